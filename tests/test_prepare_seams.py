"""prepare.py at the seams: one build per output (the stages' lock), a failed build leaves no
temporary files, a config file that does not run is one line, and images that decode to one
flat colour are kept but named."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

import jobs
from test_faults import one_line
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
    busy = tmp_path / 'run'
    code = ('import sys, time, jobs; assert jobs.take_lock(sys.argv[1]) is None; '
            'print("held", flush=True); time.sleep(60)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(busy)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    try:
        p = prepare('--src=synthetic', f'--out={busy}', '--count=16', '--image_size=16')
        one_line_error(p, f'out={busy} is in use by another run')
        assert os.listdir(busy) == [jobs.LOCK]
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


def flat_set(root):
    """A class folder of 6 images: 4 random, a 16-bit PNG of values 0..199 (it decodes to black,
    v / 257 < 1) and a blank white scan."""
    src = root / 'src' / 'a'
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / f'ok{i}.png')
    deep = Image.fromarray(rng.integers(0, 200, (40, 40)).astype(np.uint16))  # 16-bit grey
    assert deep.mode.startswith('I')
    deep.save(src / 'deep.png')
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(src / 'blank.png')
    return root / 'src'


def test_images_of_one_flat_colour_are_kept_and_named(tmp_path):
    """A 16-bit PNG whose values all sit near 0 (it decodes to black) and a blank white scan,
    among ordinary images: the build keeps all of them, meta.json lists the two under 'flat', and
    stderr warns with the count and their names."""
    flat_set(tmp_path)
    out = tmp_path / 'out'
    p = prepare(f'--src={tmp_path / "src"}', f'--out={out}', '--image_size=16', '--workers=1')
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.load(open(out / 'meta.json'))
    assert meta['count'] == 6 and meta['flat']['count'] == 2
    assert sorted(os.path.basename(k) for k in meta['flat']['items']) == ['blank.png', 'deep.png']
    line = [x for x in p.stderr.splitlines() if 'flat colour' in x]
    assert len(line) == 1 and line[0].startswith('warning: 2 image(s)'), p.stderr
    assert 'deep.png' in line[0] and 'blank.png' in line[0]


def test_the_flat_warning_of_a_holdout_build_names_the_meta_json_that_stays(tmp_path):
    """With --holdout the build runs in <out>.all, which the split removes: the warning names
    <out>/meta.json, which exists and lists the flat images (before: <out>.all/meta.json)."""
    out = tmp_path / 'out'
    p = prepare(f'--src={flat_set(tmp_path)}', f'--out={out}', '--image_size=16', '--workers=1',
                '--holdout=0.5')
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stderr.splitlines() if 'flat colour' in x]
    assert len(line) == 1 and f'listed in {out}/meta.json' in line[0], p.stderr
    assert json.load(open(out / 'meta.json'))['flat']['count'] == 2
    assert not os.path.exists(f'{out}.all')


def hold(folder):
    """A process holding a stage's lock on folder (as a running train.py holds its out_dir's)."""
    code = ('import sys, time, jobs; assert jobs.take_lock(sys.argv[1]) is None; '
        'print("held", flush=True); time.sleep(120)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(folder)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    return holder


def test_a_holdout_build_locks_every_folder_it_writes_and_a_refusal_leaves_none(tmp_path):
    """--holdout writes <out>, <out>_holdout and <out>.all: a run holding the last of them
    refuses the build with one line naming it, and the two folders the refused build had made
    are gone (before: it built into the busy <out>.all)."""
    out, src = tmp_path / 'out', flat_set(tmp_path / 'in')
    for busy in (f'{out}.all', f'{out}_holdout'):
        holder = hold(busy)
        try:
            p = prepare(f'--src={src}', f'--out={out}', '--image_size=16', '--workers=1',
                        '--holdout=0.5')
            one_line(p, f'out={out}: {busy} is in use by another run', f'process {holder.pid}')
            assert sorted(os.listdir(tmp_path)) == sorted(['in', os.path.basename(busy)])
            assert os.listdir(busy) == [jobs.LOCK]  # the holder's folder, untouched
        finally:
            holder.kill()
            holder.wait()
        shutil.rmtree(busy)


def test_a_dangling_out_link_is_one_line_naming_its_target(tmp_path):
    """--out, or the <out>_holdout a --holdout build writes, a symbolic link to a folder that
    does not exist: one line naming the link's target, before any work (before: a line naming
    the absolute path; for <out>_holdout a FileExistsError traceback after the whole build)."""
    link, gone = tmp_path / 'link', tmp_path / 'gone'
    os.symlink(gone, link)
    p = prepare('--src=synthetic', f'--out={link}', '--count=8', '--image_size=16')
    assert one_line(p) == f'out={link}: is a symbolic link to {gone}, which does not exist'
    out = tmp_path / 'out'
    os.symlink(gone, f'{out}_holdout')
    p = prepare(f'--src={flat_set(tmp_path)}', f'--out={out}', '--image_size=16', '--holdout=0.5')
    assert one_line(p) == (f'out={out}: {out}_holdout is a symbolic link to {gone}, which does '
                           'not exist')
    assert not os.path.exists(gone) and not os.path.exists(out)


# prepare.py's __main__ with os.fsync failing (a full disk) for files whose name holds $FAIL and
# sleeping in it for those holding $STALL: forked workers inherit the patch
FSYNC = """
import errno, os, runpy, sys, time
real = os.fsync
def fsync(fd):
    name = os.readlink(f'/proc/self/fd/{fd}')
    if os.environ['FAIL'] in name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if os.environ.get('STALL') and os.environ['STALL'] in name:
        time.sleep(60)
    return real(fd)
os.fsync = fsync
sys.argv[0] = sys.argv.pop(1)
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as if run directly
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def full_disk(tmp_path, args, **env):
    wrapper = tmp_path / 'full_disk.py'
    wrapper.write_text(FSYNC)
    return subprocess.run([sys.executable, str(wrapper), os.path.join(ROOT, 'prepare.py'), *args],
                          cwd=ROOT, env=dict(ENV, **env), capture_output=True, text=True,
                          timeout=300)


def tmp_files(*dirs):
    return [f for d in dirs if os.path.isdir(d) for f in os.listdir(d) if f.endswith('.tmp')]


def test_a_worker_that_cannot_write_and_one_stopped_mid_shard_leave_no_tmp(tmp_path):
    """Two workers on two tars: one's shard write fails (ENOSPC), the other is stopped by
    pool.terminate() while it writes: one line naming out, and neither worker's .tmp is left
    (before: both were)."""
    from test_prepare_laion import laion_tar
    for s in range(2):
        laion_tar(str(tmp_path / 'laion' / f'{s:05d}.tar'), s, 2)
    out = tmp_path / 'out'
    t0 = time.time()
    p = full_disk(tmp_path, [f'--src={tmp_path}/laion/*.tar', f'--out={out}', '--image_size=16',
                             '--workers=2'], FAIL='images_00000', STALL='images_00001')
    one_line(p, f'out={out}: cannot write a shard (OSError: [Errno 28] No space left on device)')
    assert time.time() - t0 < 50  # the stalled worker was stopped, not waited for
    assert tmp_files(out) == [] and not os.path.exists(out / jobs.LOCK)


def test_a_failed_holdout_split_removes_its_temporary_files(tmp_path):
    """The split's write of <out>_holdout fails (ENOSPC): one line naming out, no .tmp left in
    any of the three folders (before: the holdout shard's was), and the same command then
    finishes the split."""
    out = tmp_path / 'out'
    args = [f'--src={flat_set(tmp_path)}', f'--out={out}', '--image_size=16', '--workers=1',
            '--holdout=0.5']
    p = full_disk(tmp_path, args, FAIL='_holdout/images_')
    one_line(p, f'out={out}: write failed (No space left on device)')
    assert tmp_files(out, f'{out}_holdout', f'{out}.all') == []
    p = prepare(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.load(open(f'{out}_holdout/meta.json'))['count'] == 3
