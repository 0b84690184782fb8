"""
The dataset format, and what training reads from it: Dataset (memory-mapped shards), Loader
(augmented training batches, exact resume) and eval_batches. prepare.py writes datasets.

A dataset is a directory:
    meta.json           count, image_size S, has_text, context_length (77, or null without
                        texts), classnames (or null), shards: [{images, texts, count}], skipped:
                        {count, reasons, items: [[key, reason]]}, source, source_type, build
    images_XXXXX.npy    uint8 [n, S, S, 3]: every image stored once, its shorter side resized to
                        S (bicubic, antialiased) and centre-cropped: training never decodes
    texts_XXXXX.npy     uint16 [n, 77]: CLIP BPE ids (tokenizer.py), when has_text
    classes.npy         int32 [count]: class ids, for class folders and the synthetic set
meta.json is written last: a directory with one holds a finished dataset.
"""
import collections
import errno
import json
import mmap
import os
import resource
import sys
import threading

import numpy as np
import torch

import runtime
from runtime import prefetched

from shuffle import epoch_order
from transforms import (color_jitter, color_params, crop_params, crop_resize_cpu, normalize,
                        pad_params, plain, resized_crop, to_float)

CONTEXT_LENGTH = 77  # tokens per caption


def shard_file(kind, s):
    """The file name of shard s: kind 'images' or 'texts'."""
    return f'{kind}_{s:05d}.npy'

# -----------------------------------------------------------------------------
# reading


# One memory map per shard holds a file descriptor (mmap dups it) and a map. LAION-400M at
# shard_size=10000 is 40,000 image + 40,000 text shards, and random batches touch all of them:
# kept open, that is 80,000 descriptors (common soft limit `ulimit -n`: 1,024 per process) and
# 80,000 maps (vm.max_map_count: 65,530). A Dataset keeps at most MAX_OPEN_SHARDS maps, least
# recently used first out: 128 is an eighth of a 1,024 limit, so a process with two readers
# (training + kNN evaluation) and torch's own files stays under half of it, and a node of 8
# ranks holds ~2,000 maps in all. A miss re-maps a shard, ~50 us more than a hit on a shared
# 2-core machine (bench/bench_open.py). At LAION's size nearly every random read misses whatever
# the cache holds (128 of 40,000 shards: 0.3% hits), so a larger one would buy little there.
MAX_OPEN_SHARDS = 128
SPARE_FILES = 32  # descriptors left free for torch, sockets and logs when checking the limit


class ShardError(runtime.OneLine, ValueError):
    """A shard that cannot be read (bad file, too many open files): a one-line stop."""


def _stop(msg):
    # A shard is opened on first read, in the main thread or a prefetch thread. The main thread
    # stops at once; a prefetch thread hands the error to its consumer (prefetch), which stops
    # there: tearing down the process group from a worker would pull it from under the main thread.
    if threading.current_thread() is threading.main_thread():
        runtime.stop(msg)
    raise ShardError(msg)


def _read_header(f, path):
    """(shape, dtype, offset) from an open .npy file, checked against the file's size;
    ValueError naming the file if it is not a .npy file or shorter than its header says."""
    size = os.fstat(f.fileno()).st_size
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = read[version](f)
        offset = f.tell()
    except Exception as e:
        raise ValueError(f'{path}: not a readable .npy file ({size} bytes: '
                         f'{type(e).__name__}: {e})'.replace('\n', ' '))
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if size < need:
        raise ValueError(f'{path}: truncated: {size} bytes, its header says {dtype} {list(shape)} '
                         f'({need} bytes)')
    if fortran:
        raise ValueError(f'{path}: Fortran-ordered array, expected C order')
    return tuple(shape), dtype, offset


def _npy_header(path):
    """(shape, dtype) of a .npy file, checked as _read_header does; ValueError if missing."""
    try:
        with open(path, 'rb') as f:
            return _read_header(f, path)[:2]
    except FileNotFoundError:
        raise ValueError(f'{path}: missing')


def _truncated(path, size, need):
    return (f'{path}: truncated while in use ({size} bytes, its header says {need}); the run '
            'cannot go on: restore the file and resume')


def _whole(path, need, file_id):
    """Stop with one line if the mapped file at path is now shorter than `need` bytes: a read of a
    page past its end would kill the process with SIGBUS, no message. Once per shard a read
    touches, before it: os.stat of the path, ~2.5 us on a shared 2-core machine (fstat on a kept
    descriptor, 1.3 us, would take a second descriptor per map: _check_limit counts one), +0.18 ms
    on a 0.53 ms gather of 256 64-px rows from 64 shards, ~1% of that Loader.batch (14.6 ms). A
    truncation between this check and the read still kills the process with SIGBUS: a mapped read
    cannot be guarded, only preceded by a check. A path that now names another file (replaced) or
    none (deleted) leaves the mapped one as it was: nothing to check."""
    if path is None:  # an empty shard: nothing mapped
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_size < need and (st.st_dev, st.st_ino) == file_id:
        _stop(_truncated(path, st.st_size, need))


def _open_files():
    try:
        return len(os.listdir('/proc/self/fd'))
    except OSError:  # no /proc (macOS): the maps alone are counted
        return 0


class Dataset:
    """A built dataset directory; images are read straight from memory-mapped shards. Opening it
    reads meta.json (and classes.npy) only, whatever the number of shards; each shard's .npy header
    (shape, dtype, file size) is checked against meta.json when the shard is mapped. At most
    max_open_shards shards are mapped at once (least recently used first out), safe to read from
    several threads."""

    def __init__(self, data_dir, max_open_shards=MAX_OPEN_SHARDS):
        path = os.path.join(data_dir, 'meta.json')
        if os.path.exists(os.path.join(data_dir, 'build.json')) and not os.path.exists(path):
            raise ValueError(f'{data_dir}: prepare.py has not finished there (build.json but no '
                             'meta.json): re-run the same prepare.py command, it continues where '
                             'it stopped')
        if not os.path.exists(path):
            raise ValueError(f'{data_dir}: no meta.json (build it with: '
                             f'python prepare.py --src=... --out={data_dir})')
        if not (isinstance(max_open_shards, int) and max_open_shards >= 1):
            raise ValueError(f'max_open_shards={max_open_shards}: must be an integer >= 1')
        self.dir, self.max_open_shards = data_dir, max_open_shards
        try:
            with open(path, encoding='utf-8') as f:
                self.meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f'{path}: invalid JSON ({e})')
        self._check(path)
        self.image_size = self.meta['image_size']
        self.classnames = self.meta.get('classnames')
        cp = os.path.join(data_dir, 'classes.npy')
        self.classes = None
        if os.path.exists(cp):
            shape, dtype = _npy_header(cp)
            if shape != (self.meta['count'],) or dtype.kind not in 'iu':
                n = self.meta['count']
                raise ValueError(f'{cp}: {dtype} {list(shape)}, but {path} says {n} images '
                                 f'(expected int32 [{n}])')
            self.classes = np.load(cp)
        self.offsets = np.cumsum([0] + [s['count'] for s in self.meta['shards']])
        # (kind, shard) -> memory map, oldest first; opened on first use: a process only maps
        # the shards it reads. The lock: a Loader's prefetch thread and the main thread both read.
        self._mm = collections.OrderedDict()
        n = len(self.meta['shards'])  # data offset of each checked shard, -1 until then
        self._offset = {'images': np.full(n, -1, np.int64), 'texts': np.full(n, -1, np.int64)}
        self._lock = threading.Lock()
        self._limit_checked = False

    def _check(self, path):
        m = self.meta
        if not isinstance(m, dict):
            raise ValueError(f'{path}: expected a JSON object')
        for k in ('count', 'image_size', 'shards'):
            if k not in m:
                raise ValueError(f'{path}: missing key {k!r}')
        S = m['image_size']
        if not isinstance(S, int) or S < 1 or not isinstance(m['shards'], list):
            raise ValueError(f'{path}: image_size must be a positive integer and shards a list')
        total = 0
        for k, s in enumerate(m['shards']):
            if not (isinstance(s, dict) and isinstance(s.get('count'), int) and s['count'] >= 0
                    and s.get('images') and (s.get('texts') or not m.get('has_text'))):
                raise ValueError(f'{path}: shards[{k}] needs "images"'
                                 f'{", texts" if m.get("has_text") else ""} and a "count" >= 0')
            total += s['count']
        if total != m['count']:
            for s in range(len(m['shards'])):  # only on this error path: name the shard whose
                shard, dtype, want = self._expect('images', s)  # header disagrees, if one does
                try:
                    with open(shard, 'rb') as f:
                        self._header(f, shard, dtype, want)
                except FileNotFoundError:
                    raise ValueError(f'{shard}: missing')
            raise ValueError(f'{path}: count is {m["count"]} but its shards hold {total} images')

    def _check_limit(self):
        # once, before the first map: the maps this Dataset may hold must fit under the soft
        # open-file limit, with the files open now (other readers, torch, sockets) and some spare
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        now = _open_files()
        if soft != resource.RLIM_INFINITY and now + self.max_open_shards + SPARE_FILES > soft:
            _stop(f'max_open_shards={self.max_open_shards}: the open-file limit (ulimit -n) is '
                  f'{soft} and {now} files are open, too few for {self.max_open_shards} shard maps '
                  f'+ {SPARE_FILES} spare: raise ulimit -n or lower max_open_shards')
        self._limit_checked = True

    def _expect(self, kind, s):
        """(path, dtype, shape) that meta.json gives shard s of `kind`."""
        n, S = self.meta['shards'][s]['count'], self.meta['image_size']
        dtype, shape = ((np.uint8, (n, S, S, 3)) if kind == 'images' else
                        (np.uint16, (n, self.meta.get('context_length') or CONTEXT_LENGTH)))
        return os.path.join(self.dir, str(self.meta['shards'][s][kind])), np.dtype(dtype), shape

    def _header(self, f, path, dtype, want):
        """The data offset of open shard file f, its header checked against meta.json's."""
        shape, got, offset = _read_header(f, path)
        if shape != want or got != dtype:
            raise ValueError(f'{path}: {got} {list(shape)}, but '
                             f'{os.path.join(self.dir, "meta.json")} says {dtype} {list(want)}')
        return offset

    def _map(self, kind, s):
        """Shard s of `kind` as (rows, path, need, file id): a read-only memory map, the bytes its
        header says the file holds and the (device, inode) mapped, for _whole. Its header is checked
        against meta.json the first time only, its data offset kept (a read that parses the header
        costs 344 us per row, one that re-maps at the kept offset 96 us, a hit 46 us:
        bench/bench_open.py)."""
        path, dtype, want = self._expect(kind, s)
        offset = int(self._offset[kind][s])
        try:
            if offset < 0:
                with open(path, 'rb') as f:
                    offset = self._header(f, path, dtype, want)
                self._offset[kind][s] = offset
            if want[0] == 0:  # an empty file region cannot be mapped
                return np.empty(want, dtype), None, 0, None
            need = offset + int(np.prod(want)) * dtype.itemsize
            fd = os.open(path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if st.st_size < need:  # shrank since its header was checked
                    _stop(_truncated(path, st.st_size, need))
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # holds a dup of fd until unmapped
            finally:
                os.close(fd)
            return (np.ndarray(want, dtype, buffer=mm, offset=offset), path, need,
                    (st.st_dev, st.st_ino))
        except FileNotFoundError:
            _stop(f'{path}: missing')
        except TypeError as e:  # shorter than when its header was checked
            _stop(f'{path}: truncated while in use ({e})')
        except ValueError as e:
            _stop(str(e) if str(e).startswith(path) else f'{path}: {e}')
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                _stop(f'max_open_shards={self.max_open_shards}: too many open files mapping '
                      f'{path} (the limit, ulimit -n, is '
                      f'{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}): raise ulimit -n or '
                      'lower max_open_shards')
            if e.errno == errno.ENOMEM:
                _stop(f'max_open_shards={self.max_open_shards}: out of memory maps mapping {path} '
                      '(vm.max_map_count, or memory): lower max_open_shards')
            raise

    def __len__(self):
        return int(self.offsets[-1])

    def _shard(self, kind, s):
        with self._lock:
            key = (kind, int(s))
            if key in self._mm:
                self._mm.move_to_end(key)
                return self._mm[key]
            if not self._limit_checked:
                self._check_limit()
            mm = self._mm[key] = self._map(kind, key[1])
            if len(self._mm) > self.max_open_shards:
                # dropped, not closed: a reader still holding it keeps it valid until it is done
                self._mm.popitem(last=False)
            return mm

    def _gather(self, kind, idx, out):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f'{self.dir}: index out of range [0, {len(self)})')
        order = np.argsort(idx, kind='stable')  # read in file order, place in the order asked
        sidx = idx[order]
        shard = np.searchsorted(self.offsets, sidx, side='right') - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            rows, path, need, file_id = self._shard(kind, s)
            _whole(path, need, file_id)
            out[order[sel]] = rows[sidx[sel] - self.offsets[s]]
        return out

    def images(self, idx, out=None):
        """uint8 [n, S, S, 3] for indices in any order; `out` may be a (pinned) buffer to fill."""
        n = np.asarray(idx).size
        out = np.empty((n, self.image_size, self.image_size, 3), np.uint8) if out is None else out
        return self._gather('images', idx, out)

    def texts(self, idx):
        """int64 [n, 77] CLIP token ids."""
        if not self.meta.get('has_text'):
            raise ValueError(f'{self.dir}: this dataset has no texts')
        ctx = self.meta.get('context_length') or CONTEXT_LENGTH
        out = np.empty((np.asarray(idx).size, ctx), np.uint16)
        return self._gather('texts', idx, out).astype(np.int64)

    def sources(self, idx):
        """Where each row came from, as prepare.py recorded it beside the shards (an image path,
        tar:key or the synthetic index); None for a shard built without a record."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        shard = np.searchsorted(self.offsets, idx, side='right') - 1
        out, lines = [None] * len(idx), {}
        for j, (i, s) in enumerate(zip(idx.tolist(), shard.tolist())):
            if s not in lines:
                name = self.meta['shards'][s].get('sources')
                path = name and os.path.join(self.dir, name)
                lines[s] = open(path).read().splitlines() if path and os.path.exists(path) else None
            if lines[s] is not None:
                out[j] = json.loads(lines[s][i - self.offsets[s]])
        return out

    def pinned_images(self, idx, pin):
        """images(idx) as a uint8 tensor, in pinned memory if pin (fast, asynchronous copies)."""
        S = self.image_size
        buf = torch.empty((len(idx), S, S, 3), dtype=torch.uint8, pin_memory=pin)
        self.images(idx, out=buf.numpy())
        return buf


def open_dataset(key, path, max_open_shards=None):
    """data.Dataset(path); its errors become one line that names the setting the path came
    from (`data_dir=data/x: no meta.json ...`)."""
    try:
        return Dataset(path, max_open_shards or MAX_OPEN_SHARDS)
    except RecursionError:  # json's parser on thousands of nested brackets
        runtime.stop(f'{key}={path}: meta.json is nested too deeply to be a dataset description')
    except (ValueError, OSError) as e:
        runtime.stop(f"{key}={path}: {str(e).removeprefix(str(path) + ': ')}")


# -----------------------------------------------------------------------------
# training and evaluation batches

AUGMENTS = ('rrc', 'pad_crop', 'flip', 'none')


def _seed(*xs):
    return int(np.random.SeedSequence(list(xs)).generate_state(1, np.uint64)[0] >> 1)


class Loader:
    """Training batches. Step `step` of epoch `epoch` takes global batch `step` of epoch_order,
    a permutation keyed by (seed, epoch); rank r gets its slice [r*B, (r+1)*B). Augmentation
    randomness is seeded by (seed, epoch, step, rank), so batch(epoch, step) is a pure function:
    resuming at a step gives exactly the batches an uninterrupted run would have seen.

    augment: 'rrc' (random resized crop, area ~ U(scale), aspect ~ U(ratio), + flip), 'pad_crop'
    (reflect-pad by `pad` pixels, random crop back to the stored size, + flip), 'flip', 'none';
    True / False mean 'rrc' / 'none'. views: V independently augmented views of each image.
    color_jitter: SimCLR colour distortion strength (0 = off), applied after the crop.
    A batch is dict(images, aug, labels, texts, index): images float [B,3,S,S] (views=1) or
    [V,B,3,S,S] (views=V > 1, view v of image b at [v, b]), CLIP-normalised; aug float [V,B,5]
    (cx, cy, w, h of the crop box as fractions of the stored image, flip 0/1) or [V,B,10] with
    colour (+ brightness, contrast, saturation, hue, grayscale 0/1), the parameters applied."""

    def __init__(self, data_dir, batch_size, image_size, labels=None, with_text=False, rank=0,
                 world_size=1, seed=0, augment=True, device='cpu', scale=(0.4, 1.0),
                 ratio=(3 / 4, 4 / 3), prefetch=4, pad=4, views=1, color_jitter=0.0,
                 max_open_shards=MAX_OPEN_SHARDS):
        self.ds = Dataset(data_dir, max_open_shards)
        self.batch_size, self.image_size, self.labels = batch_size, image_size, labels
        self.with_text, self.rank, self.world_size, self.seed = with_text, rank, world_size, seed
        self.device, self.prefetch = torch.device(device), prefetch
        self.scale, self.ratio = scale, ratio
        self.augment = ('rrc' if augment else 'none') if isinstance(augment, bool) else augment
        self.pad, self.views, self.color_jitter = pad, views, color_jitter
        if self.augment not in AUGMENTS:
            raise ValueError(f'augment={augment!r}: expected one of {", ".join(AUGMENTS)} '
                             '(or True / False)')
        if self.augment == 'pad_crop' and not 0 <= pad < self.ds.image_size:
            raise ValueError(f'pad={pad}: reflect padding needs 0 <= pad < the stored size '
                             f'{self.ds.image_size}')
        if views < 1 or color_jitter < 0:
            raise ValueError(f'views={views}, color_jitter={color_jitter}: need views >= 1 and '
                             'color_jitter >= 0')
        if labels is not None and len(labels) != len(self.ds):
            raise ValueError(f'labels have {len(labels)} rows, dataset {data_dir} has '
                             f'{len(self.ds)} images')
        if with_text and not self.ds.meta.get('has_text'):
            raise ValueError(f'{data_dir}: with_text=True but this dataset has no texts')
        # the incomplete last global batch is dropped
        self.steps_per_epoch = len(self.ds) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f'{data_dir}: {len(self.ds)} images < one global batch '
                             f'({batch_size} x {world_size})')
        _warn_upsampling(data_dir, self.ds.image_size, image_size)
        _warn_dropped(data_dir, len(self.ds), batch_size * world_size, rank)
        # grid_sample on an accelerator; on a CPU the uint8 path is faster (bench/bench_loader.py)
        self._grid = self.device.type != 'cpu'

    def indices(self, epoch, step):
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f'step {step} outside [0, {self.steps_per_epoch})')
        start = (step * self.world_size + self.rank) * self.batch_size
        return epoch_order(np.arange(start, start + self.batch_size), len(self.ds), self.seed,
                           epoch)

    def params(self, n, generator):
        """One view's augmentation parameters: float [n, 5] (cx, cy, w, h, flip), [n, 10] with
        colour."""
        S = self.ds.image_size
        if self.augment == 'rrc':
            boxes, flip = crop_params(n, generator, self.scale, self.ratio, size=S)
        elif self.augment == 'pad_crop':
            boxes, flip = pad_params(n, generator, S, self.pad)
        else:
            boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(n, 1)
            flip = (torch.rand(n, generator=generator) < 0.5 if self.augment == 'flip'
                    else torch.zeros(n, dtype=torch.bool))
        out = [boxes, flip.float()[:, None]]
        if self.color_jitter:
            out.append(color_params(n, generator, self.color_jitter))
        return torch.cat(out, 1)

    def view(self, u8, x, aug):
        """One augmented view, CLIP-normalised, from the uint8 batch (CPU path) or its float copy
        on the device (x, 0..255 or normalised; grid path)."""
        jitter = aug.shape[1] > 5
        if self.augment == 'none':
            y = plain(u8, self.device, self.image_size, norm=not jitter)
        elif self._grid:  # exact on normalised input too: the weights of each sample sum to one
            y = resized_crop(x, aug[:, :4], aug[:, 4] > 0.5, self.image_size)
        else:
            y = crop_resize_cpu(u8, aug[:, :4], aug[:, 4] > 0.5, self.image_size, norm=not jitter)
        return normalize(color_jitter(y, aug[:, 5:])) if jitter else y

    def batch(self, epoch, step):
        idx = self.indices(epoch, step)
        pin = self.device.type == 'cuda'
        buf = self.ds.pinned_images(idx, pin)
        # all views from one generator, view after view: view 0 is the batch that views=1 gives
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, step, self.rank))
        aug = torch.stack([self.params(len(idx), g) for _ in range(self.views)])  # [V, B, p]
        x = None
        if self._grid and self.augment != 'none':  # uint8 to the device once, for all views
            x = to_float(buf, self.device, norm=not self.color_jitter)
        views = [self.view(buf, x, a) for a in aug]
        images = views[0] if self.views == 1 else torch.stack(views)
        out = dict(images=images, aug=aug.to(self.device), labels=None, texts=None,
                   index=torch.from_numpy(idx.astype(np.int64)))
        if self.labels is not None:
            order = np.argsort(idx)
            rows = np.empty((len(idx),) + tuple(self.labels.shape[1:]), np.int64)
            rows[order] = self.labels[idx[order]]
            out['labels'] = torch.from_numpy(rows).to(self.device, non_blocking=pin)
        if self.with_text:
            out['texts'] = torch.from_numpy(self.ds.texts(idx)).to(self.device, non_blocking=pin)
        return out

    def iterate(self, epoch, start_step=0):
        """batch(epoch, s) for s in [start_step, steps_per_epoch), made in a background thread."""
        steps = range(start_step, self.steps_per_epoch)
        return prefetched(lambda s: self.batch(epoch, s), steps, self.prefetch)


_warned = set()


def _warn_upsampling(data_dir, stored, size):
    # a model size above the stored one silently trains on blurred pixels: say so, once
    key = (os.path.abspath(data_dir), stored, size)
    if size > stored and key not in _warned:
        _warned.add(key)
        print(f'warning: {data_dir} stores {stored}x{stored} images; image_size={size} upsamples '
              f'them (rebuild the shards at image_size >= {size} for real detail)', file=sys.stderr)


def _warn_dropped(data_dir, n, batch, rank=0):
    # the last partial global batch of every epoch is dropped: on small data that can be half of
    # it (60 images in batches of 32: 28 left out); say so past 10%, once, on the first rank
    dropped = n % batch
    key = ('dropped', os.path.abspath(data_dir), n, batch)
    if rank == 0 and dropped > 0.1 * n and key not in _warned:
        _warned.add(key)
        print(f'warning: {data_dir}: {n} images make {n // batch} batch(es) of {batch} per epoch; '
              f'each epoch leaves out {dropped} ({100 * dropped / n:.0f}%, other images each '
              f'epoch): a batch that divides {n}, or one of at most {n // 10}, loses less',
              file=sys.stderr)


def eval_batches(data_dir, batch_size, image_size, rank=0, world_size=1, device='cpu', prefetch=4,
                 max_open_shards=MAX_OPEN_SHARDS):
    """Evaluation order, no augmentation: rank r reads its contiguous slice of the rows
    (runtime.shard_range).
    Yields (index int64 [b], images [b,3,S,S])."""
    ds = Dataset(data_dir, max_open_shards)
    _warn_upsampling(data_dir, ds.image_size, image_size)
    N = len(ds)
    start, n = runtime.shard_range(N, rank, world_size)
    device = torch.device(device)

    def load(a):
        idx = np.arange(a, min(a + batch_size, start + n))
        buf = ds.pinned_images(idx, device.type == 'cuda')
        return torch.from_numpy(idx), plain(buf, device, image_size)

    return prefetched(load, range(start, start + n, batch_size), prefetch)
