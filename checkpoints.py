"""
Reading and writing other people's checkpoints: one entry point, from_pretrained(path), returns
(VisionTransformer, TextTransformer or None) from this project's ckpt.pt, OpenAI CLIP (TorchScript
archive or state dict), open_clip, or a Hugging Face CLIP / MLCDVisionModel directory; export_hf
writes a vision tower as a Hugging Face directory. Foreign keys are renamed onto ours, the
architecture is inferred from the tensor shapes, and the weights are loaded strictly.
No code stored in a checkpoint ever runs (see docs/checkpoints.md).
"""

import collections
import json
import math
import os
import pickle
import re
import zipfile

import torch
import torch.nn.functional as F

from model import ACTS, TextTransformer, VisionTransformer

# -----------------------------------------------------------------------------
# the entry point; this project's checkpoints, OpenAI CLIP and open_clip


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
            raise ValueError(f'{path}: directory has neither config.json (Hugging Face) nor '
                             'open_clip weights')
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
        text = (_build(TextTransformer, ckpt['text_config'], ckpt['text'], path)
                if 'text_config' in ckpt else None)
        return vision, text

    sd = ckpt.get('state_dict', ckpt)  # open_clip training checkpoints wrap the weights
    sd = {re.sub(r'^module\.', '', k): v for k, v in sd.items() if torch.is_tensor(v)}
    if 'visual.conv1.weight' not in sd:
        raise ValueError(f'{source}: not a CLIP checkpoint we know (no visual.conv1.weight, '
                         f'vision_config or config.json); its keys: [{_names(sd)}]')
    towers, unexpected = _rename(sd, OPENAI_RULES, OPENAI_BLOCK, OPENAI_TRANSPOSED)
    if unexpected:
        raise ValueError(f'{source}: unexpected keys for an OpenAI/open_clip CLIP: '
                         f'[{_names(unexpected)}]')
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


# -----------------------------------------------------------------------------
# Hugging Face: CLIPModel, CLIPVisionModel(WithProjection), MLCDVisionModel


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
                  intermediate_size=round(c['width'] * c['mlp_ratio']),
                  num_hidden_layers=c['layers'], num_attention_heads=c['heads'],
                  image_size=c['image_size'], patch_size=c['patch_size'],
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
# their keys onto ours. Each rule: (regex on their key, tower, our key); tower None means a known
# key we do not use. '{block}' in our key is the block's inner name, mapped through the format's
# block table.

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
    more = f' ... ({len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


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


# -----------------------------------------------------------------------------
# the architecture from the tensor shapes, then a strict load


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
    s = _shapes(sd, ['token_embed.weight', 'pos_embed', 'proj.weight', 'blocks.0.mlp.fc.weight'],
                source)
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
                         f'missing keys [{_names(missing)}]; '
                         f'unexpected keys [{_names(unexpected)}]; '
                         f'wrong shapes [{_names(wrong)}]')
    model.load_state_dict(sd)
    return model


def resize_pos_embed(pos_embed, grid):
    """[1 + g*g, D] -> [1 + grid*grid, D]: bicubic interpolation over the g x g patch grid,
    the class token's embedding untouched; returned as is when the grid does not change."""
    n, D = pos_embed.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
        raise ValueError(f'position embedding of {n} rows is not 1 + a square grid')
    if g == grid:
        return pos_embed
    # rows are (h, w) row-major
    patches = pos_embed[1:].reshape(1, g, g, D).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode='bicubic', align_corners=False,
                            antialias=True)  # Keys' a=-0.5 cubic, as open_clip and timm resize
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, D).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], patches])

# -----------------------------------------------------------------------------
# reading files without running their code


def _load_weights(path):
    """a state dict (or our checkpoint dict) from a file; never unpickles arbitrary objects. An
    empty, truncated or unreadable file is a one-line ValueError naming it."""
    try:
        if os.path.getsize(path) == 0:  # torch.load would say "EOFError: "
            raise ValueError(f'{path}: empty file (0 bytes)')
        return _read_weights(path)
    except FileNotFoundError:
        raise ValueError(f'{path}: missing') from None
    except ValueError as e:
        if str(e).startswith(path):  # ours, already naming the file
            raise
        raise ValueError(f'{path}: truncated or not a checkpoint ({_reader_line(e)})') from None
    except Exception as e:  # the readers' own: RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f'{path}: truncated or not a checkpoint ({_reader_line(e)})') from None


def _reader_line(e, limit=120):
    """A reader's error, short: torch's zip reader appends four sentences of advice to "failed
    reading zip archive: failed finding central directory"; a weights_only refusal opens with a
    paragraph on PyTorch 2.6 and gives the reason (the global or opcode refused) below it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Weights only load failed'):
        lines = [x for x in (line.split('WeightsUnpickler error:')[-1].strip()
                             for line in lines[1:]) if x]
    msg = lines[0].split('. ')[0].rstrip('.') if lines else ''
    msg = f'{type(e).__name__}: {msg}' if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[:limit - 3] + '...'


def _read_weights(path):
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
    return torch.load(path, map_location='cpu', weights_only=True)


# A TorchScript archive (OpenAI's CLIP .pt files) is a zip: <name>/data.pkl pickles the module tree
# (each module a `__torch__.*` class), tensors point at raw storages in <name>/data/<key>.
# torch.jit.load would compile and run the archive's code (a class's __setstate__ could write
# files), so a restricted unpickler reads the pickle instead: it resolves only the tensor rebuild
# function, storage dtypes, OrderedDict and TorchScript's list builders, and each `__torch__.*`
# class becomes an inert holder of its pickled attributes.

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
