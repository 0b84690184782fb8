"""
A learned teacher's features for cluster.py's embeddings_path, with two choices cluster.py's own
teacher pass does not offer: which feature of the tower, and the mean over augmented views.

    python scripts/teacher_features.py --checkpoint=out/simclr_cifar10/ckpt.pt \
        --data_dir=data/cifar10-train --out=out/teacher_v8.npy --views=8
    python cluster.py --embeddings_path=out/teacher_v8.npy --data_dir=data/cifar10-train ...

feature: 'embed' (the projected output: what cluster.py's teacher pass embeds) or 'pooled' (the
class token after the final LayerNorm, before the projection: what CLIP's linear probes read).
views = 1: the plain image, as cluster.py embeds it; views = V > 1: the plain image and V - 1
views augmented like training (augment, pad, crop_scale), each l2-normalised, then averaged: the
teacher's answer for an image rather than for one crop of it. The [N, d] float32 result is held
in memory, so this is for small sets (CIFAR: 50K x 128); one process, any device.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import runtime  # noqa: E402
import files  # noqa: E402
from checkpoints import from_pretrained  # noqa: E402
from data import Dataset  # noqa: E402
from transforms import crop_params, crop_resize_cpu, pad_params, plain  # noqa: E402

# -----------------------------------------------------------------------------
checkpoint = ''  # the teacher: anything checkpoints.from_pretrained loads
data_dir = ''  # a data.py dataset
out = ''  # the .npy written (float32 [N, d])
feature = 'embed'  # 'embed' | 'pooled'
views = 1  # 1: the plain image; V > 1: the plain image + V - 1 augmented views, averaged
augment = 'pad_crop'  # the extra views: 'pad_crop' (reflect-pad, crop, flip) | 'rrc' (resized crop, flip)
pad = 4
crop_scale = (0.4, 1.0)
batch_size = 500
seed = 0
device = 'cpu'
exec(open(os.path.join(ROOT, 'configurator.py')).read())
runtime.check_device(device)
# -----------------------------------------------------------------------------
if not (checkpoint and data_dir and out):
    raise SystemExit('teacher_features.py: checkpoint, data_dir and out are required')
if feature not in ('embed', 'pooled') or augment not in ('pad_crop', 'rrc') or views < 1:
    raise SystemExit(f"teacher_features.py: feature={feature!r} (embed | pooled), augment={augment!r} "
                     f"(pad_crop | rrc), views={views} (>= 1)")
vision = from_pretrained(checkpoint)[0].to(device).eval()
ds = Dataset(data_dir)
S, N = vision.image_size, len(ds)
g = torch.Generator().manual_seed(seed)
result = None
for i in runtime.progress(range(0, N, batch_size), desc=f'features x{views}'):
    u8 = ds.images(np.arange(i, min(i + batch_size, N)))
    x = [plain(u8, device, S)]
    for _ in range(views - 1):
        n = len(u8)
        boxes, flip = (pad_params(n, g, ds.image_size, pad) if augment == 'pad_crop'
                       else crop_params(n, g, tuple(crop_scale), size=ds.image_size))
        x.append(crop_resize_cpu(u8, boxes, flip, S).to(device))
    with torch.no_grad():
        p = vision.ln_post(vision.forward_tokens(torch.cat(x))[:, 0])
        f = vision.proj(p) if feature == 'embed' and vision.proj is not None else p
        f = F.normalize(f.float(), dim=-1).view(views, len(u8), -1).mean(0)
    if result is None:
        result = np.zeros((N, f.shape[1]), np.float32)
    result[i:i + len(u8)] = f.cpu().numpy()
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
with files.atomic_open(out) as fh:
    np.save(fh, result)
print(f'{out}: {N} x {result.shape[1]} {feature} features, mean of {views} view(s)')
