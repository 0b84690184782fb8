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

import checkpoints
import prepare
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small text tower and batch so that a run takes seconds on 2 cores
TINY = ['--global_batch_size=32', '--text_width=64', '--text_layers=1', '--text_heads=2', '--warmup_steps=2',
        '--learning_rate=2e-3', '--log_interval=1', '--device=cpu', '--seed=3']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('lit')
    prepare.build('synthetic', str(d / 'syn'), image_size=32, count=160, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    vision, _ = model.create('ViT-T/4', layers=2)
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict()}, d / 'vision.pt')
    return d


# MKL may pick kernels by memory alignment, which varies from process to process; STRICT makes
# its results bitwise reproducible, which the exact-resume check needs across processes
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_CBWR='AUTO,STRICT')


def lit(setup, out, *args, nproc=1):
    env = ENV
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
    return lit(setup, 'full', '--max_steps=10', '--augment=none')


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
    vision, text = checkpoints.from_pretrained(str(setup / 'full' / 'ckpt.pt'))
    assert text is not None and text.embed_dim == vision.embed_dim == 128
    assert text.config['width'] == 64 and text.config['layers'] == 1


def test_precomputed_features_match_the_full_forward(setup, full_run):
    pre, pre_log = lit(setup, 'pre', '--max_steps=10', '--stop_at=3', '--precompute_features=True')
    full, full_log = full_run  # augment='none': the full forward sees the eval transform too
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



# -----------------------------------------------------------------------------
# failure behaviour (as train.py's; see tests/test_train.py)

def lit_cmd(setup, out, *args):
    return [sys.executable, os.path.join(ROOT, 'lit.py'), f'--data_dir={setup / "syn"}',
            f'--vision_checkpoint={setup / "vision.pt"}', f'--out_dir={out}', *TINY, *args]


def lit_fails(setup, out, *args):
    p = subprocess.run(lit_cmd(setup, out, *args), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    return last


def sha(path):
    import hashlib
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def files(out):
    return {f: sha(out / f) for f in os.listdir(out)}


@pytest.fixture(scope='module')
def base(setup):
    """A finished 2-step run on precomputed features, kept pristine (copied by each test)."""
    lit(setup, 'base', '--max_steps=2', '--precompute_features=True')
    return setup / 'base'


def test_lit_refuses_to_replace_a_checkpoint_and_resumes_past_a_torn_log_line(setup, base):
    out = setup / 'again'
    shutil.copytree(base, out)
    before = files(out)
    last = lit_fails(setup, out, '--max_steps=2', '--precompute_features=True')
    assert '--init_from=resume' in last and '--overwrite=True' in last, last
    assert files(out) == before
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"step": 3, "epoch": 0.6, "lo')  # cut short by a full disk
    _, log = lit(setup, 'again', '--max_steps=3', '--precompute_features=True', '--init_from=resume')
    assert [r['step'] for r in log] == [1, 2, 3]  # the torn line dropped, every line parses


def test_lit_broken_files_and_divergence_stop_with_one_line(setup, base, tmp_path):
    resume = ['--max_steps=3', '--precompute_features=True', '--init_from=resume']
    for i, keep in enumerate((0.5, 0.0)):  # a truncated and an empty ckpt.pt
        out = setup / f'broken{i}'
        shutil.copytree(base, out)
        blob = open(out / 'ckpt.pt', 'rb').read()
        open(out / 'ckpt.pt', 'wb').write(blob[:int(len(blob) * keep)])
        last = lit_fails(setup, out, *resume)
        assert str(out / 'ckpt.pt') in last and ('truncated' if keep else 'empty') in last, last
    # a diverging text tower: stopped before the optimizer step, the checkpoint kept
    out = setup / 'diverged'
    shutil.copytree(base, out)
    before = files(out)
    last = lit_fails(setup, out, '--learning_rate=1e6', '--max_steps=6', *resume[1:])
    assert 'non-finite' in last and 'nothing was updated or saved' in last, last
    assert {f: h for f, h in files(out).items() if f != 'log.jsonl'} == \
        {f: h for f, h in before.items() if f != 'log.jsonl'}
    # unwritable out_dir (sysfs takes no new files, even from root): stops before any work
    last = lit_fails(setup, '/sys/kernel/mlcd_lit')
    assert 'out_dir=/sys/kernel/mlcd_lit' in last and 'cannot write' in last, last


def test_lit_defaults_stop_with_one_line_and_no_folder(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'lit.py')], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith('data_dir=data/laion400m: no meta.json')
    assert os.listdir(tmp_path) == []


def test_lit_sigterm_checkpoints_and_resumes_exactly(setup):
    import signal
    import time
    args = ['--max_steps=20', '--precompute_features=True']
    whole, whole_log = lit(setup, 'sig_whole', *args)
    out = setup / 'sig_part'
    p = subprocess.Popen(lit_cmd(setup, out, *args), cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=open(setup / 'sig_part.err', 'w'))
    t0 = time.time()
    while not (os.path.exists(out / 'log.jsonl') and len(open(out / 'log.jsonl').readlines()) >= 2):
        assert p.poll() is None and time.time() - t0 < 300, 'the run ended before it was signalled'
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 1
    last = open(setup / 'sig_part.err').read().strip().splitlines()[-1]
    assert 'stopped by SIGTERM' in last and '--init_from=resume' in last, last
    step = torch.load(out / 'ckpt.pt', weights_only=True)['step']
    assert 2 <= step < 20
    part, log = lit(setup, 'sig_part', *args, '--init_from=resume')
    assert [r['step'] for r in log] == list(range(1, 21))
    assert [r['loss'] for r in log] == [r['loss'] for r in whole_log]  # bitwise, from JSON
    a = torch.load(setup / 'sig_whole' / 'ckpt.pt', weights_only=True)
    b = torch.load(out / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(a['text'][k], b['text'][k]) for k in a['text'])
    assert torch.equal(a['logit_scale'], b['logit_scale'])


def test_lit_two_ranks_stop_together_on_a_signal_to_one(setup):
    """SIGTERM to rank 1 only: the flag rides in the temperature gradient's all-reduce, both
    ranks stop after the same step with one checkpoint, rank 0 alone saying so, and the resumed
    run equals the uninterrupted one."""
    import signal
    import time
    args = ['--max_steps=20', '--precompute_features=True']
    _, whole_log = lit(setup, 'sig2_whole', *args, nproc=2)
    out = setup / 'sig2_part'
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    ps = [subprocess.Popen(lit_cmd(setup, out, *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=open(setup / f'sig2_part{r}.err', 'w'),
                           env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE='2',
                                    LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)))
          for r in range(2)]
    t0 = time.time()
    while not (os.path.exists(out / 'log.jsonl') and len(open(out / 'log.jsonl').readlines()) >= 2):
        assert all(p.poll() is None for p in ps) and time.time() - t0 < 300, 'ended before the signal'
        time.sleep(0.05)
    ps[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in ps] == [1, 1]
    step = torch.load(out / 'ckpt.pt', weights_only=True)['step']
    assert 2 <= step < 20
    last = open(setup / 'sig2_part0.err').read().strip().splitlines()[-1]  # rank 0 alone says it
    assert f'after step {step} ' in last and '--init_from=resume' in last, last
    assert 'stopped by' not in open(setup / 'sig2_part1.err').read()
    _, log = lit(setup, 'sig2_part', *args, '--init_from=resume', nproc=2)
    assert [r['loss'] for r in log] == [r['loss'] for r in whole_log]
    a = torch.load(setup / 'sig2_whole' / 'ckpt.pt', weights_only=True)
    b = torch.load(out / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(a['text'][k], b['text'][k]) for k in a['text'])
