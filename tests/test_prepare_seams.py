"""prepare.py at the seams: one build per output (the stages' lock), a failed build leaves no
temporary files, a config file that does not run is one line, and images that decode to one
flat colour are kept but named."""
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from test_train import ROOT, one_line_error

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def prepare(*args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300, **kw)


def test_a_second_build_of_the_same_out_stops_and_leaves_the_first_alone(tmp_path):
    """A build in progress holds out's lock: a second prepare.py on it, even with
    --overwrite=True, stops at once naming the holder, and the first finishes whole; prepare.py
    into a running stage's out_dir (its lock) is refused the same way."""
    out = tmp_path / 'syn'
    first = subprocess.Popen([sys.executable, 'prepare.py', '--src=synthetic', f'--out={out}',
                              '--count=30000', '--image_size=16', '--workers=1'], cwd=ROOT,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / 'build.json').exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    p = prepare('--src=synthetic', f'--out={out}', '--count=64', '--image_size=16',
                '--overwrite=True', '--workers=1')
    assert first.poll() is None, 'the first build ended before the second started: make it longer'
    one_line_error(p, f'out={out} is in use by another run', 'process')
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert json.load(open(out / 'meta.json'))['count'] == 30000
    assert not [f for f in os.listdir(out) if f.endswith('.tmp') or f == '.lock']
    # a stage's out_dir in use
    import common
    busy = tmp_path / 'run'
    code = ('import sys, time, common; assert common.take_lock(sys.argv[1]) is None; '
            'print("held", flush=True); time.sleep(60)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(busy)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    try:
        p = prepare('--src=synthetic', f'--out={busy}', '--count=16', '--image_size=16')
        one_line_error(p, f'out={busy} is in use by another run')
        assert os.listdir(busy) == [common.LOCK]
    finally:
        holder.kill()


def test_a_failed_build_removes_its_temporary_files(tmp_path):
    """A shard write that fails as a full disk would (a file-size limit) stops with one line
    naming out, and no *.tmp is left to fill the disk of the re-run."""
    import resource
    out = tmp_path / 'syn'
    p = prepare('--src=synthetic', f'--out={out}', '--count=4000', '--image_size=32',
                '--shard_size=1000', '--workers=1',
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    one_line_error(p, f'out={out}', 'cannot write a shard')
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')], os.listdir(out)
    p = prepare('--src=synthetic', f'--out={out}', '--count=4000', '--image_size=32',
                '--shard_size=1000', '--workers=1')
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_config_file_that_does_not_run_is_one_line(tmp_path):
    """A config file with a syntax error, or one that raises: one line naming the file, the
    error and its line, in train.py, lit.py and prepare.py (before: a traceback)."""
    (tmp_path / 'syn.py').write_text('learning_rate = 1e-3\nmax_steps = (\n')
    (tmp_path / 'raise.py').write_text('learning_rate = 1e-3\nwarmup_steps = 1 / 0\n')
    for stage in ('train.py', 'lit.py', 'prepare.py'):
        for name, words in (('syn', ['SyntaxError at line 2', "'(' was never closed"]),
                            ('raise', ['ZeroDivisionError at line 2', 'division by zero'])):
            p = subprocess.run([sys.executable, stage, str(tmp_path / f'{name}.py')], cwd=ROOT,
                               env=ENV, capture_output=True, text=True, timeout=300)
            one_line_error(p, f'config file {tmp_path / name}.py', *words)


def test_images_of_one_flat_colour_are_kept_and_named(tmp_path):
    """A 16-bit PNG whose values all sit near 0 (it decodes to black) and a blank white scan,
    among ordinary images: the build keeps all of them, meta.json lists the two under 'flat', and
    stderr warns with the count and their names."""
    src = tmp_path / 'src' / 'a'
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / f'ok{i}.png')
    deep = Image.fromarray(rng.integers(0, 200, (40, 40)).astype(np.uint16))  # 16-bit grey
    assert deep.mode.startswith('I')
    deep.save(src / 'deep.png')
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(src / 'blank.png')
    out = tmp_path / 'out'
    p = prepare(f'--src={tmp_path / "src"}', f'--out={out}', '--image_size=16', '--workers=1')
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.load(open(out / 'meta.json'))
    assert meta['count'] == 6 and meta['flat']['count'] == 2
    assert sorted(os.path.basename(k) for k in meta['flat']['items']) == ['blank.png', 'deep.png']
    line = [x for x in p.stderr.splitlines() if 'flat colour' in x]
    assert len(line) == 1 and line[0].startswith('warning: 2 image(s)'), p.stderr
    assert 'deep.png' in line[0] and 'blank.png' in line[0]
