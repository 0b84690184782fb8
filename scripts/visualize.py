"""
What a tower has learnt, as in the paper's Fig. 6: each image beside the first three principal
components of its patch features shown as RGB, one column per tower. For each tower the PCA is
fitted over the patches of all the images shown, so equal colours mean similar features across
images. Pillow only.

    python scripts/visualize.py --checkpoint=out/cifar10/a_mlcd/ckpt.pt,init:ViT-T/4 \
        --data_dir=out/cifar10/data/test --image_size=32 --labels=MLCD,random --out=docs/pca.png
    python scripts/visualize.py --checkpoint=path/to/mlcd-vit-bigG-patch14-448 --images=a.jpg,b.jpg

--checkpoint: comma-separated, each anything checkpoints.from_pretrained reads, or init:<preset>
for a tower of that model.py preset at its random initialisation (seed). Images: num_images of a
data.py dataset, spread evenly over it (or the given indices), or image files. Patch grids are
upsampled with nearest so that small images (CIFAR's 32 px) stay readable.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import runtime  # noqa: E402
import data  # noqa: E402
import sources  # noqa: E402
import transforms  # noqa: E402
import model  # noqa: E402

HEADER = 16  # pixels of the label row above the grid


def load_tower(spec, image_size, seed):
    if spec.startswith('init:'):
        name = spec[len('init:'):]
        if name not in model.PRESETS:
            raise SystemExit(f'visualize.py: unknown preset {name!r} in {spec!r}; presets: '
                             f'{", ".join(model.PRESETS)}')
        torch.manual_seed(seed)
        cfg = {**model.PRESETS[name]['vision']}
        cfg['image_size'] = image_size or cfg['image_size']
        return model.VisionTransformer(**cfg)
    try:
        return checkpoints.from_pretrained(spec, image_size=image_size or None)[0]
    except ValueError as e:
        raise SystemExit(f'visualize.py: {e}')


def title(spec):
    """a short column title: out/run/ckpt.pt -> run, path/to/model_dir -> model_dir."""
    if os.path.isfile(spec):
        return os.path.basename(os.path.dirname(os.path.abspath(spec)))
    return os.path.basename(os.path.normpath(spec)) if not spec.startswith('init:') else spec


def load_images(data_dir, images, num_images, indices, size):
    """uint8 [n, S, S, 3]: dataset images at their stored size, files centre-cropped to size."""
    if images:
        out = []
        for path in images.split(','):
            try:
                out.append(sources.decode(open(path, 'rb').read(), size))
            except (OSError, sources.Skip) as e:
                raise SystemExit(f'visualize.py: {path}: {e}')
        return np.stack(out)
    try:
        ds = data.Dataset(data_dir)
    except ValueError as e:
        raise SystemExit(f'visualize.py: {e}')
    n = len(ds)
    idx = list(indices) or np.linspace(0, n - 1, min(num_images, n)).round().astype(int).tolist()
    if not idx or min(idx) < 0 or max(idx) >= n:
        raise SystemExit(f'visualize.py: {data_dir} has {n} images; indices {idx} are out of range')
    return ds.images(idx)


@torch.no_grad()
def patch_features(vision, u8, device):
    """[n, gh, gw, width]: the last block's patch tokens through ln_post, at the tower's size."""
    S = vision.image_size
    x = transforms.normalize(transforms.resize(transforms.to_float(u8, device, norm=False), S))
    tokens = vision.ln_post(vision.forward_tokens(x)[:, 1:])
    g = S // vision.patch_size
    return tokens.reshape(len(u8), g, g, -1).double().cpu()


def pca_rgb(feats):
    """[n, gh, gw, D] -> uint8 [n, gh, gw, 3]: projections on the top 3 principal components of
    all the patches, each scaled to 0..255 between its 1st and 99th percentile."""
    f = feats.reshape(-1, feats.shape[-1])
    f = f - f.mean(0)
    _, _, vh = torch.linalg.svd(f, full_matrices=False)
    p = f @ vh[:3].T  # [patches, <=3]
    p = p * torch.sign(p.gather(0, p.abs().argmax(0, keepdim=True)))  # fixed sign: largest > 0
    lo, hi = torch.quantile(p, 0.01, dim=0), torch.quantile(p, 0.99, dim=0)
    p = ((p - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    if p.shape[1] < 3:  # fewer than 3 feature dimensions or patches: pad with black
        p = torch.cat([p, torch.zeros(len(p), 3 - p.shape[1], dtype=p.dtype)], 1)
    return (p * 255).round().to(torch.uint8).reshape(*feats.shape[:3], 3).numpy()


def grid(u8, columns, labels, cell):
    """one row per image: the image, then each tower's PCA colours; a label row on top."""
    n = len(u8)
    canvas = Image.new('RGB', ((1 + len(columns)) * cell, HEADER + n * cell), 'white')
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(['image'] + labels):
        draw.text((c * cell + 3, 2), label[:max(1, cell // 6)], fill='black')
    for r in range(n):
        cells = [u8[r]] + [col[r] for col in columns]
        for c, a in enumerate(cells):
            im = Image.fromarray(np.ascontiguousarray(a), 'RGB').resize((cell, cell), Image.NEAREST)
            canvas.paste(im, (c * cell, HEADER + r * cell))
    return canvas


if __name__ == '__main__':
    checkpoint = ''   # comma-separated: checkpoints from_pretrained reads, or init:<preset>
    labels = ''       # comma-separated column titles (default: the checkpoint names)
    data_dir = ''     # a data.py dataset ...
    num_images = 8    # ... of which this many, spread evenly over it
    indices = []      # ... or these indices
    images = ''       # or comma-separated image files
    image_size = 0    # the towers' input size (0: each tower's own); rope2d towers take any
    cell = 96         # side of one cell in the picture, pixels
    out = 'pca.png'
    seed = 0          # of the init:<preset> towers
    device = 'cpu'
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    runtime.check_device(device)
    specs = [s for s in checkpoint.split(',') if s]
    if not specs or not (data_dir or images):
        raise SystemExit('visualize.py: give --checkpoint=a[,b...] and --data_dir=... or '
                         '--images=...')
    names = labels.split(',') if labels else [title(s) for s in specs]
    if len(names) != len(specs):
        raise SystemExit(f'visualize.py: {len(names)} labels for {len(specs)} checkpoints')
    towers = [load_tower(s, image_size, seed).to(device).eval() for s in specs]
    u8 = load_images(data_dir, images, num_images, indices, max(t.image_size for t in towers))
    columns = [pca_rgb(patch_features(t, u8, device)) for t in towers]
    picture = grid(u8, columns, names, cell)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    picture.save(out)
    print(json.dumps(dict(out=out, size=list(picture.size), images=len(u8), checkpoints=specs,
                          grids=[t.image_size // t.patch_size for t in towers])))
