"""
Loader throughput at 224x224 with augmentation, random order:
  ours: data.Loader over memory-mapped uint8 shards on the CPU: random resized crop and resize in
        uint8 (PyTorch's antialiased bilinear uint8 kernel), flip by index reversal, converted to
        CLIP-normalised float image by image
  grid: the same loader through its device path run on the CPU (one batched bilinear grid_sample
        on float images; what the CPU ran before the uint8 path)
  base: the usual pipeline: PIL decodes JPEG files, then a torchvision-style RandomResizedCrop
        (PIL crop + bilinear resize) + horizontal flip + ToTensor + Normalize per image, stacked
        into batches; in the main process and with `workers` processes (DataLoader-like: each
        worker builds a whole batch)
  host: the CPU's part of ours when the device is a GPU (uint8 rows gathered from the memmaps;
        the crop/flip/normalise then runs on the GPU)
All read the same images (synthetic scenes; the JPEG files are what the shards are built from),
from a warm page cache, with the JPEGs at 224x224 (the least decoding the baseline can have) and at
384x384. Also the shard build (JPEG folder -> 224 shards) in images/s.

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--n_images=768 --batch_size=64 --runs=3 --workers=2]

(One torch thread, as the DataLoader-style baseline uses per worker; on a shared machine threads
spinning against other processes distort small ops.)

Prints one JSON line (also written to out/bench_loader/bench_loader.json).
"""
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import prepare  # noqa: E402
import synthetic  # noqa: E402
import transforms  # noqa: E402

n_images = 768
batch_size = 64
image_size = 224
source_sizes = (224, 384)  # JPEG files at the stored size, and larger (web images, ImageNet average ~400x350)
runs = 3
workers = 2
jpeg_quality = 90
out_dir = 'out/bench_loader'
exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configurator.py')).read())

MEAN = torch.tensor(transforms.CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(transforms.CLIP_STD).view(3, 1, 1)


def random_resized_crop_params(W, H, rng, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, with numpy randomness."""
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return rng.integers(0, H - h + 1), rng.integers(0, W - w + 1), h, w
    return 0, 0, H, W


def pil_sample(path, rng):
    with Image.open(path) as im:
        im = im.convert('RGB')
        i, j, h, w = random_resized_crop_params(*im.size, rng)
        im = im.resize((image_size, image_size), Image.BILINEAR, box=(j, i, j + w, i + h))  # crop + resize
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
    return (x - MEAN) / STD  # Normalize


def pil_batch(args):
    paths, seed = args
    rng = np.random.default_rng(seed)
    return torch.stack([pil_sample(p, rng) for p in paths])  # a tensor: sent back through shared memory, as DataLoader does


def pil_epoch(paths, epoch, pool):
    threads = torch.get_num_threads()
    if pool is None:
        torch.set_num_threads(1)  # per-image tensor ops are too small to gain from threads (DataLoader does the same)
    try:
        return _pil_epoch(paths, epoch, pool)
    finally:
        torch.set_num_threads(threads)


def _pil_epoch(paths, epoch, pool):
    order = np.random.default_rng(epoch).permutation(len(paths))
    steps = len(paths) // batch_size
    jobs = [([paths[k] for k in order[s * batch_size:(s + 1) * batch_size]], epoch * 100000 + s) for s in range(steps)]
    n = 0
    for b in (pool.imap(pil_batch, jobs) if pool else map(pil_batch, jobs)):
        n += len(b)
    return n


def host_epoch(loader, epoch):
    # the CPU's whole share of the work when the device is a GPU: uint8 rows gathered into a batch
    buf = np.empty((loader.batch_size, loader.ds.image_size, loader.ds.image_size, 3), np.uint8)
    n = 0
    for s in range(loader.steps_per_epoch):
        n += len(loader.ds.images(loader.indices(epoch, s), out=buf))
    return n


def ours_epoch(loader, epoch):
    n = 0
    for b in loader.iterate(epoch):
        n += len(b['index'])
    return n


def timed(fn):
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def bench(source_size):
    tmp = tempfile.mkdtemp(prefix='bench_loader_')
    try:
        # the images: synthetic scenes at source_size, written as JPEG files in class folders
        syn = synthetic.synthetic(n_images, source_size, seed=0)
        paths = []
        for k, (im, c) in enumerate(zip(syn['images'], syn['classes'])):
            p = os.path.join(tmp, 'jpeg', syn['classnames'][c], f'{k:06d}.jpg')
            os.makedirs(os.path.dirname(p), exist_ok=True)
            Image.fromarray(im).save(p, quality=jpeg_quality)
            paths.append(p)
        del syn
        # shard build, JPEG folder -> 224 shards
        build_rates = []
        for r in range(runs):
            meta = prepare.build(os.path.join(tmp, 'jpeg'), os.path.join(tmp, 'shards'), image_size=image_size,
                              workers=workers, overwrite=True, progress=False)
            build_rates.append(meta['build']['images_per_s'])
        loader = data.Loader(os.path.join(tmp, 'shards'), batch_size, image_size, seed=0, augment=True)
        grid = data.Loader(os.path.join(tmp, 'shards'), batch_size, image_size, seed=0, augment=True)
        grid._grid = True  # the device path (grid_sample), here on the CPU
        pool = multiprocessing.Pool(workers, torch.set_num_threads, (1,))
        ours_epoch(loader, 100)  # warm-up: page cache, allocator, threads
        ours_epoch(grid, 100)
        pil_epoch(paths, 100, pool)
        ours, gridr, host, base1, basew = [], [], [], [], []
        for r in range(runs):  # interleaved, so that a change in machine load hits all alike
            ours.append(timed(lambda: ours_epoch(loader, r)))
            gridr.append(timed(lambda: ours_epoch(grid, r)))
            host.append(timed(lambda: host_epoch(loader, r)))
            base1.append(timed(lambda: pil_epoch(paths, r, None)))
            basew.append(timed(lambda: pil_epoch(paths, r, pool)))
            print(f'source {source_size}px run {r}: ours {ours[-1]:.0f} img/s (grid_sample {gridr[-1]:.0f}, '
                  f'host part {host[-1]:.0f}), PIL 1 process {base1[-1]:.0f}, '
                  f'PIL {workers} workers {basew[-1]:.0f}, build {build_rates[r]:.0f}')
        pool.terminate()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = lambda xs: round(float(np.median(xs)), 1)
    return dict(ours_images_per_s=med(ours), grid_images_per_s=med(gridr), ours_host_images_per_s=med(host), pil_images_per_s=med(base1), pil_workers_images_per_s=med(basew),
                ratio_vs_pil=round(med(ours) / med(base1), 2), grid_ratio_vs_pil=round(med(gridr) / med(base1), 2), ratio_vs_pil_workers=round(med(ours) / med(basew), 2),
                host_ratio_vs_best_pil=round(med(host) / max(med(base1), med(basew)), 1),
                build_images_per_s=med(build_rates))


if __name__ == '__main__':
    result = dict(n_images=n_images, image_size=image_size, batch_size=batch_size, runs=runs, workers=workers,
                  torch_threads=torch.get_num_threads(), cpus=len(os.sched_getaffinity(0)))
    for s in source_sizes:
        result[f'source_{s}px'] = bench(s)
    print(json.dumps(result))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'bench_loader.json'), 'w') as f:
        json.dump(result, f)
