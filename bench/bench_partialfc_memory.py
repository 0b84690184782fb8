"""
Memory per rank of a PartialFC step (forward, backward, AdamW on the centres) at the shapes of
ViT-L/14 on 8, 80 and 160 ranks (d = 768, l = 8, global batch 32,768, k = 1M, r = 0.1), before
and after the positives were scored a chunk at a time, side by side in one run.

    python bench/bench_partialfc_memory.py           # the three worlds (2 shared cores: ~12 min)
    python bench/bench_partialfc_memory.py --worlds=8,160

A rank runs in one process, as the tests model it: it holds its n_r = k / world centres and
scores the global micro-batch B = world x micro (train.py's batch plan: 2,048 at 8 ranks, 16,400
at 80, 32,800 at 160); its input is the all-gather's output [B, d] and the labels are uniform over
[0, k), so about B l / world of them are local. Memory is counted exactly, allocation by
allocation, by torch's profiler on the CPU (its memory events: every tensor allocated and freed,
nothing from the allocator's cache or the interpreter); peak: the highest live total during the
second step (the first creates Adam's state), the tower's activations not included. 'before' is
loss.py as of git revision `before` (the commit this change was made on), 'after' the one beside
this file. Each variant runs in a fresh subprocess; time: median of `repeats` forward + backward
after the profiled steps, one thread.
"""
import os
import sys
import json
import time
import subprocess
import tempfile

import torch

worlds = (8, 80, 160)
embed_dim = 768
num_positives = 8
global_batch_size = 32768
micro_batch_size = 256  # config/vitl14.py
num_classes = 1_000_000
sample_ratio = 0.1
repeats = 3
threads = 1
positive_chunk = 2**24  # PartialFC's default on a GPU (the table is for GPU ranks); CPU: 2^20
before = 'dc8ae7a'  # git revision of the loss.py to compare against
variant = ''  # '' = run all and compare; 'before' or 'after' = one child run
world = 0  # the child's world size
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)  # configurator.py, runtime.py and loss.py sit one level up
exec(open(os.path.join(root, 'configurator.py')).read())
import runtime  # noqa: E402
import optim  # noqa: E402


def load_loss():
    """loss.py of this tree ('after') or of git revision `before`, as a module."""
    if variant == 'after':
        import loss
        return loss
    src = subprocess.run(['git', 'show', f'{before}:loss.py'], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), 'loss_before.py')
    open(path, 'w').write(src)
    sys.path.insert(0, os.path.dirname(path))
    import loss_before
    return loss_before


def windows(trace):
    """{name: (start, end)} of the record_function ranges, and the memory events in time order."""
    events = json.load(open(trace))['traceEvents']
    spans = {e['name']: (e['ts'], e['ts'] + e['dur']) for e in events
             if e.get('cat') == 'user_annotation'}
    mem = sorted((e['ts'], e['args']['Total Allocated']) for e in events
                 if e.get('name') == '[memory]')
    return spans, mem


def peak_in(mem, span):
    start, end = span
    live = [a for t, a in mem if t < start]
    return max([a for t, a in mem if start <= t <= end] + live[-1:]), (live[-1] if live else 0)


def child():
    from torch.profiler import profile, record_function, ProfilerActivity
    torch.set_num_threads(threads)
    loss = load_loss()
    _, micro, _, _ = optim.batch_plan(global_batch_size, world, micro_batch_size)
    B, d, l = world * micro, embed_dim, num_positives
    n = runtime.shard_range(num_classes, 0, world)[1]
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        pfc = loss.PartialFC(d, n, sample_ratio, 64.0, 0.3, 'mlcd', seed=0)
        pfc.positive_chunk = positive_chunk  # no effect before
        opt = torch.optim.AdamW([pfc.weight], lr=1e-4, weight_decay=0.0)
        x = torch.randn(B, d, requires_grad=True)  # the all-gather's output
        labels = torch.randint(0, num_classes, (B, l))  # global ids: this rank holds [0, n)
        for step in range(2):
            with record_function(f'step{step}'):
                with record_function(f'forward{step}'):
                    out = pfc(x, labels)
                with record_function(f'backward{step}'):
                    out.backward()
                del out
                with record_function(f'adamw{step}'):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    x.grad = None
    trace = os.path.join(tempfile.mkdtemp(), 'trace.json')
    prof.export_chrome_trace(trace)
    spans, mem = windows(trace)
    peak, live = peak_in(mem, spans['step1'])
    res = dict(variant=variant, world=world, B=B, n_r=n, S=pfc.sample().numel(), l=l, d=d,
               local_pairs=int(((labels >= 0) & (labels < n)).sum()),
               live_at_step_gb=live / 1e9, peak_gb=peak / 1e9,
               forward_peak_gb=peak_in(mem, spans['forward1'])[0] / 1e9,
               backward_peak_gb=peak_in(mem, spans['backward1'])[0] / 1e9,
               adamw_peak_gb=peak_in(mem, spans['adamw1'])[0] / 1e9)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pfc(x, labels).backward()
        times.append(time.perf_counter() - t0)
        x.grad = pfc.weight.grad = None
    res['fwd_bwd_s'] = sorted(times)[len(times) // 2]
    res['times_s'] = times
    res['positives_s'] = positives_time(loss, pfc, x, labels)
    if variant == 'after':  # and at the CPU's default chunk
        pfc.positive_chunk = 2**20
        res['positives_chunk_2^20_s'] = positives_time(loss, pfc, x, labels)
    print(json.dumps(res))


def positives_time(loss, pfc, x, labels):
    """Median time of forward + backward of the positives' cosines alone [B, l], as each version
    computes them (masked where a label is not local), with a random upstream gradient."""
    B, l = labels.shape
    local = labels < pfc.num_local
    lab = torch.where(local, labels, 0)
    e = torch.nn.functional.normalize(x.detach(), dim=1).requires_grad_()
    grad = torch.randn(B, l) * local
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if variant == 'after':
            rows = max(1, pfc.positive_chunk // (l * embed_dim))
            none = torch.zeros(1, dtype=torch.long)  # S: one row, the positives are timed
            c = loss._CentreRows.apply(pfc.weight, e, lab, none, rows)[0]
        else:  # PartialFC.forward's lines at `before`
            w_pos = pfc.weight.index_select(0, lab.flatten()).view(B, l, -1)
            c = torch.bmm(w_pos, e.unsqueeze(2)).squeeze(2) / w_pos.norm(dim=2).clamp_min(1e-12)
        c.backward(grad)
        times.append(time.perf_counter() - t0)
        e.grad = pfc.weight.grad = None
    return sorted(times)[len(times) // 2]


def spawn(name, w):
    args = [f'--{key}={val}' for key, val in config.items()
            if key not in ('variant', 'world', 'worlds')]
    cmd = [sys.executable, os.path.abspath(__file__), f'--variant={name}', f'--world={w}'] + args
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if res.returncode != 0:
        raise SystemExit(f'bench_partialfc_memory: {name} at world={w} failed:\n'
                         f'{res.stderr[-2000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


if variant:
    child()
    raise SystemExit(0)

print(f'PartialFC step memory per rank: d={embed_dim} l={num_positives} k={num_classes:,} '
      f'r={sample_ratio} global batch {global_batch_size} micro <= {micro_batch_size}, '
      f'before = loss.py at {before}, threads={threads}', flush=True)
rows = []
for w in worlds:
    for name in ('before', 'after'):
        rows.append(spawn(name, w))
        print(json.dumps(rows[-1]), flush=True)
GB = 1e9
print(f"\n{'per rank (GB)':22s}" + ''.join(f'{w:>16d}' for w in worlds) + '   ranks')
by = {(r['variant'], r['world']): r for r in rows}
table = [
    ('global micro-batch B', lambda r: f"{r['B']:,}"),
    ('centres n_r x d', lambda r: f"{r['n_r'] * r['d'] * 4 / GB:.3f}"),
    ('their gradient', lambda r: f"{r['n_r'] * r['d'] * 4 / GB:.3f}"),
    ('Adam state (2x)', lambda r: f"{2 * r['n_r'] * r['d'] * 4 / GB:.3f}"),
    ('embeddings [B, d]', lambda r: f"{r['B'] * r['d'] * 4 / GB:.3f}"),
    ('negatives [B, |S|]', lambda r: f"{r['B'] * r['S'] * 4 / GB:.3f}"),
    ('positive rows B l d', lambda r: f"{r['B'] * r['l'] * r['d'] * 4 / GB:.3f}"),
]
for label, f in table:
    print(f'{label:22s}' + ''.join(f"{f(by['after', w]):>16s}" for w in worlds))
for key, label in [('peak_gb', 'step peak'), ('forward_peak_gb', '  in forward'),
                   ('backward_peak_gb', '  in backward'), ('adamw_peak_gb', '  in AdamW'),
                   ('fwd_bwd_s', 'loss fwd+bwd (s)'), ('positives_s', '  positives alone (s)')]:
    print(f'{label:22s}' + ''.join(f"{by['before', w][key]:7.3f} -> {by['after', w][key]:6.3f}"
                                   for w in worlds))
print(f"{'  at chunk 2^20 (s)':22s}" + ''.join(f"{by['after', w]['positives_chunk_2^20_s']:16.3f}"
                                              for w in worlds))
print(json.dumps(dict(worlds=worlds, before={w: by['before', w] for w in worlds},
                      after={w: by['after', w] for w in worlds})))
