"""
The GPU check's timings (bench/gpu.py runs them): host syncs of one step, train.py's step at the
paper's per-GPU shapes (images/s, MFU, phase shares, data wait, torch.compile in a child process)
and cluster.py's assignment search.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]  # the project's modules; sync_count (tests/)

import runtime  # noqa: E402,F401 (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
from model import PRESETS  # noqa: E402
from sync_count import count_syncs  # noqa: E402
from gpu_util import (NUM_POSITIVES, TOPK, Timed, adam_steps, autocast,  # noqa: E402
                      build_training, free, is_oom, make_dataset, marker, seconds, step_breakdown,
                      sync, synthetic_batches, train_step)


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
    peak = runtime.peak_flops(device)
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
    cmd = [sys.executable, os.path.join(ROOT, 'bench', 'gpu.py'), '--only=compile', f'--model_name={name}',
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
        peak = runtime.peak_flops(device)
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



def stage(script, args, timeout):
    """A stage as a subprocess: (its stdout, its last JSON line); an error names the stage."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f'{script} {" ".join(args)}: exit {p.returncode}: '
                           + (p.stderr.strip() or p.stdout.strip())[-500:])
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{')]
    return p.stdout, json.loads(lines[-1]) if lines else {}


def time_search(device, tmp, N, k, d, timeout):
    """cluster.py itself, search='torch', for every search_dtype: N x d embeddings against k
    centres, top-8 (one k-means iteration on a k-point sample: the assign phase is what is timed).
    Seconds of the assign phase, and its labels against the float32 run's."""
    torch.manual_seed(0)
    x = F.normalize(torch.randn(N, d, device=device), dim=1).half().cpu().numpy()
    path = os.path.join(tmp, 'search_x.npy')
    np.save(path, x)
    del x
    out, labels = dict(rows=N, centroids=k, dim=d, topk=TOPK), {}
    for dtype in ('float32', 'float16', 'bfloat16'):
        o = os.path.join(tmp, f'search_{dtype}')
        _, r = stage('cluster.py', [f'--embeddings_path={path}', f'--out_dir={o}', f'--num_classes={k}',
                                    f'--num_positives={TOPK}', '--niter=1', '--max_points_per_centroid=1',
                                    '--search=torch', f'--search_dtype={dtype}', f'--device={device}',
                                    '--force=True'], timeout)
        labels[dtype] = np.load(os.path.join(o, 'labels.npy'))
        ref = labels['float32']
        out[dtype] = dict(assign_s=r['seconds']['assign'], kmeans_s=r['seconds']['kmeans'],
                          assign_s_per_1m_rows=r['seconds']['assign'] * 1e6 / N,
                          top1_equal_fp32=float((labels[dtype][:, 0] == ref[:, 0]).mean()),
                          topk_equal_fp32=float((labels[dtype] == ref).all(1).mean()))
        if dtype != 'float32':  # the centres differ where k-means moved a point: compare labels
            out[dtype]['note'] = 'labels vs the float32 run (same seed, one k-means iteration)'
    return out


def time_auto(device, tmp, model, image_size, count, timeout):
    """train.py's micro_batch_size='auto' on this GPU at `image_size` (the paper's 224): one step
    of a `count`-image global batch on one rank (the search starts at `count` and halves on each
    out of memory); the line that says what it chose, and the seconds to its first step."""
    data_dir, labels_dir = os.path.join(tmp, 'auto_data'), os.path.join(tmp, 'auto_labels')
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        stage('prepare.py', ['--src=synthetic', f'--count={count}', f'--image_size={image_size}',
                             f'--out={data_dir}'], timeout)
        stage('cluster.py', [f'--data_dir={data_dir}', f'--out_dir={labels_dir}', '--num_classes=64',
                             '--num_positives=8', f'--device={device}'], timeout)
    t0 = time.time()
    log, r = stage('train.py', [f'--data_dir={data_dir}', f'--labels_dir={labels_dir}',
                                f'--out_dir={os.path.join(tmp, "auto_run")}', f'--model={model}',
                                f'--image_size={image_size}', f'--global_batch_size={count}',
                                '--micro_batch_size=auto',
                                '--max_steps=1', '--eval_interval=0', '--ckpt_interval=1000',
                                f'--device={device}', '--overwrite=True'], timeout)
    line = next((ln for ln in log.splitlines() if 'micro_batch_size=auto' in ln), '')
    return dict(model=model, seconds=time.time() - t0, line=line.strip(), step=r.get('step'),
                ok=bool(line) and r.get('step') == 1)
