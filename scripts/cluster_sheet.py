"""
What a cluster holds: a contact sheet of a clustering, one row per cluster, its images (those
whose nearest centre it is, labels.npy's first column) beside one another. Rows are clusters
spread evenly over the size order (the largest, the median, the smallest); each is titled with
its id and size and, when the dataset has classes, its most frequent class and that class's
share of the cluster. Pillow only.

    python scripts/cluster_sheet.py --data_dir=data/x --labels_dir=out/cluster --out=sheet.png
    python scripts/cluster_sheet.py ... --clusters=3,17,250    # these clusters

Images are drawn at `cell` pixels (nearest neighbour, so that 32 px images stay sharp); within a
cluster they are a seeded random choice of its members.
"""
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

TITLE = 14  # pixels of the title line above each row


def pick_clusters(nearest, rows, chosen):
    """The cluster ids to show: `chosen` as given, else `rows` of the non-empty clusters spread
    evenly over their size order, largest first (ties: the lower id)."""
    sizes = np.bincount(nearest[nearest >= 0])
    if chosen:
        bad = [c for c in chosen if not 0 <= c < len(sizes) or sizes[c] == 0]
        if bad:
            raise SystemExit(f'cluster_sheet.py: clusters {bad} are empty or not in [0, {len(sizes)})')
        return list(chosen), sizes
    order = [c for c in np.lexsort((np.arange(len(sizes)), -sizes)) if sizes[c] > 0]
    at = np.linspace(0, len(order) - 1, min(rows, len(order))).round().astype(int)
    return [int(order[i]) for i in dict.fromkeys(at)], sizes


def members(nearest, c, per_row, rng):
    """Up to per_row images whose nearest centre is c, a seeded random choice, in index order."""
    idx = np.flatnonzero(nearest == c)
    return np.sort(rng.choice(idx, min(per_row, len(idx)), replace=False))


def title(c, size, ys, classnames):
    """'cluster c: n images' and, with classes (ys: the cluster's), its most frequent one's share."""
    line = f'cluster {c}: {int(size):,} image' + 's' * (int(size) != 1)
    if ys is not None:
        counts = np.bincount(ys)
        top = int(counts.argmax())
        name = classnames[top] if classnames and top < len(classnames) else f'class {top}'
        line += f'; {name} {100 * counts[top] / len(ys):.0f}%'
    return line


def sheet(ds, nearest, clusters, sizes, per_row, cell, seed):
    rng = np.random.default_rng(seed)
    classes = None if ds.classes is None else np.asarray(ds.classes)
    canvas = Image.new('RGB', (per_row * cell, len(clusters) * (TITLE + cell)), 'white')
    draw = ImageDraw.Draw(canvas)
    for r, c in enumerate(clusters):
        y = r * (TITLE + cell)
        ys = None if classes is None else classes[nearest == c]
        draw.text((2, y + 1), title(c, sizes[c], ys, ds.classnames), fill='black')
        for i, im in enumerate(ds.images(members(nearest, c, per_row, rng))):
            canvas.paste(Image.fromarray(im, 'RGB').resize((cell, cell), Image.NEAREST),
                         (i * cell, y + TITLE))
    return canvas


if __name__ == '__main__':
    data_dir = ''     # the data.py dataset that was clustered
    labels_dir = ''   # its cluster.py out_dir (labels.npy)
    rows = 8          # clusters shown, spread over the size order ...
    clusters = []     # ... or these cluster ids
    per_row = 12      # images per cluster
    cell = 48         # side of one image in the sheet, pixels
    seed = 0          # of the choice of images within a cluster
    out = 'clusters.png'
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    if not data_dir or not labels_dir:
        raise SystemExit('cluster_sheet.py: give --data_dir=<dataset> --labels_dir=<cluster.py out_dir>')
    try:
        ds = data.Dataset(data_dir)
    except ValueError as e:
        raise SystemExit(f'cluster_sheet.py: {e}')
    path = os.path.join(labels_dir, 'labels.npy')
    if not os.path.exists(path):
        raise SystemExit(f'cluster_sheet.py: {path} does not exist (run cluster.py first)')
    labels = np.load(path, mmap_mode='r')
    if labels.ndim != 2 or len(labels) != len(ds):
        raise SystemExit(f'cluster_sheet.py: {path} has shape {list(labels.shape)}, but {data_dir} '
                         f'has {len(ds)} images (labels of other data?)')
    nearest = np.asarray(labels[:, 0], dtype=np.int64)
    chosen, sizes = pick_clusters(nearest, rows, [int(c) for c in clusters])
    sheet(ds, nearest, chosen, sizes, per_row, cell, seed).save(out)
    print(f'{out}: clusters {chosen} of {int((sizes > 0).sum())} non-empty, '
          f'{per_row} images each')
