"""
What a dataset of LAION-400M's shape costs before the first batch, and per batch:
  open:  data.Dataset on 40,000 image + 40,000 text shards (LAION-400M at prepare.py's
         shard_size=10000). ours: meta.json and classes.npy only, each shard's header checked
         when it is first mapped; eager: the same plus every shard's .npy header read and checked
         at open (what data.py did before). Warm page cache: on a network file system each
         header is a round trip, so the eager figure is a lower bound.
  map:   a read of one row from a shard read for the first time (header read and checked, then
         mapped), from one evicted from the LRU (mapped again: a miss) and from one still mapped
         (a hit), per row.
  order: the epoch order at N = 400M rows: memory and time of one rank's batch of 256 positions
         through shuffle.epoch_order vs numpy's permutation of all N rows (measured at 10M and 40M
         rows, 8 bytes per row: 3.2 GB at 400M, computed, not run).
Tiny images (1x1 px, one row per shard) keep the files small: the costs measured are per file.

    OMP_NUM_THREADS=1 python bench/bench_open.py [--shards=40000 --runs=5]

Prints one JSON line (also written to out/bench_open/bench_open.json).
"""
import json
import os
import shutil
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

shards = 40000
runs = 5
root = '/tmp/bench_open'
for arg in sys.argv[1:]:
    key, value = arg.removeprefix('--').split('=')
    globals()[key] = type(globals()[key])(value)


def build(d, n):
    """n image shards of one 1x1 image, n text shards, meta.json: the format prepare.py writes."""
    if os.path.exists(os.path.join(d, 'meta.json')):
        return
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    img, txt, meta = np.zeros((1, 1, 1, 3), np.uint8), np.zeros((1, 77), np.uint16), []
    for s in range(n):
        np.save(os.path.join(d, data.shard_file('images', s)), img)
        np.save(os.path.join(d, data.shard_file('texts', s)), txt)
        meta.append({'images': data.shard_file('images', s), 'texts': data.shard_file('texts', s),
                     'count': 1})
    np.save(os.path.join(d, 'classes.npy'), np.zeros(n, np.int32))
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump({'count': n, 'image_size': 1, 'has_text': True, 'context_length': 77,
                   'classnames': None, 'shards': meta}, f)


def eager_open(d):
    """The open as it was: the Dataset, then every shard's header read and checked."""
    ds = data.Dataset(d)
    for s in range(len(ds.meta['shards'])):
        for kind in ('images', 'texts'):
            path, dtype, want = ds._expect(kind, s)
            shape, got = data._npy_header(path)
            assert shape == want and got == dtype
    return ds


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_open(d):
    ours, eager = [], []
    for _ in range(runs):  # side by side, alternating
        ours.append(timed(lambda: data.Dataset(d)))
        eager.append(timed(lambda: eager_open(d)))
    return {'ours_s': statistics.median(ours), 'eager_s': statistics.median(eager),
            'eager_over_ours': statistics.median(eager) / statistics.median(ours)}


def bench_map(d, n=4000):
    import resource
    n = min(n, shards, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)  # hits: all mapped
    first, remap, hits = [], [], []
    read_all = lambda ds: timed(lambda: [ds.images([k]) for k in range(n)]) / n  # noqa: E731
    for _ in range(runs):
        ds = data.Dataset(d, max_open_shards=n)
        first.append(read_all(ds))  # header read and checked, then mapped
        hits.append(read_all(ds))  # all mapped now
        ds._mm.clear()  # as if evicted: mapped again, the checked offset kept
        remap.append(read_all(ds))
    us = lambda x: 1e6 * statistics.median(x)  # noqa: E731
    return {'rows': n, 'first_us_per_row': us(first), 'remap_us_per_row': us(remap),
            'hit_us_per_row': us(hits)}


def peak_bytes(fn):
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def bench_order(N=400_000_000, B=256):
    pos = np.arange(1000 * B, 1001 * B)
    t = [timed(lambda: data.epoch_order(pos, N, 1337, 3)) for _ in range(max(runs, 20))]
    perm = {n: peak_bytes(lambda: np.random.default_rng([1337, 3]).permutation(n))
            for n in (10_000_000, 40_000_000)}
    per_row = perm[40_000_000] / 40_000_000
    return {'ours_bytes_per_batch': peak_bytes(lambda: data.epoch_order(pos, N, 1337, 3)),
            'ours_ms_per_batch': 1e3 * statistics.median(t),
            'permutation_peak_bytes': perm, 'permutation_bytes_per_row': per_row,
            'permutation_gb_at_400M': per_row * N / 1e9}


if __name__ == '__main__':
    d = os.path.join(root, f'{shards}')
    t0 = time.time()
    build(d, shards)
    result = {'shards': shards, 'files': 2 * shards, 'runs': runs,
              'build_s': time.time() - t0, 'open': bench_open(d), 'map': bench_map(d),
              'order': bench_order(), 'machine': f'{os.cpu_count()} CPU cores (shared)'}
    os.makedirs('out/bench_open', exist_ok=True)
    with open('out/bench_open/bench_open.json', 'w') as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
