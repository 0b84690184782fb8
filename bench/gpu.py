"""
The GPU check: one command on one GPU that checks every CUDA path of the project against its CPU /
float64 counterpart, times train.py's step at the paper's per-GPU shapes, and leaves a report.

    python bench/gpu.py --out_dir=out/gpu            # one or two H100 / H200 / A100s: an 8-minute budget
    python bench/gpu.py --device=cpu --out_dir=...   # the same code, tiny sizes (~1 min, in CI)

It needs torch, numpy and pillow (prepare.py); faiss and flash-attn are used when they import. Each
section runs in try/except: an error is recorded in the report and the run goes on. A time budget
(budget_s) skips what no longer fits, small work first; torch.compile runs in a child process
with its own timeout. This file drives the sections and writes the report; they live beside it:
gpu_checks.py (correctness), gpu_launch.py (torchrun), gpu_timing.py (timings) and gpu_util.py
(what they share, with a copy of train.py's step). out_dir/gpu_report.json and gpu_report.md
are rewritten after every section, so a run cut short still leaves a report; a short table is
printed at the end.

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
launch       gpu_launch.py: cluster, train (stopped and resumed), lit and probe through
             torchrun on one GPU (NCCL)
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

import runtime  # noqa: E402,F401 (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

import model  # noqa: E402
from model import PRESETS  # noqa: E402
from gpu_launch import check_launch  # noqa: E402
from gpu_checks import (check_attention, check_kmeans, check_loader, check_partialfc,  # noqa: E402
                        check_pinned, check_probe, check_towers)
from gpu_timing import (compile_child, host_syncs, time_assign, time_auto,  # noqa: E402
                        time_compile, time_model, time_search)
from gpu_util import NUM_POSITIVES, SAMPLE_RATIO, TOPK, free  # noqa: E402


# sizes: the paper's per-GPU shapes on a GPU, tiny ones for the CPU smoke run
SIZES = {
    'paper': dict(models=('ViT-B/16', 'ViT-L/14'), world=8, k_total=1_000_000, mb_start=32,
                  mb_max=2048, warmup=2, steps=5, sync_batch=8, assign=(1_000_000, 100_000, 768),
                  pfc=(20_000, 64, 128), kmeans=(20_000, 32, 50), probe=(4000, 64, 10),
                  busy=2048, search_s=60, search=(1_000_000, 100_000, 768),
                  auto=(224, 2048)),
    'tiny': dict(models=('ViT-T/4',), world=2, k_total=4000, mb_start=2, mb_max=8, warmup=1,
                 steps=2, sync_batch=2, assign=(8192, 1000, 64), pfc=(2000, 16, 32),
                 kmeans=(4000, 32, 50), probe=(1000, 32, 10), busy=128, search_s=20,
                 search=(8192, 1000, 64), auto=(32, 64)),
}


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
                 cudnn=torch.backends.cudnn.version(), peak_bf16_flops=runtime.peak_flops(device),
                 cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        e.update(gpu=None, peak_bf16_flops=None, cpu=platform.processor() or platform.machine())
    return e


def fmt(x, spec='.3g', pct=False):
    if x is None:
        return '-'
    return f'{100 * x:.1f}%' if pct else format(x, spec)


def goals(R):
    """The targets this check measures (docs/gpu.md); None where not measured."""
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
    la = R.get('launch') or {}
    L += ['', '## Every stage under torchrun (bench/gpu_launch.py)', '']
    if 'error' in la:
        L.append(f"error: {la['error'][:300]}")
    elif la:
        L.append(f"{'ok' if la['ok'] else 'FAILED'}: {la['nproc']} rank(s) on {la['device']}; "
                 + ', '.join(f"{k[:-2]} {la[k]:.0f} s" for k in la if k.endswith('_s'))
                 + f"; train steps {la['train_steps']} (stop_at, then resume), LiT loss "
                 f"{fmt(la['lit_loss'])}, probe top-1 {fmt(la['linear_probe']['top1'])}")
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
    sr = R.get('search') or {}
    if sr:
        L += ['', f"## cluster.py's assign phase per search_dtype ({sr.get('rows', 0):,} x {sr.get('dim')} "
              f"against {sr.get('centroids', 0):,} centres, top-{TOPK}, search='torch')", '',
              '| search_dtype | assign s | s per 1M rows | top-1 = float32 run | top-8 = float32 run |',
              '|---|---|---|---|---|']
        for name in ('float32', 'float16', 'bfloat16'):
            v = sr.get(name)
            if isinstance(v, dict) and 'assign_s' in v:
                L.append(f"| {name} | {v['assign_s']:.2f} | {v['assign_s_per_1m_rows']:.2f} | "
                         f"{100 * v['top1_equal_fp32']:.3f}% | {100 * v['topk_equal_fp32']:.3f}% |")
    au = R.get('auto') or {}
    if au:
        L += ['', f"## train.py micro_batch_size='auto' ({au.get('model')}, one rank)", '',
              f"{au.get('line') or au.get('error', 'not run')} ({fmt(au.get('seconds'), '.0f')} s to the "
              'end of one step)']
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
    budget_s = 480.0  # total seconds; a section that no longer fits is skipped (and listed)
    compile = True  # time torch.compile of the tower too (in a child process)
    compile_backend = ''  # '' : inductor on CUDA, 'eager' on a CPU (traces only: seconds)
    compile_timeout_s = 150.0  # per model
    sections = 'all'  # or a comma list of: checks, launch, syncs, step, assign, search, auto, compile (all:
    #                   launch only on CUDA; on a CPU tests/test_launch.py runs it on 2 ranks)
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
    want = (set(sections.split(',')) if sections != 'all' else
            {'checks', 'syncs', 'step', 'assign', 'search', 'auto', 'compile'}
            | ({'launch'} if dev.type == 'cuda' else set()))
    R = dict(size=size, budget_s=budget_s, seconds=0.0, sizes={k: v for k, v in S.items()},
             env={}, checks={}, syncs={}, step={}, assign={}, search={}, auto={}, errors={},
             skipped={}, notes=[])
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
    if 'launch' in want:  # NCCL on CUDA on up to 2 GPUs (2: reduce_scatter's path), gloo on a CPU
        nproc = max(1, min(2, torch.cuda.device_count())) if dev.type == 'cuda' else 1
        section('launch', lambda: check_launch(str(dev), tmp, nproc, timeout=120), 60,
                lambda r: R.update(launch=r))
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
    if 'search' in want:  # cluster.py itself for each search_dtype
        section('search', lambda: time_search(dev, tmp, *S['search'], timeout=max(30, left() / 2)), 40,
                lambda r: R.update(search=r))
    if 'auto' in want:  # train.py's micro_batch_size='auto' on the large tower
        section('auto', lambda: time_auto(dev, tmp, S['models'][-1], *S['auto'],
                                                 timeout=max(30, left() - 20)), 60,
                lambda r: R.update(auto=r))
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
