"""
CIFAR-10's standard binary download -> the image-folder archive scripts/reproduce_cifar10.py reads.

    python scripts/cifar10_folders.py cifar-10-binary.tar.gz cifar10.tar.gz

The input is "CIFAR-10 binary version" from https://www.cs.toronto.edu/~kriz/cifar.html (the
Python version is pickled, and unpickling runs code: not read here). Its data_batch_1..5.bin and
test_batch.bin hold records of 1 label byte + 3,072 bytes (the red, green and blue 32 x 32
planes, rows top to bottom); batches.meta.txt names the classes. Members are read from the archive
by those names, never extracted. The output holds cifar10/{train,test}/<class>/<NNNN>.png
(lossless, numbered per class in file order): 50,000 training and 10,000 test images.
"""
import io
import sys
import tarfile

import numpy as np
from PIL import Image

RECORD = 1 + 3 * 32 * 32
PARTS = {'train': [f'data_batch_{i}.bin' for i in range(1, 6)], 'test': ['test_batch.bin']}


def member(tf, name):
    """The archive's member whose file name is `name` (in any folder), as bytes."""
    found = [m for m in tf.getmembers() if m.isfile() and m.name.rsplit('/', 1)[-1] == name]
    if len(found) != 1:
        raise SystemExit(f'cifar10_folders.py: {tf.name}: expected one {name}, found {len(found)}')
    return tf.extractfile(found[0]).read()


def records(raw, name):
    """label [n] uint8, images [n, 32, 32, 3] uint8 of one batch file."""
    if len(raw) % RECORD:
        raise SystemExit(f'cifar10_folders.py: {name}: {len(raw)} bytes is not a whole number of '
                         f'{RECORD}-byte records')
    rec = np.frombuffer(raw, np.uint8).reshape(-1, RECORD)
    return rec[:, 0], rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def convert(src, dst):
    with tarfile.open(src) as tf, tarfile.open(dst, 'w:gz') as out:
        classes = [c for c in member(tf, 'batches.meta.txt').decode().split() if c]
        if len(classes) != 10:
            raise SystemExit(f'cifar10_folders.py: {src}: batches.meta.txt names {len(classes)} classes, not 10')
        for part, files in PARTS.items():
            count = [0] * len(classes)
            for name in files:
                labels, images = records(member(tf, name), name)
                for y, img in zip(labels.tolist(), images):
                    if y >= len(classes):
                        raise SystemExit(f'cifar10_folders.py: {name}: label {y} out of range')
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format='PNG')
                    info = tarfile.TarInfo(f'cifar10/{part}/{classes[y]}/{count[y]:04d}.png')
                    info.size = buf.tell()
                    buf.seek(0)
                    out.addfile(info, buf)
                    count[y] += 1
            print(f'{part}: {sum(count)} images, {dict(zip(classes, count))}')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    convert(sys.argv[1], sys.argv[2])
