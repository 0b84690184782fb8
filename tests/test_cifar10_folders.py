"""scripts/cifar10_folders.py against CIFAR-10's binary format as its page defines it: a label byte,
then the red, green and blue 32 x 32 planes, row-major."""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 'airplane automobile bird cat deer dog frog horse ship truck'.split()


def add(tf, name, raw):
    info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
    info.size = len(raw)
    tf.addfile(info, io.BytesIO(raw))


def test_binary_download_to_folders(tmp_path):
    rng = np.random.default_rng(0)
    src, dst = tmp_path / 'cifar-10-binary.tar.gz', tmp_path / 'cifar10.tar.gz'
    expect = {}  # output member -> image [32, 32, 3]
    with tarfile.open(src, 'w:gz') as tf:
        add(tf, 'batches.meta.txt', ('\n'.join(CLASSES) + '\n\n').encode())
        count = {}
        for part, names in (('train', [f'data_batch_{i}.bin' for i in range(1, 6)]), ('test', ['test_batch.bin'])):
            count = {}
            for name in names:
                raw = b''
                for _ in range(3):
                    y = int(rng.integers(10))
                    r, g, b = (rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(3))
                    raw += bytes([y]) + r.tobytes() + g.tobytes() + b.tobytes()
                    n = count.get(y, 0)
                    expect[f'cifar10/{part}/{CLASSES[y]}/{n:04d}.png'] = np.stack([r, g, b], -1)
                    count[y] = n + 1
                add(tf, name, raw)
    p = subprocess.run([sys.executable, 'scripts/cifar10_folders.py', str(src), str(dst)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with tarfile.open(dst) as tf:
        got = {m.name: np.asarray(Image.open(tf.extractfile(m))) for m in tf.getmembers()}
    assert sorted(got) == sorted(expect)
    for name, img in expect.items():
        assert (got[name] == img).all(), name


def test_truncated_batch_is_refused_by_name(tmp_path):
    src = tmp_path / 'bad.tar.gz'
    with tarfile.open(src, 'w:gz') as tf:
        add(tf, 'batches.meta.txt', '\n'.join(CLASSES).encode())
        add(tf, 'data_batch_1.bin', bytes(3073 + 100))  # one record and 100 stray bytes
    p = subprocess.run([sys.executable, 'scripts/cifar10_folders.py', str(src), str(tmp_path / 'o.tar.gz')],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and 'data_batch_1.bin: 3173 bytes is not a whole number' in p.stderr
