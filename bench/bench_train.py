"""
train.py's throughput against a bare training loop, side by side, on CIFAR-10 at 32 px with
config/cifar10.py's tower and recipe (ViT-T/8, batch 256, l = 8, r = 0.1, pad-and-crop + flip):
  ours: train.py itself (a subprocess): data.Loader over the uint8 shards, PartialFC, AdamW for
        the tower and the centres, logging, the packed host read; img/s from its log.jsonl
        (the median over log intervals, the first one left out)
  bare: the same tower, loss and optimizer in a plain loop over the images held in memory as one
        uint8 tensor, the same augmentation written inline (every image its own crop offset and
        flip, the batch one gather); median step after 5 warm-up steps
  simclr: lit.py with config/simclr_cifar10.py (the CIFAR-10 reproduction's teacher: SimCLR, two
        views of each image) at the same tower and batch, timed like ours: what a student's step
        costs against its teacher's
All on `threads` threads, one after the other, `runs` times; the medians are reported. All under
one OpenMP wait policy, the stage scripts' (runtime.py: PASSIVE unless $OMP_WAIT_POLICY is set): a
bare loop under ACTIVE against train.py under PASSIVE would time the policy, not the script.

    python bench/bench_train.py --data_dir=out/cifar10/data/train --labels_dir=out/cifar10/cluster_pixels

(the data and labels scripts/reproduce_cifar10.py builds). Prints one JSON line.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import runtime  # noqa: E402,F401  (first: the stage scripts' OpenMP wait policy, for the bare loop too)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import model  # noqa: E402
import transforms  # noqa: E402
from loss import PartialFC  # noqa: E402

data_dir = 'out/cifar10/data/train'
labels_dir = 'out/cifar10/cluster_pixels'
threads = 2
steps = 60  # per run of each
runs = 3
exec(open(os.path.join(ROOT, 'configurator.py')).read())
torch.set_num_threads(threads)
B, L, R, K = 256, 8, 0.1, 1000  # config/cifar10.py


def logged(script, config, extra=()):
    """img/s of one of our stage scripts run for `steps` steps: the median over its log intervals."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, script, config, f'--data_dir={data_dir}', f'--out_dir={out}',
               f'--max_steps={steps}', '--log_interval=10', f'--ckpt_interval={10 * steps}',
               f'--threads={threads}', *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
        return float(np.median([r['images_per_s'] for r in log if 'images_per_s' in r][1:]))


def ours():
    return logged('train.py', 'config/cifar10.py', [f'--labels_dir={labels_dir}'])


def simclr():  # the SimCLR teacher's step at the same batch: two views of each image, lit.py
    return logged('lit.py', 'config/simclr_cifar10.py', ['--image_size=32', '--model=ViT-T/8'])


def bare():
    torch.manual_seed(0)
    ds = data.Dataset(data_dir)
    X = torch.from_numpy(ds.images(np.arange(len(ds))))  # uint8 [N, 32, 32, 3]
    Y = torch.from_numpy(np.load(os.path.join(labels_dir, 'labels.npy'))[:, :L].astype(np.int64))
    vision, _ = model.create('ViT-T/8')
    pfc = PartialFC(vision.embed_dim, K, sample_ratio=R, scale=32, margin=0.3)
    opt = torch.optim.AdamW(list(vision.parameters()) + list(pfc.parameters()), lr=5e-4, weight_decay=0.05)
    mean = torch.tensor(transforms.CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(transforms.CLIP_STD).view(1, 3, 1, 1) * 255
    S, j = X.shape[1], torch.arange(X.shape[1])

    def reflect(i):  # reflect-padding as an index map: -1 -> 1, S -> S - 2
        i = i.abs()
        return torch.where(i > S - 1, 2 * (S - 1) - i, i)

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(X), (B,))
        # pad 4, a random S x S crop and a flip for every image: one gather for the batch
        y0, x0 = torch.randint(-4, 5, (2, B, 1))
        rows, cols = reflect(y0 + j), reflect(x0 + j)
        cols = torch.where(torch.rand(B, 1) < 0.5, cols.flip(1), cols)
        x = X[idx[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        x = (x.float().contiguous() - mean) / std
        loss = pfc(vision(x), Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return B / float(np.median(times[5:]))


res = {'ours': [], 'bare': [], 'simclr': []}
for _ in range(runs):
    res['ours'].append(ours())
    res['bare'].append(bare())
    res['simclr'].append(simclr())
med = {k: float(np.median(v)) for k, v in res.items()}
print(json.dumps({'threads': threads, 'omp_wait_policy': os.environ['OMP_WAIT_POLICY'],
                  'steps': steps, 'runs': runs, 'ours_img_s': med['ours'],
                  'bare_img_s': med['bare'], 'ours_over_bare': med['ours'] / med['bare'],
                  'simclr_img_s': med['simclr'], 'ours_over_simclr': med['ours'] / med['simclr'],
                  'all': res}))
