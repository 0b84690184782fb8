"""
What the GPU check's pieces share (bench/gpu.py drives them): tolerances, timing helpers and a
copy of train.py's optimizer step (one process, no DDP) that the timings and the host-sync count
run.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]  # the project's modules; sync_count (tests/)

import runtime  # noqa: E402,F401 (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import jobs  # noqa: E402
import optim  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import transforms  # noqa: E402
from loss import PartialFC  # noqa: E402
from model import VisionTransformer  # noqa: E402


NUM_POSITIVES, SAMPLE_RATIO = 8, 0.1  # l, r (Table 5)
TOPK = 8  # the assignment's l
# errors allowed against the float64 CPU reference (relative, ||a - b|| / ||b||): bf16 keeps 8
# mantissa bits (~0.4% per rounding), fp32 on CUDA may run the patch convolution in TF32 (cuDNN's
# default, 11 bits)
TOL = {'bfloat16': 5e-2, 'float32': 5e-3}


# -----------------------------------------------------------------------------
# helpers


def rel(a, b):
    """||a - b|| / ||b|| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def marker(device):
    """A point in the device's timeline: a recorded CUDA event, or on a CPU (whose ops run as
    they are called) the wall clock."""
    if device.type == 'cuda':
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def seconds(a, b):
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def is_oom(e):
    return (isinstance(e, torch.cuda.OutOfMemoryError)
            or isinstance(e, RuntimeError) and ('out of memory' in str(e)
                                                or 'CUBLAS_STATUS_ALLOC_FAILED' in str(e)))


def free(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def autocast(device, dtype):
    return (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == 'bfloat16'
            else nullcontext())


def unnorm(x):
    """CLIP-normalised float [..., 3, H, W] -> 0..255 levels, float64 on the CPU."""
    mean = torch.tensor(transforms.CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(transforms.CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    return (x.detach().double().cpu() * std + mean) * 255


# -----------------------------------------------------------------------------
# train.py's step


def train_step(vision, params, pfc, optimizer, optimizer_c, batches, accum, ctx, grad_clip):
    """One optimizer step as train.py's loop runs it (one process, no DDP; keep the two in step):
    accum micro-batches of tower forward (autocast), PartialFC and backward; the gradient norm
    (clipped); everything the step must agree on packed into one tensor and read once, the step's
    one host sync; both AdamW steps; zero_grad. A batch may hold 'others': rows standing in for
    the other ranks' embeddings that PartialFC gathers (its labels then cover all rows).
    Returns the host list [loss, grad norm, centre grad norm, pos_cos, neg_cos, *flags]."""
    device = pfc.weight.device
    loss_sum, pos_cos, neg_cos = 0.0, 0.0, 0.0
    emb_finite = torch.ones((), dtype=torch.bool, device=device)
    for _ in range(accum):
        batch = next(batches)
        with ctx:
            emb = vision(batch['images'])
        emb_finite &= torch.isfinite(emb).all()
        x = emb.float() if 'others' not in batch else torch.cat([emb.float(), batch['others']])
        loss = pfc(x, batch['labels']) / accum
        loss.backward()
        loss_sum += loss.detach()
        pos_cos += pfc.stats['pos_cos'] / accum
        neg_cos += pfc.stats['neg_cos'] / accum
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0
                 else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    vals = torch.stack([loss_sum, grad_norm, pfc.weight.grad.norm(), pos_cos, neg_cos]).float()
    flags = torch.cat([~torch.isfinite(vals), ~emb_finite.view(1),
                       torch.full((1,), jobs.signalled is not None, device=device)]).float()
    out = torch.cat([vals, flags]).tolist()
    optimizer.step()
    optimizer_c.step()
    optimizer.zero_grad(set_to_none=True)
    optimizer_c.zero_grad(set_to_none=True)
    return out


def build_training(vcfg, num_classes, device, lr=5e-4):
    """Tower, PartialFC and the two AdamW of train.py (its defaults: wd 0.2 on the matrices but
    the position table, none on the centres, betas (0.9, 0.98), eps 1e-6)."""
    torch.manual_seed(0)
    vision = VisionTransformer(**vcfg).to(device)
    pfc = PartialFC(vision.embed_dim, num_classes, sample_ratio=SAMPLE_RATIO).to(device)
    pfc.generator.manual_seed(0)
    optimizer = torch.optim.AdamW(optim.param_groups(vision, 0.2, skip=('pos_embed',)), lr=lr,
                                 betas=(0.9, 0.98), eps=1e-6)
    optimizer_c = torch.optim.AdamW([pfc.weight], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                                    weight_decay=0.0)
    return vision, pfc, optimizer, optimizer_c


def adam_steps(*optimizers):
    """AdamW's step counters: on the host in a CUDA run (count_syncs' `host`)."""
    return [s['step'] for o in optimizers for s in o.state.values() if 'step' in s]


def synthetic_batches(B, image_size, embed_dim, world, k_total, device, distinct=2):
    """Endless batches of fixed device tensors (no data cost): images, labels of all world x B
    gathered rows (global ids in [0, k_total): about 1/world of them in rank 0's shard) and the
    other ranks' (world - 1) x B unit embeddings."""
    g = torch.Generator(device=device).manual_seed(1)
    out = []
    for _ in range(distinct):
        b = dict(images=torch.randn(B, 3, image_size, image_size, device=device, generator=g),
                 labels=torch.randint(0, k_total, (world * B, NUM_POSITIVES), device=device,
                                      generator=g))
        if world > 1:
            b['others'] = F.normalize(torch.randn((world - 1) * B, embed_dim, device=device,
                                                  generator=g), dim=1)
        out.append(b)
    return itertools.cycle(out)


class Timed:
    """An iterator wrapper that adds up the time the host waits in next()."""

    def __init__(self, it):
        self.it, self.wait = it, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        x = next(self.it)
        self.wait += time.perf_counter() - t
        return x


def step_breakdown(vision, params, pfc, optimizer, optimizer_c, batch, ctx, grad_clip, device):
    """One micro-batch of train_step with marks between its phases, in seconds of device time.
    The tower's backward runs from the embedding's gradient (the same arithmetic as one
    loss.backward()), so that PartialFC's forward + backward is timed on its own."""
    m = [marker(device)]
    with ctx:
        emb = vision(batch['images'])
    m.append(marker(device))
    x = emb.detach().float().requires_grad_()
    loss = pfc(torch.cat([x, batch['others']]) if 'others' in batch else x, batch['labels'])
    loss.backward()
    m.append(marker(device))
    emb.backward(x.grad.to(emb.dtype))
    m.append(marker(device))
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    torch.stack([loss.detach(), grad_norm, pfc.weight.grad.norm()]).float().tolist()
    m.append(marker(device))
    optimizer.step()
    optimizer_c.step()
    optimizer.zero_grad(set_to_none=True)
    optimizer_c.zero_grad(set_to_none=True)
    m.append(marker(device))
    sync(device)
    names = ('forward', 'loss', 'backward', 'clip_and_read', 'optimizer')
    return {n: seconds(a, b) for n, a, b in zip(names, m, m[1:])}

def make_dataset(path, count, size, seed=0):
    """Random uint8 images in data.py's format (meta.json + one shard): the loader's speed does
    not depend on what the pixels show."""
    if os.path.exists(os.path.join(path, 'meta.json')):
        if data.Dataset(path).meta['count'] >= count:
            return path
        shutil.rmtree(path)
    os.makedirs(path)
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(os.path.join(path, data.shard_file('images', 0)), mode='w+',
                                    dtype=np.uint8, shape=(count, size, size, 3))
    for i in range(0, count, 256):
        arr[i:i + 256] = rng.integers(0, 256, arr[i:i + 256].shape, dtype=np.uint8)
    arr.flush()
    del arr
    meta = dict(count=count, image_size=size, has_text=False, classnames=None, source='random',
                shards=[dict(images=data.shard_file('images', 0), texts=None, count=count)])
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return path
