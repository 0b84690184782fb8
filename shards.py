"""
Writes the shards of a dataset (the format data.py reads) for prepare.py: uint8 image rows streamed
into images_XXXXX.npy, each row's source in sources_XXXXX.txt, caption ids in texts_XXXXX.npy, and a
shard_XXXXX.json record written last, which marks the shard finished. Every file is written under
a temporary name, fsynced and renamed, so a reader (or a resumed build) never sees part of one.
"""
import contextlib
import glob
import json
import os
import re

import numpy as np

from data import CONTEXT_LENGTH, shard_file


def write_file(path, write, mode='wb'):
    """write(f) to a temporary name, fsync, rename. The name carries the pid: a worker left running
    by a killed build and the resumed build may write the same shard at once (same bytes)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: the partial file goes, the space with it
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


FLAT = 2  # an image whose uint8 values span at most this many levels is one flat colour


class ImageShard:
    """Streams rows into images_XXXXX.npy.<pid>.tmp (memory stays at one row); the .npy header is
    rewritten with the final row count (numpy pads it for this) and the file renamed into place."""

    def __init__(self, path, image_size):
        self.path, self.n, self.S, self.flat, self.sources = path, 0, image_size, [], []
        self.f = open(f'{path}.{os.getpid()}.tmp', 'wb')
        self.header_len = self._header()

    def _header(self):
        self.f.seek(0)
        shape = (self.n, self.S, self.S, 3)
        np.lib.format.write_array_header_1_0(
            self.f, {'descr': '|u1', 'fortran_order': False, 'shape': shape})
        return self.f.tell()

    def write(self, img, key, check_flat=True):
        # one flat colour (max - min <= FLAT levels): a 16-bit PNG whose values all sit near 0
        # decodes to black, a blank scan to white; kept, but named, so the user can look
        if check_flat and int(img.max()) - int(img.min()) <= FLAT:
            self.flat.append(key)
        self.f.write(img.tobytes())
        self.sources.append(key)  # where the row came from: a path, tar:key or synthetic index
        self.n += 1

    def close(self):
        assert self._header() == self.header_len  # same length, so the rows are untouched
        self.f.flush()
        os.fsync(self.f.fileno())  # the shard record, written next, must never outlive the rows
        self.f.close()
        os.replace(self.f.name, self.path)
        # sources_XXXXX.txt beside the shard: row i's source as a JSON string on line i
        folder, name = os.path.split(self.path)  # images_XXXXX.npy -> sources_XXXXX.txt
        write_file(os.path.join(folder, 'sources_' + name[len('images_'):-len('.npy')] + '.txt'),
                   lambda f: f.writelines(json.dumps(k) + '\n' for k in self.sources), 'w')


def sources_file(s):
    return f'sources_{s:05d}.txt'


def finish_shard(out, s, shard, texts, classes, skipped, n_items):
    """Closes shard s; its record shard_XXXXX.json, written last, marks it finished."""
    shard.close()
    if texts is not None:
        texts = np.array(texts, np.uint16).reshape(-1, CONTEXT_LENGTH)
        write_file(os.path.join(out, shard_file('texts', s)), lambda f: np.save(f, texts))
    record = dict(count=shard.n, items=n_items, skipped=skipped, classes=classes, flat=shard.flat)
    write_file(os.path.join(out, f'shard_{s:05d}.json'), lambda f: json.dump(record, f), 'w')
    return record


def remove_tmp(out, pids):
    """A failed build frees its disk: the *.<pid>.tmp files of these processes go (their shards
    unfinished), so that a re-run on a nearly full disk fits; other processes' are left alone."""
    pids = {str(x) for x in pids}
    for p in glob.glob(os.path.join(out, '*.tmp')):
        if p.rsplit('.', 2)[-2] in pids:
            with contextlib.suppress(OSError):
                os.remove(p)


def clear(out):
    for p in glob.glob(os.path.join(out, '*')):
        base = os.path.basename(p)
        if re.fullmatch(r'((images|texts|shard)_\d+\.(npy|json)|sources_\d+\.txt'
                        r'|classes\.npy|meta\.json|build\.json|data\.json)(\.(\d+\.)?tmp)?', base):
            os.remove(p)
