"""train.py end to end, as subprocesses on a tiny model and the synthetic set: it learns, a
stopped-and-resumed run repeats the uninterrupted one bitwise, 2 gloo ranks match 1 process on the
same global batch (and their checkpoint resumes on 1 rank, centres re-sharded exactly), and each
bad input stops with its message."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = 4  # positives per image in the test labels

# ViT-T/4 at 16 px (17 tokens): ~0.1 s per step of 16 images on one core
TINY = ['--model=ViT-T/4', '--image_size=16', '--warmup_steps=2', '--learning_rate=2e-3',
        '--log_interval=1', '--ckpt_interval=1000', '--device=cpu', f'--num_positives={L}']


def run(args, out_dir, nproc=1, expect_ok=True):
    # one thread per process: faster than two on a shared 2-core machine, and deterministic
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))
    launch = ([sys.executable, '-m', 'torch.distributed.run', '--standalone',
               f'--nproc_per_node={nproc}'] if nproc > 1 else [sys.executable])
    p = subprocess.run(launch + [os.path.join(ROOT, 'train.py')] + TINY + args +
                       [f'--out_dir={out_dir}'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    if expect_ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out_dir):
    recs = [json.loads(x) for x in open(os.path.join(out_dir, 'log.jsonl'))]
    return [(r['step'], r['loss'], r['pos_cos']) for r in recs if 'loss' in r]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The synthetic set (prepare.py, 16 px) clustered by cluster.py's pixel teacher into 32
    centres, 4 labels per image: the real stage-1 output, and labels a tiny tower can learn
    quickly."""
    root = tmp_path_factory.mktemp('train')
    data_dir, labels_dir = str(root / 'syn'), str(root / 'cluster')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for cmd in (['prepare.py', '--src=synthetic', f'--out={data_dir}', '--count=512', '--image_size=16',
                 '--seed=0'],
                ['cluster.py', f'--data_dir={data_dir}', f'--out_dir={labels_dir}', '--num_classes=32',
                 f'--num_positives={L}']):
        p = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    labels = np.load(os.path.join(labels_dir, 'labels.npy'))
    assert labels.shape == (512, L)
    return {'root': root, 'data': ['--data_dir=' + data_dir, '--labels_dir=' + labels_dir],
            'data_dir': data_dir, 'labels_dir': labels_dir, 'num_classes': 32,
            'label_max': int(labels.max())}


def test_learns_and_checkpoint_loads(data):
    out = str(data['root'] / 'learn')
    p = run(data['data'] + ['--global_batch_size=32', '--micro_batch_size=16', '--max_steps=40',
                            '--sample_ratio=0.5', '--num_positives=2', '--augment=none',
                            f'--eval_data_dir={data["data_dir"]}', '--eval_interval=20',
                            '--eval_batch_size=128'], out)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == json.load(open(os.path.join(out, 'train.json')))
    assert result['step'] == 40 and result['num_classes'] == data['num_classes']
    log = losses(out)
    assert [s for s, _, _ in log] == list(range(1, 41))  # 2 micro-batches per step, 40 steps
    first, last = log[:5], log[-5:]
    assert np.mean([x[1] for x in last]) < 0.8 * np.mean([x[1] for x in first])
    assert np.mean([x[2] for x in last]) > np.mean([x[2] for x in first]) + 0.05  # Fig. 3
    knn = [json.loads(x)['knn_acc'] for x in open(os.path.join(out, 'log.jsonl')) if 'knn_acc' in x]
    assert len(knn) == 2 and result['knn_acc'] == knn[-1] and 0 <= knn[-1] <= 1
    # ckpt.pt is a tower checkpoint checkpoints.from_pretrained reads
    from checkpoints import from_pretrained
    from model import VisionTransformer
    ck = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=True)
    ref = VisionTransformer(**ck['vision_config'])
    ref.load_state_dict(ck['vision'])
    vision, _ = from_pretrained(os.path.join(out, 'ckpt.pt'))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vision.eval()(x), ref.eval()(x), rtol=0, atol=0)
    assert ck['step'] == 40 and ck['world_size'] == 1 and ck['centres'] == ['centres_00000040_rank0_of_1.pt']
    shard = torch.load(os.path.join(out, ck['centres'][0]), weights_only=True)
    assert shard['weight'].shape == (data['num_classes'], 128) and shard['start'] == 0
    # init_from=<checkpoint path>: the tower starts from it (lr 0: it must come out unchanged)
    warm = str(data['root'] / 'warm')
    run(data['data'] + ['--global_batch_size=16', '--micro_batch_size=16', '--max_steps=1',
                        f'--init_from={os.path.join(out, "ckpt.pt")}', '--learning_rate=0.0'], warm)
    ck2 = torch.load(os.path.join(warm, 'ckpt.pt'), map_location='cpu', weights_only=True)
    assert ck2['vision_config'] == ck['vision_config'] and ck2['step'] == 1
    for k in ck['vision']:
        assert torch.equal(ck['vision'][k], ck2['vision'][k]), k


@pytest.mark.parametrize('loss_type', ['mlcd', 'onevision'])
def test_resume_is_exact(data, loss_type):
    """stop after step 3, resume: the same loss sequence, bitwise, and the same final weights
    (augmentation and negative sampling on, so the loader and the sampler must draw on from where
    they stopped; 'onevision': and the labels drawn, 3 of 4 per image and step)."""
    # l = 1: a micro-batch of 8 has <= 8 positives, so 16 of the 32 centres means >= 8 random
    # negatives, and the sampler's state matters ('onevision': its 3 terms sample 3 sets)
    l = 1 if loss_type == 'mlcd' else L
    args = data['data'] + ['--global_batch_size=16', '--micro_batch_size=8', '--max_steps=6',
                           '--sample_ratio=0.5', f'--num_positives={l}', '--ckpt_interval=2',
                           f'--loss_type={loss_type}', '--onevision_pool=4']
    full, part = str(data['root'] / f'full_{loss_type}'), str(data['root'] / f'part_{loss_type}')
    run(args, full)
    run(args + ['--stop_at=3'], part)
    assert [s for s, _, _ in losses(part)] == [1, 2, 3]
    with open(os.path.join(part, 'log.jsonl'), 'a') as f:  # as if it died after logging step 4
        f.write(json.dumps({'step': 4, 'loss': 0.0, 'pos_cos': 0.0}) + '\n')
    run(args + ['--init_from=resume'], part)
    assert losses(part) == losses(full)  # floats from JSON: exact equality is bitwise
    a = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)
    b = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    for k in a['vision']:
        assert torch.equal(a['vision'][k], b['vision'][k]), k
    sa = torch.load(os.path.join(full, a['centres'][0]), weights_only=True)
    sb = torch.load(os.path.join(part, b['centres'][0]), weights_only=True)
    for k in ('weight', 'exp_avg', 'exp_avg_sq'):
        assert torch.equal(sa[k], sb[k]), k
    # only the shards of the latest checkpoint remain
    assert sorted(f for f in os.listdir(part) if f.startswith('centres_')) == b['centres']


def test_two_ranks_match_one_and_resume_on_one(data):
    """Same global batch of 16 on 1 process and on 2 gloo ranks x 2 accumulated micro-batches of 4
    (all centres scored, no augmentation, so both see exactly the same problem): the losses agree
    to float32 reduction order (rel 1e-5). The 2-rank checkpoint then resumes on 1 rank: its centres and their Adam
    state are the two old shards stacked, bit for bit, and the loss continues as the 1-process run."""
    args = data['data'] + ['--global_batch_size=16', '--max_steps=5', '--sample_ratio=1.0',
                           '--augment=none', '--ckpt_interval=1000']
    one, two = str(data['root'] / 'one'), str(data['root'] / 'two')
    knn = [f'--eval_data_dir={data["data_dir"]}', '--eval_interval=3', '--eval_batch_size=100']
    run(args + ['--micro_batch_size=16'] + knn, one)
    run(args + ['--micro_batch_size=4', '--stop_at=3'] + knn, two, nproc=2)  # 2 ranks x 4 x 2 accum
    ref = losses(one)
    got = losses(two)
    assert [s for s, _, _ in got] == [1, 2, 3]
    np.testing.assert_allclose([x[1] for x in got], [x[1] for x in ref[:3]], rtol=1e-5)
    np.testing.assert_allclose([x[2] for x in got], [x[2] for x in ref[:3]], rtol=1e-5, atol=1e-6)
    # kNN at step 3: each rank embeds its slice of the eval set, the gathered features score the
    # same (a vote may flip on a near tie: allow 2 of 512)
    knn_at = lambda d: [json.loads(x)['knn_acc'] for x in open(os.path.join(d, 'log.jsonl'))
                        if 'knn_acc' in x and json.loads(x)['step'] == 3]
    assert len(knn_at(two)) == 1 and abs(knn_at(two)[0] - knn_at(one)[0]) <= 2 / 512

    ck = torch.load(os.path.join(two, 'ckpt.pt'), weights_only=True)
    assert ck['world_size'] == 2 and len(ck['centres']) == 2
    old = [torch.load(os.path.join(two, n), weights_only=True) for n in ck['centres']]
    assert old[0]['start'] == 0 and old[1]['start'] == old[0]['rows']
    # resume with nothing left to do: rewrites the checkpoint for 1 rank
    run(args + ['--micro_batch_size=16', '--init_from=resume', '--stop_at=3'], two)
    ck1 = torch.load(os.path.join(two, 'ckpt.pt'), weights_only=True)
    assert ck1['world_size'] == 1 and ck1['step'] == 3
    new = torch.load(os.path.join(two, ck1['centres'][0]), weights_only=True)
    for k in ('weight', 'exp_avg', 'exp_avg_sq'):
        assert torch.equal(new[k], torch.cat([old[0][k], old[1][k]])), k
    for k in ck['vision']:
        assert torch.equal(ck['vision'][k], ck1['vision'][k]), k
    # and continue on 1 rank: steps 4, 5 as in the 1-process run
    run(args + ['--micro_batch_size=16', '--init_from=resume'], two)
    got = losses(two)
    assert [s for s, _, _ in got] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([x[1] for x in got], [x[1] for x in ref], rtol=1e-5)


def sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def test_bad_inputs_stop_with_a_message(data):
    root = data['root']
    base = data['data'] + ['--global_batch_size=16', '--micro_batch_size=16', '--max_steps=2']
    # an unknown config key
    p = run(base + ['--learning_rat=1e-3'], str(root / 'bad0'), expect_ok=False)
    assert p.returncode != 0 and "unknown key 'learning_rat'" in p.stderr
    # labels.npy with a row count other than the dataset's
    short = root / 'short'
    os.makedirs(short)
    lab = np.load(os.path.join(data['labels_dir'], 'labels.npy'))
    np.save(short / 'labels.npy', lab[:-1])
    p = run(data['data'][:1] + [f'--labels_dir={short}'] + base[2:], str(root / 'bad1'), expect_ok=False)
    assert p.returncode != 0 and '511 label rows' in p.stderr and '512 images' in p.stderr
    # a label id >= num_classes
    k = data['label_max']
    p = run(base + [f'--num_classes={k}'], str(root / 'bad2'), expect_ok=False)
    assert p.returncode != 0 and f'num_classes is {k}' in p.stderr and 'labels.npy' in p.stderr
    # a non-finite loss (scale = inf) after a good checkpoint: stops, the checkpoint is untouched
    out = str(root / 'bad3')
    run(base, out)
    before = {f: sha(os.path.join(out, f)) for f in os.listdir(out) if f.endswith('.pt')}
    p = run(base + ['--init_from=resume', '--max_steps=4', '--scale=1e999'], out, expect_ok=False)
    assert p.returncode != 0 and 'non-finite loss' in p.stderr and 'at step 3' in p.stderr
    after = {f: sha(os.path.join(out, f)) for f in os.listdir(out) if f.endswith('.pt')}
    assert after == before
    run(base + ['--init_from=resume', '--max_steps=3'], out)  # and it still resumes
    assert [s for s, _, _ in losses(out)] == [1, 2, 3]


@pytest.mark.parametrize('name', ['vitb32', 'vitb16', 'vitl14', 'tiny', 'cifar10'])
def test_config_files(name):
    """Every config file holds only known keys of the right types; the paper ones match Tables 9-10."""
    p = subprocess.run([sys.executable, 'train.py', f'config/{name}.py', '--help'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    # '  --key=value  # the comment beside the setting in train.py'
    got = dict(x.split('  # ')[0].strip()[2:].split('=', 1) for x in p.stdout.splitlines()
               if x.startswith('  --'))
    if name.startswith('vit'):
        assert got['learning_rate'] == ('0.0004' if name == 'vitl14' else '0.0005')
        assert (got['global_batch_size'], got['epochs'], got['warmup_steps']) == ('32768', '32', '2000')
        assert (got['weight_decay'], got['num_classes'], got['num_positives']) == ('0.2', '1000000', '8')
        assert (got['sample_ratio'], got['margin'], got['loss_type']) == ('0.1', '0.3', "'mlcd'")


# -----------------------------------------------------------------------------
# failure behaviour: every way a run can end keeps the last good checkpoint, and says why in a line

BASE = ['--global_batch_size=16', '--micro_batch_size=16', '--max_steps=2']


def files(out_dir):
    return {f: sha(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if not f.endswith('.tmp')}


def one_line_error(p, *needles):
    """A non-zero exit whose stderr ends with a line holding every needle, and no traceback."""
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture(scope='module')
def two_runs(data):
    """Two finished 2-step runs of different seeds (the same shard names), kept pristine."""
    out = {}
    for name, seed in (('A', 1337), ('B', 7)):
        out[name] = str(data['root'] / f'run{name}')
        run(data['data'] + BASE + [f'--seed={seed}'], out[name])
    return out


def copy_run(two_runs, data, name):
    dst = str(data['root'] / name)
    shutil.copytree(two_runs['A'], dst)
    return dst


def test_diverged_run_stops_before_the_step_and_keeps_the_checkpoint(data, two_runs):
    """lr 1e6: NaN embeddings at the next step (PartialFC's loss may even read 0.0 then): the run
    stops before the optimizer step, and the good checkpoint is not replaced by NaN weights."""
    out = copy_run(two_runs, data, 'diverged')
    before = files(out)
    p = run(data['data'] + BASE + ['--init_from=resume', '--max_steps=6', '--learning_rate=1e6'],
            out, expect_ok=False)
    one_line_error(p, 'non-finite', 'embeddings', 'nothing was updated or saved')
    after = files(out)  # log.jsonl has step 3 (finite, with lr 1e6); step 4 was not applied
    assert {f: after[f] for f in before if f != 'log.jsonl'} == \
        {f: h for f, h in before.items() if f != 'log.jsonl'}
    assert [s for s, _, _ in losses(out)] == [1, 2, 3]
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ck['step'] == 2 and all(torch.isfinite(v).all() for v in ck['vision'].values())


def test_a_new_run_never_replaces_a_checkpoint(data, two_runs):
    out = copy_run(two_runs, data, 'again')
    before = files(out)
    p = run(data['data'] + BASE, out, expect_ok=False)  # the same command, without resume
    one_line_error(p, f'out_dir={out}', '--init_from=resume', '--overwrite=True')
    assert files(out) == before
    run(data['data'] + BASE + ['--overwrite=True', '--max_steps=1'], out)
    assert [s for s, _, _ in losses(out)] == [1]
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    old = torch.load(os.path.join(two_runs['A'], 'ckpt.pt'), weights_only=True)
    assert ck['step'] == 1 and ck['run_id'] != old['run_id']


def test_resume_drops_a_torn_last_log_line(data, two_runs):
    out = copy_run(two_runs, data, 'torn')
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write('{"step": 3, "epoch": 0.09, "lo')  # the disk filled up mid-record
    run(data['data'] + BASE + ['--init_from=resume', '--max_steps=3'], out)
    recs = [json.loads(x) for x in open(os.path.join(out, 'log.jsonl'))]
    assert [r['step'] for r in recs] == [1, 2, 3]


def test_files_of_another_run_are_refused(data, two_runs):
    """A centre shard or a ckpt.pt of another run (another seed, the same step and shard names),
    and a bit flipped in a shard's centres: each stops with a line naming the file."""
    b = two_runs['B']
    shard = 'centres_00000002_rank0_of_1.pt'
    resume = data['data'] + BASE + ['--init_from=resume', '--max_steps=3']
    out = copy_run(two_runs, data, 'foreign_shard')
    shutil.copy(os.path.join(b, shard), os.path.join(out, shard))
    one_line_error(run(resume, out, expect_ok=False), shard, 'belongs to run')
    out = copy_run(two_runs, data, 'foreign_ckpt')
    shutil.copy(os.path.join(b, 'ckpt.pt'), os.path.join(out, 'ckpt.pt'))
    one_line_error(run(resume, out, expect_ok=False), shard, 'belongs to run')
    out = copy_run(two_runs, data, 'bitflip')
    sh = torch.load(os.path.join(out, shard), weights_only=True)
    sh['weight'].view(torch.int32)[3, 5] ^= 1 << 4  # one bit of one centre
    torch.save(sh, os.path.join(out, shard))
    one_line_error(run(resume, out, expect_ok=False), shard, 'checksum')


def test_broken_checkpoint_files_stop_with_one_line(data, two_runs):
    shard = 'centres_00000002_rank0_of_1.pt'
    resume = data['data'] + BASE + ['--init_from=resume', '--max_steps=3']
    cases = {'missing shard': (shard, None, 'is missing'),
             'truncated shard': (shard, 0.5, 'truncated'),
             'truncated ckpt': ('ckpt.pt', 0.5, 'truncated'),
             'empty ckpt': ('ckpt.pt', 0.0, 'empty (0 bytes)')}
    for i, (what, (name, keep, needle)) in enumerate(cases.items()):
        out = copy_run(two_runs, data, f'broken{i}')
        path = os.path.join(out, name)
        if keep is None:
            os.remove(path)
        else:
            blob = open(path, 'rb').read()
            open(path, 'wb').write(blob[:int(len(blob) * keep)])
        one_line_error(run(resume, out, expect_ok=False), path, needle)


def test_a_failed_checkpoint_write_keeps_the_previous_one(data, two_runs):
    """A checkpoint that cannot be written (a 1 MiB file-size limit fails the ~30 MB ckpt.pt the
    way a full disk would) stops the run with one line; the previous checkpoint is intact and
    the run resumes from it."""
    import resource
    out = copy_run(two_runs, data, 'disk_full')
    before = files(out)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, 'train.py'] + TINY + data['data'] + BASE +
                       ['--init_from=resume', '--max_steps=3', f'--out_dir={out}'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    one_line_error(p, os.path.join(out, 'ckpt.pt'), 'write failed', 'previous checkpoint is unchanged')
    after = files(out)
    assert all(after[f] == h for f, h in before.items() if f != 'log.jsonl')  # log: step 3 added
    assert not any(f.endswith('.tmp') for f in os.listdir(out))
    run(data['data'] + BASE + ['--init_from=resume', '--max_steps=3'], out)
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['step'] == 3


def test_labels_must_be_int_n_by_l(data):
    lab = np.load(os.path.join(data['labels_dir'], 'labels.npy'))
    bad = {'float': lab.astype(np.float32), 'all_minus_one': np.full_like(lab, -1),
           'one_d': lab[:, 0].copy()}
    for name, arr in bad.items():
        d = data['root'] / f'labels_{name}'
        os.makedirs(d)
        np.save(d / 'labels.npy', arr)
        out = str(data['root'] / f'out_labels_{name}')
        p = run(data['data'][:1] + [f'--labels_dir={d}'] + BASE, out, expect_ok=False)
        one_line_error(p, f'labels_dir={d}', 'must be int [N, l]')
        assert not os.path.exists(out)  # nothing to write: no folder either


def test_unwritable_out_dir_stops_before_any_work(data, tmp_path):
    # sysfs takes no new files, even from root; a mode-0555 folder stops everyone else
    cases = ['/sys/kernel', '/sys/kernel/mlcd_run']
    if os.geteuid() != 0:
        ro = tmp_path / 'ro'
        os.makedirs(ro)
        os.chmod(ro, 0o555)
        cases += [str(ro), str(ro / 'run')]
    for out in cases:
        p = run(data['data'] + BASE, out, expect_ok=False)
        one_line_error(p, f'out_dir={out}', 'cannot write')
        assert 'global batch' not in p.stdout  # stopped before any work


def test_defaults_stop_with_one_line_and_no_folder(tmp_path):
    """python train.py with its defaults, where there is no data: one line naming the setting,
    and no out/ folder left behind."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py')], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    one_line_error(p, 'data_dir=data/laion400m: no meta.json')
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# signals and ranks that stop answering

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start(args, out_dir, log, rank=None, world=1, port=None):
    """train.py in the background, stdout/stderr to files; with rank set, one DDP rank as
    torchrun would start it (so a test can signal or stop one rank)."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py')] + TINY + args +
                            [f'--out_dir={out_dir}'], cwd=ROOT, env=env,
                            stdout=open(f'{log}.out', 'w'), stderr=open(f'{log}.err', 'w'))


def wait_for_step(out_dir, step, procs, timeout=300):
    """Until log.jsonl records `step` (the run is inside its training loop)."""
    import time
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = os.path.join(out_dir, 'log.jsonl')
        if os.path.exists(path) and any(s >= step for s, _, _ in losses(out_dir)):
            return
        assert all(p.poll() is None for p in procs), 'the run ended before it was signalled'
        time.sleep(0.05)
    raise AssertionError(f'no step {step} in {timeout} s')


SIG_ARGS = ['--global_batch_size=16', '--micro_batch_size=8', '--max_steps=20', '--sample_ratio=0.5',
            '--num_positives=1', '--ckpt_interval=1000']


def test_sigterm_checkpoints_and_resumes_exactly(data):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, the exit status is non-zero
    and says how to resume; the resumed run repeats the uninterrupted one bitwise. Then two
    signals at once (SIGINT, then SIGTERM) exit without writing anything."""
    import signal
    args = data['data'] + SIG_ARGS
    full, part = str(data['root'] / 'sig_full'), str(data['root'] / 'sig_part')
    run(args, full)
    p = start(args, part, part)
    wait_for_step(part, 2, [p])
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 1
    err = open(f'{part}.err').read().strip().splitlines()[-1]
    assert 'stopped by SIGTERM' in err and '--init_from=resume' in err, err
    ck = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    assert 2 <= ck['step'] < 20 and [s for s, _, _ in losses(part)] == list(range(1, ck['step'] + 1))
    # two signals: delivered together on SIGCONT, the second exits at once
    before = files(part)
    p = start(args + ['--init_from=resume'], part, part)
    wait_for_step(part, ck['step'] + 1, [p])
    p.send_signal(signal.SIGSTOP)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    assert p.wait(timeout=300) == 128 + signal.SIGTERM
    assert 'exiting now' in open(f'{part}.err').read()
    after = files(part)
    assert {f: after[f] for f in after if f != 'log.jsonl'} == {f: before[f] for f in before if f != 'log.jsonl'}
    run(args + ['--init_from=resume'], part)
    assert losses(part) == losses(full)
    a = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)
    b = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    for k in a['vision']:
        assert torch.equal(a['vision'][k], b['vision'][k]), k


def test_two_ranks_stop_together_on_a_signal_to_one(data):
    """SIGTERM to rank 1 only: the flag rides in the step's all-reduce, so both ranks stop after
    the same step and one checkpoint is written, and rank 0 alone says so (torchrun passes a
    signal to every rank: one line, not one per rank); resumed, the run equals the uninterrupted
    one."""
    import signal
    args = data['data'] + SIG_ARGS[:1] + ['--micro_batch_size=4'] + SIG_ARGS[2:]
    full, part = str(data['root'] / 'sig2_full'), str(data['root'] / 'sig2_part')
    run(args, full, nproc=2)
    port = free_port()
    ps = [start(args, part, f'{part}{r}', rank=r, world=2, port=port) for r in range(2)]
    wait_for_step(part, 2, ps)
    ps[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in ps] == [1, 1]
    err = open(f'{part}0.err').read().strip().splitlines()[-1]
    assert 'stopped by a signal to another rank' in err, err
    assert 'stopped by' not in open(f'{part}1.err').read()
    ck = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    assert 2 <= ck['step'] < 20 and ck['world_size'] == 2
    assert f'after step {ck["step"]} ' in err
    run(args + ['--init_from=resume'], part, nproc=2)
    assert losses(part) == losses(full)
    a = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)
    b = torch.load(os.path.join(part, 'ckpt.pt'), weights_only=True)
    for k in a['vision']:
        assert torch.equal(a['vision'][k], b['vision'][k]), k


@pytest.mark.parametrize('stopped', [1, 0])  # rank 0 also hosts the rendezvous store
def test_a_stopped_rank_ends_the_other_within_the_timeout(data, stopped):
    """SIGSTOP on one rank (as a hung or swapped-out process): the other gets no answer and, after
    timeout_minutes (here 0.2 min) rather than torch's default 30, exits with one line naming
    the likely causes and the setting."""
    import signal
    out = str(data['root'] / f'stopped{stopped}')
    args = data['data'] + SIG_ARGS[:1] + ['--micro_batch_size=4', '--max_steps=1000',
                                          '--timeout_minutes=0.2'] + SIG_ARGS[3:]
    port = free_port()
    ps = [start(args, out, f'{out}{r}', rank=r, world=2, port=port) for r in range(2)]
    try:
        wait_for_step(out, 2, ps)
        ps[stopped].send_signal(signal.SIGSTOP)
        other = 1 - stopped
        assert ps[other].wait(timeout=120) == 1  # not 30 minutes
        err = open(f'{out}{other}.err').read()
        last = err.strip().splitlines()[-1]
        assert 'Traceback' not in err, err[-3000:]
        assert last.startswith(f'rank {other}: lost contact') and 'timeout_minutes=0.2' in last, last
        assert 'stopped' in last and 'OOM' in last, last
    finally:
        for p in ps:
            p.kill()
            p.wait()
