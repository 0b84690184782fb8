"""
Benchmark of cluster.py's k-means over ranks: N x d float16 embeddings into k centres plus the
top-l assignment, through the real script (embeddings_path input) on 1 rank and on 2 ranks
(torchrun, gloo), against the obvious alternative: everything in RAM as float32, faiss.Kmeans
(spherical) on it, one index.search over all rows, with 1 and with 2 threads. Every k-means sees
the same number of points (min(N, max_points_per_centroid * k); all of them at the defaults) for
the same iterations. Each configuration runs `repeats` times; the medians are reported.

    python bench/bench_cluster.py                         # 1M x 128 -> 10K, top-8, 2 iterations
    python bench/bench_cluster.py --n=200000 --niter=5    # quicker

Each rank and the faiss process get OMP_NUM_THREADS=threads (1) per rank / thread count given:
1 rank uses one core, 2 ranks two. Peak RSS is each process's own ru_maxrss (cluster.py reports
it per rank in cluster.json; it includes file pages mapped while reading). cluster.py's time also
covers its embed phase (a normalised float16 copy of the input), which the alternative skips;
kmeans_s is the k-means phase alone (sample read + iterations) and faiss's train().
"""
import os
import sys
import json
import time
import socket
import subprocess

import numpy as np

n = 1_000_000  # embeddings
d = 128
k = 10_000  # centres
l = 8  # top-l labels
true_k = 10_000  # generating clusters of the random data
noise = 0.6  # per-row noise norm relative to the unit centre
niter = 2  # Lloyd iterations (kept low: one iteration is ~2.6 TFLOP, minutes on one CPU core)
max_points_per_centroid = 256  # k-means sample = min(n, this * k): all 1M rows at the defaults
repeats = 3
threads = 1  # OMP_NUM_THREADS per rank (and for faiss at 1 thread)
work_dir = 'out/bench_cluster'
seed = 0
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)  # configurator.py imports itself from beside the script it configures
exec(open(os.path.join(root, 'configurator.py')).read())
os.makedirs(work_dir, exist_ok=True)

# the obvious alternative: load it all, float32, plain faiss
IN_RAM = r'''
import sys, json, time, resource, numpy as np, faiss
path, k, l, niter, ppc, seed = sys.argv[1], *map(int, sys.argv[2:])
t0 = time.time()
x = np.load(path).astype(np.float32)
km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=ppc,
                  min_points_per_centroid=1)
t1 = time.time()
km.train(x)
t2 = time.time()
_, labels = km.index.search(x, l)
print(json.dumps(dict(seconds=time.time() - t0, kmeans_s=t2 - t1, mean_cos=float(km.obj[-1]) / min(len(x), ppc * k),
                      peak_rss_gib=[resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20])))
'''


def make_data(path, n, d, true_k, seed):
    """Unit-norm rows around true_k random unit centres, written chunkwise into a .npy memmap."""
    if os.path.exists(path) and np.load(path, mmap_mode='r').shape == (n, d):
        return
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((true_k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, true_k, n).astype(np.int32)
    out = np.lib.format.open_memmap(path + '.tmp', mode='w+', dtype=np.float16, shape=(n, d))
    for i in range(0, n, 65536):
        yi = y[i:i + 65536]
        x = centres[yi] + rng.standard_normal((len(yi), d), dtype=np.float32) * (noise / np.sqrt(d))
        out[i:i + len(yi)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    os.replace(path + '.tmp', path)


def measure(cmd, omp):
    """Wall time of one command and the JSON line it printed last."""
    t = time.time()
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(omp), CUDA_VISIBLE_DEVICES=''))
    wall = time.time() - t
    if r.returncode != 0:
        raise SystemExit(f'benchmark command failed ({r.returncode}): {" ".join(cmd)}\n{r.stderr[-2000:]}')
    return wall, json.loads([ln for ln in r.stdout.splitlines() if ln.startswith('{')][-1])


def ours(path, ranks):
    if ranks == 1:
        cmd = [sys.executable, 'cluster.py']
    else:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={ranks}', f'--master_port={port}',
               'cluster.py']
    return cmd + [f'--embeddings_path={path}', f'--out_dir={work_dir}/ours_{ranks}', f'--num_classes={k}',
                  f'--num_positives={l}', f'--niter={niter}', f'--max_points_per_centroid={max_points_per_centroid}',
                  f'--seed={seed}', '--force=True']


path = os.path.join(work_dir, f'emb_{n}x{d}.npy')
t = time.time()
make_data(path, n, d, true_k, seed)
print(f'data {path}: {time.time() - t:.1f}s', flush=True)
configs = {
    'cluster.py, 1 rank': lambda: measure(ours(path, 1), threads),
    'cluster.py, 2 ranks': lambda: measure(ours(path, 2), threads),
    f'faiss.Kmeans, {threads} thread(s)': lambda: measure(
        [sys.executable, '-c', IN_RAM, path, str(k), str(l), str(niter), str(max_points_per_centroid), str(seed)], threads),
    f'faiss.Kmeans, {2 * threads} threads': lambda: measure(
        [sys.executable, '-c', IN_RAM, path, str(k), str(l), str(niter), str(max_points_per_centroid), str(seed)],
        2 * threads),
}
runs = {name: [] for name in configs}
for rep in range(repeats):  # interleaved, so that machine load drifts hit every configuration alike
    for name, f in configs.items():
        wall, res = f()
        kmeans_s = res['kmeans_s'] if 'kmeans_s' in res else res['seconds']['kmeans']
        mean_cos = res['mean_cos'] if 'mean_cos' in res else res['kmeans_mean_cos']
        runs[name].append((wall, kmeans_s, max(res['peak_rss_gib']), mean_cos))
        print(json.dumps(dict(config=name, repeat=rep, wall_s=round(wall, 1), kmeans_s=round(kmeans_s, 1),
                              peak_rss_gib_per_rank=res['peak_rss_gib'], mean_cos=mean_cos)), flush=True)
sample = min(n, max_points_per_centroid * k)
results = dict(n=n, d=d, k=k, l=l, niter=niter, kmeans_sample=sample, repeats=repeats, omp_threads_per_rank=threads,
               lloyd_gflop_per_iter=round(2 * sample * k * d / 1e9, 1), rows={})
for name, v in runs.items():
    wall, km, rss, cos = (float(np.median(c)) for c in zip(*v))
    results['rows'][name] = dict(wall_s=round(wall, 1), kmeans_s=round(km, 1), peak_rss_gib_per_rank=round(rss, 3),
                                 mean_cos=round(cos, 4))
json.dump(results, open(os.path.join(work_dir, 'bench_cluster.json'), 'w'), indent=1)
print(json.dumps(results))
