"""
The CLIP image and text towers (Radford et al. 2021), which MLCD trains (An et al., ECCV 2024).
Reading other checkpoint formats and exporting to Hugging Face: checkpoints.py.

VisionTransformer: conv patch embedding -> [class token; patches] + position embedding -> ln_pre
-> pre-norm blocks -> ln_post(class token) -> linear projection. With position='rope2d' (the
MLCD authors' later towers, transformers' MLCDVisionModel) there is no position table: 2D rotary
embeddings turn q and k in every block, and any image size works as is.
TextTransformer: token + position embedding -> causal pre-norm blocks -> ln_final ->
projection of the end-of-text token (the highest id in the sequence).
"""

import torch
import torch.utils.checkpoint  # noqa: F401 (torch.utils.checkpoint.checkpoint)
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: a GPU kernel; CPU machines and CI use torch's SDPA
    from flash_attn import flash_attn_func
except Exception:
    flash_attn_func = None


def flash_supports(head_dim, capability):
    """flash-attn 2's limits: an Ampere or newer GPU (compute capability 8.0+), heads of <= 256."""
    return tuple(capability) >= (8, 0) and head_dim <= 256


# the least capable visible GPU's compute capability, read once (flash-attn is used only if all
# of them run it; an older GPU, a V100 or T4, takes SDPA)
GPU_CAPABILITY = (min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
                  if flash_attn_func is not None and torch.cuda.is_available() else (0, 0))

# -----------------------------------------------------------------------------
# building blocks


def attention(q, k, v, causal=False):
    """The one place attention is computed. q, k, v: [B, T, heads, head_dim] -> same shape.
    softmax(q k^T / sqrt(head_dim)) v, with a causal mask if asked."""
    if (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and flash_supports(q.shape[-1], GPU_CAPABILITY)):
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
    attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
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


def run_blocks(blocks, x, checkpointing, *args):
    """x through the blocks. checkpointing (open_clip's grad_checkpointing): under autograd each
    block keeps only its input and recomputes its activations in the backward, one more forward
    of compute for a tower's activations cut to one [B, N, width] tensor per block (the numbers
    are the same: the recomputation runs the same kernels on the same inputs)."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


class VisionTransformer(nn.Module):

    def __init__(self, image_size=224, patch_size=16, width=768, layers=12, heads=12, embed_dim=512,
                 mlp_ratio=4.0, act='quick_gelu', ln_eps=1e-5, proj=True, position='learned',
                 rope_theta=10000.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f'image_size {image_size} is not a multiple of patch_size '
                             f'{patch_size}')
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
        self.grad_checkpointing = False  # a run's memory setting, not the architecture's: no config
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
        return run_blocks(self.blocks, x, self.grad_checkpointing, rope)

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



def text_config(embed_dim, preset='', width=0, layers=0, heads=0):
    """The text tower for an image tower of output width embed_dim: the preset whose embedding
    width is embed_dim (ViT-B: 512, ViT-L: 768, ViT-T/4: 128), else ViT-B's with embed_dim set to
    it; `preset` names one instead; width, layers, heads override the preset's (0: keep)."""
    name = preset or next((k for k, v in PRESETS.items() if v['text']['embed_dim'] == embed_dim), 'ViT-B/16')
    if name not in PRESETS:
        raise ValueError(f"text_preset {name!r} is not one of {', '.join(PRESETS)}")
    cfg = dict(PRESETS[name]['text'], embed_dim=embed_dim)
    cfg.update({k: v for k, v in (('width', width), ('layers', layers), ('heads', heads)) if v})
    return cfg


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
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_weights(self, width, layers)

    def forward(self, ids):
        """[B, T<=context_length] int64 CLIP BPE ids -> [B, embed_dim] (not L2-normalised)."""
        T = ids.shape[1]
        if T > self.context_length:
            raise ValueError(f'text of length {T} exceeds context_length {self.context_length}')
        x = self.token_embed(ids) + self.pos_embed[:T]
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
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
# presets: the paper's towers (OpenAI CLIP's ViT-B/32, B/16, L/14 architectures) and tiny
# CPU ones


def _preset(image_size, patch, width, layers, heads, embed, t_width, t_layers, t_heads,
            act='quick_gelu'):
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
# augmentation-aware image embedding (UniCLIP, Lee et al., NeurIPS 2022; our reading of it)


class AugAwareVision(nn.Module):
    """A VisionTransformer whose pooled feature gets an embedding of the augmentation that made
    the view, added before the projection: proj(ln_post(class token) + mlp(aug)). Views can then
    be compared in the loss without forcing the tower to be invariant to the augmentation.
    aug [N, aug_dim]: the loader's parameters per view: crop box (cx, cy, w, h) as fractions of
    the image, flip 0/1, then any colour parameters: brightness, contrast, saturation factors
    (1 = no change), hue shift and grayscale 0/1 (0 = none). `identity` is the vector of an
    unaugmented image (default: (0.5, 0.5, 1, 1) then zeros; lit.py passes the colour identity
    too); aug=None uses it.
    Our choices (the paper gives no code): a 2-layer GELU MLP of the raw parameters whose last
    layer starts at zero, so training starts from the plain tower. aug_dim=0: plain vision(images).
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
        self.mlp = nn.Sequential(nn.Linear(aug_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, vision.width))
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


class Towers(nn.Module):
    """The trained towers as one module, so that DDP wraps them (and all-reduces their gradients)
    together (lit.py): vision (an AugAwareVision) is None when locked, text None without
    captions."""

    def __init__(self, vision, text):
        super().__init__()
        self.vision, self.text = vision, text

    def forward(self, images, aug, texts):
        return (None if images is None else self.vision(images, aug),
                None if texts is None else self.text(texts))
