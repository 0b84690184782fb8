"""model.py and checkpoints.py against independent references: transformers' CLIP (which defines the Hugging Face
format), the same weights rewritten in OpenAI / open_clip layout, a float64 attention formula, and
the ViT FLOP formula."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import model
import transformers  # the reference for the Hugging Face format (requirements-dev.txt)


WIDTH, T_WIDTH, EMBED = 128, 64, 48  # head width 64, as OpenAI / open_clip weights assume


def hf_clip(act, seed=0):
    """a random-weight transformers CLIPModel with a small config."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=T_WIDTH, intermediate_size=4 * T_WIDTH, num_hidden_layers=2,
                         num_attention_heads=1, vocab_size=49408, max_position_embeddings=77,
                         hidden_act=act, eos_token_id=2 if act == 'quick_gelu' else 49407),  # both pooling rules
        vision_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=EMBED)
    m = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # transformers zero-inits biases and sets LayerNorm to 1/0: perturb them
        for name, p in m.named_parameters():
            if name.endswith('bias') or 'norm' in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(1, 49406, (3, 77), generator=g)
    for row, eot in enumerate([5, 20, 76]):  # end-of-text (highest id) then padding zeros
        ids[row, eot] = 49407
        ids[row, eot + 1:] = 0
    return x, ids


def features(obj):  # transformers 5 returns an output object from get_*_features, 4.x a tensor
    return obj if torch.is_tensor(obj) else obj.pooler_output


def reference(m, x, ids):
    with torch.no_grad():
        return features(m.get_image_features(pixel_values=x)), features(m.get_text_features(input_ids=ids))


def ours(path, x, ids, **kw):
    vision, text = checkpoints.from_pretrained(str(path), **kw)
    with torch.no_grad():
        return vision(x), (text(ids) if text is not None else None), vision, text


def to_openai(m):
    """transformers CLIPModel weights rewritten in OpenAI CLIP's layout (independently of model.py)."""
    sd, out = m.state_dict(), {}
    for tower, prefix in (('vision_model', 'visual.'), ('text_model', '')):
        layers = m.config.vision_config.num_hidden_layers if tower == 'vision_model' else m.config.text_config.num_hidden_layers
        for i in range(layers):
            a, b = f'{tower}.encoder.layers.{i}.', f'{prefix}transformer.resblocks.{i}.'
            for p in ('weight', 'bias'):
                out[f'{b}attn.in_proj_{p}'] = torch.cat([sd[f'{a}self_attn.{n}_proj.{p}'] for n in 'qkv'])
                out[f'{b}attn.out_proj.{p}'] = sd[f'{a}self_attn.out_proj.{p}']
                out[f'{b}ln_1.{p}'] = sd[f'{a}layer_norm1.{p}']
                out[f'{b}ln_2.{p}'] = sd[f'{a}layer_norm2.{p}']
                out[f'{b}mlp.c_fc.{p}'] = sd[f'{a}mlp.fc1.{p}']
                out[f'{b}mlp.c_proj.{p}'] = sd[f'{a}mlp.fc2.{p}']
    for p in ('weight', 'bias'):
        out[f'visual.ln_pre.{p}'] = sd[f'vision_model.pre_layrnorm.{p}']
        out[f'visual.ln_post.{p}'] = sd[f'vision_model.post_layernorm.{p}']
        out[f'ln_final.{p}'] = sd[f'text_model.final_layer_norm.{p}']
    out['visual.conv1.weight'] = sd['vision_model.embeddings.patch_embedding.weight']
    out['visual.class_embedding'] = sd['vision_model.embeddings.class_embedding']
    out['visual.positional_embedding'] = sd['vision_model.embeddings.position_embedding.weight']
    out['visual.proj'] = sd['visual_projection.weight'].t().contiguous()
    out['token_embedding.weight'] = sd['text_model.embeddings.token_embedding.weight']
    out['positional_embedding'] = sd['text_model.embeddings.position_embedding.weight']
    out['text_projection'] = sd['text_projection.weight'].t().contiguous()
    out['logit_scale'] = sd['logit_scale']
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope='module', params=['quick_gelu', 'gelu'])
def clip(request, tmp_path_factory):
    m = hf_clip(request.param)
    path = tmp_path_factory.mktemp('hf') / 'clip'
    m.save_pretrained(path)
    x, ids = inputs()
    return m, path, x, ids, reference(m, x, ids)


def test_hf_clipmodel(clip):
    m, path, x, ids, (img, txt) = clip
    v, t, vision, text = ours(path, x, ids)
    assert vision.config['act'] == m.config.vision_config.hidden_act
    assert vision.embed_dim == text.embed_dim == EMBED and vision.image_size == 32
    torch.testing.assert_close(v, img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, txt, atol=1e-5, rtol=1e-5)


def test_hf_clipvisionmodel(clip, tmp_path):
    m, _, x, _, _ = clip
    hv = transformers.CLIPVisionModel(m.config.vision_config).eval()
    hv.load_state_dict({k[len('vision_model.'):]: v for k, v in m.state_dict().items()
                        if k.startswith('vision_model.')})
    hv.save_pretrained(tmp_path / 'vis')
    with torch.no_grad():
        out = hv(pixel_values=x)
    v, t, vision, _ = ours(tmp_path / 'vis', x, None)
    assert t is None and vision.config['proj'] is False and vision.embed_dim == WIDTH
    torch.testing.assert_close(v, out.pooler_output, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # all tokens = transformers' last_hidden_state
        torch.testing.assert_close(vision.forward_tokens(x), out.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_openai_and_open_clip_layouts(clip, tmp_path):
    m, _, x, ids, (img, txt) = clip
    sd = to_openai(m)
    act = m.config.vision_config.hidden_act
    kw = {} if act == 'quick_gelu' else {'act': 'gelu'}  # OpenAI weights are QuickGELU by default
    # plain OpenAI state dict
    torch.save(sd, tmp_path / 'openai.pt')
    # open_clip training checkpoint: wrapped in 'state_dict', DDP 'module.' prefixes
    torch.save({'epoch': 3, 'name': 'run', 'state_dict': {'module.' + k: v for k, v in sd.items()}},
               tmp_path / 'epoch_3.pt')
    # open_clip release directory, with the config that records the activation
    os.makedirs(tmp_path / 'oc')
    torch.save(sd, tmp_path / 'oc' / 'open_clip_pytorch_model.bin')
    with open(tmp_path / 'oc' / 'open_clip_config.json', 'w') as f:
        json.dump({'model_cfg': {'embed_dim': EMBED, 'quick_gelu': act == 'quick_gelu',
                                 'vision_cfg': {'width': WIDTH, 'head_width': 64},
                                 'text_cfg': {'width': T_WIDTH, 'heads': 1}}}, f)
    for path, extra in ((tmp_path / 'openai.pt', kw), (tmp_path / 'epoch_3.pt', kw), (tmp_path / 'oc', {})):
        v, t, vision, text = ours(path, x, ids, **extra)
        assert vision.config['act'] == text.config['act'] == act, path
        torch.testing.assert_close(v, img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t, txt, atol=1e-5, rtol=1e-5)


class Holder(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.jit: the format OpenAI released
def test_openai_torchscript_archive(tmp_path):
    """OpenAI's .pt files are TorchScript archives whose state_dict() holds the weights plus
    input_resolution / context_length / vocab_size tensors; build one with the same names."""
    m = hf_clip('quick_gelu', seed=2)  # OpenAI's models are QuickGELU
    x, ids = inputs()
    img, txt = reference(m, x, ids)
    sd = to_openai(m)
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    root = Holder()
    for key, value in sd.items():
        *path, name = key.split('.')
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, Holder())
            mod = getattr(mod, p)
        mod.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.save(torch.jit.script(root), tmp_path / 'ViT-tiny.pt')
    v, t, _, _ = ours(tmp_path / 'ViT-tiny.pt', x, ids)
    torch.testing.assert_close(v, img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, txt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('proj', [True, False])
def test_export_hf_roundtrip(tmp_path, proj):
    torch.manual_seed(0)
    vision = model.VisionTransformer(image_size=32, patch_size=8, width=WIDTH, layers=2, heads=2,
                                     embed_dim=EMBED, act='gelu', proj=proj).eval()
    checkpoints.export_hf(vision, tmp_path / 'hf')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours_out = vision(x)
        pooled = vision.ln_post(vision.forward_tokens(x)[:, 0])
        hv = transformers.CLIPVisionModel.from_pretrained(tmp_path / 'hf').eval()
        torch.testing.assert_close(hv(pixel_values=x).pooler_output, pooled, atol=1e-5, rtol=1e-5)
        if proj:
            hp = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / 'hf').eval()
            torch.testing.assert_close(hp(pixel_values=x).image_embeds, ours_out, atol=1e-5, rtol=1e-5)
        back, text = checkpoints.from_pretrained(str(tmp_path / 'hf'))  # and back into ours
        assert text is None and back.config == vision.config
        torch.testing.assert_close(back(x), ours_out, atol=0, rtol=0)


def test_our_checkpoint_and_create(tmp_path):
    torch.manual_seed(0)
    vision, text = model.create('ViT-T/4')
    assert (vision.image_size, vision.embed_dim, text.embed_dim) == (32, 128, 128)
    assert model.VisionTransformer(**vision.config).config == vision.config
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict(), 'text_config': text.config,
                'text': text.state_dict(), 'logit_scale': torch.tensor(4.6), 'step': 7}, tmp_path / 'ckpt.pt')
    x, ids = inputs()
    v2, t2 = checkpoints.from_pretrained(str(tmp_path / 'ckpt.pt'))
    with torch.no_grad():
        torch.testing.assert_close(v2(x), vision(x), atol=0, rtol=0)
        torch.testing.assert_close(t2(ids), text(ids), atol=0, rtol=0)
    # a larger image size: same weights except the interpolated position embeddings
    v3, _ = checkpoints.from_pretrained(str(tmp_path / 'ckpt.pt'), image_size=48)
    assert v3.image_size == 48 and v3.pos_embed.shape == (1 + 12 * 12, 192)
    assert v3(torch.randn(1, 3, 48, 48)).shape == (1, 128)
    with pytest.raises(ValueError, match='unknown model'):
        model.create('ViT-X/1')


def test_mismatched_checkpoints_name_the_keys(clip, tmp_path):
    m, path, *_ = clip
    sd = to_openai(m)
    sd['visual.transformer.resblocks.0.ls_1.gamma'] = torch.ones(WIDTH)  # layer scale: not CLIP
    del sd['ln_final.bias']
    torch.save(sd, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match=r'resblocks\.0\.ls_1\.gamma'):
        checkpoints.from_pretrained(str(tmp_path / 'bad.pt'))
    del sd['visual.transformer.resblocks.0.ls_1.gamma']
    torch.save(sd, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match=r'missing keys \[ln_final\.bias\]'):
        checkpoints.from_pretrained(str(tmp_path / 'bad.pt'))
    # our own format with a config that does not fit the weights
    vision = model.VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=1, embed_dim=16)
    sd = vision.state_dict()
    sd['extra.weight'] = torch.zeros(1)
    torch.save({'vision_config': {**vision.config, 'layers': 2}, 'vision': sd}, tmp_path / 'ours.pt')
    with pytest.raises(ValueError, match=r'blocks\.1\.attn\.qkv\.weight.*extra\.weight'):
        checkpoints.from_pretrained(str(tmp_path / 'ours.pt'))
    torch.save({'fc.weight': torch.zeros(2, 2)}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match=r'fc\.weight'):
        checkpoints.from_pretrained(str(tmp_path / 'other.pt'))


@pytest.mark.parametrize('causal', [False, True])
def test_attention_matches_float64_formula(causal):
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 13, 3, 16
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    out = model.attention(q, k, v, causal=causal)
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float('-inf'))
    ref = (torch.softmax(s, dim=-1) @ v64).transpose(1, 2)
    assert out.shape == (B, T, H, D)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if causal:  # the first token sees only itself
        torch.testing.assert_close(out[:, 0], v[:, 0], atol=1e-6, rtol=1e-6)


def test_pos_embed_interpolation():
    torch.manual_seed(0)
    pe = torch.randn(1 + 7 * 7, 5)
    assert checkpoints.resize_pos_embed(pe, 7) is pe  # exact identity at the same size
    g, n = 7, 24  # 224/32 -> 336/14 style grid change
    rows = torch.arange(g, dtype=torch.float32).repeat_interleave(g)  # value = row index: a ramp
    ramp = torch.cat([torch.tensor([[-5.0, 3.0]]), torch.stack([rows, 2 * rows + 1], 1)])
    out = checkpoints.resize_pos_embed(ramp, n)
    assert out.shape == (1 + n * n, 2)
    assert torch.equal(out[0], ramp[0])  # class token untouched
    grid = out[1:, 0].reshape(n, n)
    assert torch.allclose(grid, grid[:, :1].expand(n, n))  # constant along each row
    col = grid[:, 0]
    assert (col.diff() >= 0).all() and col.min() >= -0.2 and col.max() <= g - 1 + 0.2  # smooth, no ringing
    src = (torch.arange(n) + 0.5) * g / n - 0.5  # pixel-centre sample positions (align_corners=False)
    inner = (src.floor() >= 1) & (src.floor() + 2 <= g - 1)  # all 4 bicubic taps inside the grid
    torch.testing.assert_close(col[inner], src[inner].float(), atol=1e-5, rtol=0)  # a ramp stays a ramp
    torch.testing.assert_close(out[1:, 1], 2 * out[1:, 0] + 1, atol=1e-5, rtol=0)  # linear in values
    # a ViT-L/14 tower moved from 224 to 336 through from_pretrained's code path
    vision = model.VisionTransformer(image_size=224, patch_size=14, width=64, layers=1, heads=1, embed_dim=8)
    big = checkpoints._build(model.VisionTransformer, vision.config, vision.state_dict(), 'test', image_size=336)
    assert big.pos_embed.shape == (1 + 24 * 24, 64) and big.image_size == 336
    same = checkpoints._build(model.VisionTransformer, vision.config, vision.state_dict(), 'test', image_size=224)
    assert torch.equal(same.pos_embed, vision.pos_embed)


def test_flops_and_params():
    with torch.device('meta'):  # shapes only: no memory, no init time
        vision, text = model.create('ViT-B/16')
    # independent count of ViT-B/16 at 224: multiply-adds (MACs) of every matmul, incl. attention
    L, D, P, T, E = 12, 768, 16, 197, 512
    macs = 196 * 3 * P * P * D                     # patch embedding
    macs += L * (T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D)  # qkv, QK^T, AV, out, MLP
    macs += D * E                                  # projection
    # flops() counts 2 FLOPs per multiply-add; the often quoted "17.5 GFLOPs" of ViT-B/16 counts
    # one per multiply-add (fvcore convention), i.e. ~17.5e9 MACs
    assert vision.flops() == 2 * macs
    assert abs(vision.flops() / 2 / 17.5e9 - 1) < 0.03
    assert abs(vision.num_params() / 86.2e6 - 1) < 0.01  # CLIP ViT-B/16 image tower: 86.2M
    assert abs(text.num_params() / 63.4e6 - 1) < 0.01  # CLIP's 12x512 text tower: 63.4M
    Tt, Dt = 77, 512
    assert text.flops() == 2 * (12 * (Tt * Dt * 3 * Dt + 2 * Tt * Tt * Dt + Tt * Dt * Dt + 2 * Tt * Dt * 4 * Dt) + Dt * E)
    with torch.device('meta'):
        v14, _ = model.create('ViT-L/14-336')
    assert (v14.image_size, v14.width, len(v14.blocks), v14.embed_dim) == (336, 1024, 24, 768)
    assert model.PRESETS['ViT-L/14']['text']['width'] == 768 and model.PRESETS['ViT-L/14']['text']['heads'] == 12


def test_without_safetensors(tmp_path, monkeypatch):
    """safetensors is a dev dependency only: export falls back to pytorch_model.bin, and reading a
    .safetensors file says what to install."""
    torch.manual_seed(0)
    vision = model.VisionTransformer(image_size=16, patch_size=8, width=64, layers=1, heads=1, embed_dim=8).eval()
    x = torch.randn(2, 3, 16, 16)
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, 'safetensors.torch', None)  # makes `import safetensors.torch` fail
        checkpoints.export_hf(vision, tmp_path / 'bin')
        assert sorted(os.listdir(tmp_path / 'bin')) == ['config.json', 'pytorch_model.bin']
        back, _ = checkpoints.from_pretrained(str(tmp_path / 'bin'))
        checkpoints.export_hf(vision, tmp_path / 'st')  # fallback again, then give it a safetensors name
        os.rename(tmp_path / 'st' / 'pytorch_model.bin', tmp_path / 'st' / 'model.safetensors')
        with pytest.raises(ValueError, match='needs the safetensors package'):
            checkpoints.from_pretrained(str(tmp_path / 'st'))
    with torch.no_grad():
        torch.testing.assert_close(back(x), vision(x), atol=0, rtol=0)
        hp = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / 'bin').eval()
        torch.testing.assert_close(hp(pixel_values=x).image_embeds, vision(x), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# 2D-RoPE towers: transformers' MLCDVisionModel is the reference

def hf_mlcd(theta=10000.0, seed=0):
    """a random-weight transformers MLCDVisionModel with a small config (head width 64)."""
    torch.manual_seed(seed)
    cfg = transformers.MLCDVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                                        num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                        patch_size=8, hidden_act='gelu',
                                        rope_parameters={'rope_type': 'axial', 'rope_theta': theta})
    m = transformers.MLCDVisionModel(cfg).eval()
    with torch.no_grad():  # zero biases and unit LayerNorms would hide mapping mistakes
        for name, p in m.named_parameters():
            if name.endswith('bias') or 'norm' in name:
                p.add_(0.1 * torch.randn_like(p))
        m.class_pos_emb.mul_(3.0)  # class token angles well away from zero
    return m


SIZES = [(32, 32), (48, 24), (64, 64)]  # the config's size, non-square, larger: no interpolation


def assert_same_as_hf(vision, hf):
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        with torch.no_grad():
            out = hf(pixel_values=x)
            tokens = vision.forward_tokens(x)
            torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-5, rtol=1e-5)
            pooled = vision.ln_post(vision.forward_tokens(x)[:, 0])
            torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('layout', ['transformers5', 'prefixed_sharded', 'prefixed_bin'])
def test_hf_mlcd_vision_model(tmp_path, layout):
    """read an MLCDVisionModel directory as transformers >= 5 writes it, and in the
    'vision_model.'-prefixed layout of the released files, sharded safetensors or a .bin."""
    m = hf_mlcd(theta=500.0 if layout == 'prefixed_sharded' else 10000.0)
    path = tmp_path / 'mlcd'
    if layout == 'transformers5':
        m.save_pretrained(path)
    else:
        m.config.save_pretrained(path)
        sd = {'vision_model.' + k: v.clone() for k, v in m.state_dict().items()}
        if layout == 'prefixed_bin':  # and a config as transformers 4 wrote it: theta implied
            conf = json.load(open(path / 'config.json'))
            del conf['rope_parameters']
            json.dump(conf, open(path / 'config.json', 'w'))
            torch.save(sd, path / 'pytorch_model.bin')
        else:
            from safetensors.torch import save_file
            names = sorted(sd)
            shards = {'model-00001-of-00002.safetensors': names[:len(names) // 2],
                      'model-00002-of-00002.safetensors': names[len(names) // 2:]}
            for f, keys in shards.items():
                save_file({k: sd[k] for k in keys}, path / f, metadata={'format': 'pt'})
            with open(path / 'model.safetensors.index.json', 'w') as f:
                json.dump({'weight_map': {k: f for f, keys in shards.items() for k in keys}}, f)
    vision, text = checkpoints.from_pretrained(str(path))
    assert text is None and vision.pos_embed is None and 'pos_embed' not in vision.state_dict()
    assert vision.config['position'] == 'rope2d' and vision.config['proj'] is False
    assert vision.config['rope_theta'] == m.config.rope_parameters['rope_theta']
    assert (vision.image_size, vision.config['heads'], vision.embed_dim) == (32, 2, WIDTH)
    assert_same_as_hf(vision, m)
    with torch.no_grad():  # vision(x) of a tower without projection: transformers' pooler_output
        x = torch.randn(2, 3, 40, 40)
        torch.testing.assert_close(vision(x), m(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-5)
    # image_size only sets the size the tower reports: the same weights, nothing interpolated
    big, _ = checkpoints.from_pretrained(str(path), image_size=64)
    assert big.image_size == 64
    for k, v in vision.state_dict().items():
        assert torch.equal(big.state_dict()[k], v), k
    # a config that does not fit the weights is named
    conf = json.load(open(path / 'config.json'))
    json.dump({**conf, 'num_attention_heads': 4}, open(path / 'config.json', 'w'))
    with pytest.raises(ValueError, match='num_attention_heads 4 does not fit class_pos_emb of 32'):
        checkpoints.from_pretrained(str(path))


@pytest.mark.parametrize('proj', [True, False])
def test_export_mlcd_roundtrip(tmp_path, proj):
    torch.manual_seed(0)
    vision = model.VisionTransformer(image_size=32, patch_size=8, width=WIDTH, layers=2, heads=2,
                                     embed_dim=EMBED, act='gelu', proj=proj,
                                     position='rope2d').eval()
    with torch.no_grad():
        for name, p in vision.named_parameters():
            if name.endswith('bias') or 'ln' in name:
                p.add_(0.1 * torch.randn_like(p))
    checkpoints.export_hf(vision, tmp_path / 'hf')
    assert json.load(open(tmp_path / 'hf' / 'config.json'))['architectures'] == ['MLCDVisionModel']
    hf = transformers.MLCDVisionModel.from_pretrained(tmp_path / 'hf').eval()
    assert_same_as_hf(vision, hf)
    back, text = checkpoints.from_pretrained(str(tmp_path / 'hf'))
    assert text is None and back.config == vision.config
    x = torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        torch.testing.assert_close(back(x), vision(x), atol=0, rtol=0)


def test_rope2d_is_relative():
    """the score of two rotated patch tokens depends on their offset only (RoFormer's property),
    over rows and columns, and rows differ from columns; rotations keep norms."""
    g = torch.Generator().manual_seed(0)
    D, gh, gw = 16, 5, 7
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    cos, sin = model.rope2d(torch.randn(D // 2, generator=g), gh, gw)

    def rot(x, r, c):  # token 1 + r * gw + c: class token first, row-major patches
        t = 1 + r * gw + c
        return model.apply_rope(x.view(1, 1, 1, D), cos[t:t + 1], sin[t:t + 1]).view(D)

    def score(a, b):
        return float(rot(q, *a) @ rot(k, *b))

    for a, b, (dr, dc) in [((0, 0), (1, 2), (3, 4)), ((4, 6), (2, 1), (-2, -1)),
                           ((1, 3), (1, 3), (2, 2))]:
        moved = score((a[0] + dr, a[1] + dc), (b[0] + dr, b[1] + dc))
        assert abs(score(a, b) - moved) < 1e-4, (a, b)
    assert abs(score((0, 0), (0, 1)) - score((0, 0), (1, 0))) > 1e-3
    assert abs(float(rot(q, 3, 5).norm()) - float(q.norm())) < 1e-5


# -----------------------------------------------------------------------------
# TorchScript archives are read without running their code

class Overwriter(torch.nn.Module):
    """a scripted module whose __setstate__ (run by torch.jit.load) writes into a file."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        self.target = target

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        victim = torch.from_file(state[1], True, 8, dtype=torch.uint8)  # shared: writes go to disk
        # the sum keeps the write alive through TorchScript's dead-code elimination
        self.weight = state[0] + 0.0 * victim.copy_(torch.full([8], 88, dtype=torch.uint8)).sum()
        self.target = state[1]
        self.training = state[2]


def scripted(tensors, **modules):
    """a TorchScript archive of Holder modules holding `tensors` under their dotted names."""
    root = Holder()
    for key, value in tensors.items():
        *path, name = key.split('.')
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, Holder())
            mod = getattr(mod, p)
        if value.is_floating_point():
            mod.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
        else:
            mod.register_buffer(name, value)
    for name, m in modules.items():
        root.add_module(name, m)
    return torch.jit.script(root)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_torchscript_code_never_runs(tmp_path):
    victim = tmp_path / 'victim.txt'
    victim.write_bytes(b'original')
    m = hf_clip('quick_gelu', seed=2)
    torch.jit.save(scripted(to_openai(m), evil=Overwriter(str(victim))), tmp_path / 'evil.pt')
    with pytest.raises(ValueError) as err:  # refused (loading code it must not run) ...
        checkpoints.from_pretrained(str(tmp_path / 'evil.pt'))
    assert victim.read_bytes() == b'original'  # ... and the file is untouched
    assert re.search(r'evil\.pt.*Overwriter.*custom state', str(err.value)), err.value
    # the same file as pytorch_model.bin of a Hugging Face directory
    os.makedirs(tmp_path / 'hf')
    os.rename(tmp_path / 'evil.pt', tmp_path / 'hf' / 'pytorch_model.bin')
    m.config.save_pretrained(tmp_path / 'hf')
    with pytest.raises(ValueError) as err:
        checkpoints.from_pretrained(str(tmp_path / 'hf'))
    assert victim.read_bytes() == b'original'
    assert 'custom state' in str(err.value)
    # what torch.jit.load would have done: the archive is a real attack
    torch.jit.load(tmp_path / 'hf' / 'pytorch_model.bin')
    assert victim.read_bytes() == b'X' * 8


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_torchscript_reader_matches_jit_load(tmp_path):
    """on a benign archive the zip reader returns exactly torch.jit.load's state_dict(): float16
    (OpenAI's released weights), views sharing a storage, offsets, integer and bool buffers."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    tensors = {'visual.proj': torch.randn(5, 3, generator=g).half(), 'visual.t': base.t(),
               'visual.row': base[2], 'visual.col': base[:, 1], 'a.b.c.scale': torch.tensor(4.6),
               'ids': torch.arange(7), 'mask': torch.rand(3, 3, generator=g) > 0.5,
               'bf': torch.randn(2, 2, generator=g).bfloat16(), 'empty': torch.zeros(0, 4)}
    torch.jit.save(scripted(tensors), tmp_path / 'ok.pt')
    ref = torch.jit.load(tmp_path / 'ok.pt').state_dict()
    got = checkpoints._load_weights(str(tmp_path / 'ok.pt'))
    assert sorted(got) == sorted(ref) == sorted(tensors)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert torch.equal(got[k], ref[k]) and torch.equal(got[k], tensors[k]), k
    # a global that is not a tensor rebuild is refused by name, before anything runs
    import zipfile
    with zipfile.ZipFile(tmp_path / 'ok.pt') as z, zipfile.ZipFile(tmp_path / 'bad.pt', 'w') as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename.endswith('/data.pkl'):
                data = b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.'  # os.system('true')
            out.writestr(item, data)
    with pytest.raises(ValueError, match=r'bad\.pt.*os\.system is not allowed'):
        checkpoints.from_pretrained(str(tmp_path / 'bad.pt'))


def test_rope_preset_trains_resumes_and_loads(tmp_path):
    """train.py with model='ViT-T/4-rope' on the synthetic set: a run stopped at step 2 and
    resumed repeats the uninterrupted one bitwise; its ckpt.pt is a rope2d tower that
    from_pretrained reads at any size and that exports to transformers' MLCDVisionModel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS='1')

    def run(*args):
        p = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

    data, labels = str(tmp_path / 'syn'), str(tmp_path / 'cluster')
    run('prepare.py', '--src=synthetic', f'--out={data}', '--count=128', '--image_size=16', '--seed=0')
    os.makedirs(labels)  # labels as cluster.py writes them: 2 centre ids per image, here random
    np.save(os.path.join(labels, 'labels.npy'),
            np.random.default_rng(0).integers(0, 16, (128, 2)).astype(np.int32))
    args = ['train.py', '--model=ViT-T/4-rope', '--image_size=16', f'--data_dir={data}',
            f'--labels_dir={labels}', '--num_positives=2', '--global_batch_size=16',
            '--micro_batch_size=8', '--max_steps=4', '--warmup_steps=1', '--learning_rate=2e-3',
            '--sample_ratio=0.5', '--log_interval=1', '--ckpt_interval=2', '--device=cpu']
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run(*args, f'--out_dir={full}')
    run(*args, f'--out_dir={part}', '--stop_at=2')
    at2 = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    run(*args, f'--out_dir={part}', '--init_from=resume')

    def log(d):
        return [(r['step'], r['loss']) for r in map(json.loads, open(os.path.join(d, 'log.jsonl')))
                if 'loss' in r]
    assert [s for s, _ in log(full)] == [1, 2, 3, 4] and log(part) == log(full)
    a = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)
    b = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    assert a['vision_config']['position'] == 'rope2d' and a['vision_config']['image_size'] == 16
    assert 'cls_rope' in a['vision'] and not any('pos_embed' in k for k in a['vision'])
    for k in a['vision']:
        assert torch.equal(a['vision'][k], b['vision'][k]), k
    assert not torch.equal(a['vision']['cls_rope'], at2['vision']['cls_rope'])  # it is trained

    ref = model.VisionTransformer(**a['vision_config']).eval()
    ref.load_state_dict(a['vision'])
    vision, _ = checkpoints.from_pretrained(os.path.join(full, 'ckpt.pt'))
    vision.eval()
    assert vision.config == ref.config
    with torch.no_grad():
        for size in (16, 32):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(vision(x), ref(x), atol=0, rtol=0)
        checkpoints.export_hf(vision, tmp_path / 'hf')
        hf = transformers.MLCDVisionModel.from_pretrained(tmp_path / 'hf').eval()
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, vision.forward_tokens(x),
                                   atol=1e-5, rtol=1e-5)


def test_visualize_writes_the_grid(tmp_path):
    """scripts/visualize.py: one row per image (the image, then each tower's PCA colours), a label
    row on top; from a dataset at 32 px and from image files."""
    from PIL import Image
    import data
    import prepare
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    syn = str(tmp_path / 'syn')
    prepare.build('synthetic', syn, image_size=32, count=5, workers=1, progress=False)
    torch.manual_seed(0)
    vision = model.VisionTransformer(**model.PRESETS['ViT-T/4-rope']['vision'])
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    os.makedirs(ckpt.parent)
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    for name in ('a.png', 'b.jpg'):
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / name)
    files = f'--images={tmp_path / "a.png"},{tmp_path / "b.jpg"}'
    cell, env = 40, dict(os.environ, OMP_NUM_THREADS='1')
    for src, rows in ((f'--data_dir={syn}', 3), (files, 2)):
        out = tmp_path / f'pca{rows}.png'
        p = subprocess.run([sys.executable, 'scripts/visualize.py', src, '--num_images=3',
                            f'--checkpoint={ckpt},init:ViT-T/4', f'--cell={cell}', f'--out={out}'],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout.splitlines()[-1])['grids'] == [8, 8]
        im = Image.open(out)
        assert im.format == 'PNG' and im.mode == 'RGB' and im.size == (3 * cell, 16 + rows * cell)
        for c in (1, 2):  # each tower's column varies over its patches
            assert np.asarray(im)[16:, c * cell:(c + 1) * cell].std() > 10
    # the first row's image cell is dataset image 0, upsampled with nearest
    first = Image.fromarray(data.Dataset(syn).images([0])[0]).resize((cell, cell), Image.NEAREST)
    grid = np.asarray(Image.open(tmp_path / 'pca3.png'))
    assert np.array_equal(grid[16:16 + cell, :cell], np.asarray(first))


def test_flash_attn_only_where_it_runs():
    """flash-attn 2 runs on compute capability 8.0+ with heads of up to 256; anything else (a V100,
    a T4, a head of 288) takes SDPA (bench/gpu.py checks that path against float64 on a GPU)."""
    assert model.flash_supports(64, (8, 0)) and model.flash_supports(256, (9, 0))
    assert not model.flash_supports(64, (7, 5)) and not model.flash_supports(64, (7, 0))
    assert not model.flash_supports(288, (9, 0))
    assert model.GPU_CAPABILITY == (0, 0) or model.flash_attn_func is not None
