"""data.py at LAION's shape, on a small machine: a dataset of hundreds of shards is read with a
bounded number of open shard maps (every stage, under a low `ulimit -n`), opening it reads no
shard, and the epoch order is a bijection computed per batch (no N-row permutation)."""
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import data
import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNT, SHARD = 400, 1  # 400 image + 400 text shard files: far above the limits used below
ENV = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', MKL_CBWR='AUTO,STRICT')


@pytest.fixture(scope='module')
def many(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('scale') / 'many')
    prepare.build('synthetic', d, image_size=16, count=COUNT, seed=0, shard_size=SHARD, workers=1,
                  progress=False)
    return d


def reference(d, kind):
    """Every row of `kind`, read whole with np.load (no memory map), in dataset order."""
    meta = json.load(open(os.path.join(d, 'meta.json')))
    return np.concatenate([np.load(os.path.join(d, s[kind])) for s in meta['shards']])


def open_files():
    return len(os.listdir('/proc/self/fd'))


def with_file_limit(limit):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def run(args, limit):
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, preexec_fn=with_file_limit(limit))


def one_line_stop(p, *needles):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert all(n in lines[-1] for n in needles), lines[-1]


# ----------------------------------------------------------------------------- bounded maps


def test_reads_are_exact_with_at_most_max_open_shards_maps_from_two_threads(many):
    images, texts = reference(many, 'images'), reference(many, 'texts')
    before = open_files()
    ds = data.Dataset(many, max_open_shards=8)
    errors = []

    def reader(ds, seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(30):  # random batches touch shards all over the set: the LRU churns
                idx = rng.integers(0, COUNT, 24)
                assert np.array_equal(ds.images(idx), images[idx])
                assert np.array_equal(ds.texts(idx), texts[idx].astype(np.int64))
                assert len(ds._mm) <= 8
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=reader, args=(ds, s)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert np.array_equal(ds.images(np.arange(COUNT)), images)  # every shard, in order
    # one descriptor per map, and no more than the cache holds (+ 2: reads in flight)
    assert len(ds._mm) == 8 and open_files() - before <= 8 + 2
    del ds
    assert open_files() <= before  # dropping the Dataset closes its maps


def test_opening_reads_no_shard_and_a_bad_one_stops_at_first_read(many, tmp_path):
    # only meta.json and classes.npy: the open succeeds, so it read no shard
    d = str(tmp_path / 'meta_only')
    os.makedirs(d)
    for f in ('meta.json', 'classes.npy'):
        shutil.copy(os.path.join(many, f), d)
    ds = data.Dataset(d)
    assert len(ds) == COUNT and len(ds.classes) == COUNT and len(ds._mm) == 0
    with pytest.raises(SystemExit, match='^' + os.path.join(d, 'images_00007.npy') + ': missing$'):
        ds.images([7 * SHARD])


@pytest.mark.parametrize('limit,max_open', [(64, 128), (40, 16)])
def test_a_limit_below_what_max_open_shards_needs_stops_with_one_line(many, tmp_path, limit,
                                                                     max_open):
    # checked before the first shard is mapped: cluster.py reads shards in its first phase
    p = run(['cluster.py', f'--data_dir={many}', f'--out_dir={tmp_path / "c"}', '--num_classes=8',
             '--teacher=pixels', f'--max_open_shards={max_open}'], limit)
    one_line_stop(p, f'max_open_shards={max_open}:', f'ulimit -n) is {limit}')


def test_too_many_open_files_in_the_prefetch_thread_is_one_line(many):
    # the check passes (a few files + 8 maps + 32 spare <= 64), then other files use up every
    # descriptor but one: the next map (open + mmap's dup) fails with EMFILE in the Loader's
    # prefetch thread, and the main thread stops with the one line
    code = (f'import sys; sys.path.insert(0, {ROOT!r}); import data\n'
            f'ld = data.Loader({many!r}, 16, 16, with_text=True, max_open_shards=8)\n'
            'ld.batch(0, 0)\n'
            'held = []\n'
            'try:\n'
            '    while True: held.append(open(sys.executable, "rb"))\n'
            'except OSError: held.pop().close()\n'
            'for b in ld.iterate(0): pass\n')
    p = subprocess.run([sys.executable, '-c', code], env=ENV, capture_output=True, text=True,
                       timeout=120, preexec_fn=with_file_limit(64))
    one_line_stop(p, 'max_open_shards=8: too many open files mapping', 'ulimit -n, is 64')


def test_out_of_memory_maps_is_one_line(many, monkeypatch):
    def enomem(*args, **kwargs):
        raise OSError(12, 'Cannot allocate memory')
    monkeypatch.setattr(data.mmap, 'mmap', enomem)
    with pytest.raises(SystemExit, match=r'^max_open_shards=4: out of memory maps mapping .*'
                                         r'images_00000\.npy \(vm\.max_map_count'):
        data.Dataset(many, max_open_shards=4).images([0])


def test_every_stage_runs_under_a_low_open_file_limit(many, tmp_path):
    # 800 shard files, 96 descriptors: each reader keeps at most 16 maps. Cluster (pixels
    # teacher), train with kNN evaluation (two readers in one process), LiT (images + texts from
    # the prefetch thread), probe (linear probe, zero-shot, retrieval)
    limit, lim = 96, '--max_open_shards=16'
    assert limit < 2 * COUNT // SHARD
    t = str(tmp_path)
    stages = [
        ['cluster.py', f'--data_dir={many}', f'--out_dir={t}/cluster', '--num_classes=16',
         '--num_positives=4', '--teacher=pixels', lim],
        ['train.py', '--model=ViT-T/4', '--image_size=16', '--warmup_steps=2', '--device=cpu',
         '--num_positives=4', f'--data_dir={many}', f'--labels_dir={t}/cluster',
         f'--out_dir={t}/train', '--global_batch_size=32', '--micro_batch_size=16', '--max_steps=3',
         f'--eval_data_dir={many}', lim],
        ['lit.py', '--global_batch_size=32', '--text_width=64', '--text_layers=1', '--text_heads=2',
         '--warmup_steps=2', '--device=cpu', f'--data_dir={many}',
         f'--vision_checkpoint={t}/train/ckpt.pt', f'--out_dir={t}/lit', '--max_steps=3', lim],
        ['probe.py', f'--checkpoint={t}/lit/ckpt.pt', f'--train_dir={many}', f'--test_dir={many}',
         f'--retrieval_dir={many}', f'--out_dir={t}/probe', '--max_iter=10', '--device=cpu', lim]]
    for args, out in zip(stages, ('cluster/cluster.json', 'train/train.json', 'lit/lit.json',
                                  'probe/probe.json')):
        p = run(args, limit)
        assert p.returncode == 0, args[0] + p.stderr[-3000:]
        assert os.path.exists(os.path.join(t, out))
    assert json.load(open(f'{t}/train/train.json'))['knn_acc'] is not None
    assert 'retrieval' in json.dumps(json.load(open(f'{t}/probe/probe.json')))

# ----------------------------------------------------------------------------- epoch order


@pytest.mark.parametrize('n', [1, 2, 3, 5, 16, 17, 100, 1000, 1023, 1024, 1025, 4099])
def test_epoch_order_gives_every_row_exactly_once(n):
    for seed, epoch in ((0, 0), (1337, 3), (7, 12)):
        order = data.epoch_order(np.arange(n), n, seed, epoch)
        assert np.array_equal(np.sort(order), np.arange(n))
        # batch by batch (what each rank computes) is the same order
        parts = [data.epoch_order(np.arange(a, min(a + 7, n)), n, seed, epoch)
                 for a in range(0, n, 7)]
        assert np.array_equal(np.concatenate(parts), order)
    if n >= 16:
        assert not np.array_equal(order, data.epoch_order(np.arange(n), n, 7, 13))
        assert not np.array_equal(order, np.arange(n))


def test_epoch_order_looks_uniform():
    # 400 epochs of n = 1000: the first row is spread over [0, n) like a uniform draw (chi-square
    # over 10 bins, 9 degrees of freedom: 27.9 is its 0.999 quantile), and neighbours in the
    # order are uncorrelated
    n = 1000
    orders = np.stack([data.epoch_order(np.arange(n), n, 0, e) for e in range(400)])
    counts = np.bincount(orders[:, 0] * 10 // n, minlength=10)
    assert ((counts - 40) ** 2 / 40).sum() < 27.9
    assert abs(np.corrcoef(orders[:, :-1].ravel(), orders[:, 1:].ravel())[0, 1]) < 0.02


def test_loader_order_needs_memory_of_a_batch_not_of_the_dataset(many):
    # a 400M-row dataset, stood in by meta.json only (its shards are never read)
    ld = data.Loader(many, 16, 16)
    ld.batch_size, ld.world_size, ld.rank = 256, 8, 5
    ld.ds.offsets = np.array([0, 400_000_000])
    ld.steps_per_epoch = 400_000_000 // (256 * 8)
    tracemalloc.start()
    idx = ld.indices(3, 1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(np.unique(idx)) == 256 and idx.max() < 400_000_000
    assert peak < 256 * 1024  # the old permutation: 8 bytes x 400M rows = 3.2 GB per rank
    assert np.array_equal(idx, data.epoch_order(np.arange(1000 * 8 * 256 + 5 * 256,
                                                          1000 * 8 * 256 + 6 * 256),
                                                400_000_000, 0, 3))
