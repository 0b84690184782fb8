"""Faults an operator meets on a long multi-node run, each as the stages really run
(subprocesses, 2 gloo ranks where ranks matter): every refusal is one line and exit status 1, a
resume refuses another run and lists the differences, one run per out_dir (an OS-released lock),
one out_dir for every rank, durable renames, centre-shard checksums that cover the RNG and
sampler state, and torchrun's own report naming the stop."""
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import files as file_io
import jobs
from test_lit import lit, lit_fails, setup  # noqa: F401 (setup: a fixture)
from test_train import (BASE, ROOT, SIG_ARGS, copy_run, data, files, free_port,  # noqa: F401
                        losses, run, start, two_runs, wait_for_step)  # (data, two_runs: fixtures)

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def one_line(p, *needles):
    """Exit status 1, no traceback, and stderr's last line holds every needle."""
    err = p.stderr if isinstance(p.stderr, str) else ''
    last = err.strip().splitlines()[-1] if err.strip() else ''
    assert p.returncode == 1 and 'Traceback' not in err, (p.returncode, err[-3000:])
    for n in needles:
        assert n in last, (n, last)
    return last


def script(name, *args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# -----------------------------------------------------------------------------
# 1. every refusal is one line

def corrupt_sets(root, good):
    """Copies of a good dataset, each broken one way: {name: (path, words the line must hold)}."""
    out = {}

    def copy(name):
        d = root / name
        shutil.copytree(good, d)
        out[name] = d
        return d
    (copy('json') / 'meta.json').write_text('{"count": 3, "shards": [')
    (copy('nested') / 'meta.json').write_text('[' * 100000 + ']' * 100000)
    (copy('list') / 'meta.json').write_text('[1, 2]')
    (copy('types') / 'meta.json').write_text('{"count": "x", "image_size": 16, "shards": 5}')
    shard = sorted(f for f in os.listdir(good) if f.startswith('images_'))[0]
    (copy('header') / shard).write_bytes(b'\x93NUMPY garbage' * 10)
    blob = (good / shard).read_bytes()
    (copy('truncated') / shard).write_bytes(blob[:len(blob) // 2])
    (copy('classes_garbage') / 'classes.npy').write_bytes(b'not an array')
    y = np.load(good / 'classes.npy')
    y[7] = -1
    np.save(copy('classes_minus_one') / 'classes.npy', y)
    return out


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('faults')
    p = script('prepare.py', '--src=synthetic', f'--out={root / "syn"}', '--count=64',
               '--image_size=16', '--seed=0', '--workers=1')
    assert p.returncode == 0, p.stderr[-2000:]
    return root


def test_corrupt_datasets_stop_cluster_and_probe_with_one_line(small):
    """Eight broken datasets (invalid or 100,000-deep JSON, wrong types, a garbage or truncated
    shard, a garbage classes.npy, a class id of -1) through cluster.py and probe.py: one line
    each, naming the setting, and no out_dir left behind."""
    for name, d in corrupt_sets(small, small / 'syn').items():
        out = small / f'out_{name}'
        one_line(script('cluster.py', f'--data_dir={d}', f'--out_dir={out}', '--num_classes=4',
                        '--num_positives=2', '--pca_dim=8', '--device=cpu'), str(d))
        one_line(script('probe.py', '--checkpoint=pixels', f'--train_dir={d}', f'--test_dir={d}',
                        f'--out_dir={out}', '--device=cpu'), str(d))
        assert not out.exists(), name
    garbage = small / 'garbage.pt'
    garbage.write_bytes(b'PK\x03\x04 not a zip')
    one_line(script('cluster.py', f'--data_dir={small / "syn"}', f'--teacher={garbage}',
                    f'--out_dir={small / "out_t"}', '--num_classes=4', '--num_positives=2'),
             'teacher', str(garbage))
    one_line(script('probe.py', f'--checkpoint={garbage}', f'--test_dir={small / "syn"}',
                    f'--out_dir={small / "out_t"}'), 'checkpoint')


def test_nested_meta_json_stops_train_and_lit_with_one_line(small, tmp_path):
    d = corrupt_sets(tmp_path, small / 'syn')['nested']
    one_line(script('train.py', f'--data_dir={d}', f'--out_dir={tmp_path / "t"}'), f'data_dir={d}')
    one_line(script('lit.py', f'--data_dir={d}', f'--out_dir={tmp_path / "l"}'), f'data_dir={d}')


def test_out_dir_that_is_a_file_or_read_only_stops_with_one_line(small, tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    cases = [str(a_file), str(a_file / 'sub'), '/sys/kernel/mlcd_faults']
    for out in cases:
        one_line(script('cluster.py', f'--data_dir={small / "syn"}', f'--out_dir={out}',
                        '--num_classes=4', '--num_positives=2'), f'out_dir={out}')
        one_line(script('probe.py', '--checkpoint=pixels', f'--test_dir={small / "syn"}',
                        f'--out_dir={out}'), f'out_dir={out}')
        one_line(script('prepare.py', '--src=synthetic', f'--out={out}', '--count=8',
                        '--image_size=16'), f'out={out}')


def test_caption_token_ids_beyond_the_vocabulary_stop_lit_with_one_line(setup, tmp_path):  # noqa: F811
    d = tmp_path / 'syn'
    shutil.copytree(setup / 'syn', d)
    texts = sorted(f for f in os.listdir(d) if f.startswith('texts_'))[-1]
    ids = np.load(d / texts)
    ids[-1, 1] = 49408  # one past CLIP's vocabulary, in the last caption
    np.save(d / texts, ids)
    last = lit_fails(setup, tmp_path / 'out', f'--data_dir={d}', '--max_steps=2')
    assert f'data_dir={d}' in last and '49408' in last and 'vocab_size=49408' in last, last


def test_train_resumed_from_a_foreign_ckpt_stops_with_one_line(data, two_runs, setup, tmp_path):  # noqa: F811
    """ckpt.pt that is a plain state dict, an empty dict, a tensor, or lit.py's checkpoint."""
    ck = torch.load(os.path.join(two_runs['A'], 'ckpt.pt'), weights_only=True)
    lit(setup, 'foreign', '--max_steps=1', '--precompute_features=True')
    foreign = {'state_dict': ck['vision'], 'empty': {}, 'tensor': torch.zeros(3),
               'lit': torch.load(setup / 'foreign' / 'ckpt.pt', weights_only=True)}
    for name, obj in foreign.items():
        out = copy_run(two_runs, data, f'foreign_{name}')
        torch.save(obj, os.path.join(out, 'ckpt.pt'))
        p = run(data['data'] + BASE + ['--init_from=resume', '--max_steps=3'], out, expect_ok=False)
        one_line(p, 'init_from=resume', os.path.join(out, 'ckpt.pt'), 'not a checkpoint of this')


def test_a_full_disk_while_trimming_the_log_stops_with_one_line(data, two_runs):
    """A resume rewrites log.jsonl without the records past the checkpoint; a file-size limit
    below the log's size fails that write as a full disk would: one line, the log as it was,
    no log.jsonl.tmp."""
    import resource
    out = copy_run(two_runs, data, 'trim_full')
    before = files(out)
    limit = os.path.getsize(os.path.join(out, 'log.jsonl')) - 1
    p = subprocess.run([sys.executable, 'train.py'] + data['data'] + BASE +
                       ['--model=ViT-T/4', '--image_size=16', '--device=cpu', '--num_positives=4',
                        '--warmup_steps=2', '--learning_rate=2e-3', '--log_interval=1',
                        '--init_from=resume', '--max_steps=3', f'--out_dir={out}'], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    one_line(p, os.path.join(out, 'log.jsonl'), 'write failed', 'unchanged')
    assert files(out) == before and not any(f.endswith('.tmp') for f in os.listdir(out))


def test_ctrl_c_in_probe_stops_with_one_line(small, tmp_path):
    out = tmp_path / 'probe'
    p = subprocess.Popen([sys.executable, 'probe.py', '--checkpoint=pixels',
                          f'--train_dir={small / "syn"}', f'--test_dir={small / "syn"}',
                          f'--out_dir={out}', '--probe_tol=0', '--max_iter=100000'], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # the fits have started
        if line.startswith('linear probe:'):
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    p.stderr = err
    assert one_line(p, 'stopped by SIGINT') and not (out / 'probe.json').exists()


# -----------------------------------------------------------------------------
# 2. a resume continues the same run, or stops listing what differs

def test_resume_with_other_labels_or_tower_stops_listing_the_differences(data, two_runs):
    """Labels of another clustering (cluster seed 1: same N and k, most labels differ) and
    another image_size: refused in one line that names both; an allowed change (learning rate,
    log interval, stop_at) still resumes."""
    other = str(data['root'] / 'cluster_seed1')
    p = script('cluster.py', f'--data_dir={data["data_dir"]}', f'--out_dir={other}',
               '--num_classes=32', '--num_positives=4', '--seed=1')
    assert p.returncode == 0, p.stderr[-2000:]
    a = np.load(os.path.join(data['labels_dir'], 'labels.npy'))
    b = np.load(os.path.join(other, 'labels.npy'))
    assert a.shape == b.shape and (a[:, 0] != b[:, 0]).mean() > 0.5
    out = copy_run(two_runs, data, 'other_labels')
    before = files(out)
    resume = BASE + ['--init_from=resume', '--max_steps=3']
    p = run([data['data'][0], f'--labels_dir={other}'] + resume + ['--image_size=32'], out,
            expect_ok=False)
    last = one_line(p, os.path.join(out, 'ckpt.pt'), 'labels=', 'image_size=16 (now 32)')
    assert files(out) == before, last
    run(data['data'] + resume + ['--learning_rate=1e-3', '--log_interval=2', '--stop_at=3'], out)
    assert [s for s, _, _ in losses(out)][-1] == 3


def test_lit_resume_with_another_text_tower_stops_listing_the_differences(setup, tmp_path):  # noqa: F811
    lit(setup, 'text1', '--max_steps=2', '--precompute_features=True', '--stop_at=1')
    last = lit_fails(setup, setup / 'text1', '--max_steps=2', '--precompute_features=True',
                     '--init_from=resume', '--text_layers=2', '--text_width=128')
    assert 'text_layers=1 (now 2)' in last and 'text_width=64 (now 128)' in last, last


# -----------------------------------------------------------------------------
# 3. one run per out_dir

def test_a_second_run_on_a_busy_out_dir_stops_naming_the_holder(data):
    out = str(data['root'] / 'busy')
    args = data['data'] + SIG_ARGS[:2] + ['--max_steps=100000'] + SIG_ARGS[3:]
    first = start(args, out, out)
    try:
        wait_for_step(out, 1, [first])
        for extra in ([], ['--init_from=resume']):  # a resubmitted job, either way
            p = run(args + extra, out, expect_ok=False)
            one_line(p, f'out_dir={out} is in use by another run',
                     f'host {socket.gethostname()}, process {first.pid}')
            assert 'steps per epoch' not in p.stdout  # stopped before any work
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    # killed with SIGKILL, the lock went with it: the next run takes over
    run(args + ['--max_steps=1', '--overwrite=True'], out)
    assert [s for s, _, _ in losses(out)] == [1]


def test_the_lock_is_released_by_the_os_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', 'import jobs, time; '
                               f'print(jobs.take_lock({str(tmp_path)!r}), flush=True); '
                               'time.sleep(300)'], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == 'None'
    try:
        msg = jobs.take_lock(str(tmp_path))
        assert msg and f'process {holder.pid}' in msg, msg
    finally:
        holder.kill()
        holder.wait()
    assert jobs.take_lock(str(tmp_path)) is None  # kill -9 left the file, not the lock
    jobs.release_out_dir()
    assert not (tmp_path / jobs.LOCK).exists()


@pytest.mark.parametrize('stage', ['train.py', 'cluster.py'])
def test_ranks_that_see_different_out_dirs_stop_naming_out_dir(data, tmp_path, stage):
    """Two gloo ranks started in different working directories with a relative out_dir (two
    nodes without a shared file system): both stop at start with one line naming out_dir."""
    port = free_port()
    args = {'train.py': data['data'] + ['--model=ViT-T/4', '--image_size=16', '--device=cpu',
                                         '--num_positives=4'] + BASE,
            'cluster.py': [f'--data_dir={data["data_dir"]}', '--num_classes=4',
                           '--num_positives=2', '--pca_dim=8']}[stage]
    ps = []
    for r in range(2):
        os.makedirs(tmp_path / f'node{r}')
        env = dict(ENV, RANK=str(r), LOCAL_RANK='0', WORLD_SIZE='2', LOCAL_WORLD_SIZE='1',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        ps.append(subprocess.Popen([sys.executable, os.path.join(ROOT, stage), *args,
                                    '--out_dir=out', '--timeout_minutes=0.1'],
                                   cwd=tmp_path / f'node{r}', env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True))
    for p in ps:
        p.stdout_, p.stderr = p.communicate(timeout=300)
        one_line(p, 'out_dir=out is not one folder that every rank sees')
    for r in range(2):  # nothing left behind (rank 0 removes the folder it made and left empty)
        out = tmp_path / f'node{r}' / 'out'
        assert not os.path.exists(out) or not os.listdir(out)


# -----------------------------------------------------------------------------
# 4. durability

def test_atomic_writes_fsync_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append(
        'fsync dir' if stat.S_ISDIR(os.fstat(fd).st_mode) else 'fsync file') or real_fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append('rename') or real_replace(a, b))
    file_io.atomic_save({'x': torch.ones(2)}, str(tmp_path / 'ck.pt'))
    assert events == ['fsync file', 'rename', 'fsync dir']
    assert torch.load(tmp_path / 'ck.pt', weights_only=True)['x'].sum() == 2


@pytest.mark.parametrize('part', ['exp_avg', 'rng'])
def test_a_centre_shard_whose_adam_or_rng_state_changed_is_refused(data, two_runs, part):
    out = copy_run(two_runs, data, f'changed_{part}')
    name = 'centres_00000002_rank0_of_1.pt'
    sh = torch.load(os.path.join(out, name), weights_only=True)
    t = sh['exp_avg'].view(-1).view(torch.uint8) if part == 'exp_avg' else sh['rng']['torch']
    t[100] ^= 1  # one bit of the centres' Adam moment or of the torch RNG's state
    torch.save(sh, os.path.join(out, name))
    p = run(data['data'] + BASE + ['--init_from=resume', '--max_steps=3'], out, expect_ok=False)
    one_line(p, name, 'checksum')


# -----------------------------------------------------------------------------
# 5. exit status and torchrun's report

def test_under_torchrun_a_stop_exits_1_and_torchruns_report_names_it(data, tmp_path):
    """A bad setting found after the process group is up, on 2 ranks under torchrun: torchrun
    exits 1 and its failure report gives the stop's line as the root cause."""
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', os.path.join(ROOT, 'train.py'),
                        f'--data_dir={data["data_dir"]}', f'--labels_dir={tmp_path}/none',
                        f'--out_dir={tmp_path}/out', '--device=cpu'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    line = f'labels_dir={tmp_path}/none: no labels.npy'
    assert p.returncode == 1 and line in p.stderr, p.stderr[-3000:]
    root = p.stderr[p.stderr.index('Root Cause'):]
    assert f'traceback : {line}' in root, root
