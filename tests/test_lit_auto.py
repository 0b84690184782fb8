"""micro_batch_size='auto' in lit.py (as train.py's, optim.auto_micro_batch): on a device that runs
out of memory above some micro-batch (the MLCD_FAKE_OOM_ABOVE test hook), it picks the largest
that fits by halving, says so on the first line, and leaves no trace of its tries: the run's
losses, text tower, temperature and optimizer state equal bitwise those of a run given that
micro-batch outright, on 1 process and on 2 gloo ranks; the paper configs ask for it."""
import subprocess
import sys

import pytest
import torch

import test_lit_microbatch as tm
from test_lit_microbatch import ROOT, ckpt, lit

setup = tm.setup  # its fixture: the synthetic set and a frozen ViT-T/4 tower


def equal(a, b):
    """Bit for bit, through the nested dicts and lists of a checkpoint."""
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def same_run(setup, auto, fixed):
    """auto's run is fixed's: the same losses, and bitwise the same trained weights, temperature
    (or domain similarity), optimizer state and torch RNG state in ckpt.pt (numpy's global one
    is never seeded: it differs from process to process)."""
    assert len(auto[1]) > 1 and [r['loss'] for r in auto[1]] == [r['loss'] for r in fixed[1]]
    a, b = ckpt(setup, 'auto'), ckpt(setup, 'fixed')
    for key in ('text', 'aug_vision', 'logit_scale', 'similarity', 'optimizer'):
        assert (key in a) == (key in b) and (key not in a or equal(a[key], b[key])), key
    assert equal([r['torch'] for r in a['rng']], [r['torch'] for r in b['rng']])


@pytest.mark.parametrize('mode', [['--precompute_features=True'],
                                  ['--loss=uniclip', '--image_size=16', '--max_steps=2']])
def test_auto_picks_the_largest_that_fits_and_equals_that_micro_batch_outright(
        setup, mode, monkeypatch):
    # LiT from precomputed features, and UniCLIP (a trained, augmentation-aware image tower):
    # 32 and 16 images run out of memory, 8 fit
    monkeypatch.setitem(tm.ENV, 'MLCD_FAKE_OOM_ABOVE', '8')
    auto = lit(setup, 'auto', *mode, '--micro_batch_size=auto', '--overwrite=True')
    monkeypatch.delitem(tm.ENV, 'MLCD_FAKE_OOM_ABOVE')
    assert auto[2] == ('global batch 32 = 1 rank(s) x 32 images in 4 micro-batches of 8 '
                       '(micro_batch_size=auto: 8 fits on cpu (16 ran out of memory))'), auto[2]
    assert auto[0]['micro_batches'] == 4
    same_run(setup, auto, lit(setup, 'fixed', *mode, '--micro_batch_size=8', '--overwrite=True'))


def test_auto_on_two_ranks_halves_together_and_equals_that_micro_batch(setup, monkeypatch):
    monkeypatch.setitem(tm.ENV, 'MLCD_FAKE_OOM_ABOVE', '4')  # 16 per rank and 8 fail, 4 fit
    auto = lit(setup, 'auto', '--precompute_features=True', '--micro_batch_size=auto',
               '--overwrite=True', nproc=2)
    monkeypatch.delitem(tm.ENV, 'MLCD_FAKE_OOM_ABOVE')
    assert auto[2] == ('global batch 32 = 2 rank(s) x 16 images in 4 micro-batches of 4 '
                       '(micro_batch_size=auto: 4 fits on cpu (8 ran out of memory))'), auto[2]
    fixed = lit(setup, 'fixed', '--precompute_features=True', '--micro_batch_size=4',
                '--overwrite=True', nproc=2)
    same_run(setup, auto, fixed)


def test_auto_without_running_out_needs_no_gradient_cache_and_stops_when_nothing_fits(
        setup, monkeypatch):
    first = lit(setup, 'auto', '--precompute_features=True', '--micro_batch_size=auto',
                '--overwrite=True', '--max_steps=1')[2]
    assert first == ('global batch 32 = 1 rank(s) x 32 images (micro_batch_size=auto: 32 fits '
                     'on cpu (no gradient cache needed))'), first
    monkeypatch.setitem(tm.ENV, 'MLCD_FAKE_OOM_ABOVE', '0')
    p = subprocess.run([sys.executable, 'lit.py', f'--data_dir={setup / "syn"}',
                        f'--vision_checkpoint={setup / "vision.pt"}', f'--out_dir={setup / "none"}',
                        *tm.TINY, '--micro_batch_size=auto'], cwd=ROOT, env=tm.ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        'micro_batch_size=auto: even 1 image per forward does not fit on cpu (a training '
        'micro-step ran out of memory)')
