"""
The GPU check: one command on one GPU that checks every CUDA path of the project against its CPU /
float64 counterpart, times train.py's step at the paper's per-GPU shapes, and leaves a report.

    python bench/gpu.py --out_dir=out/gpu            # one H100 / H200 / A100: a 7-minute budget
    python bench/gpu.py --device=cpu --out_dir=...   # the same code, tiny sizes (~1 min, in CI)

It needs torch, numpy and pillow (prepare.py); faiss and flash-attn are used when they import. Each
section runs in try/except: an error is recorded in the report and the run goes on. A time budget
(budget_s) skips what no longer fits, small work first; torch.compile runs in a child process
with its own timeout. out_dir/gpu_report.json and gpu_report.md are rewritten after every
section, so a run cut short still leaves a report; a short table is printed at the end.

checks (the same inputs on the device and on the CPU)
  towers     ViT, ViT with 2D RoPE (non-square input), causal text tower: forward + backward under
             bf16 autocast and in fp32 on the device vs float64 on the CPU
  attention  model.attention (flash-attn when importable, else SDPA) and each SDPA backend vs
             float64 softmax(q k^T / sqrt(d)) v, with and without the causal mask
  partialfc  loss.PartialFC forward + backward on the device vs float64 on the CPU over the same
             sampled centres (index=): Eq. 5, Eq. 4, and the batch-positives sampler
  loader     data.Loader(device=...) (one grid_sample) vs the CPU loader's grid and uint8 paths
  pinned     batches through the prefetch thread (pinned buffers, non-blocking copies) while the
             device is kept busy: labels exact, images equal to the same batch made on the CPU
  probe      evaluation.fit_logreg (L-BFGS) on the device vs float64 on the CPU: the same optimum
  kmeans     cluster.py as subprocesses: search='torch' on the device vs on the CPU, and vs faiss
             on the CPU when faiss is installed: centroids and labels
timings
  syncs      host syncs of one train.py step (tests/sync_count.py's dispatch-mode counter, and on
             CUDA torch.cuda.set_sync_debug_mode('warn')): the one expected read, nothing else
  step       train.py's optimizer step (tower under bf16 autocast, PartialFC, backward, clip,
             AdamW for tower and centres, one host read) at the largest micro-batch that fits
             (doubling until out of memory). One GPU stands in for rank 0 of `world`: PartialFC
             holds k / world centres and scores the gathered world x micro-batch rows (the other
             ranks' rows are fixed tensors; all-gather and reduce-scatter are not timed).
             images/s and MFU (3 x VisionTransformer.flops() per image over the peak of the GPU);
             shares of forward / loss / backward / clip + read / optimizer (CUDA events; the
             tower's backward is run from the embedding's gradient so that the loss is timed on
             its own); fed by data.Loader vs by synthetic tensors (share of time waiting for
             data); the loader alone and its host side alone; torch.compile of the tower
  assign     cluster.py's torch search (x @ C.T, top-l) 1M x 768 against 100K centres, top-8,
             in cluster.py's chunks: fp32 (as cluster.py runs it), tf32, bf16, fp16; TFLOP/s of
             the GEMMs alone and the time of the whole search
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]  # the project's modules; sync_count (tests/)

import common  # noqa: E402 (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import prepare  # noqa: E402
import transforms  # noqa: E402
import model  # noqa: E402
from loss import PartialFC  # noqa: E402
from model import PRESETS, TextTransformer, VisionTransformer  # noqa: E402
from sync_count import count_syncs  # noqa: E402

# dense bf16 tensor-core peak per GPU (FLOP/s), as in train.py (first match in the device name)
PEAK_FLOPS = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'A100': 312e12}
# sizes: the paper's per-GPU shapes on a GPU, tiny ones for the CPU smoke run
SIZES = {
    'paper': dict(models=('ViT-B/16', 'ViT-L/14'), world=8, k_total=1_000_000, mb_start=32,
                  mb_max=2048, warmup=2, steps=5, sync_batch=8, assign=(1_000_000, 100_000, 768),
                  pfc=(20_000, 64, 128), kmeans=(20_000, 32, 50), probe=(4000, 64, 10),
                  busy=2048, search_s=60),
    'tiny': dict(models=('ViT-T/4',), world=2, k_total=4000, mb_start=2, mb_max=8, warmup=1,
                 steps=2, sync_batch=2, assign=(8192, 1000, 64), pfc=(2000, 16, 32),
                 kmeans=(4000, 32, 50), probe=(1000, 32, 10), busy=128, search_s=20),
}
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


def peak_flops(device):
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
                       torch.full((1,), common.signalled is not None, device=device)]).float()
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
    optimizer = torch.optim.AdamW(common.param_groups(vision, 0.2, skip=('pos_embed',)), lr=lr,
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


# -----------------------------------------------------------------------------
# correctness checks: each returns a dict with 'ok' and its figures


def check_towers(device):
    img = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    wide = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))  # grid 4 x 6
    ids = torch.randint(1, 998, (3, 77), generator=torch.Generator().manual_seed(2))
    for i, n in enumerate((5, 40, 77)):  # end of text (the highest id) at three places, zeros after
        ids[i, n - 1], ids[i, n:] = 999, 0
    small = dict(width=128, layers=2, heads=2, embed_dim=64)
    cases = {'vision': (VisionTransformer(image_size=32, patch_size=8, **small), img),
             'vision_rope2d': (VisionTransformer(image_size=32, patch_size=8, position='rope2d',
                                                 act='gelu', **small), wide),
             'text_causal': (TextTransformer(vocab_size=1000, **small), ids)}
    out, ok = {}, True
    for name, (net, x) in cases.items():
        ref = copy.deepcopy(net).double()
        xr = x if x.dtype == torch.long else x.double()
        y = ref(xr)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (y * w).sum().backward()
        dev = copy.deepcopy(net).to(device)
        for dtype in ('bfloat16', 'float32'):
            dev.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                yd = dev(x.to(device))
            (yd.float() * w.float().to(device)).sum().backward()
            names = [n for n, _ in ref.named_parameters()]
            g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
            g_dev = torch.cat([p.grad.flatten() for p in dev.parameters()])
            per = {n: rel(a.grad, b.grad) for n, a, b in
                   zip(names, dev.parameters(), ref.parameters())}
            worst = max(per, key=per.get)
            r = dict(output=rel(yd, y), grads=rel(g_dev, g_ref), worst_param=worst,
                     worst_param_rel_diff=per[worst], tol=TOL[dtype])
            r['ok'] = r['output'] < TOL[dtype] and r['grads'] < TOL[dtype]
            out[f'{name}_{dtype}'] = r
            ok &= r['ok']
    return dict(ok=ok, cases=out)


def check_attention(device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(0)
    out, ok = {}, True
    for T, causal in ((257, False), (77, True), (50, True)):  # ViT-L/14's tokens; text contexts
        q, k, v = (torch.randn(2, T, 4, 64, generator=g, dtype=torch.float64) for _ in range(3))
        gout = torch.randn(2, T, 4, 64, generator=g, dtype=torch.float64)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        s = torch.einsum('bthd,bshd->bhts', qr, kr) / math.sqrt(64)
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float('-inf'))
        ref = torch.einsum('bhts,bshd->bthd', s.softmax(-1), vr)
        (ref * gout).sum().backward()
        for dtype in (torch.bfloat16, torch.float32):
            qd, kd, vd = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
            y = model.attention(qd, kd, vd, causal)
            (y.float() * gout.float().to(device)).sum().backward()
            tol = TOL[str(dtype).removeprefix('torch.')]
            r = dict(output=rel(y, ref), grad_q=rel(qd.grad, qr.grad), grad_k=rel(kd.grad, kr.grad),
                     grad_v=rel(vd.grad, vr.grad), tol=tol)
            r['ok'] = max(r['output'], r['grad_q'], r['grad_k'], r['grad_v']) < tol
            out[f'model.attention_T{T}_causal{int(causal)}_{r_name(dtype)}'] = r
            ok &= r['ok']
        # each SDPA kernel on its own, bf16 ([B, h, T, d] layout); one that is not available for
        # these inputs on this device is reported, not failed
        qt, kt, vt = (t.to(device, torch.bfloat16).transpose(1, 2) for t in (q, k, v))
        for name in ('FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'CUDNN_ATTENTION', 'MATH'):
            key = f'sdpa_{name.lower()}_T{T}_causal{int(causal)}'
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                out[key] = dict(ok=True, available=False, note='not in this torch')
                continue
            try:
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter('ignore')  # why a kernel does not apply: noise here
                    y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
            except Exception as e:  # noqa: BLE001 (no kernel for these inputs here)
                out[key] = dict(ok=True, available=False,
                                note=f'{type(e).__name__}: {str(e).strip()[:200]}')
                continue
            r = dict(available=True, output=rel(y, ref), tol=TOL['bfloat16'])
            r['ok'] = r['output'] < TOL['bfloat16']
            out[key] = r
            ok &= r['ok']
    impl = 'flash_attn' if model.flash_attn_func is not None and device.type == 'cuda' else 'sdpa'
    return dict(ok=ok, bf16_attention=impl, cases=out)


def r_name(dtype):
    return str(dtype).removeprefix('torch.')


def check_partialfc(device, k, B, d):
    out, ok = {}, True
    for name, kw in (('mlcd', {}), ('mlc', dict(loss_type='mlc')),
                     ('mlcd_batch_positives', dict(batch_positives_as_negatives=True))):
        torch.manual_seed(0)
        pfc = PartialFC(d, k, sample_ratio=SAMPLE_RATIO, **kw)
        ref = copy.deepcopy(pfc).double()
        pfc.to(device)
        pfc.generator.manual_seed(1)
        g = torch.Generator().manual_seed(2)
        labels = torch.randint(0, k, (B, NUM_POSITIVES), generator=g)
        labels[::4, 1] = labels[::4, 0]  # a repeated label counts once
        labels[1::4, 2:] = -1  # rows with fewer labels
        # embeddings near their positives' centres, so that positives score high and Eq. 4 and
        # Eq. 5 differ (at random both are ~ the sum of the two log-sum-exps)
        w = F.normalize(ref.weight.detach().float(), dim=1)
        emb = (w[labels.clamp_min(0)] * (labels >= 0)[..., None]).sum(1)
        emb = F.normalize(emb, dim=1) + 0.1 * torch.randn(B, d, generator=g) / math.sqrt(d)
        e = emb.clone().to(device).requires_grad_()
        loss = pfc(e, labels.to(device))
        loss.backward()
        used = pfc.index[pfc.index >= 0].cpu()  # the centres the device scored (sampled there)
        er = emb.double().requires_grad_()
        loss_r = ref(er, labels, index=used)
        loss_r.backward()
        r = dict(loss=loss.item(), loss_ref=loss_r.item(), loss_err=rel(loss, loss_r),
                 grad_emb=rel(e.grad, er.grad), grad_centres=rel(pfc.weight.grad, ref.weight.grad),
                 pos_cos_err=abs(float(pfc.stats['pos_cos']) - float(ref.stats['pos_cos'])),
                 neg_cos_err=abs(float(pfc.stats['neg_cos']) - float(ref.stats['neg_cos'])),
                 scored=len(used), tol=1e-4)
        sampled_ok = (len(used.unique()) == len(used) and 0 <= int(used.min())
                      and int(used.max()) < k)
        if not kw:  # the plain sampler: exactly round(r k) distinct sorted centres
            sampled_ok &= len(used) == round(SAMPLE_RATIO * k) and bool((used.diff() > 0).all())
        r['sample_ok'] = sampled_ok
        r['ok'] = (sampled_ok and max(r['loss_err'], r['grad_emb'], r['grad_centres']) < 1e-4
                   and max(r['pos_cos_err'], r['neg_cos_err']) < 1e-5)
        out[name] = r
        ok &= r['ok']
    return dict(ok=ok, cases=out)


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


def synthetic_set(tmp):
    """The built-in synthetic scenes (prepare.py), 96 images at 32 px, and random labels."""
    path = os.path.join(tmp, 'synthetic32')
    if not os.path.exists(os.path.join(path, 'meta.json')):
        prepare.build('synthetic', path, image_size=32, count=96, workers=1, progress=False,
                   overwrite=True)
    labels = np.random.default_rng(0).integers(0, 1000, (96, 4)).astype(np.int32)
    return path, labels


def check_loader(device, tmp):
    """The device path (grid_sample) against the same loader on the CPU, run through the same
    path (the device's arithmetic) and through the CPU's uint8 path. As in tests/test_data.py:
    both are bilinear on the same grid where a crop is enlarged or kept (<= 1 level apart: the
    uint8 path rounds), while a shrunk crop is antialiased on the uint8 path only (skipped)."""
    syn, labels = synthetic_set(tmp)
    out, ok = {}, True
    for augment, size, jitter, views in (('rrc', 32, 0.0, 1), ('rrc', 48, 0.0, 1),
                                         ('pad_crop', 32, 0.0, 1), ('flip', 32, 0.0, 1),
                                         ('none', 40, 0.0, 1), ('rrc', 32, 0.4, 2)):
        kw = dict(labels=labels, seed=5, augment=augment, color_jitter=jitter, views=views, pad=3)
        dev = data.Loader(syn, 16, size, device=device, **kw)
        dev._grid = True  # the device path, also when the device is a CPU
        grid = data.Loader(syn, 16, size, device='cpu', **kw)
        grid._grid = True
        u8 = data.Loader(syn, 16, size, device='cpu', **kw)
        grid_err = u8_err = 0.0
        compared = same = 0
        for step in (0, 1):
            bd, bg, bu = dev.batch(0, step), grid.batch(0, step), u8.batch(0, step)
            same += (torch.equal(bd['aug'].cpu(), bg['aug'])
                     and torch.equal(bd['index'], bg['index'])
                     and torch.equal(bd['labels'].cpu(),
                                     torch.from_numpy(labels[bd['index'].numpy()]).long()))
            a, b, c = unnorm(bd['images']), unnorm(bg['images']), unnorm(bu['images'])
            grid_err = max(grid_err, float((a - b).abs().max()))
            if jitter == 0 and augment != 'none':
                for i, box in enumerate(bg['aug'][0]):
                    wh = transforms._pixel_boxes(box[None, :4], syn_size(syn), syn_size(syn))[0, 2:]
                    if (wh <= size).all():  # enlarged or kept: bilinear on both paths
                        u8_err = max(u8_err, float((a[i] - c[i]).abs().max()))
                        compared += 1
            elif augment == 'none':
                u8_err = max(u8_err, float((a - c).abs().max()))
                compared += len(a)
        tol = 0.1 if jitter else 0.05  # levels of 0..255: the same fp32 arithmetic on two devices
        r = dict(max_err_vs_cpu_grid=grid_err, tol=tol, uint8_path_max_diff=u8_err,
                 uint8_compared=compared, uint8_tol=1.01, same_params_labels=same == 2)
        r['ok'] = bool(same == 2 and grid_err <= tol and u8_err <= 1.01)
        out[f'{augment}_{size}' + (f'_jitter{jitter}_views{views}' if jitter else '')] = r
        ok &= r['ok']
    return dict(ok=ok, cases=out)


def syn_size(path):
    return data.Dataset(path).image_size


def check_pinned(device, tmp, busy):
    """Batches from the loader's prefetch thread (pinned host buffers and non-blocking copies on
    CUDA) while the main thread keeps the device busy, so that a copy racing its buffer would
    show: labels must be exact and images equal to the same batch made on the CPU."""
    syn, labels = synthetic_set(tmp)
    dev = data.Loader(syn, 16, 32, labels=labels, device=device, seed=7)
    ref = data.Loader(syn, 16, 32, labels=labels, device='cpu', seed=7)
    ref._grid = dev._grid  # the same arithmetic: this check is about the copies
    x = torch.randn(busy, busy, device=device)
    bad_labels, err, n = 0, 0.0, 0
    for step, b in enumerate(dev.iterate(0)):
        for _ in range(8):  # queue work ahead of the next batch's copies
            x = x @ x
            x /= x.norm()
        r = ref.batch(0, step)
        bad_labels += int((b['labels'].cpu() != torch.from_numpy(labels[b['index'].numpy()])).sum())
        err = max(err, float((unnorm(b['images']) - unnorm(r['images'])).abs().max()))
        n += 1
    # the evaluation batches too (no augmentation: the same normalisation on both devices)
    ev = max(float((unnorm(a[1]) - unnorm(c[1])).abs().max()) for a, c in
             zip(data.eval_batches(syn, 40, 32, device=device), data.eval_batches(syn, 40, 32)))
    return dict(ok=bad_labels == 0 and err <= 0.05 and ev <= 0.05, batches=n,
                wrong_labels=bad_labels,
                max_err_levels=err, eval_max_err_levels=ev, tol=0.05,
                pinned=device.type == 'cuda')


def check_probe(device, n, d, C):
    """evaluation.fit_logreg with its defaults on the device and on the CPU, and a float64 fit run to
    a tight tolerance on the CPU (the optimum): both default fits end near it and near each other.
    Overlapping classes, so that the objective is far from 0 and its gaps are meaningful."""
    import evaluation
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, n)
    x = (rng.standard_normal((C, d)) * 0.2)[y] + rng.standard_normal((n, d))
    lam = 1.0

    def objective(W, b):  # mean CE + lam / (2n) ||W||^2, in float64 on the CPU
        W, b = W.detach().double().cpu(), b.detach().double().cpu()
        logits = torch.from_numpy(x) @ W + b
        return float(F.cross_entropy(logits, torch.from_numpy(y)) + lam / (2 * n) * W.pow(2).sum())

    def fit(dev, **kw):
        return evaluation.fit_logreg(torch.as_tensor(x, dtype=torch.float32, device=dev),
                                torch.as_tensor(y, device=dev), C, lam, max_iter=1000, **kw)
    t0 = time.time()
    W, b = fit(device)
    t_dev = time.time() - t0
    Wc, bc = fit('cpu')
    Wr, br = evaluation.fit_logreg(x, y, C, lam, max_iter=1000, dtype=torch.float64, tol=1e-10)
    j, jc, jr = objective(W, b), objective(Wc, bc), objective(Wr, br)
    xt = torch.from_numpy(x)
    agree = float(((xt @ W.double().cpu() + b.double().cpu()).argmax(1)
                   == (xt @ Wr.double() + br.double()).argmax(1)).double().mean())
    r = dict(objective=j, objective_cpu=jc, objective_opt=jr, gap_err=(j - jr) / jr,
             cpu_gap=(jc - jr) / jr, device_vs_cpu_err=abs(j - jc) / jr, tol=1e-4,
             weights_rel_diff=rel(W, Wr), weights_tol=5e-2, prediction_agreement=agree,
             agreement_tol=0.99, fit_device=str(W.device), seconds=t_dev)
    r['ok'] = (max(r['gap_err'], r['device_vs_cpu_err']) < 1e-4 and r['weights_rel_diff'] < 5e-2
               and agree >= 0.99)
    return r


def run_cluster(args, timeout):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'cluster.py')] + args, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f'cluster.py {" ".join(args)}: exit {p.returncode}: '
                           + (p.stderr.strip() or p.stdout.strip())[-500:])


def check_kmeans(device, tmp, N, d, k):
    """cluster.py (k-means + top-4 assignment) on well-separated blobs: with search='torch' on the
    device, on the CPU, and with faiss on the CPU when installed. The float64 sums make the
    centres exact given the assignments, so the runs should agree up to a point on a near-tie."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((k, d))
    x = c[rng.integers(0, k, N)] / np.sqrt(d) + 0.15 * rng.standard_normal((N, d)) / np.sqrt(d)
    path = os.path.join(tmp, 'kmeans_embeddings.npy')
    np.save(path, x.astype(np.float32))
    runs = {'torch_device': ('torch', str(device)), 'torch_cpu': ('torch', 'cpu')}
    if importlib.util.find_spec('faiss') is not None:
        runs['faiss_cpu'] = ('faiss', 'cpu')
    res, seconds_ = {}, {}
    for name, (search, dev) in runs.items():
        out = os.path.join(tmp, f'kmeans_{name}')
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        run_cluster([f'--embeddings_path={path}', f'--out_dir={out}', f'--num_classes={k}',
                     '--num_positives=4', '--niter=8', f'--search={search}',
                     f'--device={dev}'], 300)
        seconds_[name] = time.time() - t0
        res[name] = tuple(np.load(os.path.join(out, f)) for f in ('centroids.npy', 'labels.npy'))
    cases, ok = {}, True
    C0, L0 = res['torch_device']
    for name in runs:
        if name == 'torch_device':
            continue
        C1, L1 = res[name]
        r = dict(centroid_max_err=float(np.abs(C0 - C1).max()), tol=1e-3,
                 top1_agreement=float((L0[:, 0] == L1[:, 0]).mean()), agreement_tol=0.999,
                 rows_equal=float((L0 == L1).all(1).mean()))
        r['ok'] = r['top1_agreement'] >= 0.999 and r['centroid_max_err'] < 1e-3
        cases[f'device_vs_{name}'] = r
        ok &= r['ok']
    return dict(ok=ok, faiss='faiss_cpu' in runs, seconds=seconds_, cases=cases)


# -----------------------------------------------------------------------------
# timings


def host_syncs(vcfg, num_classes, B, world, k_total, device):
    """Syncs of one step of accum=2 micro-batches: the dispatch-mode counter (AdamW's step
    counters excluded: on CUDA they live on the host), against the signature of the one expected
    read measured alone; on CUDA also the driver's view (set_sync_debug_mode('warn'))."""
    vision, pfc, opt, opt_c = build_training(vcfg, num_classes, device)
    params = list(vision.parameters())
    batches = synthetic_batches(B, vcfg['image_size'], vision.embed_dim, world, k_total, device)
    ctx = autocast(device, 'bfloat16' if device.type == 'cuda' else 'float32')
    step = lambda: train_step(vision, params, pfc, opt, opt_c, batches, 2, ctx, 1.0)  # noqa: E731
    step()  # AdamW makes its state on the first step
    sync(device)
    with count_syncs() as one:
        torch.zeros(10, device=device).tolist()
    with count_syncs(host=adam_steps(opt, opt_c)) as seen:
        step()
    other = seen - one
    r = dict(counted=dict(seen), expected_read=dict(one), other=sum(other.values()),
             other_ops=dict(other), exact=seen == one)
    if device.type == 'cuda':
        torch.cuda.set_sync_debug_mode('warn')
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter('always')
                step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
        sync(device)  # after: a synchronize() would be flagged too
        msgs = [str(x.message) for x in w if 'synchroniz' in str(x.message)]
        r.update(sync_debug_warnings=len(msgs), sync_debug_messages=msgs[:5])
    r['ok'] = r['exact'] and r.get('sync_debug_warnings', 1) <= 1
    return r


def find_micro_batch(name, vcfg, S, device, note):
    """Doubling from mb_start until out of memory (or mb_max, or the time share): the largest
    that ran two steps."""
    vision, pfc, opt, opt_c = build_training(vcfg, S['num_classes'], device)
    params, ctx = list(vision.parameters()), autocast(device, S['dtype'])
    tried, best, B = {}, None, S['mb_start']
    t_end = time.time() + S['search_s']
    while B <= S['mb_max']:
        err = None
        try:
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            batches = synthetic_batches(B, vcfg['image_size'], vision.embed_dim, S['world'],
                                        S['k_total'], device)
            t0 = time.time()
            for _ in range(2):
                train_step(vision, params, pfc, opt, opt_c, batches, 1, ctx, 1.0)
            sync(device)
            dt = time.time() - t0
            mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda'
                   else None)
            tried[B] = dict(fits=True, seconds_2_steps=round(dt, 3),
                            peak_gib=None if mem is None else round(mem, 2))
            best = B
        except Exception as e:  # noqa: BLE001 (an OOM ends the search; anything else is an error)
            if not is_oom(e):
                raise
            err = str(e).splitlines()[0][:160]
        batches = None
        opt.zero_grad(set_to_none=True)
        opt_c.zero_grad(set_to_none=True)
        free(device)
        if err is not None:
            tried[B] = dict(fits=False, error=err)
            break
        if time.time() + 2.5 * tried[B]['seconds_2_steps'] > t_end:
            note.append(f'{name}: micro-batch search stopped at {B} (time share)')
            break
        B *= 2
    return best, tried, (vision, pfc, opt, opt_c)


def time_steps(vision, params, pfc, opt, opt_c, batches, ctx, device, warmup, steps):
    for _ in range(warmup):
        train_step(vision, params, pfc, opt, opt_c, batches, 1, ctx, 1.0)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(vision, params, pfc, opt, opt_c, batches, 1, ctx, 1.0)
    sync(device)
    return (time.perf_counter() - t0) / steps


def time_model(name, S, device, tmp, note):
    vcfg = dict(PRESETS[name]['vision'])
    B, tried, (vision, pfc, opt, opt_c) = find_micro_batch(name, vcfg, S, device, note)
    r = dict(micro_batch=B, tried=tried, num_local_centres=S['num_classes'], world=S['world'],
             flops_per_image=3 * vision.flops())
    if B is None:
        return r
    params, ctx = list(vision.parameters()), autocast(device, S['dtype'])
    peak = peak_flops(device)
    batches = synthetic_batches(B, vcfg['image_size'], vision.embed_dim, S['world'],
                                S['k_total'], device)

    def part(key, fn):  # an error (an OOM near the limit, say) loses this part only
        try:
            r[key] = fn()
        except Exception as e:  # noqa: BLE001
            r[key] = dict(error=f'{type(e).__name__}: {str(e).strip()[:300]}')
            opt.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            free(device)

    def synthetic():
        dt = time_steps(vision, params, pfc, opt, opt_c, batches, ctx, device, S['warmup'],
                        S['steps'])
        return dict(step_s=dt, images_per_s=B / dt,
                    mfu=B / dt * 3 * vision.flops() / peak if peak else None)

    def breakdown():  # median of 3 instrumented steps
        parts = [step_breakdown(vision, params, pfc, opt, opt_c, next(batches), ctx, 1.0, device)
                 for _ in range(3)]
        med = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
        return dict(seconds=med, share={k: v / sum(med.values()) for k, v in med.items()})

    part('synthetic', synthetic)
    part('breakdown', breakdown)
    # fed by data.Loader (random uint8 images at the tower's size, rrc as train.py) instead
    n = B * (S['warmup'] + S['steps'] + 1)
    ds = make_dataset(os.path.join(tmp, f'random{vcfg["image_size"]}'), n, vcfg['image_size'])
    n = len(data.Dataset(ds))  # a larger set made for another model is reused
    labels = np.random.default_rng(0).integers(0, S['k_total'], (n, NUM_POSITIVES)).astype(np.int32)
    loader = data.Loader(ds, B, vcfg['image_size'], labels=labels, device=device, seed=0)
    fixed = next(batches)

    def fed(it):  # the other ranks' rows and labels, as in the synthetic batches
        for b in it:
            if 'others' in fixed:
                b = dict(b, labels=torch.cat([b['labels'], fixed['labels'][B:]]),
                         others=fixed['others'])
            yield b

    def loader_fed():
        it = loader.iterate(0)
        timed = Timed(fed(it))
        try:
            for _ in range(S['warmup']):
                train_step(vision, params, pfc, opt, opt_c, timed, 1, ctx, 1.0)
            sync(device)
            timed.wait, t0 = 0.0, time.perf_counter()
            for _ in range(S['steps']):
                train_step(vision, params, pfc, opt, opt_c, timed, 1, ctx, 1.0)
            sync(device)
            wall = time.perf_counter() - t0
        finally:
            it.close()
        return dict(step_s=wall / S['steps'], images_per_s=B * S['steps'] / wall,
                    data_wait_share=timed.wait / wall)

    def loader_alone():  # host gather + device augmentation, nothing else
        t0, m = time.perf_counter(), 0
        for b in loader.iterate(0):
            m += len(b['index'])
        sync(device)
        return dict(images_per_s=m / (time.perf_counter() - t0))

    def host_gather():  # the host's part on a GPU: uint8 rows from the memmaps into pinned memory
        buf = torch.empty((B, vcfg['image_size'], vcfg['image_size'], 3), dtype=torch.uint8,
                          pin_memory=device.type == 'cuda')
        dsr, t0 = data.Dataset(ds), time.perf_counter()
        for s in range(loader.steps_per_epoch):
            dsr.images(loader.indices(1, s), out=buf.numpy())
        return dict(images_per_s=B * loader.steps_per_epoch / (time.perf_counter() - t0))

    part('loader_fed', loader_fed)
    part('loader_alone', loader_alone)
    part('host_gather', host_gather)
    ips, host = r['synthetic'].get('images_per_s'), r['host_gather'].get('images_per_s')
    r['host_over_step'] = host / ips if ips and host else None
    return r


def time_compile(name, B, S, device, out_dir, timeout):
    """torch.compile of the tower in a child process (its own timeout: a slow or hung compile
    cannot eat the run), which writes its figures to out_dir; returns them or why there are
    none."""
    path = os.path.join(out_dir, f'compile_{name.replace("/", "_")}.json')
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), '--only=compile', f'--model_name={name}',
           f'--micro_batch={B}', f'--device={device}', f'--size={S["size"]}',
           f'--compile_backend={S["compile_backend"]}', f'--out_dir={out_dir}']
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f'timed out after {timeout:.0f} s (compile + steps)')
    if not os.path.exists(path):
        return dict(ok=False, seconds=time.time() - t0, error=f'exit {p.returncode}: '
                    + (p.stderr.strip() or p.stdout.strip())[-600:])
    with open(path) as f:
        return json.load(f)


def compile_child(name, B, S, device, out_dir, backend):
    vcfg = dict(PRESETS[name]['vision'])
    vision, pfc, opt, opt_c = build_training(vcfg, S['num_classes'], device)
    params, ctx = list(vision.parameters()), autocast(device, S['dtype'])
    batches = synthetic_batches(B, vcfg['image_size'], vision.embed_dim, S['world'],
                                S['k_total'], device)
    r = dict(backend=backend, micro_batch=B)
    try:
        compiled = torch.compile(vision, backend=backend)
        t0 = time.perf_counter()
        train_step(compiled, params, pfc, opt, opt_c, batches, 1, ctx, 1.0)
        sync(device)
        r['first_step_s'] = time.perf_counter() - t0  # compiling forward and backward
        dt = time_steps(compiled, params, pfc, opt, opt_c, batches, ctx, device, 1, S['steps'])
        peak = peak_flops(device)
        r.update(ok=True, step_s=dt, images_per_s=B / dt,
                 mfu=B / dt * 3 * vision.flops() / peak if peak else None)
    except Exception as e:  # noqa: BLE001 (recorded, as every section's errors)
        r.update(ok=False, error=f'{type(e).__name__}: {str(e).strip()[:600]}')
    path = os.path.join(out_dir, f'compile_{name.replace("/", "_")}.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(r, f)
    os.replace(path + '.tmp', path)


def time_assign(device, N, k, d, budget):
    """cluster.py's torch search: chunks of rows (float16 on disk, .float() on the device) times
    the centres, then top-8; its chunk keeps rows x k float32 scores <= 1 GiB. GEMMs timed with
    CUDA events around each one; the search (GEMM + top-k) as a whole. Rows are cut short when
    the time share would not cover all N (and the figures say how many were done)."""
    torch.manual_seed(0)
    X = F.normalize(torch.randn(N, d, device=device), dim=1).half()
    C = F.normalize(torch.randn(k, d, device=device), dim=1)
    chunk = max(1, min(65536, (1 << 28) // k))  # cluster.py's chunk_rows for search='torch'
    variants = (('fp32', torch.float32, 'highest'), ('tf32', torch.float32, 'high'),
                ('bf16', torch.bfloat16, None), ('fp16', torch.float16, None))
    out = dict(rows=N, centroids=k, dim=d, topk=TOPK, chunk_rows=chunk)
    ref_top1 = None
    prev = torch.get_float32_matmul_precision()
    for name, dt, prec in variants:
        try:
            if prec:
                torch.set_float32_matmul_precision(prec)
            Ct = C.to(dt).T
            x0 = X[:chunk].to(dt)
            top1 = (x0 @ Ct).topk(TOPK, dim=1).indices[:, 0]  # warm-up, and agreement with fp32
            if ref_top1 is None:
                ref_top1 = top1
            sync(device)
            t_end, gemm, rows = time.time() + budget / len(variants), 0.0, 0
            t0 = time.perf_counter()
            for i in range(0, N, chunk):
                x = X[i:i + chunk].to(dt)
                a = marker(device)
                s = x @ Ct
                b = marker(device)
                s.topk(TOPK, dim=1)
                gemm_pair = (a, b)
                rows += len(x)
                if device.type == 'cuda':
                    sync(device)  # events read only after completion; one sync per chunk
                gemm += seconds(*gemm_pair)
                if time.time() > t_end:
                    break
            sync(device)
            wall = time.perf_counter() - t0
            flops = 2 * rows * k * d
            out[name] = dict(rows_done=rows, gemm_s=gemm, gemm_tflops=flops / gemm / 1e12,
                             search_s=wall, search_tflops=flops / wall / 1e12,
                             search_s_per_1m_rows=wall * 1e6 / rows,
                             top1_agreement_with_fp32=float((top1 == ref_top1).double().mean()))
        except Exception as e:  # noqa: BLE001
            out[name] = dict(error=f'{type(e).__name__}: {str(e).strip()[:300]}')
        finally:
            torch.set_float32_matmul_precision(prev)
            free(device)
    return out


# -----------------------------------------------------------------------------
# the report


def env_info(device):
    e = dict(device=str(device), python=platform.python_version(), torch=torch.__version__,
             cuda=torch.version.cuda, cpu_count=os.cpu_count(),
             flash_attn=model.flash_attn_func is not None,
             faiss=importlib.util.find_spec('faiss') is not None,
             triton=importlib.util.find_spec('triton') is not None,
             matmul_precision=torch.get_float32_matmul_precision(),
             date=time.strftime('%Y-%m-%d %H:%M:%S %Z'))
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        e.update(gpu=torch.cuda.get_device_name(device), capability=f'{p.major}.{p.minor}',
                 memory_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count,
                 cudnn=torch.backends.cudnn.version(), peak_bf16_flops=peak_flops(device),
                 cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        e.update(gpu=None, peak_bf16_flops=None, cpu=platform.processor() or platform.machine())
    return e


def fmt(x, spec='.3g', pct=False):
    if x is None:
        return '-'
    return f'{100 * x:.1f}%' if pct else format(x, spec)


def goals(R):
    """The targets this check measures (README); None where not measured."""
    env, steps, asg = R['env'], R['step'], R['assign']
    big = steps.get('ViT-L/14', {})
    g = {}
    if not env.get('gpu'):
        return dict.fromkeys(('vitl14_mfu_ge_45pct', 'loss_le_5pct_of_step',
                              'loader_host_ge_3x_step', 'assign_gemm_ge_50pct_peak'))
    mfu = big.get('synthetic', {}).get('mfu')
    g['vitl14_mfu_ge_45pct'] = None if mfu is None else mfu >= 0.45
    shares = [s['breakdown']['share']['loss'] for s in steps.values()
              if 'share' in s.get('breakdown', {})]
    g['loss_le_5pct_of_step'] = None if not shares else max(shares) <= 0.05
    ratios = [s['host_over_step'] for s in steps.values() if s.get('host_over_step')]
    g['loader_host_ge_3x_step'] = None if not ratios else min(ratios) >= 3
    peak = env.get('peak_bf16_flops')
    best = max((v.get('gemm_tflops', 0) for k, v in asg.items() if k in ('bf16', 'fp16')
                and isinstance(v, dict)), default=0)
    g['assign_gemm_ge_50pct_peak'] = None if not peak or not best else best * 1e12 >= 0.5 * peak
    return g


def write_report(R, out_dir):
    try:
        R['goals'] = goals(R)
        md = markdown(R)
    except Exception as e:  # noqa: BLE001 (the JSON is still written)
        md = (f'# GPU check\n\nthe report could not be rendered ({type(e).__name__}: {e}); '
              'see gpu_report.json\n')
    with open(os.path.join(out_dir, 'gpu_report.json.tmp'), 'w') as f:
        json.dump(R, f, indent=1, default=str)
    os.replace(os.path.join(out_dir, 'gpu_report.json.tmp'),
               os.path.join(out_dir, 'gpu_report.json'))
    with open(os.path.join(out_dir, 'gpu_report.md.tmp'), 'w') as f:
        f.write(md)
    os.replace(os.path.join(out_dir, 'gpu_report.md.tmp'), os.path.join(out_dir, 'gpu_report.md'))
    return md


def markdown(R):
    e = R['env']
    yn = lambda k: '?' if k not in e else ('yes' if e[k] else 'no')  # noqa: E731
    L = [f"# GPU check: {e.get('gpu') or e.get('device')}", '',
         f"torch {e.get('torch')}, CUDA {e.get('cuda')}, cuDNN {e.get('cudnn')}, flash-attn "
         f"{yn('flash_attn')}, faiss {yn('faiss')}, triton {yn('triton')}; {e.get('date')}; "
         f"sizes '{R['size']}', "
         f"{R['seconds']:.0f} s of a {R['budget_s']:.0f} s budget.", '',
         '## Correctness (device vs CPU / float64)', '',
         '| check | result | worst error / tolerance |', '|---|---|---|']
    for name, c in R['checks'].items():
        if 'error' in c:
            L.append(f"| {name} | ERROR | {c['error'][:150]} |")
            continue
        worst = []  # (error / tolerance, text) of the errors that have a tolerance beside them
        for case, v in (c.get('cases') or {name: c}).items():
            for key, val in v.items() if isinstance(v, dict) else ():
                tol = v.get('tol')
                if isinstance(val, float) and isinstance(tol, float) and (
                        'err' in key or key.startswith(('output', 'grad'))):
                    worst.append((val / tol, f'{case}.{key} = {val:.2e} (tolerance {tol:g})'))
        L.append(f"| {name} | {'ok' if c['ok'] else 'FAILED'} | {max(worst)[1] if worst else ''} |")
    s = R['syncs']
    L += ['', '## Host syncs of one training step (2 micro-batches)', '']
    if 'error' in s:
        L.append(f"error: {s['error']}")
    elif s:
        L.append(f"counted {s['counted']}; the one expected read {s['expected_read']}; other: "
                 f"{s['other']} {s['other_ops'] or ''}"
                 + (f"; set_sync_debug_mode('warn'): {s['sync_debug_warnings']} warning(s)"
                    if 'sync_debug_warnings' in s else ''))
    L += ['', f"## Training step (one GPU as rank 0 of {R['sizes']['world']}: "
          f"{R['sizes']['num_classes']:,} local centres of {R['sizes']['k_total']:,}, "
          f"r = {SAMPLE_RATIO}, l = {NUM_POSITIVES})", '',
          '| model | micro-batch | img/s | MFU | forward | loss | backward | clip + read '
          '| optimizer | img/s fed by Loader | data wait | loader host / step | compiled img/s '
          '| compiled MFU | compile s |', '|' + '---|' * 15]
    for name, t in R['step'].items():
        if 'error' in t:
            L.append(f"| {name} | ERROR: {t['error'][:150]} |" + ' |' * 13)
            continue
        sy, sh, lf, c = (t.get('synthetic', {}), t.get('breakdown', {}).get('share', {}),
                         t.get('loader_fed', {}), t.get('compile', {}))
        L.append(f"| {name} | {t.get('micro_batch')} | {fmt(sy.get('images_per_s'), '.1f')} | "
                 f"{fmt(sy.get('mfu'), pct=True)} | "
                 + ' | '.join(fmt(sh.get(k), pct=True) for k in
                              ('forward', 'loss', 'backward', 'clip_and_read', 'optimizer'))
                 + f" | {fmt(lf.get('images_per_s'), '.1f')} | "
                 f"{fmt(lf.get('data_wait_share'), pct=True)} | "
                 f"{fmt(t.get('host_over_step'), '.1f')}x | {fmt(c.get('images_per_s'), '.1f')} | "
                 f"{fmt(c.get('mfu'), pct=True)} | "
                 + (fmt(c.get('first_step_s'), '.0f') if c.get('ok') else
                    (c.get('error') or 'not run')[:120]) + ' |')
    a = R['assign']
    L += ['', f"## Clustering assignment (cluster.py's torch search: {a.get('rows', 0):,} x "
          f"{a.get('dim')} against {a.get('centroids', 0):,} centres, top-{TOPK}, "
          f"chunks of {a.get('chunk_rows')} rows)", '',
          '| precision | GEMM TFLOP/s | of bf16 peak | search s per 1M rows | top-1 = fp32 '
          '| rows timed |', '|---|---|---|---|---|---|']
    peak = e.get('peak_bf16_flops')
    for name in ('fp32', 'tf32', 'bf16', 'fp16'):
        v = a.get(name)
        if not isinstance(v, dict):
            continue
        if 'error' in v:
            L.append(f"| {name} | ERROR: {v['error'][:150]} | | | | |")
            continue
        L.append(f"| {name} | {v['gemm_tflops']:.3g} | "
                 f"{fmt(v['gemm_tflops'] * 1e12 / peak if peak else None, pct=True)} | "
                 f"{v['search_s_per_1m_rows']:.2f} | {100 * v['top1_agreement_with_fp32']:.2f}% | "
                 f"{v['rows_done']:,} |")
    L += ['', '## Goals', '']
    for k, v in R['goals'].items():
        L.append(f"- {k}: {'not measured' if v is None else ('met' if v else 'NOT met')}")
    if not e.get('gpu'):
        L.append('- (no GPU: the goals are for GPU runs)')
    parts = {f'step {m} {k}': v['error'] for m, t in R['step'].items() for k, v in t.items()
             if isinstance(v, dict) and 'error' in v}
    if R['errors'] or R['skipped'] or parts:
        L += ['', '## Errors and skipped sections', '']
        L += [f'- {k}: {v}' for k, v in {**R['errors'], **parts}.items()]
        L += [f'- skipped {k}: {v}' for k, v in R['skipped'].items()]
    if R['notes']:
        L += ['', '## Notes', ''] + [f'- {n}' for n in R['notes']]
    return '\n'.join(L) + '\n'


# -----------------------------------------------------------------------------

if __name__ == '__main__':
    out_dir = 'out/gpu'
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    size = ''  # 'paper' (the paper's per-GPU shapes) | 'tiny' (CPU smoke); '': paper on CUDA
    budget_s = 420.0  # total seconds; a section that no longer fits is skipped (and listed)
    compile = True  # time torch.compile of the tower too (in a child process)
    compile_backend = ''  # '' : inductor on CUDA, 'eager' on a CPU (traces only: seconds)
    compile_timeout_s = 150.0  # per model
    sections = 'all'  # or a comma list of: checks, syncs, step, assign, compile
    only = ''  # internal: 'compile' runs one compile child
    model_name = ''  # internal (only=compile)
    micro_batch = 0  # internal (only=compile)
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    # -------------------------------------------------------------------------
    t_start = time.time()
    dev = torch.device(device)
    if dev.type == 'cuda':  # an explicit index: set_device and the generators need one
        dev = torch.device('cuda', torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    size = size or ('paper' if dev.type == 'cuda' else 'tiny')
    compile_backend = compile_backend or ('inductor' if dev.type == 'cuda' else 'eager')
    S = dict(SIZES[size], size=size, compile_backend=compile_backend,
             dtype='bfloat16' if dev.type == 'cuda' else 'float32')
    S['num_classes'] = S['k_total'] // S['world']  # rank 0's shard
    os.makedirs(out_dir, exist_ok=True)
    if only == 'compile':
        compile_child(model_name, micro_batch, S, dev, out_dir, compile_backend)
        raise SystemExit(0)
    tmp = os.path.join(out_dir, 'tmp')
    os.makedirs(tmp, exist_ok=True)
    want = set(sections.split(',')) if sections != 'all' else {'checks', 'syncs', 'step', 'assign',
                                                              'compile'}
    R = dict(size=size, budget_s=budget_s, seconds=0.0, sizes={k: v for k, v in S.items()},
             env={}, checks={}, syncs={}, step={}, assign={}, errors={}, skipped={}, notes=[])
    left = lambda: budget_s - (time.time() - t_start)  # noqa: E731

    def section(key, fn, need_s, store):
        """Run fn() if `need_s` seconds are left; its result goes to store(result); an error is
        recorded (with the last lines of its traceback) and the run goes on."""
        if left() < need_s:
            R['skipped'][key] = f'{left():.0f} s left, needs ~{need_s:.0f} s'
            print(f'skip {key}: {R["skipped"][key]}', flush=True)
            return
        t0 = time.time()
        print(f'{key} ...', end=' ', flush=True)
        try:
            res = fn()
            store(res)
            status = ('ok' if not isinstance(res, dict) or res.get('ok', True) else 'FAILED')
        except Exception as e:  # noqa: BLE001 (recorded; the next section runs)
            tb = traceback.format_exc().strip().splitlines()
            R['errors'][key] = (f'{type(e).__name__}: {str(e).strip()[:500]} '
                                f'({" | ".join(tb[-3:])[:400]})')
            store({'error': R['errors'][key]})
            status = 'ERROR'
        free(dev)
        print(f'{status} ({time.time() - t0:.1f} s)', flush=True)
        R['seconds'] = time.time() - t_start
        write_report(R, out_dir)

    section('env', lambda: env_info(dev), 0, lambda r: R.update(env=r))
    if 'checks' in want:
        k, B, d = S['pfc']
        for name, fn, need in (
                ('towers', lambda: check_towers(dev), 5),
                ('attention', lambda: check_attention(dev), 5),
                ('partialfc', lambda: check_partialfc(dev, k, B, d), 5),
                ('loader', lambda: check_loader(dev, tmp), 10),
                ('pinned', lambda: check_pinned(dev, tmp, S['busy']), 5),
                ('probe', lambda: check_probe(dev, *S['probe']), 10),
                ('kmeans', lambda: check_kmeans(dev, tmp, *S['kmeans']), 30)):
            section(f'check {name}', fn, need,
                    lambda r, name=name: R['checks'].__setitem__(name, r))
    first = PRESETS[S['models'][0]]['vision']
    if 'syncs' in want:
        section('syncs', lambda: host_syncs(first, S['num_classes'], S['sync_batch'], S['world'],
                                            S['k_total'], dev), 10, lambda r: R.update(syncs=r))
    for i, name in enumerate(S['models'] if 'step' in want else ()):
        section(f'step {name}', lambda: time_model(name, S, dev, tmp, R['notes']), 30,
                lambda r, name=name: R['step'].__setitem__(name, r))
        if i == 0 and 'assign' in want:  # the small model first, then the assignment, then L/14
            N, kc, dc = S['assign']
            section('assign', lambda: time_assign(dev, N, kc, dc, min(60.0, left() / 4)), 20,
                    lambda r: R.update(assign=r))
    if 'assign' in want and not R['assign'] and 'assign' not in R['skipped']:
        N, kc, dc = S['assign']
        section('assign', lambda: time_assign(dev, N, kc, dc, min(60.0, left() / 4)), 20,
                lambda r: R.update(assign=r))
    for name in (S['models'] if compile and 'compile' in want else ()):
        B = R['step'].get(name, {}).get('micro_batch')
        if not B:
            R['skipped'][f'compile {name}'] = 'no micro-batch from the eager timing'
            continue
        section(f'compile {name}',
                lambda: time_compile(name, B, S, dev, tmp, min(compile_timeout_s, left() - 10)),
                40, lambda r, name=name: R['step'][name].__setitem__('compile', r))
    shutil.rmtree(tmp, ignore_errors=True)
    R['seconds'] = time.time() - t_start
    md = write_report(R, out_dir)
    print()
    print(md)
    print(f'wrote {os.path.join(out_dir, "gpu_report.md")} and gpu_report.json')
