"""
Tables and figure of scripts/reproduce_cifar10.py: linear-probe top-1 of every variant, mean
and standard deviation over its seeds, the r and l sweeps (paper Table 5b / 5c), and the mean
positive / sampled-negative cosine over training (paper Fig. 3). Drawn with PIL.
    python scripts/plot_cifar10.py out/cifar10   # -> results.json, results.md, results.png there
"""
import glob
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

VARIANTS = [  # run name (before _s<seed>), label
    ('mlcd', 'MLCD l=8 r=0.1 (Eq. 5)'), ('mlc', 'MLC l=8 (Eq. 4)'),
    ('onevision', 'OneVision: 3 of 10 labels, CosFace'),
    ('unicom', 'single label l=1 (UNICOM)'), ('mlcd_r1', 'MLCD l=8 r=1.0'),
    ('simclr', 'SimCLR, 2 views (instance)'), ('uniclip', 'UniCLIP image-image, 2 views (instance)'),
    ('mlcd_t', 'MLCD l=8 r=0.1, SimCLR-tower teacher'), ('random', 'random-init ViT'), ('pixels', 'raw pixels'), ('supervised', 'true labels (reference)'),
    # does the student pass its teacher: SimCLR given more steps, and students with one change
    ('simclr_2x', 'SimCLR, 2x steps'), ('simclr_4x', 'SimCLR, 4x steps'), ('student_k300', 'student: k=300'),
    ('student_k3000', 'student: k=3000'), ('student_l4', 'student: l=4'),
    ('student_pooled', 'student: clusters of the pooled feature'),
    ('student_v8', 'student: clusters of the mean of 8 views'),
    ('student_jitter', 'student: + colour jitter 0.5'), ('student_2x', 'student: 2x steps'),
    ('student_4x', 'student: 4x steps'),
    ('student_round2', "student: a second round (the student's clusters)"),
    # split=val: OneVision's settings (draws of the pool nearest, scale sigma), seed 0
    ('ov_d3_p10_sigma32', 'OneVision: 3 of 10, sigma 32'), ('ov_d3_p10_sigma64', 'OneVision: 3 of 10, sigma 64'),
    ('ov_d1_p10_sigma32', 'OneVision: 1 of 10, sigma 32'), ('ov_d3_p16_sigma32', 'OneVision: 3 of 16, sigma 32'),
]
COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#e377c2', '#bcbd22', '#8c564b',
           '#7f7f7f', '#17becf', '#393b79', '#e7ba52', '#843c39', '#5254a3', '#8ca252', '#ad494a',
           '#7b4173', '#637939', '#bd9e39', '#d6616b', '#a55194', '#6b6ecf', '#b5cf6b', '#e7969c',
           '#de9ed6', '#3182bd']  # one per bar (26 variants)


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def probes(root, name):
    """{feature: [top-1 of each seed]} of a variant's runs, and their train.json / lit.json."""
    dirs = sorted(glob.glob(os.path.join(root, f'{name}_s*'))) or [os.path.join(root, name)]
    acc, trains = {}, []
    for d in dirs:
        p = load(os.path.join(d, 'probe.json'))
        if not p or 'linear_probes' not in p:
            continue
        for feat, lp in p['linear_probes'].items():
            acc.setdefault(feat, []).append(100 * lp['top1'])
        trains.append(load(os.path.join(d, 'train.json')) or load(os.path.join(d, 'lit.json')) or {})
    return acc, trains


def fmt(xs):
    if not xs:
        return '-'
    return f'{np.mean(xs):.2f}' if len(xs) == 1 else f'{np.mean(xs):.2f} ± {np.std(xs, ddof=1):.2f}'


def curves(root, name):
    path = os.path.join(root, f'{name}_s0', 'log.jsonl')
    if not os.path.exists(path):
        return []
    return [r for r in map(json.loads, open(path)) if 'pos_cos' in r]


def train_seconds(t):
    """Wall seconds of a pre-training run: train.json's time_s, or lit.json's steps / rate."""
    if t.get('time_s'):
        return t['time_s']
    return t['step'] / t['steps_per_s'] if t.get('steps_per_s') else None


def main(root):
    rows, results = [], {}
    for name, label in VARIANTS:
        acc, trains = probes(root, name)
        if not acc:
            continue
        feats = list(acc)
        rows.append((name, label, acc, trains))
        results[name] = {'label': label, 'top1': acc, 'seeds': len(acc[feats[0]]),
                         'steps': trains[0].get('step') if trains else None,
                         'train_s': [train_seconds(t) for t in trains if train_seconds(t)]}
    if not rows:
        raise SystemExit(f'plot_cifar10.py: no probe.json under {root}')
    feats = list(rows[0][2])
    for name, _, acc, _ in rows:  # raw pixels are probed once: the same value in every column
        if name == 'pixels':
            for f in feats:
                acc.setdefault(f, acc[next(iter(acc))])
    sweeps = {}
    for key, values, base in (('r', ('0.01', '0.1', '0.5', '1.0'), {'0.1': 'mlcd', '1.0': 'mlcd_r1'}),
                              ('l', ('1', '2', '4', '8', '16'), {'8': 'mlcd'}),
                              ('r, 10 k clusters', ('0.1', '1.0'), {})):
        pts = []
        for v in values:
            run = f'sweep_k10x_r{v}' if key.startswith('r,') else f'sweep_{key}{v}'
            d = os.path.join(root, f'{base[v]}_s0' if v in base else run)
            p = load(os.path.join(d, 'probe.json'))
            if p and 'linear_probes' in p:
                pts.append((v, {f: 100 * lp['top1'] for f, lp in p['linear_probes'].items()}))
        if pts:
            sweeps[key] = pts
    results['sweeps'] = sweeps
    with open(os.path.join(root, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)

    md = ['| variant | ' + ' | '.join(f'top-1 % ({f})' for f in feats) + ' | seeds | steps | train s |',
          '|---' * (len(feats) + 4) + '|']
    for name, label, acc, trains in rows:
        secs = [train_seconds(t) for t in trains if train_seconds(t)]
        md.append(f'| {label} | ' + ' | '.join(fmt(acc.get(f, [])) for f in feats) +
                  f" | {len(acc[feats[0]])} | {(trains[0].get('step') if trains else None) or '-'} | "
                  f"{f'{np.median(secs):.0f}' if secs else '-'} |")
    for key, pts in sweeps.items():
        md += ['', f'| {key} (MLCD, seed 0) | ' + ' | '.join(v for v, _ in pts) + ' |',
               '|---' * (len(pts) + 1) + '|']
        md += [f'| top-1 % ({f}) | ' + ' | '.join(f'{a[f]:.2f}' for _, a in pts) + ' |' for f in feats]
    open(os.path.join(root, 'results.md'), 'w').write('\n'.join(md) + '\n')
    print('\n'.join(md))
    draw(root, rows, sweeps, feats[0])


# the teacher and its student at 1, 2 and 4 x the steps: (run name at each length, label)
LONGER = [(('simclr', 'simclr_2x', 'simclr_4x'), 'teacher: SimCLR'),
          (('mlcd_t', 'student_2x', 'student_4x'), 'student: MLCD on its clusters')]


def draw(root, rows, sweeps, feat):
    """Panels side by side, each only when its runs exist: bars of every variant, the r and l
    sweeps, top-1 against steps for the teacher and its student, the cosines over training."""
    colour = {name: COLOURS[i % len(COLOURS)] for i, (name, *_) in enumerate(rows)}
    acc_of = {name: acc[feat] for name, _, acc, _ in rows}
    longer = [(label, colour.get(names[0], 'black'), [(m, acc_of[n]) for m, n in zip((1, 2, 4), names)
                                                       if n in acc_of]) for names, label in LONGER]
    longer = [(label, col, pts) for label, col, pts in longer if len(pts) > 1]
    series = [(n, curves(root, n)) for n, *_ in rows]
    series = [(n, c) for n, c in series if c]
    x0, y0, bw = 30, 400, 44
    xs = [x0 + len(rows) * (bw + 8) + 60]  # left edge of each panel after the bars
    for w in [250] * len(sweeps) + [300] * bool(longer) + [520] * bool(series):
        xs.append(xs[-1] + w)
    W, H = max(600, xs[-1]), max(560, 430 + 11 * len(rows))
    img = Image.new('RGB', (W, H), 'white')
    g = ImageDraw.Draw(img)
    # 1. bars: mean top-1 of every variant with its seeds' spread
    vals = [np.mean(acc[feat]) for _, _, acc, _ in rows]
    lo, hi = 10 * (min(vals) // 10) - 10, 10 * (max(vals) // 10 + 1)
    Y = lambda v: y0 - 340 * (v - lo) / (hi - lo)
    g.text((x0, 8), f'CIFAR-10 linear probe top-1 % ({feat}), mean and range of seeds', fill='black')
    for i, (name, label, acc, _) in enumerate(rows):
        x, col = x0 + i * (bw + 8), colour[name]
        g.rectangle([x, Y(np.mean(acc[feat])), x + bw, y0], fill=col)
        if len(acc[feat]) > 1:
            g.line([x + bw / 2, Y(max(acc[feat])), x + bw / 2, Y(min(acc[feat]))], fill='black', width=2)
        g.text((x + 2, Y(np.mean(acc[feat])) - 14), f'{np.mean(acc[feat]):.1f}', fill='black')
        g.text((x0, 420 + i * 11), f'{i + 1}. {label}', fill=col)
        g.text((x + bw / 2 - 3, y0 + 4), str(i + 1), fill='black')
    g.text((x0, y0 - 340 - 12), f'{hi:.0f}', fill='#999999')
    g.text((x0, y0 + 4 - 14), f'{lo:.0f}', fill='#999999')
    panels = iter(zip(xs, xs[1:]))
    # 2. sweeps of r and l (seed 0)
    for key, pts in sweeps.items():
        box = frame(g, next(panels), f'MLCD top-1 % vs {key} (seed 0)')
        line(g, [(v, [a[feat]]) for v, a in pts], box, '#1f77b4')
    # 3. top-1 against steps: the teacher and its student, each given 1, 2 and 4 x the steps
    if longer:
        box = frame(g, next(panels), 'top-1 % vs steps (x 1,400), mean and range of seeds')
        ys = [y for _, _, pts in longer for _, a in pts for y in a]
        for j, (label, col, pts) in enumerate(longer):
            line(g, [(f'{m}x', a) for m, a in pts], box, col, (min(ys) - 1, max(ys) + 1),
                 slots=[f'{m}x' for m in (1, 2, 4)])
            g.text((box[0] + 6, box[1] + 6 + 12 * j), label, fill=col)
    # 4. mean positive (thick) and sampled-negative (thin) cosine during training, seed 0
    if series:
        px0, py0, px1, py1 = frame(g, next(panels), 'cosine during training: positives (thick), negatives (thin)', 20)
        smax = max(r['step'] for _, c in series for r in c)
        lo = min(0.0, min(r['neg_cos'] for _, c in series for r in c))
        hi = max(0.1, max(r['pos_cos'] for _, c in series for r in c))
        X = lambda s: px0 + (px1 - px0) * s / max(smax, 1)
        Yc = lambda v: py1 - (py1 - py0) * (v - lo) / (hi - lo)
        g.line([px0, Yc(0), px1, Yc(0)], fill='#dddddd')
        g.text((px0 + 4, py0 + 2), f'{hi:.2f}', fill='#999999')
        g.text((px0 + 4, py1 - 12), f'{lo:.2f}', fill='#999999')
        g.text((px1 - 60, py1 + 4), f'step {smax}', fill='#999999')
        for n, c in series:
            g.line([(X(r['step']), Yc(r['pos_cos'])) for r in c], fill=colour[n], width=3)
            g.line([(X(r['step']), Yc(r['neg_cos'])) for r in c], fill=colour[n], width=1)
    img.save(os.path.join(root, 'results.png'))
    print(f"wrote {os.path.join(root, 'results.json')}, results.md and results.png")


def frame(g, edges, title, gap=50):
    """A panel's title and outline between its left edge and the next panel's (less a gap): its box."""
    box = (edges[0], 40, edges[1] - gap, 400)
    g.text((box[0], 8), title, fill='black')
    g.rectangle(box, outline='#999999')
    return box


def line(g, pts, box, col, span=None, slots=None):
    """One series in a panel: (x label, [value of each seed]) per point, the mean joined by a line
    with the seeds' range as a bar; x positions are evenly spaced over `slots` (default: the points)."""
    px0, py0, px1, py1 = box
    slots = slots or [v for v, _ in pts]
    means = [np.mean(a) for _, a in pts]
    a, b = span or (min(means) - 1, max(means) + 1)
    X = lambda v: px0 + 20 + (px1 - px0 - 40) * slots.index(v) / max(1, len(slots) - 1)
    Yp = lambda y: py1 - (py1 - py0) * (y - a) / (b - a)
    P = [(X(v), Yp(m)) for (v, _), m in zip(pts, means)]
    g.line(P, fill=col, width=2)
    for (v, acc), m, (x, y) in zip(pts, means, P):
        g.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        if len(acc) > 1:
            g.line([x, Yp(max(acc)), x, Yp(min(acc))], fill=col, width=1)
        g.text((x - 10, y - 16), f'{m:.1f}', fill='black')
    for v in slots:
        g.text((X(v) - 8, py1 + 4), v, fill='black')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'out/cifar10')
