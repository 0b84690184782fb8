"""
Figure and table of scripts/reproduce_cifar10.sh: linear-probe top-1 of every variant (bars) and
the mean positive / sampled-negative cosine over training (the paper's Fig. 3), drawn with PIL.
    python scripts/plot_cifar10.py out/cifar10     # -> out/cifar10/results.png, results.md
"""
import json
import os
import sys

from PIL import Image, ImageDraw

VARIANTS = [  # directory, label
    ('a_mlcd', 'a) MLCD l=8 r=0.1'), ('b_mlc', 'b) MLC l=8 (Eq. 4)'),
    ('c_single', 'c) single label l=1'), ('d_mlcd_r1', 'd) MLCD l=8 r=1.0'),
    ('a2_mlcd_round2', 'a2) MLCD, round-2 labels'), ('e_random', 'e) random-init ViT'),
    ('f_pixels', 'f) raw pixels'), ('g_supervised', 'g) true labels'),
]
COLOUR = dict(zip([d for d, _ in VARIANTS], ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
                                                '#8c564b', '#7f7f7f', '#17becf']))


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def curves(root, name):
    path = os.path.join(root, name, 'log.jsonl')
    if not os.path.exists(path):
        return []
    return [r for r in map(json.loads, open(path)) if 'pos_cos' in r]


def main(root):
    rows = []
    for d, label in VARIANTS:
        p, t = load(os.path.join(root, d, 'probe.json')), load(os.path.join(root, d, 'train.json'))
        if p and 'linear_probe' in p:
            lp = p['linear_probe']
            rows.append((d, label, 100 * lp['top1'], 100 * lp['mean_per_class'],
                         t and t.get('step'), t and t.get('time_s'), t and t.get('knn_acc')))
    if not rows:
        raise SystemExit(f'plot_cifar10.py: no probe.json under {root}')
    with open(os.path.join(root, 'results.md'), 'w') as f:
        f.write('| variant | linear probe top-1 % | mean per class % | steps | train s | kNN top-1 % |\n')
        f.write('|---|---|---|---|---|---|\n')
        for d, label, top1, mpc, steps, secs, knn in rows:
            f.write(f"| {label} | {top1:.2f} | {mpc:.2f} | {steps or '-'} | "
                    f"{f'{secs:.0f}' if secs else '-'} | {f'{100 * knn:.2f}' if knn is not None else '-'} |\n")
    print(open(os.path.join(root, 'results.md')).read())

    W, H = 1200, 505
    img = Image.new('RGB', (W, H), 'white')
    g = ImageDraw.Draw(img)
    # left: bars of linear-probe top-1
    x0, y0, bw, top = 30, 440, 64, max(r[2] for r in rows)
    g.text((x0, 10), 'CIFAR-10 linear probe top-1 (%)', fill='black')
    for i, (d, label, top1, *_) in enumerate(rows):
        h = 380 * top1 / max(top, 1e-9)
        x = x0 + i * (bw + 8)
        g.rectangle([x, y0 - h, x + bw, y0], fill=COLOUR[d])
        g.text((x + 4, y0 - h - 14), f'{top1:.1f}', fill='black')
        g.text((x + 2, y0 + 6), label.split(')')[0] + ')', fill='black')
    for i, (d, label, *_) in enumerate(rows):  # legend, two rows of four
        x, y = x0 + (i % 4) * 290, 462 + (i // 4) * 18
        g.rectangle([x, y + 2, x + 10, y + 12], fill=COLOUR[d])
        g.text((x + 14, y), label, fill='black')
    # right: mean positive (solid) and negative (thin) cosine over training steps
    px0, px1, py0, py1 = 680, 1180, 40, 440
    g.text((px0, 10), 'mean cosine over training: positives (upper), sampled negatives (lower)',
           fill='black')
    g.rectangle([px0, py0, px1, py1], outline='#999999')
    series = [(d, curves(root, d)) for d, _ in VARIANTS]
    series = [(d, c) for d, c in series if c]
    if series:
        smax = max(r['step'] for _, c in series for r in c)
        lo = min(min(r['neg_cos'] for r in c) for _, c in series)
        hi = max(max(r['pos_cos'] for r in c) for _, c in series)
        lo, hi = min(lo, 0.0), max(hi, 0.1)
        X = lambda s: px0 + (px1 - px0) * s / max(smax, 1)
        Y = lambda v: py1 - (py1 - py0) * (v - lo) / (hi - lo)
        g.line([px0, Y(0), px1, Y(0)], fill='#dddddd')
        g.text((px0 + 4, Y(0) - 12), '0', fill='#999999')
        g.text((px0 + 4, py0 + 2), f'{hi:.2f}', fill='#999999')
        g.text((px0 + 4, py1 - 12), f'{lo:.2f}', fill='#999999')
        g.text((px1 - 60, py1 + 6), f'step {smax}', fill='#999999')
        for d, c in series:
            col = COLOUR[d]
            g.line([(X(r['step']), Y(r['pos_cos'])) for r in c], fill=col, width=3)
            g.line([(X(r['step']), Y(r['neg_cos'])) for r in c], fill=col, width=1)
    img.save(os.path.join(root, 'results.png'))
    print(f"wrote {os.path.join(root, 'results.png')} and results.md")


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'out/cifar10')
