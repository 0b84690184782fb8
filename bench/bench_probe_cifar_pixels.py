"""
Raw-pixel linear probe on CIFAR-10: probe.py with checkpoint='pixels' (3072 CLIP-normalised pixel
values per image), CLIP's protocol (L-BFGS logistic regression, lambda by the parametric binary
search on a validation split carved from train, refit on train+val). Logistic regression on raw
CIFAR-10 pixels is known to land near 39-41% top-1; this checks that our probe does too.

    python bench/bench_probe_cifar_pixels.py [--n_train=50000] [--max_iter=1000] [--probe_dtype=float64]

Needs ../shared/datasets/cifar10.tar.gz (relative to the project root). The JPEGs are read from the
tar in memory and written under data/ by paths built here (split/class/number.jpg, class checked
against the ten CIFAR-10 names), never by the member names; then prepare.py turns them into shards.
Prints probe.py's table and one JSON line.
"""
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TAR = os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar.gz')
CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']

n_train = 50000  # a class-balanced subset of the training set when smaller (faster)
max_iter = 1000
probe_dtype = 'float32'  # probe.py's default; float64 reaches the same optimum, slower
out = os.path.join(ROOT, 'data', 'cifar10')  # unpacked folders and shards (data/ is git-ignored)
for arg in sys.argv[1:]:
    key, _, val = arg[2:].partition('=')
    if key not in ('n_train', 'max_iter', 'probe_dtype', 'out'):
        raise SystemExit(f'unknown option {arg}')
    globals()[key] = type(globals()[key])(val)


def unpack():
    """tar -> out/folders/<split>/<class>/<n>.jpg, JPEG bytes copied as they are (no re-encoding)."""
    if os.path.exists(os.path.join(out, 'folders.done')):
        return
    count = 0
    with tarfile.open(TAR) as tf:
        for m in tf:
            parts = m.name.split('/')
            if not m.isfile() or len(parts) != 4 or parts[1] not in ('train', 'test') or parts[2] not in CLASSES:
                continue
            d = os.path.join(out, 'folders', parts[1], parts[2])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f'{count:06d}.jpg'), 'wb') as f:
                f.write(tf.extractfile(m).read())
            count += 1
    open(os.path.join(out, 'folders.done'), 'w').write(str(count))


def shards(split):
    d = os.path.join(out, split)
    if not os.path.exists(os.path.join(d, 'meta.json')):
        subprocess.run([sys.executable, 'prepare.py', f'--src={os.path.join(out, "folders", split)}', f'--out={d}',
                        '--image_size=32', '--overwrite=True'], cwd=ROOT, check=True)
    return d


def subset(n):
    """The first n/10 training images of every class, as another folder tree (hard links)."""
    name = f'train{n}'
    for c in CLASSES:
        src, dst = os.path.join(out, 'folders', 'train', c), os.path.join(out, 'folders', name, c)
        if not os.path.exists(dst):
            os.makedirs(dst + '.tmp', exist_ok=True)
            for f in sorted(os.listdir(src))[:n // 10]:
                if not os.path.exists(os.path.join(dst + '.tmp', f)):
                    os.link(os.path.join(src, f), os.path.join(dst + '.tmp', f))
            os.replace(dst + '.tmp', dst)
    return shards(name)


if not os.path.exists(TAR):
    raise SystemExit(f'{TAR} is absent (a fresh clone has no ../shared): nothing to measure')
t0 = time.time()
unpack()
train, test = shards('train') if n_train >= 50000 else subset(n_train), shards('test')
print(f'data ready in {time.time() - t0:.0f}s')
t0 = time.time()
cmd = [sys.executable, 'probe.py', '--checkpoint=pixels', f'--train_dir={train}', f'--test_dir={test}',
       f'--max_iter={max_iter}', f'--probe_dtype={probe_dtype}', f'--out_dir={os.path.join(out, "probe")}', '--device=cpu']
with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,  # stream the lambda search
                      env=dict(os.environ, PYTHONUNBUFFERED='1')) as p:
    lines = []
    for line in p.stdout:
        print(line, end='', flush=True)
        lines.append(line)
if p.returncode:
    raise SystemExit(f'probe.py failed ({p.returncode})')
r = json.loads(lines[-1])['linear_probe']
print(json.dumps({'bench': 'probe_cifar_pixels', 'n_train': r['n_train'], 'n_val': r['n_val'], 'top1': r['top1'],
                  'mean_per_class': r['mean_per_class'], 'lambda': r['l2_lambda'], 'max_iter': max_iter,
                  'probe_dtype': probe_dtype, 'seconds': round(time.time() - t0, 1)}))
