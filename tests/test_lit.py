"""lit.py on the synthetic set: the contrastive loss goes down while the image tower stays bit-identical,
precomputed features give the same first loss (and the same run) as the full image forward,
an interrupted run resumes exactly, and 2 DDP ranks match one process."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small text tower and batch so that a run takes seconds on 2 cores
TINY = ['--global_batch_size=32', '--text_width=64', '--text_layers=1', '--text_heads=2', '--warmup_steps=2',
        '--learning_rate=2e-3', '--log_interval=1', '--device=cpu', '--seed=3']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('lit')
    data.build('synthetic', str(d / 'syn'), image_size=32, count=160, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    vision, _ = model.create('ViT-T/4', layers=2)
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict()}, d / 'vision.pt')
    return d


def lit(setup, out, *args, nproc=1):
    # MKL may pick kernels by memory alignment, which varies from process to process; STRICT makes
    # its results bitwise reproducible, which the exact-resume check needs across processes
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_CBWR='AUTO,STRICT')
    if nproc == 1:
        cmd = [sys.executable, 'lit.py']
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
               f'--master_port={port}', 'lit.py']
    cmd += [f'--data_dir={setup / "syn"}', f'--vision_checkpoint={setup / "vision.pt"}',
            f'--out_dir={setup / out}', *TINY, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == json.load(open(setup / out / 'lit.json'))
    log = [json.loads(line) for line in open(setup / out / 'log.jsonl')]
    return result, log


@pytest.fixture(scope='module')
def full_run(setup):
    return lit(setup, 'full', '--max_steps=10', '--augment=False')


@pytest.fixture(scope='module')
def whole_run(setup):
    return lit(setup, 'whole', '--max_steps=6', '--precompute_features=True')


@pytest.fixture(scope='module')
def first_leg(setup):
    """The first 3 of the 6 steps of `whole`, interrupted; ckpt kept as step3.pt."""
    out = lit(setup, 'parts', '--max_steps=6', '--precompute_features=True', '--stop_at=3')
    shutil.copy(setup / 'parts' / 'ckpt.pt', setup / 'step3.pt')
    return out


def test_lit_lowers_the_loss_and_keeps_the_image_tower(setup, full_run):
    result, log = full_run
    losses = [r['loss'] for r in log]
    assert len(losses) == 10 and result['first_loss'] == losses[0]
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses  # ln(32) = 3.47 at chance
    assert result['vision_unchanged'] is True
    # independently of lit.py's own hash: the saved image tower equals the source, bit for bit
    src = torch.load(setup / 'vision.pt', weights_only=True)['vision']
    ck = torch.load(setup / 'full' / 'ckpt.pt', weights_only=True)
    assert set(src) == set(ck['vision']) and all(torch.equal(src[k], ck['vision'][k]) for k in src)
    assert 0 < float(ck['logit_scale']) <= np.log(100) + 1e-6
    # from_pretrained returns both towers, the text one sized to the image embedding
    vision, text = model.from_pretrained(str(setup / 'full' / 'ckpt.pt'))
    assert text is not None and text.embed_dim == vision.embed_dim == 128
    assert text.config['width'] == 64 and text.config['layers'] == 1


def test_precomputed_features_match_the_full_forward(setup, full_run):
    pre, pre_log = lit(setup, 'pre', '--max_steps=10', '--stop_at=3', '--precompute_features=True')
    full, full_log = full_run  # augment=False: the full forward sees the eval transform too
    assert pre['precompute_features'] is True and pre['vision_unchanged'] is True
    # the same pairs, the same frozen embeddings, the same text tower init: the same first loss,
    # and the same next steps
    assert np.isclose(pre['first_loss'], full['first_loss'], rtol=1e-5, atol=1e-6)
    assert np.allclose([r['loss'] for r in pre_log], [r['loss'] for r in full_log[:3]], rtol=1e-4)


def test_resume_is_exact(setup, whole_run, first_leg):
    whole, _ = whole_run
    feats = setup / 'parts' / 'image_features.npy'
    mtime = os.stat(feats).st_mtime_ns
    part, log = lit(setup, 'parts', '--max_steps=6', '--precompute_features=True', '--init_from=resume')
    assert os.stat(feats).st_mtime_ns == mtime  # the resumed run reused the frozen features
    assert [r['step'] for r in log] == [1, 2, 3, 4, 5, 6] and part['step'] == 6
    a = torch.load(setup / 'whole' / 'ckpt.pt', weights_only=True)
    b = torch.load(setup / 'parts' / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(a['text'][k], b['text'][k]) for k in a['text'])
    assert torch.equal(a['logit_scale'], b['logit_scale']) and part['loss'] == whole['loss']


def test_two_ranks_match_one_process(setup, whole_run, first_leg):
    two, two_log = lit(setup, 'two', '--max_steps=6', '--stop_at=3', '--precompute_features=True', nproc=2)
    assert two['world_size'] == 2 and two['vision_unchanged'] is True
    # rank r takes slice r of the same global batch, so the global loss and update are the same
    assert np.allclose([r['loss'] for r in whole_run[1][:3]], [r['loss'] for r in two_log], rtol=1e-5)
    a = torch.load(setup / 'step3.pt', weights_only=True)
    b = torch.load(setup / 'two' / 'ckpt.pt', weights_only=True)
    # The key bias (middle third of qkv.bias) has an exactly zero gradient (softmax ignores a
    # constant added to every key's score), so Adam turns rounding noise into +-lr steps there.
    for t in (a, b):
        qkv = t['text'].pop('blocks.0.attn.qkv.bias').chunk(3)
        t['text']['q_bias'], t['text']['v_bias'] = qkv[0], qkv[2]
    assert all(torch.allclose(a['text'][k], b['text'][k], rtol=1e-4, atol=1e-5) for k in a['text'])
    assert torch.allclose(a['logit_scale'], b['logit_scale'], rtol=1e-6)
