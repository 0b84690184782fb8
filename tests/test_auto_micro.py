"""micro_batch_size='auto' (train.py, optim.auto_micro_batch): on a device that runs out of
memory above some micro-batch (the MLCD_FAKE_OOM_ABOVE test hook), it picks the largest that fits
by halving, says so on the first line, and leaves no trace of its tries: the run's losses equal
bitwise those of a run given that micro-batch outright, on 1 process and on 2 gloo ranks."""
import os

from test_train import TINY, data, losses, run  # noqa: F401 (data: the module's fixture)

ARGS = ['--global_batch_size=16', '--max_steps=3', '--sample_ratio=0.5']


def fake_oom(n):
    return dict(MLCD_FAKE_OOM_ABOVE=str(n))


def run_env(args, out_dir, env, nproc=1, expect_ok=True):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # run() passes os.environ to train.py
    try:
        return run(args, out_dir, nproc=nproc, expect_ok=expect_ok)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def test_auto_picks_the_largest_that_fits_and_equals_that_micro_batch_outright(data, tmp_path):
    auto, fixed = str(tmp_path / 'auto'), str(tmp_path / 'fixed')
    p = run_env(data['data'] + ARGS + ['--micro_batch_size=auto'], auto, fake_oom(4))
    first = p.stdout.splitlines()[0]
    assert first.startswith('global batch 16 = 1 rank(s) x 4 accumulation step(s) x 4 images'), first
    assert 'micro_batch_size=auto: 4 fits on cpu (8 ran out of memory)' in first, first
    run(data['data'] + ARGS + ['--micro_batch_size=4'], fixed)
    assert len(losses(auto)) == 3 and losses(auto) == losses(fixed)


def test_auto_on_two_ranks_halves_together_and_equals_that_micro_batch(data, tmp_path):
    auto, fixed = str(tmp_path / 'auto'), str(tmp_path / 'fixed')
    p = run_env(data['data'] + ARGS + ['--micro_batch_size=auto'], auto, fake_oom(4), nproc=2)
    first = next(x for x in p.stdout.splitlines() if x.startswith('global batch'))
    assert first.startswith('global batch 16 = 2 rank(s) x 2 accumulation step(s) x 4 images'), first
    assert 'micro_batch_size=auto: 4 fits on cpu (8 ran out of memory)' in first, first
    run(data['data'] + ARGS + ['--micro_batch_size=4'], fixed, nproc=2)
    assert len(losses(auto)) == 3 and losses(auto) == losses(fixed)


def test_auto_stops_with_one_line_when_not_even_one_image_fits(data, tmp_path):
    p = run_env(data['data'] + ARGS + ['--micro_batch_size=auto'], str(tmp_path / 'o'),
                fake_oom(0), expect_ok=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        'micro_batch_size=auto: even 1 image per forward does not fit on cpu (a training '
        'micro-step ran out of memory)')


def test_auto_is_refused_where_the_script_does_not_take_it_and_other_strings_are_refused(tmp_path):
    p = run(['--micro_batch_size=big'], str(tmp_path / 'o'), expect_ok=False)
    assert p.returncode == 1 and "'micro_batch_size' expects int" in p.stderr, p.stderr[-2000:]
