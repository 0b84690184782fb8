"""
The GPU check's correctness checks (bench/gpu.py runs them): each runs one CUDA path of the project
and its CPU / float64 counterpart on the same inputs and returns a dict with 'ok' and its figures.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]  # the project's modules; sync_count (tests/)

import runtime  # noqa: E402,F401 (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import copy  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import prepare  # noqa: E402
import transforms  # noqa: E402
import model  # noqa: E402
from loss import PartialFC  # noqa: E402
from model import TextTransformer, VisionTransformer  # noqa: E402
from gpu_util import NUM_POSITIVES, SAMPLE_RATIO, TOL, autocast, rel, unnorm  # noqa: E402


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
    # ViT-L/14's tokens; text contexts; a head of 288, past flash-attn's 256 (model.attention
    # must take SDPA there)
    for T, causal, hd in ((257, False, 64), (77, True, 64), (50, True, 64), (65, False, 288)):
        q, k, v = (torch.randn(2, T, 4, hd, generator=g, dtype=torch.float64) for _ in range(3))
        gout = torch.randn(2, T, 4, hd, generator=g, dtype=torch.float64)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        s = torch.einsum('bthd,bshd->bhts', qr, kr) / math.sqrt(hd)
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
            out[f'model.attention_T{T}_causal{int(causal)}_hd{hd}_{r_name(dtype)}'] = r
            ok &= r['ok']
        # each SDPA kernel on its own, bf16 ([B, h, T, d] layout); one that is not available for
        # these inputs on this device is reported, not failed
        qt, kt, vt = (t.to(device, torch.bfloat16).transpose(1, 2) for t in (q, k, v))
        for name in ('FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'CUDNN_ATTENTION', 'MATH'):
            key = f'sdpa_{name.lower()}_T{T}_causal{int(causal)}_hd{hd}'
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
    flash = (model.flash_attn_func is not None and device.type == 'cuda'
             and model.flash_supports(64, model.GPU_CAPABILITY))
    return dict(ok=ok, bf16_attention='flash_attn' if flash else 'sdpa',
                gpu_capability=list(model.GPU_CAPABILITY), cases=out)


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
    """evaluation.fit_logreg with its defaults on the device and on the CPU, and a float64 fit run
    to
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
    # name -> search, device, search_dtype: float32 on the device is the reference; its half
    # precision searches (candidates re-scored in float32), the CPU, faiss on the CPU and on the GPU
    runs = {'torch_device': ('torch', str(device), 'float32'), 'torch_cpu': ('torch', 'cpu', 'float32')}
    if device.type == 'cuda':
        runs.update(torch_device_fp16=('torch', str(device), 'float16'),
                    torch_device_bf16=('torch', str(device), 'bfloat16'))
    faiss_gpus = 0
    if importlib.util.find_spec('faiss') is not None:
        import faiss
        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0
        runs['faiss_cpu'] = ('faiss', 'cpu', 'float32')
        if device.type == 'cuda' and faiss_gpus:
            runs.update(faiss_device=('faiss', str(device), 'float32'),
                        faiss_device_fp16=('faiss', str(device), 'float16'))
    res, seconds_ = {}, {}
    for name, (search, dev, dtype) in runs.items():
        out = os.path.join(tmp, f'kmeans_{name}')
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        run_cluster([f'--embeddings_path={path}', f'--out_dir={out}', f'--num_classes={k}',
                     '--num_positives=4', '--niter=8', f'--search={search}',
                     f'--device={dev}', f'--search_dtype={dtype}'], 300)
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
    return dict(ok=ok, faiss='faiss_cpu' in runs, faiss_gpus=faiss_gpus, seconds=seconds_, cases=cases)

