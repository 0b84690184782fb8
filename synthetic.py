"""
The built-in synthetic dataset: one to three coloured shapes on a varied background, with a caption
that describes them; the class is the shape of the largest object. Deterministic in (seed, index).
"""
import math

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'semicircle', 'cross', 'ring')
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
           'yellow': (240, 215, 40), 'purple': (140, 60, 180), 'orange': (245, 135, 30),
           'white': (245, 245, 245), 'black': (25, 25, 25)}
BACKGROUNDS = {'gray': (128, 128, 128), 'white': (235, 235, 235), 'black': (30, 30, 30),
               'green': (70, 130, 70), 'blue': (60, 90, 160), 'brown': (120, 85, 50),
               'pink': (235, 170, 190), 'teal': (40, 140, 140)}


def _shape_sdf(shape, px, py):
    # signed distance (roughly, in units of the shape's radius), negative inside
    if shape == 'circle':
        return np.hypot(px, py) - 1.0
    if shape == 'square':
        return np.maximum(np.abs(px), np.abs(py)) - 0.8
    if shape == 'semicircle':
        return np.maximum(np.hypot(px, py + 0.4) - 1.0, -(py + 0.4))
    if shape == 'triangle':  # equilateral: three half-planes
        angles = (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)
        return np.max([np.cos(a) * px + np.sin(a) * py for a in angles], 0) - 0.5
    if shape == 'cross':
        bar = lambda a, b: np.maximum(np.abs(a) - 1.0, np.abs(b) - 0.33)
        return np.minimum(bar(px, py), bar(py, px))
    if shape == 'ring':
        return np.abs(np.hypot(px, py) - 0.72) - 0.28
    raise ValueError(shape)


def synthetic_one(index, image_size, seed):
    """Image `index` of the synthetic set: (uint8 [S,S,3], caption, class id). Deterministic."""
    rng = np.random.default_rng([seed, index])
    S = image_size
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    u = (np.arange(S, dtype=np.float32) + 0.5) / S
    gx, gy = np.meshgrid(u, u)
    a = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(a) * (gx - 0.5) + np.sin(a) * (gy - 0.5))[..., None] * rng.uniform(20, 60)
    img = (np.array(BACKGROUNDS[bg_name], np.float32) + grad
           + rng.normal(0, 5, (S, S, 3)).astype(np.float32))
    k = int(rng.integers(1, 4))
    radii = np.sort(rng.uniform(0.1, 0.3, k))[::-1]  # largest first: it names the class
    names = [c for c in COLOURS if c != bg_name]
    objects = [(r, SHAPES[rng.integers(len(SHAPES))], names[rng.integers(len(names))],
                rng.uniform(r, 1 - r, 2), rng.uniform(0, 2 * math.pi), rng.uniform(-15, 15, 3))
               for r in radii]
    for r, shape, colour, (cx, cy), t, jitter in objects[::-1]:  # largest drawn last: never hidden
        dx, dy = (gx - cx) / r, (gy - cy) / r
        px, py = np.cos(t) * dx + np.sin(t) * dy, -np.sin(t) * dx + np.cos(t) * dy
        cover = np.clip(0.5 - _shape_sdf(shape, px, py) * r * S, 0, 1)[..., None]  # antialiased
        img = img * (1 - cover) + (np.array(COLOURS[colour]) + jitter).astype(np.float32) * cover
    objects = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for _, s, c, _, _, _ in objects]
    desc = objects[0] if k == 1 else ', '.join(objects[:-1]) + ' and ' + objects[-1]
    caption = f'{desc} on a {bg_name} background'
    cls = SHAPES.index(objects[0].split()[-1])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), caption, cls


def synthetic(count, image_size=32, seed=0, start=0):
    """The built-in synthetic dataset: images [start, start+count) as a dict of
    images uint8 [n,S,S,3], captions list[str], classes int32 [n], classnames list[str]."""
    items = [synthetic_one(i, image_size, seed) for i in range(start, start + count)]
    images = np.zeros((0, image_size, image_size, 3), np.uint8)
    if items:
        images = np.stack([x[0] for x in items])
    return dict(images=images, captions=[x[1] for x in items],
                classes=np.array([x[2] for x in items], np.int32), classnames=list(SHAPES))
