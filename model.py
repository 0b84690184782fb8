"""
The CLIP image and text towers (Radford et al. 2021), which MLCD trains (An et al., ECCV 2024),
plus loading of OpenAI / open_clip / Hugging Face CLIP and MLCD weights and export to Hugging Face.

VisionTransformer: conv patch embedding -> [class token; patches] + position embedding -> ln_pre
-> pre-norm blocks -> ln_post(class token) -> linear projection. With position='rope2d' (the
MLCD authors' later towers, transformers' MLCDVisionModel) there is no position table: 2D rotary
embeddings turn q and k in every block, and any image size works as is.
TextTransformer: token + position embedding -> causal pre-norm blocks -> ln_final ->
projection of the end-of-text token (the highest id in the sequence).
"""

import collections
import json
import math
import os
import pickle
import random
import re
import zipfile

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: a GPU kernel; CPU machines and CI use torch's SDPA
    from flash_attn import flash_attn_func
except Exception:
    flash_attn_func = None

# -----------------------------------------------------------------------------
# building blocks


def attention(q, k, v, causal=False):
    """The one place attention is computed. q, k, v: [B, T, heads, head_dim] -> same shape.
    softmax(q k^T / sqrt(head_dim)) v, with a causal mask if asked."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=causal)  # takes [B, T, h, d] directly
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants [B, h, T, d]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)


def rope2d(cls_angles, grid_h, grid_w, theta=10000.0):
    """cos, sin [1 + grid_h * grid_w, head_dim] of MLCD's 2D rotary position embedding (RoFormer,
    Su et al. 2021, made axial): half of each head's dims turn with the patch's row and half with
    its column, at frequencies theta^(-4i / head_dim); the class token turns by its own learnt
    head_dim / 2 angles. Patches in row-major order, as the patch convolution flattens them."""
    half = cls_angles.shape[-1]  # head_dim // 2
    dev = cls_angles.device
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=dev) / half)
    rows = torch.arange(grid_h, device=dev).repeat_interleave(grid_w).float()
    cols = torch.arange(grid_w, device=dev).repeat(grid_h).float()
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=1)  # [N, half]
    angles = torch.cat([cls_angles.float().view(1, half), angles])
    angles = torch.cat([angles, angles], dim=1)  # dim i pairs with i + head_dim/2 (rotate_half)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, T, heads, head_dim] rotated by the angles in cos, sin [T, head_dim], in float32:
    x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1] for the halves x1, x2."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class QuickGELU(nn.Module):
    # the sigmoid approximation of GELU that OpenAI's CLIP weights were trained with
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTS = {'quick_gelu': QuickGELU, 'gelu': nn.GELU}


class Attention(nn.Module):

    def __init__(self, width, heads, causal):
        super().__init__()
        assert width % heads == 0, f'width {width} is not divisible by heads {heads}'
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)  # fused q, k, v: OpenAI's in_proj maps onto it as is
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).unbind(2)
        if rope is not None:  # (cos, sin) of rope2d(): positions enter through q and k only
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.proj(attention(q, k, v, self.causal).reshape(B, T, C))


class MLP(nn.Module):

    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = ACTS[act]()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):

    def __init__(self, width, heads, mlp_ratio, act, ln_eps, causal):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, round(width * mlp_ratio), act)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        x = x + self.mlp(self.ln_2(x))
        return x


def block_flops(tokens, width, hidden):
    """Forward FLOPs of one block on one sequence, counting 2 FLOPs per multiply-add (so that
    MFU = flops / time / peak is right). Attention is counted densely, also when causal."""
    T, D = tokens, width
    return (2 * T * D * 3 * D       # qkv projection
            + 2 * T * T * D         # q k^T
            + 2 * T * T * D         # attention-weighted sum of v
            + 2 * T * D * D         # output projection
            + 2 * 2 * T * D * hidden)  # mlp fc and proj


def init_weights(model, width, layers):
    # OpenAI CLIP's initialisation: residual branch outputs are scaled down with depth
    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for block in model.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.normal_(block.attn.proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.proj.weight, std=proj_std)
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            nn.init.zeros_(lin.bias)
    if model.proj is not None:
        nn.init.normal_(model.proj.weight, std=width ** -0.5)

# -----------------------------------------------------------------------------
# the two towers


class VisionTransformer(nn.Module):

    def __init__(self, image_size=224, patch_size=16, width=768, layers=12, heads=12, embed_dim=512,
                 mlp_ratio=4.0, act='quick_gelu', ln_eps=1e-5, proj=True, position='learned',
                 rope_theta=10000.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f'image_size {image_size} is not a multiple of patch_size {patch_size}')
        if act not in ACTS:
            raise ValueError(f'act must be one of {sorted(ACTS)}, got {act!r}')
        if position not in ('learned', 'rope2d'):
            raise ValueError(f"position must be 'learned' or 'rope2d', got {position!r}")
        if position == 'rope2d' and (width // heads) % 4:
            raise ValueError(f'rope2d needs a head width divisible by 4, got {width // heads}')
        embed_dim = embed_dim if proj else width  # the output dimension of forward()
        self.config = dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                           heads=heads, embed_dim=embed_dim, mlp_ratio=mlp_ratio, act=act,
                           ln_eps=ln_eps, proj=proj, position=position, rope_theta=rope_theta)
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.embed_dim, self.rope_theta = embed_dim, rope_theta
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.cls_token = nn.Parameter(width ** -0.5 * torch.randn(width))
        if position == 'learned':  # one row per token of the image_size grid, class token first
            self.pos_embed = nn.Parameter(width ** -0.5 * torch.randn(self.grid ** 2 + 1, width))
            self.cls_rope = None
        else:  # rotary: only the class token's angles are learnt (transformers' init)
            self.pos_embed = None
            half = width // heads // 2
            self.cls_rope = nn.Parameter(half ** -0.5 * torch.randn(half))
        self.ln_pre = nn.LayerNorm(width, eps=ln_eps)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, ln_eps, causal=False)
                                    for _ in range(layers))
        self.ln_post = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False) if proj else None
        init_weights(self, width, layers)

    def forward_tokens(self, x):
        """[B, 3, H, W] normalised pixels -> [B, 1 + N, width]: all tokens after the last block,
        class token first, before ln_post (what transformers calls last_hidden_state).
        A rope2d tower takes any H, W that are multiples of patch_size (N = H/p * W/p)."""
        H, W = x.shape[-2:]
        if self.pos_embed is not None and (H, W) != (self.image_size, self.image_size):
            raise ValueError(f'expected {self.image_size}x{self.image_size} images, got '
                             f'{(H, W)}; build the model with that image_size')
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f'image size {(H, W)} is not a multiple of patch_size '
                             f'{self.patch_size}')
        x = self.patch_embed(x)  # [B, width, H/p, W/p]
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N, width], row-major patches
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        else:
            rope = rope2d(self.cls_rope, grid_h, grid_w, self.rope_theta)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x, rope)
        return x

    def forward(self, x):
        """[B, 3, H, W] normalised pixels -> [B, embed_dim], projected and not L2-normalised
        (with proj=False: the pooled post-ln class token, [B, width])."""
        x = self.ln_post(self.forward_tokens(x)[:, 0])
        return self.proj(x) if self.proj is not None else x

    def flops(self):
        """Forward FLOPs per image (2 per multiply-add) at self.image_size."""
        c = self.config
        N, D = self.grid ** 2, self.width
        f = 2 * N * D * 3 * self.patch_size ** 2  # patch embedding
        f += c['layers'] * block_flops(N + 1, D, round(D * c['mlp_ratio']))
        f += 2 * D * self.embed_dim if self.proj is not None else 0
        return f

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


class TextTransformer(nn.Module):

    def __init__(self, context_length=77, vocab_size=49408, width=512, layers=12, heads=8,
                 embed_dim=512, mlp_ratio=4.0, act='quick_gelu', ln_eps=1e-5):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f'act must be one of {sorted(ACTS)}, got {act!r}')
        self.config = dict(context_length=context_length, vocab_size=vocab_size, width=width,
                           layers=layers, heads=heads, embed_dim=embed_dim, mlp_ratio=mlp_ratio,
                           act=act, ln_eps=ln_eps)
        self.context_length, self.width, self.embed_dim = context_length, width, embed_dim
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, ln_eps, causal=True)
                                    for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_weights(self, width, layers)

    def forward(self, ids):
        """[B, T<=context_length] int64 CLIP BPE ids -> [B, embed_dim] (not L2-normalised)."""
        T = ids.shape[1]
        if T > self.context_length:
            raise ValueError(f'text of length {T} exceeds context_length {self.context_length}')
        x = self.token_embed(ids) + self.pos_embed[:T]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        # the end-of-text token has the highest id; causal attention makes it see the whole text
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return self.proj(x)

    def flops(self):
        """Forward FLOPs per text of context_length tokens (2 per multiply-add)."""
        c = self.config
        T, D = self.context_length, self.width
        return c['layers'] * block_flops(T, D, round(D * c['mlp_ratio'])) + 2 * D * self.embed_dim

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

# -----------------------------------------------------------------------------
# presets: the paper's models (DESIGN table, OpenAI CLIP architectures) and a tiny CPU model


def _preset(image_size, patch, width, layers, heads, embed, t_width, t_layers, t_heads, act='quick_gelu'):
    vision = dict(image_size=image_size, patch_size=patch, width=width, layers=layers, heads=heads,
                  embed_dim=embed, act=act)
    text = dict(context_length=77, vocab_size=49408, width=t_width, layers=t_layers, heads=t_heads,
                embed_dim=embed, act=act)
    return dict(vision=vision, text=text)


PRESETS = {
    'ViT-B/32': _preset(224, 32, 768, 12, 12, 512, 512, 12, 8),
    'ViT-B/16': _preset(224, 16, 768, 12, 12, 512, 512, 12, 8),
    'ViT-L/14': _preset(224, 14, 1024, 24, 16, 768, 768, 12, 12),
    'ViT-L/14-336': _preset(336, 14, 1024, 24, 16, 768, 768, 12, 12),
    'ViT-T/4': _preset(32, 4, 192, 6, 3, 128, 128, 3, 2, act='gelu'),  # CPU tests and small runs
    'ViT-T/8': _preset(32, 8, 128, 4, 4, 128, 128, 3, 2, act='gelu'),  # CIFAR on a CPU (17 tokens)
}
# the same tiny tower with MLCD's 2D rotary position embedding instead of a position table
PRESETS['ViT-T/4-rope'] = {**PRESETS['ViT-T/4'], 'vision': {**PRESETS['ViT-T/4']['vision'],
                                                             'position': 'rope2d'}}


def create(name, **vision_overrides):
    """-> (VisionTransformer, TextTransformer) of a preset; keyword arguments override the vision
    tower's settings (an embed_dim override applies to the text tower too, so they still match)."""
    if name not in PRESETS:
        raise ValueError(f'unknown model {name!r}; presets: {", ".join(PRESETS)}')
    vcfg = {**PRESETS[name]['vision'], **vision_overrides}
    tcfg = {**PRESETS[name]['text']}
    if 'embed_dim' in vision_overrides:
        tcfg['embed_dim'] = vision_overrides['embed_dim']
    return VisionTransformer(**vcfg), TextTransformer(**tcfg)

# -----------------------------------------------------------------------------
# position embeddings at another image size


def resize_pos_embed(pos_embed, grid):
    """[1 + g*g, D] -> [1 + grid*grid, D]: bicubic interpolation over the g x g patch grid,
    the class token's embedding untouched; returned as is when the grid does not change."""
    n, D = pos_embed.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
        raise ValueError(f'position embedding of {n} rows is not 1 + a square grid')
    if g == grid:
        return pos_embed
    patches = pos_embed[1:].reshape(1, g, g, D).permute(0, 3, 1, 2).float()  # rows are (h, w) row-major
    patches = F.interpolate(patches, size=(grid, grid), mode='bicubic', align_corners=False,
                            antialias=True)  # Keys' a=-0.5 cubic, as open_clip and timm resize
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, D).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], patches])

# -----------------------------------------------------------------------------
# loading other people's checkpoints: rename their keys onto ours, infer the architecture from the
# tensor shapes, then load strictly. Each rule: (regex on their key, tower, our key); tower None
# means a known key we do not use. '{block}' in our key is the block's inner name, mapped through
# the format's block table.

OPENAI_RULES = [  # OpenAI CLIP and open_clip (which kept OpenAI's names)
    (r'logit_scale|input_resolution|context_length|vocab_size|.*attn_mask', None, None),
    (r'visual\.conv1\.weight', 'vision', 'patch_embed.weight'),
    (r'visual\.class_embedding', 'vision', 'cls_token'),
    (r'visual\.positional_embedding', 'vision', 'pos_embed'),
    (r'visual\.ln_pre\.(weight|bias)', 'vision', r'ln_pre.\1'),
    (r'visual\.transformer\.resblocks\.(\d+)\.(.+)', 'vision', r'blocks.\1.{block}'),
    (r'visual\.ln_post\.(weight|bias)', 'vision', r'ln_post.\1'),
    (r'visual\.proj', 'vision', 'proj.weight'),  # stored [width, embed]: transposed below
    (r'token_embedding\.weight', 'text', 'token_embed.weight'),
    (r'positional_embedding', 'text', 'pos_embed'),
    (r'transformer\.resblocks\.(\d+)\.(.+)', 'text', r'blocks.\1.{block}'),
    (r'ln_final\.(weight|bias)', 'text', r'ln_final.\1'),
    (r'text_projection', 'text', 'proj.weight'),  # stored [width, embed]: transposed below
]
OPENAI_BLOCK = {'ln_1': 'ln_1', 'attn.in_proj': 'attn.qkv', 'attn.out_proj': 'attn.proj',
                'ln_2': 'ln_2', 'mlp.c_fc': 'mlp.fc', 'mlp.c_proj': 'mlp.proj'}
OPENAI_TRANSPOSED = {'visual.proj', 'text_projection'}

HF_RULES = [  # transformers CLIPModel / CLIPVisionModel(WithProjection) / MLCDVisionModel;
    # 'vision_model.' is absent from the vision-only files written by transformers >= 5
    (r'logit_scale|.*position_ids|(?:vision_model\.)?vision_rotary_embedding\..*', None, None),
    (r'(?:vision_model\.)?class_pos_emb', 'vision', 'cls_rope'),  # MLCD: [1, head_dim/2]
    (r'(?:vision_model\.)?embeddings\.class_embedding', 'vision', 'cls_token'),
    (r'(?:vision_model\.)?embeddings\.patch_embedding\.weight', 'vision', 'patch_embed.weight'),
    (r'(?:vision_model\.)?embeddings\.position_embedding\.weight', 'vision', 'pos_embed'),
    (r'(?:vision_model\.)?pre_layrnorm\.(weight|bias)', 'vision', r'ln_pre.\1'),
    (r'(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)', 'vision', r'blocks.\1.{block}'),
    (r'(?:vision_model\.)?post_layernorm\.(weight|bias)', 'vision', r'ln_post.\1'),
    (r'visual_projection\.weight', 'vision', 'proj.weight'),
    (r'text_model\.embeddings\.token_embedding\.weight', 'text', 'token_embed.weight'),
    (r'text_model\.embeddings\.position_embedding\.weight', 'text', 'pos_embed'),
    (r'text_model\.encoder\.layers\.(\d+)\.(.+)', 'text', r'blocks.\1.{block}'),
    (r'text_model\.final_layer_norm\.(weight|bias)', 'text', r'ln_final.\1'),
    (r'text_projection\.weight', 'text', 'proj.weight'),
]
HF_BLOCK = {'layer_norm1': 'ln_1', 'self_attn.q_proj': 'attn.q', 'self_attn.k_proj': 'attn.k',
            'self_attn.v_proj': 'attn.v', 'self_attn.out_proj': 'attn.proj', 'layer_norm2': 'ln_2',
            'mlp.fc1': 'mlp.fc', 'mlp.fc2': 'mlp.proj'}


def _names(keys, limit=12):
    keys = sorted(keys)
    return ', '.join(keys[:limit]) + (f' ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def _rename(sd, rules, block_table, transposed=()):
    """their state dict -> ({'vision': ours, 'text': ours}, [their keys no rule knows])."""
    towers, unexpected = {'vision': {}, 'text': {}}, []
    for key, value in sd.items():
        for pattern, tower, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                break
        else:
            unexpected.append(key)
            continue
        if tower is None:
            continue
        name = m.expand(target)
        if '{block}' in name:  # e.g. 'attn.in_proj_weight' -> 'attn.qkv.weight'
            module, _, param = m.group(2).replace('in_proj_', 'in_proj.').rpartition('.')
            if module not in block_table:
                unexpected.append(key)
                continue
            name = name.replace('{block}', f'{block_table[module]}.{param}')
        towers[tower][name] = value.t() if key in transposed else value
    for sd in towers.values():  # separate q, k, v projections -> one fused qkv Linear
        for name in [n for n in sd if re.fullmatch(r'blocks\.\d+\.attn\.q\.(weight|bias)', n)]:
            parts = [name.replace('.q.', f'.{p}.') for p in 'qkv']
            if all(p in sd for p in parts):
                sd[name.replace('.q.', '.qkv.')] = torch.cat([sd.pop(p) for p in parts])
    return towers, unexpected


def _shapes(sd, required, source):
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f'{source}: missing keys [{_names(missing)}] (in our names)')
    return {k: sd[k].shape for k in required}


def _vision_config(sd, source, head_width=64, image_size=None):
    """architecture of a vision tower from its (renamed) weights; heads are not visible in a
    position table tower's weights: CLIP's convention is head width 64 unless the format's config
    says otherwise. A rope2d tower's class angles give its head width, its config the image size."""
    s = _shapes(sd, ['patch_embed.weight', 'blocks.0.mlp.fc.weight'], source)
    width, _, patch, _ = s['patch_embed.weight']
    if 'cls_rope' in sd:
        position, head_width = 'rope2d', 2 * sd['cls_rope'].numel()
    else:
        position = 'learned'
        image_size = math.isqrt(_shapes(sd, ['pos_embed'], source)['pos_embed'][0] - 1) * patch
    proj = 'proj.weight' in sd
    return dict(image_size=image_size, patch_size=patch, width=width,
                layers=len({k.split('.')[1] for k in sd if k.startswith('blocks.')}),
                heads=width // head_width, embed_dim=sd['proj.weight'].shape[0] if proj else width,
                mlp_ratio=s['blocks.0.mlp.fc.weight'][0] / width, proj=proj, position=position)


def _text_config(sd, source, heads=None):
    s = _shapes(sd, ['token_embed.weight', 'pos_embed', 'proj.weight', 'blocks.0.mlp.fc.weight'], source)
    vocab, width = s['token_embed.weight']
    return dict(context_length=s['pos_embed'][0], vocab_size=vocab, width=width,
                layers=len({k.split('.')[1] for k in sd if k.startswith('blocks.')}),
                heads=heads or width // 64, embed_dim=s['proj.weight'][0],
                mlp_ratio=s['blocks.0.mlp.fc.weight'][0] / width)


def _build(cls, cfg, sd, source, image_size=None):
    """construct cls(**cfg) and load sd strictly; a mismatch is a ValueError naming the keys."""
    sd = {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in sd.items()}  # DDP / compile
    if image_size is not None and cls is VisionTransformer and image_size != cfg['image_size']:
        if 'pos_embed' in sd:
            sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], image_size // cfg['patch_size'])
        cfg = {**cfg, 'image_size': image_size}
    model = cls(**cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}' for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f'{source}: weights do not fit {cls.__name__}({cfg}): '
                         f'missing keys [{_names(missing)}]; unexpected keys [{_names(unexpected)}]; '
                         f'wrong shapes [{_names(wrong)}]')
    model.load_state_dict(sd)
    return model


def _load_weights(path):
    """a state dict (or our checkpoint dict) from a file; never unpickles arbitrary objects."""
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f'{path}: reading .safetensors needs the safetensors package '
                             '(pip install safetensors)') from None
        return load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith('constants.pkl') for n in z.namelist()):
                return _torchscript_weights(z, path)  # OpenAI's released CLIP .pt files
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f'{path}: not a readable checkpoint (torch.load weights_only=True: '
                         f'{type(e).__name__}: {first})') from None


# TorchScript archives (OpenAI's CLIP .pt files) are zip files: <name>/data.pkl pickles the module
# tree (each module a `__torch__.*` class with its attributes), tensors point at raw storages in
# <name>/data/<key>, <name>/code/ holds the modules' TorchScript code. torch.jit.load compiles and
# runs that code, a class's __setstate__ included: loading an archive could write files. Here the
# pickle is read with a restricted unpickler instead: the only globals it resolves are the tensor
# rebuild function, storage dtypes, OrderedDict and TorchScript's identity list builders; a
# `__torch__.*` class becomes an inert stand-in holding its pickled attributes. No code from the
# archive is imported or run.

class _ScriptObject:
    """stands in for a `__torch__.*` class of an archive: the attributes its pickle holds."""
    __slots__ = ('attrs',)

    def __setstate__(self, state):  # pickle's BUILD
        if not isinstance(state, dict):  # the class has its own __getstate__ / __setstate__ code
            raise pickle.UnpicklingError(f'TorchScript class {type(self).__name__} stores a custom '
                                         'state that only its own code could read')
        self.attrs = state


_STORAGE_DTYPES = {f'{n}Storage': getattr(torch, d) for n, d in [
    ('Float', 'float32'), ('Double', 'float64'), ('Half', 'float16'), ('BFloat16', 'bfloat16'),
    ('Long', 'int64'), ('Int', 'int32'), ('Short', 'int16'), ('Char', 'int8'), ('Byte', 'uint8'),
    ('Bool', 'bool')]}


def _rebuild_tensor(storage, offset, size, stride, *_):  # requires_grad, hooks, metadata: unused
    if not (torch.is_tensor(storage) and isinstance(offset, int)
            and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise pickle.UnpicklingError('malformed tensor record')
    return storage.as_strided(size, stride, offset)  # raises if it reaches outside the storage


class _TorchScriptUnpickler(pickle.Unpickler):

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix, self.storages, self.classes = archive, prefix, {}, {}

    def find_class(self, module, name):  # every global of the pickle goes through here
        if module == '__torch__' or module.startswith('__torch__.'):
            key = f'{module}.{name}'
            if key not in self.classes:  # a fresh inert class per TorchScript class name
                self.classes[key] = type(name, (_ScriptObject,), {'__slots__': ()})
            return self.classes[key]
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return _rebuild_tensor
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if module == 'torch.jit._pickle' and name.startswith('build_') and name.endswith('list'):
            return lambda data: data
        if (module, name) == ('torch.jit._pickle', 'restore_type_tag'):
            return lambda value, type_str: value
        raise pickle.UnpicklingError(f'global {module}.{name} is not allowed in TorchScript '
                                     'weights')

    def persistent_load(self, pid):  # ('storage', dtype, key, location, numel) -> flat tensor
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f'unexpected persistent id {pid!r:.80}')
        dtype, key = pid[1], pid[2]
        if key not in self.storages:
            data = bytearray(self.archive.read(f'{self.prefix}/data/{key}'))
            if len(data) % dtype.itemsize:
                raise pickle.UnpicklingError(f'storage {key}: {len(data)} bytes is not a whole '
                                             f'number of {dtype}')
            self.storages[key] = (torch.frombuffer(data, dtype=dtype) if data
                                  else torch.empty(0, dtype=dtype))
        if self.storages[key].dtype != dtype:
            raise pickle.UnpicklingError(f'storage {key} is read as two dtypes')
        return self.storages[key]


def _torchscript_weights(z, source):
    """{name: tensor} of every tensor attribute in the module tree of a TorchScript archive (its
    parameters and buffers, as state_dict() would name them), without running its code."""
    pkls = [n for n in z.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
    if len(pkls) != 1:
        raise ValueError(f'{source}: a TorchScript archive without one <name>/data.pkl '
                         '(the pre-2020 JSON format is not supported)')
    prefix = pkls[0].split('/')[0]
    if f'{prefix}/byteorder' in z.namelist() and z.read(f'{prefix}/byteorder').strip() != b'little':
        raise ValueError(f'{source}: a big-endian TorchScript archive is not supported')
    try:
        with z.open(pkls[0]) as f:
            root = _TorchScriptUnpickler(f, z, prefix).load()
    except (pickle.UnpicklingError, KeyError, RuntimeError, ValueError, TypeError, EOFError) as e:
        raise ValueError(f'{source}: TorchScript archive not readable as weights: {e}') from None
    out, seen, todo = {}, set(), [('', root)]
    while todo:  # breadth-first over submodules; shared modules are visited once
        name, obj = todo.pop(0)
        if not isinstance(obj, _ScriptObject) or id(obj) in seen:
            continue
        seen.add(id(obj))
        for k, v in getattr(obj, 'attrs', {}).items():
            if torch.is_tensor(v):
                out[name + k] = v.detach()  # drops anything the pickle attached (hooks, grad)
            elif isinstance(v, _ScriptObject):
                todo.append((f'{name}{k}.', v))
    return out


def _hf_dir(path):
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):  # sharded
        with open(index) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
    else:
        files = [n for n in ('model.safetensors', 'pytorch_model.bin')
                 if os.path.exists(os.path.join(path, n))][:1]
    if not files:
        raise ValueError(f'{path}: no model.safetensors or pytorch_model.bin next to config.json')
    sd = {}
    for f in files:
        sd.update(_load_weights(os.path.join(path, f)))
    return config, sd


def _hf_act(cfg, source, default='quick_gelu'):  # transformers' CLIP default
    act = cfg.get('hidden_act', default)
    if act not in ACTS:
        raise ValueError(f'{source}: hidden_act {act!r} is not supported (one of {sorted(ACTS)})')
    return act


def from_pretrained(path, image_size=None, act=None):
    """-> (VisionTransformer, TextTransformer or None) from
    - our checkpoints: a torch.save'd dict with 'vision_config', 'vision' (+ 'text_config', 'text');
    - OpenAI CLIP .pt files (TorchScript archive or plain state dict) and open_clip checkpoints
      (plain, or wrapped in 'state_dict' with 'module.' prefixes; a directory or a file with an
      open_clip_config.json beside it); these weights do not record the activation: OpenAI's is
      QuickGELU (the default here), pass act='gelu' for open_clip models trained with GELU;
    - Hugging Face directories (config.json + model.safetensors / pytorch_model.bin) of a
      CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection or MLCDVisionModel (2D RoPE). A
      CLIPVisionModel or MLCDVisionModel has no projection: its vision(x) is the pooled
      post-layernorm class token, as transformers returns.
    No code stored in a checkpoint runs: TorchScript archives are read as zip files, all else
    with torch.load(weights_only=True) or safetensors.
    image_size: build the vision tower for this size, interpolating the position embeddings (a
    rope2d tower takes any size as is; image_size only sets the size it reports)."""
    path = os.fspath(path)
    source, oc_config = path, None
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, 'config.json')):
            return _from_hf(path, image_size)
        for name in ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin'):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise ValueError(f'{path}: directory has neither config.json (Hugging Face) nor open_clip weights')
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such checkpoint file')
    oc = os.path.join(os.path.dirname(path), 'open_clip_config.json')
    if os.path.exists(oc):
        with open(oc) as f:
            oc_config = json.load(f).get('model_cfg', {})
    ckpt = _load_weights(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f'{path}: expected a state dict, got {type(ckpt).__name__}')

    if 'vision_config' in ckpt:  # ours
        for key in ('vision',) + (('text',) if 'text_config' in ckpt else ()):
            if key not in ckpt:
                raise ValueError(f'{path}: checkpoint has {key}_config but no {key!r} key')
        vision = _build(VisionTransformer, ckpt['vision_config'], ckpt['vision'], path, image_size)
        text = _build(TextTransformer, ckpt['text_config'], ckpt['text'], path) if 'text_config' in ckpt else None
        return vision, text

    sd = ckpt.get('state_dict', ckpt)  # open_clip training checkpoints wrap the weights
    sd = {re.sub(r'^module\.', '', k): v for k, v in sd.items() if torch.is_tensor(v)}
    if 'visual.conv1.weight' not in sd:
        raise ValueError(f'{source}: not a CLIP checkpoint we know (no visual.conv1.weight, vision_config '
                         f'or config.json); its keys: [{_names(sd)}]')
    towers, unexpected = _rename(sd, OPENAI_RULES, OPENAI_BLOCK, OPENAI_TRANSPOSED)
    if unexpected:
        raise ValueError(f'{source}: unexpected keys for an OpenAI/open_clip CLIP: [{_names(unexpected)}]')
    head_width, text_heads = 64, None
    if oc_config is not None:  # open_clip's config knows what the weights do not
        act = act or ('quick_gelu' if oc_config.get('quick_gelu') else 'gelu')
        head_width = oc_config.get('vision_cfg', {}).get('head_width', 64)
        text_heads = oc_config.get('text_cfg', {}).get('heads')
    act = act or 'quick_gelu'
    vcfg = {**_vision_config(towers['vision'], source, head_width), 'act': act}
    vision = _build(VisionTransformer, vcfg, towers['vision'], source, image_size)
    text = None
    if towers['text']:
        tcfg = {**_text_config(towers['text'], source, text_heads), 'act': act}
        text = _build(TextTransformer, tcfg, towers['text'], source)
    return vision, text


def _hf_image_size(vconf, source):
    size = vconf.get('image_size', 224)
    if isinstance(size, (list, tuple)):  # [height, width]
        if len(set(size)) != 1:
            raise ValueError(f'{source}: non-square image_size {size} is not supported')
        size = size[0]
    return int(size)


def _check_inv_freq(sd, vcfg, source):
    """a stored rotary frequency buffer (files of some converters carry one) must be ours."""
    half = vcfg['width'] // vcfg['heads'] // 2
    ours = 1.0 / vcfg['rope_theta'] ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
    for k, v in sd.items():
        if k.endswith('rotary_embedding.inv_freq') and not (
                v.shape == ours.shape and torch.allclose(v.float(), ours, rtol=1e-4, atol=0)):
            raise ValueError(f'{source}: {k} is not theta^(-4i/head_dim) with rope_theta '
                             f'{vcfg["rope_theta"]}: other rotary frequencies are not supported')


def _from_hf(path, image_size=None):
    config, sd = _hf_dir(path)
    towers, unexpected = _rename(sd, HF_RULES, HF_BLOCK)
    if unexpected:
        raise ValueError(f'{path}: unexpected keys for a Hugging Face CLIP / MLCD: '
                         f'[{_names(unexpected)}]')
    # CLIPModel nests the tower configs; CLIPVisionModel's config is the vision config itself
    vconf = config.get('vision_config', config)
    vsd = towers['vision']
    if vconf.get('model_type') == 'mlcd_vision_model' and 'cls_rope' not in vsd:
        raise ValueError(f'{path}: an MLCDVisionModel without class_pos_emb')
    if 'cls_rope' in vsd:
        vsd['cls_rope'] = vsd['cls_rope'].reshape(-1)
    vcfg = _vision_config(vsd, path, image_size=_hf_image_size(vconf, path))
    rope2d = vcfg['position'] == 'rope2d'
    heads = vconf.get('num_attention_heads', vcfg['heads'] if rope2d else 12)
    if rope2d:
        if heads != vcfg['heads']:
            raise ValueError(f'{path}: num_attention_heads {heads} does not fit class_pos_emb of '
                             f'{vsd["cls_rope"].numel()} (head width / 2)')
        rope = vconf.get('rope_parameters') or {}
        if rope.get('rope_type', 'axial') != 'axial':
            raise ValueError(f"{path}: rope_type {rope['rope_type']!r} is not supported (axial)")
        vcfg['rope_theta'] = float(rope.get('rope_theta', vconf.get('rope_theta', 10000.0)))
        _check_inv_freq(sd, vcfg, path)
    vcfg.update(heads=heads, act=_hf_act(vconf, path, 'gelu' if rope2d else 'quick_gelu'),
                ln_eps=vconf.get('layer_norm_eps', 1e-5))
    vision = _build(VisionTransformer, vcfg, vsd, path, image_size)
    text = None
    if towers['text']:
        tconf = config.get('text_config', {})
        tcfg = _text_config(towers['text'], path, tconf.get('num_attention_heads', 8))
        eos, top = tconf.get('eos_token_id', 2), tcfg['vocab_size'] - 1
        if eos not in (2, top):  # 2: transformers' legacy value, meaning "pool at the highest id"
            raise ValueError(f'{path}: text eos_token_id {eos} is not the highest id {top}; '
                             'this text tower pools at the highest id, as CLIP does')
        tcfg.update(act=_hf_act(tconf, path), ln_eps=tconf.get('layer_norm_eps', 1e-5))
        text = _build(TextTransformer, tcfg, towers['text'], path)
    return vision, text


def export_hf(vision, directory):
    """write vision as a Hugging Face vision directory (config.json + model.safetensors, or
    pytorch_model.bin without safetensors): a position table tower as a CLIP vision model that
    transformers' CLIPVisionModel.from_pretrained loads; with a projection the files are a
    CLIPVisionModelWithProjection (a superset: the CLIPVisionModel class loads them too and skips
    visual_projection.weight). A rope2d tower as an MLCDVisionModel; transformers has no MLCD class
    with a projection, so visual_projection.weight is written for from_pretrained here, and
    transformers' MLCDVisionModel reports it unexpected and skips it."""
    c = vision.config
    rope = c['position'] == 'rope2d' 
    hf = {}
    for k, v in vision.state_dict().items():
        m = re.fullmatch(r'blocks\.(\d+)\.(.+)\.(weight|bias)', k)
        if m and m.group(2) == 'attn.qkv':
            for name, part in zip(('q_proj', 'k_proj', 'v_proj'), v.chunk(3)):
                hf[f'vision_model.encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(3)}'] = part
            continue
        if m:
            inner = {ours: theirs for theirs, ours in HF_BLOCK.items()}[m.group(2)]
            hf[f'vision_model.encoder.layers.{m.group(1)}.{inner}.{m.group(3)}'] = v
            continue
        hf[{'cls_token': 'vision_model.embeddings.class_embedding',
            'patch_embed.weight': 'vision_model.embeddings.patch_embedding.weight',
            'pos_embed': 'vision_model.embeddings.position_embedding.weight',
            'ln_pre.weight': 'vision_model.pre_layrnorm.weight',
            'ln_pre.bias': 'vision_model.pre_layrnorm.bias',
            'ln_post.weight': 'vision_model.post_layernorm.weight',
            'ln_post.bias': 'vision_model.post_layernorm.bias',
            'cls_rope': 'vision_model.class_pos_emb',
            'proj.weight': 'visual_projection.weight'}[k]] = v[None] if k == 'cls_rope' else v
    hf = {k: v.detach().cpu().contiguous().clone() for k, v in hf.items()}
    dtype = str(next(iter(hf.values())).dtype).removeprefix('torch.')
    if rope:
        arch, extra = ['MLCDVisionModel'], dict(
            model_type='mlcd_vision_model', num_key_value_groups=1,
            rope_parameters=dict(rope_type='axial', rope_theta=c['rope_theta']))
    else:
        arch = ['CLIPVisionModelWithProjection' if c['proj'] else 'CLIPVisionModel']
        extra = dict(model_type='clip_vision_model')
    config = dict(architectures=arch, **extra, hidden_size=c['width'],
                  intermediate_size=round(c['width'] * c['mlp_ratio']), num_hidden_layers=c['layers'],
                  num_attention_heads=c['heads'], image_size=c['image_size'], patch_size=c['patch_size'],
                  hidden_act=c['act'], layer_norm_eps=c['ln_eps'], num_channels=3,
                  projection_dim=vision.embed_dim, attention_dropout=0.0, initializer_factor=1.0,
                  initializer_range=0.02, torch_dtype=dtype)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(hf, os.path.join(directory, 'pytorch_model.bin'))
    else:
        save_file(hf, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})


# -----------------------------------------------------------------------------
# checkpoint helpers shared by train.py and lit.py


def atomic_save(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(device):
    """Every RNG a training step draws from, as plain types and tensors (weights_only loads it)."""
    s, py = np.random.get_state(), random.getstate()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if torch.device(device).type == 'cuda' else None,
            'numpy': [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])],
            'python': [py[0], list(py[1]), py[2]]}


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    if torch.device(device).type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'], device)
    np.random.set_state((state['numpy'][0], np.array(state['numpy'][1], dtype=np.uint32), *state['numpy'][2:]))
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))

# -----------------------------------------------------------------------------
# augmentation-aware image embedding (UniCLIP, Lee et al., NeurIPS 2022; our reading of it)


class AugAwareVision(nn.Module):
    """A VisionTransformer whose pooled feature gets an embedding of the augmentation that made
    the view, added before the projection: proj(ln_post(class token) + mlp(aug)). Views can then
    be compared in the loss without forcing the tower to be invariant to the augmentation.
    aug [N, aug_dim]: the loader's parameters per view: crop box (cx, cy, w, h) as fractions of
    the image, flip 0/1, then any colour parameters as offsets from no change. `identity` is the
    vector of an unaugmented image (default: (0.5, 0.5, 1, 1) then zeros); aug=None uses it.
    Our choices (the paper gives no code): raw parameters into a 2-layer GELU MLP, added to the
    pooled feature (not concatenated); its last layer starts at zero, so training starts from
    the plain tower. aug_dim=0 turns the embedding off: forward is vision(images), aug ignored.
    folded() is the plain tower of the unaugmented embedding, for evaluation and export."""

    def __init__(self, vision, aug_dim, identity=None, hidden=0):
        super().__init__()
        self.vision, self.aug_dim = vision, aug_dim
        if not aug_dim:
            return
        identity = [0.5, 0.5, 1.0, 1.0] + [0.0] * (aug_dim - 4) if identity is None else identity
        if len(identity) != aug_dim:
            raise ValueError(f'identity has {len(identity)} values, aug_dim is {aug_dim}')
        self.register_buffer('identity', torch.tensor(identity, dtype=torch.float32))
        hidden = hidden or vision.width
        self.mlp = nn.Sequential(nn.Linear(aug_dim, hidden), nn.GELU(), nn.Linear(hidden, vision.width))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, images, aug=None):
        """images [N, 3, H, W], aug [N, aug_dim] or None -> [N, embed_dim] (not L2-normalised)."""
        if not self.aug_dim:
            return self.vision(images)
        x = self.vision.ln_post(self.vision.forward_tokens(images)[:, 0])
        if aug is None:
            aug = self.identity.expand(x.shape[0], -1)
        if aug.shape != (x.shape[0], self.aug_dim):
            raise ValueError(f'aug must be [{x.shape[0]}, {self.aug_dim}], got {tuple(aug.shape)}')
        x = x + self.mlp(aug.to(x.dtype))
        return self.vision.proj(x) if self.vision.proj is not None else x

    @torch.no_grad()
    def folded(self):
        """A plain VisionTransformer equal to forward(images) with the identity augmentation: the
        constant mlp(identity) is added to ln_post's bias. What probe.py and export_hf read."""
        p = self.vision.ln_post.bias
        with torch.random.fork_rng(devices=[]):  # building a tower draws random weights: keep
            out = VisionTransformer(**self.vision.config)  # a training run's RNG untouched
        out = out.to(p.device, p.dtype)
        out.load_state_dict(self.vision.state_dict())
        if self.aug_dim:
            out.ln_post.bias += self.mlp(self.identity[None].to(p.dtype))[0]
        return out
