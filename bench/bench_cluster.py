"""
Benchmark of cluster.py at scale: wall time and peak RSS to cluster N x d float16 embeddings
into k centres and assign the top-l, through the real script (embeddings_path input), plus a
side-by-side at a smaller scale against the obvious alternative: everything in RAM as float32,
faiss.Kmeans on it (faiss draws its own sample of max_points_per_centroid * k), one index.search
over all rows (median of `repeats` runs each). Ours also makes its normalised float16 copy of the
input (the embed phase of embeddings_path), which the alternative does not.

    python bench/bench_cluster.py                      # 1M x 512 -> 10K, top-8 (CPU: ~10 min)
    python bench/bench_cluster.py --n=100000 --k=1000  # quicker

On a machine with CUDA and faiss GPUs, cluster.py runs k-means and assignment on the GPU.
Peak RSS is each child process's ru_maxrss (it includes file pages mapped while reading).
"""
import os
import sys
import json
import time
import subprocess

import numpy as np

n = 1_000_000  # embeddings
d = 512
k = 10_000  # centres
l = 8  # top-l labels
true_k = 10_000  # generating clusters of the random data
noise = 0.6  # per-row noise norm relative to the unit centre
niter = 10
max_points_per_centroid = 8  # k-means sample = min(n, this * k); faiss's own default is 256
cmp_n, cmp_k = 500_000, 1000  # side-by-side with the in-RAM alternative (same ppc, niter)
repeats = 3
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
                  min_points_per_centroid=1, gpu=faiss.get_num_gpus() > 0)
km.train(x)
_, labels = km.index.search(x, l)
np.save(path + '.inram_labels.npy', labels.astype(np.int32))
print(json.dumps(dict(seconds=time.time() - t0)))
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
    np.save(path + '.classes.npy', y)


def measure(cmd):
    """Wall time and peak RSS (GiB) of one child process."""
    shim = ('import subprocess, sys, resource, time; t = time.time(); '
            'r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True); '
            'print(r.stdout); print("WALL", time.time() - t, "RSS", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, '
            '"RC", r.returncode)')
    out = subprocess.run([sys.executable, '-c', shim, *cmd], capture_output=True, text=True, cwd=root).stdout
    tail = out.strip().splitlines()[-1].split()
    if tail[5] != '0':
        raise SystemExit(f'benchmark command failed ({tail[5]}): {" ".join(cmd)}\n{out}')
    lines = [ln for ln in out.splitlines() if ln.startswith('{')]
    return float(tail[1]), int(tail[3]) / 2 ** 20, json.loads(lines[-1]) if lines else {}


def ours(path, out, k, niter, ppc):
    return [sys.executable, 'cluster.py', f'--embeddings_path={path}', f'--classes_path={path}.classes.npy',
            f'--out_dir={out}', f'--num_classes={k}', f'--num_positives={l}', f'--niter={niter}',
            f'--max_points_per_centroid={ppc}', f'--seed={seed}', '--force=True']


results = {}
try:
    import torch
    gpu = torch.cuda.is_available()
except ImportError:
    gpu = False

# 1) the headline: n x d -> k, top-l, through cluster.py
big = os.path.join(work_dir, f'emb_{n}x{d}.npy')
t = time.time()
make_data(big, n, d, true_k, seed)
print(f'data {big}: {time.time() - t:.1f}s', flush=True)
wall, rss, res = measure(ours(big, os.path.join(work_dir, 'big'), k, niter, max_points_per_centroid))
sample = min(n, max_points_per_centroid * k)
results['headline'] = dict(n=n, d=d, k=k, l=l, niter=niter, max_points_per_centroid=max_points_per_centroid,
                           kmeans_sample=sample, wall_s=round(wall, 1), peak_rss_gib=round(rss, 2),
                           phase_s=res.get('seconds'), purity=res.get('purity'), nmi=res.get('nmi'),
                           empty=res.get('sizes', {}).get('empty'), faiss_gpu=res.get('faiss_gpu'),
                           lloyd_tflop_per_iter=round(2 * sample * k * d / 1e12, 2),
                           assign_tflop=round(2 * n * k * d / 1e12, 2))
if res.get('seconds'):
    s = res['seconds']
    results['headline']['kmeans_gflops'] = round(niter * 2 * sample * k * d / s['kmeans'] / 1e9, 1)
    results['headline']['assign_gflops'] = round(2 * n * k * d / s['assign'] / 1e9, 1)
print(json.dumps(results['headline']), flush=True)

# 2) side by side at a smaller scale: ours (streamed, float16 on disk) vs all in RAM
small = os.path.join(work_dir, f'emb_{cmp_n}x{d}.npy')
make_data(small, cmp_n, d, cmp_k, seed + 1)
rows = {'ours': [], 'in_ram': []}
for r in range(repeats):
    rows['ours'].append(measure(ours(small, os.path.join(work_dir, 'small'), cmp_k, niter, max_points_per_centroid))[:2])
    rows['in_ram'].append(measure([sys.executable, '-c', IN_RAM, small, str(cmp_k), str(l), str(niter),
                                   str(max_points_per_centroid), str(seed)])[:2])
med = {m: (float(np.median([w for w, _ in v])), float(np.median([s for _, s in v]))) for m, v in rows.items()}
results['side_by_side'] = dict(n=cmp_n, d=d, k=cmp_k, l=l, repeats=repeats,
                               ours_wall_s=round(med['ours'][0], 2), in_ram_wall_s=round(med['in_ram'][0], 2),
                               ours_rss_gib=round(med['ours'][1], 3), in_ram_rss_gib=round(med['in_ram'][1], 3),
                               wall_ratio=round(med['ours'][0] / med['in_ram'][0], 2),
                               rss_ratio=round(med['ours'][1] / med['in_ram'][1], 2))
print(json.dumps(results['side_by_side']), flush=True)
results['gpu'] = gpu
json.dump(results, open(os.path.join(work_dir, 'bench_cluster.json'), 'w'), indent=1)
print(json.dumps(results))
