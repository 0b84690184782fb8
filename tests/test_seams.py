"""What one stage hands the next is whole and of the same data: an unfinished cluster.py, labels
of other data, a swapped shard, changed captions and non-finite features are refused in one
line; cluster.py --force leaves a running train.py on the labels it mapped; SIGHUP checkpoints
like SIGTERM; a full disk and a dangling out_dir are one line each."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import files
import jobs
import provenance
from test_lit import lit_cmd, setup  # noqa: F401 (setup: a fixture)
from test_train import ROOT, SIG_ARGS, losses, one_line_error, run, start, wait_for_step

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
L = 4
BASE = ['--global_batch_size=16', '--micro_batch_size=16', '--max_steps=2']


def script(name, *args, env=ENV, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def cluster(data_dir, out, *args, env=ENV, ok=True, **kw):
    p = script('cluster.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--num_classes=32',
               f'--num_positives={L}', *args, env=env, **kw)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope='module')
def two(tmp_path_factory):
    """Two synthetic sets of the same N and shard sizes (seeds 0 and 1, 4 shards of 128), and
    cluster.py's labels of the first."""
    root = tmp_path_factory.mktemp('seams')
    for name, seed in (('A', 0), ('B', 1)):
        p = script('prepare.py', '--src=synthetic', f'--out={root / name}', '--count=512',
                   '--image_size=16', f'--seed={seed}', '--shard_size=128', '--workers=1')
        assert p.returncode == 0, p.stderr[-2000:]
    cluster(root / 'A', root / 'labA')
    return root


def train_args(root, data='A', labels='labA'):
    return [f'--data_dir={root / data}', f'--labels_dir={root / labels}']


def test_fingerprint_is_the_same_on_two_ranks_and_names_a_swapped_shard(two, tmp_path):
    """The fingerprint read over 2 gloo ranks equals one process's; a copy of a dataset has the
    same fingerprint, and one of its shards swapped for another set's is named."""
    code = ('import sys, json, torch.distributed as dist, provenance; '
            'dist.init_process_group("gloo"); '
            'fp = provenance.data_fingerprint(sys.argv[1], dist.get_rank(), dist.get_world_size()); '
            'print(json.dumps(fp)) if dist.get_rank() == 0 else None; dist.destroy_process_group()')
    (tmp_path / 'fp.py').write_text(code)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', str(tmp_path / 'fp.py'), str(two / 'A')], cwd=ROOT,
                       env=dict(ENV, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    one = provenance.data_fingerprint(str(two / 'A'))
    assert json.loads(p.stdout.strip().splitlines()[-1]) == one and len(one['shards']) == 4
    shutil.copytree(two / 'A', tmp_path / 'A')
    assert provenance.data_fingerprint(str(tmp_path / 'A')) == one
    shutil.copy(two / 'B' / 'images_00002.npy', tmp_path / 'A' / 'images_00002.npy')
    now = provenance.data_fingerprint(str(tmp_path / 'A'))
    assert provenance.differences(one, now, str(tmp_path / 'A')) == ['images shard images_00002.npy']


def test_an_interrupted_cluster_run_is_refused_by_train(two, tmp_path):
    """cluster.py killed in its assign phase, from scratch and while --force redoes a finished
    out_dir: no labels.npy under its final name, and train.py stops with one line naming the
    phase and the command that continues it (before: it trained on rows of zeros)."""
    fresh, forced = tmp_path / 'fresh', tmp_path / 'forced'
    shutil.copytree(two / 'labA', forced)
    for out, extra in ((fresh, []), (forced, ['--force=True', '--seed=3'])):
        p = cluster(two / 'A', out, *extra, ok=False, env=dict(ENV, CLUSTER_KILL_AT='assign:1'))
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        assert not os.path.exists(out / 'labels.npy')
        p = run([f'--data_dir={two / "A"}', f'--labels_dir={out}'] + BASE, str(tmp_path / 'run'),
                expect_ok=False)
        one_line_error(p, f'labels_dir={out}', 'assign phase', 'cluster.py')
    cluster(two / 'A', fresh)  # the same command continues and finishes
    assert np.load(fresh / 'labels.npy').shape == (512, L)


def test_labels_of_other_data_are_refused_from_scratch(two, tmp_path):
    """Labels of set A with data_dir of set B (same N, shapes and shard sizes): one line naming
    the shards that differ; nothing is made in out_dir."""
    p = run(train_args(two, data='B') + BASE, str(tmp_path / 'run'), expect_ok=False)
    one_line_error(p, f'labels_dir={two / "labA"}', f'data_dir={two / "B"}',
                   'images shards images_00000.npy', 'and 1 more', 'texts shards')
    assert not os.path.exists(tmp_path / 'run')


def test_a_swapped_shard_or_other_data_is_refused_on_resume(two, tmp_path):
    """A run on a copy of set A: one shard swapped for B's, then --init_from=resume, is refused
    by the labels' record; with labels that record no data (made by hand), by the checkpoint's
    own fingerprint, which names the shard. The restored shard resumes."""
    shutil.copytree(two / 'A', tmp_path / 'A')
    (tmp_path / 'hand').mkdir()
    shutil.copy(two / 'labA' / 'labels.npy', tmp_path / 'hand' / 'labels.npy')
    out = str(tmp_path / 'run')
    run(train_args(tmp_path, labels='hand') + BASE, out)
    shutil.copy(two / 'B' / 'images_00003.npy', tmp_path / 'A' / 'images_00003.npy')
    resume = BASE[:2] + ['--max_steps=4', '--init_from=resume']
    p = run([f'--data_dir={tmp_path / "A"}', f'--labels_dir={two / "labA"}'] + resume, out,
            expect_ok=False)
    one_line_error(p, f'labels_dir={two / "labA"}', 'images shard images_00003.npy')
    p = run(train_args(tmp_path, labels='hand') + resume, out, expect_ok=False)
    one_line_error(p, os.path.join(out, 'ckpt.pt'), 'images shard images_00003.npy',
                   'resume on the data it was written with')
    p = run([f'--data_dir={two / "B"}', f'--labels_dir={tmp_path / "hand"}'] + resume, out,
            expect_ok=False)  # another dataset of the same N
    one_line_error(p, os.path.join(out, 'ckpt.pt'), f'data_dir={two / "B"}')
    shutil.copy(two / 'A' / 'images_00003.npy', tmp_path / 'A' / 'images_00003.npy')
    run(train_args(tmp_path, labels='hand') + resume, out)
    assert losses(out)[-1][0] == 4


def test_lit_refuses_a_resume_after_a_caption_changed(setup, tmp_path):  # noqa: F811
    """One token of one caption (not a row the sampled fingerprint reads) changed after a LiT run:
    its resume stops with one line naming the texts shard; restored, it resumes."""
    shutil.copytree(setup / 'syn', tmp_path / 'syn')
    out = tmp_path / 'run'

    def cmd(*a):
        c = lit_cmd(setup, out, '--max_steps=2', *a)
        c[2] = f'--data_dir={tmp_path / "syn"}'  # the copy
        return c
    p = subprocess.run(cmd(), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    texts = tmp_path / 'syn' / 'texts_00000.npy'
    keep = texts.read_bytes()
    t = np.load(texts)
    t[5, 1] = (t[5, 1] + 1) % 49000  # row 5 of 160: not the first, middle or last row
    np.save(texts, t)
    p = subprocess.run(cmd('--init_from=resume', '--max_steps=3'), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line_error(p, str(out / 'ckpt.pt'), 'texts shard texts_00000.npy')
    texts.write_bytes(keep)
    p = subprocess.run(cmd('--init_from=resume', '--max_steps=3'), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize('search', ['torch', 'faiss'])
def test_non_finite_features_are_refused_before_kmeans(tmp_path, search):
    """embeddings_path with a NaN row and an Inf row: one line with their count and rows, on both
    searches (before: torch wrote NaN centres and one label row for all, faiss a traceback);
    nothing is written under a final name."""
    x = np.random.default_rng(0).standard_normal((640, 8)).astype(np.float32)
    x[3, 2], x[100, 0] = np.nan, np.inf
    np.save(tmp_path / 'x.npy', x)
    out = tmp_path / 'c'
    p = script('cluster.py', f'--embeddings_path={tmp_path / "x.npy"}', f'--out_dir={out}',
               '--num_classes=10', '--num_positives=2', f'--search={search}')
    one_line_error(p, 'embeddings_path=', '2 feature row(s) are not finite', '[3, 100]')
    assert p.returncode == 1
    left = set(os.listdir(out)) if out.exists() else set()
    assert not left & {'embeddings.npy', 'embeddings.npy.tmp', 'centroids.npy', 'labels.npy',
                       'phase_embed.json'}, left


def test_force_leaves_a_running_train_on_the_labels_it_mapped(two, tmp_path):
    """cluster.py --force (another seed) rewrites the labels while train.py runs on them: the run
    keeps the file it mapped, so its losses equal a run that nobody disturbed (before, it switched
    labels mid-way); the new labels are a new file, and resuming on them is refused."""
    shutil.copytree(two / 'labA', tmp_path / 'lab')
    args = train_args(two) + SIG_ARGS[:2] + ['--max_steps=150', '--sample_ratio=0.5',
                                             f'--num_positives={L}', '--ckpt_interval=1000']
    full, live = str(tmp_path / 'full'), str(tmp_path / 'live')
    run(args, full)
    args[1] = f'--labels_dir={tmp_path / "lab"}'
    p = start(args, live, live)
    wait_for_step(live, 2, [p])
    before = np.load(tmp_path / 'lab' / 'labels.npy')
    cluster(two / 'A', tmp_path / 'lab', '--force=True', '--seed=5')
    assert p.poll() is None, 'the run ended before the labels were rewritten: make it longer'
    assert p.wait(timeout=300) == 0, open(f'{live}.err').read()[-2000:]
    assert not np.array_equal(before, np.load(tmp_path / 'lab' / 'labels.npy'))
    assert losses(live) == losses(full)
    q = run(args + ['--init_from=resume', '--max_steps=152'], live, expect_ok=False)
    one_line_error(q, 'labels=')


def test_sighup_checkpoints_releases_the_lock_and_resumes_exactly(two, tmp_path):
    """SIGHUP (a closed terminal) as SIGTERM: the step finishes, a checkpoint, one line, exit 1,
    the lock file gone; the resumed run repeats the uninterrupted one (before: exit 129, nothing
    saved since the last checkpoint, the lock file left)."""
    args = train_args(two) + SIG_ARGS
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run(args, full)
    p = start(args, part, part)
    wait_for_step(part, 2, [p])
    p.send_signal(signal.SIGHUP)
    assert p.wait(timeout=300) == 1
    err = open(f'{part}.err').read()
    assert 'Traceback' not in err and 'stopped by SIGHUP' in err.strip().splitlines()[-1], err
    assert err.count('SIGHUP: stopping after this step') == 1
    assert not os.path.exists(os.path.join(part, jobs.LOCK))
    assert torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)['step'] >= 2
    run(args + ['--init_from=resume'], part)
    assert losses(part) == losses(full)


def hup_once_there(cmd, path):
    """Run cmd until `path` appears, send SIGHUP, and return its stderr once it ended with exit
    status 1 and no traceback."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    t0 = time.time()
    while not path.exists() and time.time() - t0 < 300:
        time.sleep(0.05)
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1 and 'Traceback' not in err, err[-2000:]
    return err


def test_sighup_stops_lit_and_cluster_with_one_line(setup, two, tmp_path):  # noqa: F811
    """lit.py: SIGHUP checkpoints like SIGTERM (exit 1, one line, no lock left); cluster.py: one
    line, the lock released, its finished phases kept."""
    out, c = tmp_path / 'lit', tmp_path / 'c'
    err = hup_once_there(lit_cmd(setup, out, '--max_steps=100000', '--log_interval=1'),
                         out / 'log.jsonl')
    assert 'stopped by SIGHUP' in err.strip().splitlines()[-1] and (out / 'ckpt.pt').exists()
    assert not (out / jobs.LOCK).exists()
    err = hup_once_there([sys.executable, 'cluster.py', f'--data_dir={two / "A"}', f'--out_dir={c}',
                          '--num_classes=32', '--niter=100000', '--kmeans_ckpt_interval=1'],
                         c / 'kmeans_state.npz')
    assert 'stopped by SIGHUP: finished phases are kept' in err.strip().splitlines()[-1]
    assert not (c / jobs.LOCK).exists() and (c / 'phase_embed.json').exists()


@pytest.mark.parametrize('limit', [4096, 40000])
def test_cluster_on_a_full_disk_stops_with_one_line(two, tmp_path, limit):
    """A file-size limit fails cluster.py's writes as a full disk would (the PCA basis at 4 KB,
    the embeddings at 40 KB): one line naming the file, no traceback, nothing under a final name
    that is not whole."""
    p = cluster(two / 'A', tmp_path / 'c', ok=False,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = one_line_error(p, str(tmp_path / 'c'))
    assert p.returncode == 1 and ('write failed' in line or 'cannot be created' in line), line
    assert not (tmp_path / 'c' / 'embeddings.npy').exists()


def test_a_dangling_out_dir_link_is_one_line(two, tmp_path):
    """out_dir a symbolic link to a folder that does not exist: one line saying so (before:
    'File exists' from makedirs)."""
    os.symlink(tmp_path / 'gone', tmp_path / 'link')
    p = run(train_args(two) + BASE, str(tmp_path / 'link'), expect_ok=False)
    one_line_error(p, 'is a symbolic link to', 'which does not exist')
    p = cluster(two / 'A', tmp_path / 'link', ok=False)
    one_line_error(p, 'is a symbolic link to', 'which does not exist')


def test_json_has_no_bare_nan(tmp_path):
    """save_json writes non-finite floats as null: every stage's JSON parses strictly."""
    files.save_json(str(tmp_path / 'x.json'), {'a': float('nan'), 'b': [1.0, float('inf')], 'c': 2})
    strict = json.loads((tmp_path / 'x.json').read_text(), parse_constant=lambda c: 1 / 0)
    assert strict == {'a': None, 'b': [1.0, None], 'c': 2}


def test_the_lost_rank_line_drops_gloos_sign_off():
    """The lost-rank line quotes the cause without gloo's 'GLHF!' sign-off."""
    code = ('import jobs; jobs.lost_rank(RuntimeError, RuntimeError("[gloo] Connection closed '
            'by peer [127.0.0.1]:29500 GLHF! \\U0001F3D6\\nmore"), None, 1, 30.0)')
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=60)
    line = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and 'Connection closed by peer [127.0.0.1]:29500)' in line, line
    assert 'GLHF' not in p.stderr


def test_lit_holds_one_readers_shard_maps_under_a_low_file_limit(setup, tmp_path):  # noqa: F811
    """80 shards, max_open_shards=64 and `ulimit -n` 156 (room for one reader's 64 maps + 32
    spare, not two readers'): lit.py trains (before: its caption check kept 64 maps of its own
    open, and the loader's reader then stopped on the limit)."""
    import prepare
    prepare.build('synthetic', str(tmp_path / 'syn'), image_size=32, count=160, seed=0, workers=1,
                  shard_size=2, progress=False)
    cmd = lit_cmd(setup, tmp_path / 'run', '--max_steps=2', '--max_open_shards=64')
    cmd[2] = f'--data_dir={tmp_path / "syn"}'
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (156, 156)))
    assert p.returncode == 0, p.stderr[-2000:]


def test_an_unfinished_prepare_is_refused_naming_it(two, tmp_path):
    """A dataset folder whose build stopped (build.json, shards, no meta.json): train.py and
    cluster.py stop with one line saying prepare.py has not finished there."""
    d = tmp_path / 'half'
    shutil.copytree(two / 'A', d)
    os.remove(d / 'meta.json')
    (d / 'build.json').write_text('{}')
    p = run([f'--data_dir={d}', f'--labels_dir={two / "labA"}'] + BASE, str(tmp_path / 'run'),
            expect_ok=False)
    one_line_error(p, f'data_dir={d}', 'prepare.py has not finished there')
    one_line_error(cluster(d, tmp_path / 'c', ok=False), 'prepare.py has not finished there')


def test_cluster_refuses_to_reuse_embeddings_of_changed_data(two, tmp_path):
    """cluster.py re-run with the same settings after a shard of its data_dir changed: its
    finished embed phase is of other data, so it stops naming the shard instead of skipping."""
    shutil.copytree(two / 'A', tmp_path / 'A')
    cluster(tmp_path / 'A', tmp_path / 'c')
    shutil.copy(two / 'B' / 'images_00001.npy', tmp_path / 'A' / 'images_00001.npy')
    p = cluster(tmp_path / 'A', tmp_path / 'c', ok=False)
    one_line_error(p, 'phase_embed.json', 'images shard images_00001.npy', 'force=True')
