"""lit.py's instance discrimination modes, as subprocess runs on tiny towers: CLIP from scratch
(lock_image=False) trains both towers, UniCLIP (loss='uniclip') and SimCLR (loss='simclr') train
on a dataset without captions, every mode resumes bit for bit, UniCLIP on 2 gloo ranks equals one
process, UniCLIP reduced to one scale and no augmentation embedding equals SimCLR, and every
checkpoint loads with checkpoints.from_pretrained, exports and runs through probe.py."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import checkpoints
import prepare
import synthetic
import tokenizer
import model
from contrastive import simclr_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--global_batch_size=32', '--text_width=64', '--text_layers=1', '--text_heads=2',
        '--warmup_steps=2', '--learning_rate=2e-3', '--log_interval=1', '--device=cpu', '--seed=3']
# MKL may pick kernels by memory alignment, which varies from process to process; STRICT makes
# its results bitwise reproducible, which the exact-resume checks need across processes
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_CBWR='AUTO,STRICT')
UNICLIP = ['--loss=uniclip', '--color_jitter=0.5']  # all three parts on, colour in the aug code


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """syn: 160 captioned synthetic images; img: the same images as class folders (no captions,
    as CIFAR-10 is); vision.pt: a 2-block ViT-T/4 to start the trained towers from."""
    d = tmp_path_factory.mktemp('baselines')
    prepare.build('synthetic', str(d / 'syn'), image_size=32, count=160, seed=0, workers=1, progress=False)
    for i in range(160):
        img, _, cls = synthetic.synthetic_one(i, 32, 0)
        os.makedirs(d / 'folders' / f'c{cls}', exist_ok=True)
        Image.fromarray(img).save(d / 'folders' / f'c{cls}' / f'{i:03d}.png')
    prepare.build(str(d / 'folders'), str(d / 'img'), image_size=32, workers=1, progress=False)
    torch.manual_seed(0)
    vision, _ = model.create('ViT-T/4', layers=2)
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict()}, d / 'vision.pt')
    return d


def cmd(setup, out, *args, data_dir='syn'):
    files = [a for a in args if not a.startswith('--')]  # config files first: --keys override them
    return ['lit.py', *files, f'--data_dir={setup / data_dir}',
            f'--vision_checkpoint={setup / "vision.pt"}', f'--out_dir={setup / out}', *TINY,
            *[a for a in args if a.startswith('--')]]


def lit(setup, out, *args, nproc=1, data_dir='syn'):
    if nproc == 1:
        pre = [sys.executable]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        pre = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
               f'--master_port={port}']
    p = subprocess.run(pre + cmd(setup, out, *args, data_dir=data_dir), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == json.load(open(setup / out / 'lit.json'))
    return result, [json.loads(line) for line in open(setup / out / 'log.jsonl')]


def fails(setup, out, *args, data_dir='syn'):
    p = subprocess.run([sys.executable] + cmd(setup, out, *args, data_dir=data_dir), cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    return p.stderr.strip().splitlines()[-1]


def ckpt(setup, out):
    return torch.load(setup / out / 'ckpt.pt', weights_only=True)


def same(a, b):
    """Bitwise equality of two checkpoints' nested tensors (dicts, lists of tensors)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


# -----------------------------------------------------------------------------
# each mode trains

@pytest.fixture(scope='module')
def clip_run(setup):
    return lit(setup, 'clip', '--lock_image=False', '--max_steps=10', '--augment=none')


def test_clip_from_scratch_trains_both_towers(setup, clip_run):
    result, log = clip_run
    losses = [r['loss'] for r in log]
    assert len(losses) == 10 and np.mean(losses[-3:]) < losses[0] - 0.3, losses  # ln 32 = 3.47
    assert result['vision_unchanged'] is None and result['setup']['lock_image'] is False
    src = torch.load(setup / 'vision.pt', weights_only=True)['vision']
    ck = ckpt(setup, 'clip')
    assert set(ck['vision']) == set(src)
    moved = [k for k in src if not torch.equal(src[k], ck['vision'][k])]
    assert len(moved) == len(src), set(src) - set(moved)  # every image-tower tensor was trained
    assert 'aug_vision' not in ck and 0 < float(ck['logit_scale']) <= np.log(100) + 1e-6
    # Adam moments for the image tower too: it is in the optimizer
    n_params = len(src) + len(ck['text']) + 1
    assert len(ck['optimizer']['state']) == n_params


def view_loss(vision, data_dir):
    """NT-Xent at temperature 0.1 of pairs of augmented views that no training run drew (loader
    seeds 100-102), over every image: how well a tower tells its images apart."""
    total = []
    for seed in range(100, 103):
        loader = data.Loader(data_dir, 32, vision.image_size, augment='rrc', views=2, seed=seed,
                             color_jitter=0.5)
        for s in range(loader.steps_per_epoch):
            with torch.no_grad():
                e = vision(loader.batch(0, s)['images'].flatten(0, 1)).view(2, 32, -1)
            total.append(simclr_loss(e, 10.0).item())
    return np.mean(total)


def test_uniclip_and_simclr_train_without_captions(setup):
    start, _ = checkpoints.from_pretrained(str(setup / 'vision.pt'), image_size=16)
    before = view_loss(start, str(setup / 'img'))
    for name, args in (('uni_img', UNICLIP), ('sim_img', ['--loss=simclr', '--color_jitter=0.5'])):
        result, log = lit(setup, name, *args, '--max_steps=20', '--image_size=16', data_dir='img')
        assert result['setup']['text'] is False and result['views'] == 2 and len(log) == 20
        ck = ckpt(setup, name)
        assert 'text' not in ck and ck['vision_config']['image_size'] == 16
        vision, text = checkpoints.from_pretrained(str(setup / name / 'ckpt.pt'))
        assert text is None and vision.image_size == 16
        # the loss of single batches jumps with their augmentations: measure on fixed ones
        after = view_loss(vision, str(setup / 'img'))
        assert after < before - 0.05, (name, before, after)
    assert 'aug_vision' in ckpt(setup, 'uni_img') and ckpt(setup, 'uni_img')['setup']['aug_dim'] == 10
    # captions are required where the loss needs them, and said so in one line
    last = fails(setup, 'clip_img', '--lock_image=False', '--max_steps=2', data_dir='img')
    assert 'has no captions' in last and 'simclr' in last, last


def test_uniclip_with_one_scale_and_no_aug_embedding_is_simclr(setup):
    """Two views, no captions, one shared scale, no augmentation code: MP-NCE's denominators are
    NT-Xent's, so the two scripts' runs (two different loss implementations) must agree."""
    common = ['--max_steps=4', '--model=ViT-T/4', '--image_size=16']
    _, a = lit(setup, 'eq_uni', '--loss=uniclip', '--domain_similarity=False', '--aug_embed=False',
               *common, data_dir='img')
    _, b = lit(setup, 'eq_sim', '--loss=simclr', *common, data_dir='img')
    assert np.allclose([r['loss'] for r in a], [r['loss'] for r in b], rtol=1e-5, atol=0)
    assert np.allclose([r['scales'][0] for r in a], [r['logit_scale'] for r in b], rtol=1e-5)
    va, vb = ckpt(setup, 'eq_uni')['vision'], ckpt(setup, 'eq_sim')['vision']
    assert all(torch.allclose(va[k], vb[k], rtol=1e-4, atol=1e-5) for k in va)


# -----------------------------------------------------------------------------
# exact resume, 2 ranks

@pytest.mark.parametrize('mode', ['clip', 'uniclip', 'simclr'])
def test_resume_is_exact(setup, mode):
    args, data_dir = {'clip': (['--lock_image=False'], 'syn'), 'uniclip': (UNICLIP, 'syn'),
                      'simclr': (['--loss=simclr', '--color_jitter=0.5'], 'img')}[mode]
    args = [*args, '--max_steps=6']
    _, whole = lit(setup, f'{mode}_whole', *args, data_dir=data_dir)
    lit(setup, f'{mode}_parts', *args, '--stop_at=3', data_dir=data_dir)
    assert ckpt(setup, f'{mode}_parts')['step'] == 3
    _, parts = lit(setup, f'{mode}_parts', *args, '--init_from=resume', data_dir=data_dir)
    assert [r['step'] for r in parts] == list(range(1, 7))
    assert [r['loss'] for r in parts] == [r['loss'] for r in whole]  # bitwise, from JSON
    a, b = ckpt(setup, f'{mode}_whole'), ckpt(setup, f'{mode}_parts')
    for key in ('vision', 'aug_vision', 'text', 'logit_scale', 'similarity', 'optimizer'):
        assert (key in a) == (key in b) and (key not in a or same(a[key], b[key])), key
    # torch's RNG too (numpy's and Python's are unseeded and unused: they differ per process)
    assert torch.equal(a['rng'][0]['torch'], b['rng'][0]['torch'])
    assert ('aug_vision' in a) == (mode == 'uniclip') and ('text' in a) == (mode != 'simclr')


def test_uniclip_two_ranks_match_one_process(setup):
    # the loader seeds augmentation per rank, so views agree across rank counts only without it;
    # the two views are then the same image (a positive pair of equal embeddings)
    args = [*UNICLIP, '--augment=none', '--max_steps=3']
    _, one = lit(setup, 'uni_one', *args)
    two, two_log = lit(setup, 'uni_two', *args, nproc=2)
    assert two['world_size'] == 2
    assert np.allclose([r['loss'] for r in one], [r['loss'] for r in two_log], rtol=1e-5, atol=0)
    for k in ('scales', 'offsets'):
        assert np.allclose([r[k] for r in one], [r[k] for r in two_log], rtol=1e-5, atol=1e-6)
    a, b = ckpt(setup, 'uni_one'), ckpt(setup, 'uni_two')
    # the key bias (middle third of qkv.bias) has an exactly zero gradient (softmax ignores a
    # constant added to every key's score), so Adam turns rounding noise into +-lr steps there
    for key in ('aug_vision', 'text'):
        for sd in (a[key], b[key]):
            for name in [n for n in sd if n.endswith('attn.qkv.bias')]:
                q, _, v = sd.pop(name).chunk(3)
                sd[name + '.q'], sd[name + '.v'] = q, v
        bad = [n for n in a[key] if not torch.allclose(a[key][n], b[key][n], rtol=1e-4, atol=1e-5)]
        assert not bad, (key, bad)
    assert same(a['similarity'].keys(), b['similarity'].keys())
    assert all(torch.allclose(a['similarity'][k], b['similarity'][k], rtol=1e-5, atol=1e-6)
               for k in a['similarity'])


# -----------------------------------------------------------------------------
# checkpoints: from_pretrained, export, probe


def test_checkpoints_load_export_and_probe(setup, clip_run, tmp_path):
    lit(setup, 'uni_probe', *UNICLIP, '--max_steps=3')
    ck = ckpt(setup, 'uni_probe')
    vision, text = checkpoints.from_pretrained(str(setup / 'uni_probe' / 'ckpt.pt'))
    # 'vision' is the tower of the unaugmented embedding: the trained augmentation-aware tower with
    # the loader's parameters of a view left as it is (whole image, no flip, colour factors 1)
    aware = model.AugAwareVision(model.VisionTransformer(**ck['vision_config']), 10,
                                 identity=[0.5, 0.5, 1, 1, 0, 1, 1, 1, 0, 0])
    aware.load_state_dict(ck['aug_vision'])
    assert not torch.allclose(aware.mlp[2].weight, torch.zeros(()))  # the aug code was trained
    x = next(data.eval_batches(str(setup / 'syn'), 8, 32))[1]
    ident = torch.tensor([0.5, 0.5, 1, 1, 0, 1, 1, 1, 0, 0]).expand(8, -1)
    with torch.no_grad():
        assert torch.allclose(vision(x), aware(x, ident), atol=1e-5)
        assert not torch.allclose(vision(x), aware.vision(x), atol=1e-3)  # the fold matters
        checkpoints.export_hf(vision, str(tmp_path / 'hf'))
        again, _ = checkpoints.from_pretrained(str(tmp_path / 'hf'))
        assert torch.allclose(again(x), vision(x), atol=1e-5)
    for name in ('uni_probe', 'clip', 'uni_img'):
        d = 'img' if name == 'uni_img' else 'syn'
        if not (setup / name / 'ckpt.pt').exists():  # run alone: train it here
            lit(setup, name, *UNICLIP, '--max_steps=2', data_dir=d)
        p = subprocess.run([sys.executable, 'probe.py', f'--checkpoint={setup / name / "ckpt.pt"}',
                            f'--train_dir={setup / d}', f'--test_dir={setup / d}',
                            f'--retrieval_dir={setup / d}', f'--out_dir={tmp_path / name}',
                            '--max_iter=20', '--device=cpu'],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.load(open(tmp_path / name / 'probe.json'))
        assert 0 <= res['linear_probe']['top1'] <= 1 and res['linear_probe']['n_test'] == 160
        if name == 'uni_img':
            assert 'skipped' in res['zero_shot'] and 'skipped' in res['retrieval']
        else:
            assert 0 <= res['zero_shot']['top1'] <= 1 and 0 <= res['retrieval']['i2t_R@1'] <= 1


# -----------------------------------------------------------------------------
# settings and what they refuse


def test_cut_captions_give_the_same_text_embeddings():
    # lit.py cuts each batch after its last end token: causal attention and end-token pooling
    # make the padding behind it irrelevant
    torch.manual_seed(0)
    text = model.TextTransformer(width=64, layers=2, heads=2, embed_dim=32)
    ids = torch.from_numpy(tokenizer.tokenize(['a red circle', 'a blue square and a green star '
                                                'on a white background', 'x']).astype(np.int64))
    n = int(ids.argmax(1).max()) + 1
    assert n < 20
    with torch.no_grad():
        assert torch.allclose(text(ids[:, :n]), text(ids), atol=1e-5)
        assert not torch.allclose(text(ids[:, :n - 1]), text(ids), atol=1e-3)  # the end token counts


def test_folding_keeps_the_random_state():
    # lit.py folds the tower at every checkpoint: building the plain tower must not draw from the
    # run's random stream
    torch.manual_seed(0)
    aware = model.AugAwareVision(model.VisionTransformer(image_size=8, patch_size=4, width=8,
                                                         layers=1, heads=2, embed_dim=6), 5)
    before = torch.get_rng_state()
    aware.folded()
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_settings_stop_with_one_line(setup):
    last = fails(setup, 'x1', '--loss=uniclip', '--precompute_features=True')
    assert 'precompute_features needs a frozen image tower' in last, last
    last = fails(setup, 'x2', '--loss=simclr', '--views=3')
    assert "loss='simclr' takes views=2" in last, last
    last = fails(setup, 'x3', '--loss=moco')
    assert "loss must be 'clip', 'uniclip' or 'simclr'" in last, last
    last = fails(setup, 'x4', '--lock_image=False', '--model=ViT-Z/1')
    assert 'model' in last and 'ViT-T/4' in last, last
    # a resume must ask for what the checkpoint holds
    lit(setup, 'x5', *UNICLIP, '--max_steps=2', '--stop_at=1')
    last = fails(setup, 'x5', *UNICLIP, '--max_steps=2', '--aug_embed=False', '--init_from=resume')
    assert 'aug_dim=10 (now 0)' in last and 'resume with the settings' in last, last


@pytest.mark.parametrize('name', ['clip_tiny', 'uniclip_tiny', 'simclr_cifar10', 'uniclip_cifar10'])
def test_configs_run(setup, name):
    """The config files as given (ViT-T/4; ViT-T/8 at 32 px for CIFAR-10), two steps of a small batch."""
    d = 'img' if 'cifar' in name else 'syn'
    result, log = lit(setup, f'cfg_{name}', f'config/{name}.py', '--max_steps=2', '--log_interval=1',
                      '--global_batch_size=32', data_dir=d)
    vision, text = checkpoints.from_pretrained(str(setup / f'cfg_{name}' / 'ckpt.pt'))
    assert vision.config['layers'] == (4 if 'cifar' in name else 6)
    assert vision.image_size == (32 if 'cifar' in name else 16)
    assert (text is None) == ('cifar' in name) and len(log) == 2
