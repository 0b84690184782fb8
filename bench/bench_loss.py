"""
Benchmark of the MLCD loss at scale: forward + backward time and peak memory of PartialFC
(sample_ratio 0.1: each row's positives plus a random 10% of the centres as negatives) against
the obvious alternative, a plain full-logits implementation of Eq. 5 (all k centres, a [B, k]
logit matrix), and against PartialFC with batch_positives_as_negatives=True (insightface's
sampling: every positive of the batch scored, filled up to 10% with random centres), side by side
in one run, median of `repeats` timed iterations after one warm-up each.

    python bench/bench_loss.py                       # k = 1M, d = 512, batch 1024 (CPU: ~10 min)
    python bench/bench_loss.py --num_classes=100000  # quicker

Each variant runs in a fresh subprocess. Memory: on CPU the child's peak RSS (ru_maxrss) minus
its RSS after setup (interpreter, centres [k, d], inputs), i.e. what forward + backward add,
including the [k, d] gradient of the centres that both variants produce; on CUDA
torch.cuda.max_memory_allocated after setup (centres included).
The full-logits variant needs ~5 fp32 copies of [B, k] (20 GB at k = 1M, B = 1024) and minutes
per step on a small CPU, so there it is measured at `full_num_classes` (25K and 50K: the two show
that time and memory are linear in k) and scaled to k; on CUDA it runs at k itself.
"""
import os
import sys
import json
import math
import time
import resource
import subprocess

import torch
import torch.nn.functional as F

num_classes = 1_000_000
embed_dim = 512
batch_size = 1024
num_positives = 8
sample_ratio = 0.1
scale = 64.0
margin = 0.3
repeats = 3
device = 'cuda' if torch.cuda.is_available() else 'cpu'
profile = True  # one extra profiled iteration per variant: what dominates
variant = ''  # '' = run all and compare; 'partialfc', 'partialfc_old' or 'full' = one child run
# the plain version at k = 1M needs ~20 GB and minutes per step on a 2-core CPU: measure it at
# these k and scale linearly (empty = at num_classes, the default on CUDA)
full_num_classes = (25_000, 50_000) if device == 'cpu' else ()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)  # configurator.py and loss.py sit one level up
exec(open(os.path.join(root, 'configurator.py')).read())
from loss import PartialFC  # noqa: E402


def full_logits(x, weight, labels):
    """Eq. 5 the plain way: every centre scored, [B, k] logits, no sampling."""
    e, w = F.normalize(x, dim=1), F.normalize(weight, dim=1)
    logits = (e @ w.t()).mul_(scale)  # [B, k]
    c = (logits.gather(1, labels) / scale).clamp(-1, 1)
    s_pos = scale * torch.cos(torch.clamp(torch.acos(c) + margin, max=math.pi))  # ArcFace margin
    s_neg = logits.scatter(1, labels, float('-inf'))
    return (F.softplus(torch.logsumexp(-s_pos, 1)) + F.softplus(torch.logsumexp(s_neg, 1))).mean()


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def rss_gb():  # resident now (Linux), so that a transient peak of the setup is not counted
    try:
        return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30
    except OSError:
        return peak_rss_gb()


def child():
    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(batch_size, embed_dim, device=dev, requires_grad=True)  # the backbone's output
    # distinct positives per row (a duplicate would count twice in the plain version)
    labels = (torch.randint(0, num_classes, (batch_size, 1), device=dev) +
              torch.arange(num_positives, device=dev) * (num_classes // num_positives)) % num_classes
    pfc = PartialFC(embed_dim, num_classes, sample_ratio, scale, margin, 'mlcd',
                    batch_positives_as_negatives=variant == 'partialfc_old').to(dev)
    if variant.startswith('partialfc'):
        step = lambda: pfc(x, labels)
    else:
        step = lambda: full_logits(x, pfc.weight, labels)

    def run():
        x.grad = pfc.weight.grad = None
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step().backward()
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    setup_gb = rss_gb()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up
    times = [run() for _ in range(repeats)]
    out = dict(variant=variant, num_classes=num_classes, median_s=sorted(times)[len(times) // 2], times_s=times)
    if dev.type == 'cuda':
        out['peak_gb'] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out['peak_rss_gb'], out['setup_rss_gb'] = peak_rss_gb(), setup_gb
        out['working_gb'] = out['peak_rss_gb'] - setup_gb
    if profile:
        from torch.profiler import profile as prof, ProfilerActivity
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
        with prof(activities=acts) as p:
            run()
        def self_time(ev):  # device time on CUDA (named self_device_* in newer torch), else CPU
            if dev.type == 'cuda':
                return getattr(ev, 'self_device_time_total', None) or getattr(ev, 'self_cuda_time_total', 0)
            return ev.self_cpu_time_total
        events = sorted(p.key_averages(), key=self_time, reverse=True)
        total = max(sum(self_time(ev) for ev in events), 1e-9)
        out['profile'] = [(ev.key, round(100 * self_time(ev) / total, 1)) for ev in events[:6]]
    print(json.dumps(out))


def mem_available_gb():
    try:
        for line in open('/proc/meminfo'):
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float('inf')


def spawn(name, k):
    args = [f'--{key}={val}' for key, val in config.items() if key not in ('variant', 'num_classes')]
    cmd = [sys.executable, os.path.abspath(__file__), f'--variant={name}', f'--num_classes={k}'] + args
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if res.returncode != 0:
        raise SystemExit(f'bench_loss: {name} failed:\n{res.stderr[-2000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


if variant:
    child()
    raise SystemExit(0)

print(f'PartialFC vs full logits: k={num_classes:,} d={embed_dim} batch={batch_size} l={num_positives} '
      f'sample_ratio={sample_ratio} device={device} threads={torch.get_num_threads()}', flush=True)
part = spawn('partialfc', num_classes)
print(json.dumps(part), flush=True)
old = spawn('partialfc_old', num_classes)
print(json.dumps(old), flush=True)
fulls = []
for k in full_num_classes or (num_classes,):
    # the plain version holds ~5 fp32 [B, k] copies plus 4 [k, d] (centres, normalised, gradients)
    need_gb = (5 * batch_size + 4 * embed_dim) * 4 * k / 2**30
    if device == 'cpu' and need_gb > 0.5 * mem_available_gb():
        print(f'skipping full logits at k={k:,}: needs ~{need_gb:.0f} GB, {mem_available_gb():.0f} GB available')
        continue
    fulls.append(spawn('full', k))
    print(json.dumps(fulls[-1]), flush=True)
if not fulls:
    raise SystemExit('bench_loss: no full-logits size fits in memory; pass a smaller --full_num_classes')
full = fulls[-1]
f = num_classes / full['num_classes']  # time and memory of full logits are linear in k
mem_key = 'peak_gb' if device == 'cuda' else 'working_gb'
result = dict(device=device, num_classes=num_classes, full_measured_at=[r['num_classes'] for r in fulls],
              partialfc_s=part['median_s'], partialfc_old_s=old['median_s'], full_s=full['median_s'] * f,
              speedup=full['median_s'] * f / part['median_s'],
              partialfc_mem_gb=part[mem_key], partialfc_old_mem_gb=old[mem_key],
              full_mem_gb=full[mem_key] * f,
              mem_ratio=full[mem_key] * f / max(part[mem_key], 1e-9))
print(f"\n{'':30s}{'time (s)':>10s}{'mem (GB)':>10s}")
print(f"{'partialfc k=%d' % num_classes:30s}{part['median_s']:10.2f}{part[mem_key]:10.2f}")
print(f"{'  batch positives as negatives':30s}{old['median_s']:10.2f}{old[mem_key]:10.2f}")
for r in fulls:
    print(f"{'full logits k=%d (measured)' % r['num_classes']:30s}{r['median_s']:10.2f}{r[mem_key]:10.2f}")
if f != 1:
    print(f"{'full logits k=%d (x%.0f)' % (num_classes, f):30s}{result['full_s']:10.2f}{result['full_mem_gb']:10.2f}")
print(f"ratio full/partialfc at k={num_classes:,}: time {result['speedup']:.1f}x, memory {result['mem_ratio']:.1f}x")
print(json.dumps(result))
