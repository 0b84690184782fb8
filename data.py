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
import atexit
import json
import os
import queue
import sys
import threading

import numpy as np
import torch

import common

from transforms import (color_jitter, color_params, crop_params, crop_resize_cpu, normalize,
                        pad_params, plain, resized_crop, to_float)

CONTEXT_LENGTH = 77  # tokens per caption


def shard_file(kind, s):
    """The file name of shard s: kind 'images' or 'texts'."""
    return f'{kind}_{s:05d}.npy'

# -----------------------------------------------------------------------------
# reading


def _npy_header(path):
    """(shape, dtype) from a .npy file's header, checked against the file's size; ValueError naming
    the file if it is missing, not a .npy file or shorter than its header says."""
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = read[version](f)
            offset = f.tell()
    except FileNotFoundError:
        raise ValueError(f'{path}: missing')
    except Exception as e:
        raise ValueError(f'{path}: not a readable .npy file ({os.path.getsize(path)} bytes: '
                         f'{type(e).__name__}: {e})'.replace('\n', ' '))
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if size < need:
        raise ValueError(f'{path}: truncated: {size} bytes, its header says {dtype} {list(shape)} '
                         f'({need} bytes)')
    if fortran:
        raise ValueError(f'{path}: Fortran-ordered array, expected C order')
    return tuple(shape), dtype


class Dataset:
    """A built dataset directory; images are read straight from memory-mapped shards. Opening it
    checks meta.json and every shard's .npy header (shape, dtype, file size) once."""

    def __init__(self, data_dir):
        path = os.path.join(data_dir, 'meta.json')
        if not os.path.exists(path):
            raise ValueError(f'{data_dir}: no meta.json (build it with: '
                             f'python prepare.py --src=... --out={data_dir})')
        self.dir = data_dir
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
        self._mm = {}  # opened on first use: a process only maps the shards it reads

    def _check(self, path):
        m = self.meta
        if not isinstance(m, dict):
            raise ValueError(f'{path}: expected a JSON object')
        for k in ('count', 'image_size', 'shards'):
            if k not in m:
                raise ValueError(f'{path}: missing key {k!r}')
        S, ctx = m['image_size'], m.get('context_length') or CONTEXT_LENGTH
        if not isinstance(S, int) or S < 1 or not isinstance(m['shards'], list):
            raise ValueError(f'{path}: image_size must be a positive integer and shards a list')
        total = 0
        for k, s in enumerate(m['shards']):
            if not (isinstance(s, dict) and isinstance(s.get('count'), int) and s.get('images')):
                raise ValueError(f'{path}: shards[{k}] needs "images" and an integer "count"')
            kinds = [('images', np.uint8, (s['count'], S, S, 3))]
            if m.get('has_text'):
                kinds.append(('texts', np.uint16, (s['count'], ctx)))
            for kind, dtype, want in kinds:
                f = os.path.join(self.dir, str(s.get(kind)))
                shape, got = _npy_header(f)
                if shape != want or got != dtype:
                    raise ValueError(f'{f}: {got} {list(shape)}, but {path} says '
                                     f'{np.dtype(dtype)} {list(want)}')
            total += s['count']
        if total != m['count']:
            raise ValueError(f'{path}: count is {m["count"]} but its shards hold {total} images')

    def __len__(self):
        return int(self.offsets[-1])

    def _shard(self, kind, s):
        if (kind, s) not in self._mm:
            path = os.path.join(self.dir, self.meta['shards'][s][kind])
            self._mm[kind, s] = np.load(path, mmap_mode='r')
        return self._mm[kind, s]

    def _gather(self, kind, idx, out):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f'{self.dir}: index out of range [0, {len(self)})')
        order = np.argsort(idx, kind='stable')  # read in file order, place in the order asked
        sidx = idx[order]
        shard = np.searchsorted(self.offsets, sidx, side='right') - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[order[sel]] = self._shard(kind, s)[sidx[sel] - self.offsets[s]]
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

    def pinned_images(self, idx, pin):
        """images(idx) as a uint8 tensor, in pinned memory if pin (fast, asynchronous copies)."""
        S = self.image_size
        buf = torch.empty((len(idx), S, S, 3), dtype=torch.uint8, pin_memory=pin)
        self.images(idx, out=buf.numpy())
        return buf

# -----------------------------------------------------------------------------
# training and evaluation batches

AUGMENTS = ('rrc', 'pad_crop', 'flip', 'none')


def _seed(*xs):
    return int(np.random.SeedSequence(list(xs)).generate_state(1, np.uint64)[0] >> 1)


_running = set()  # (stop event, thread) of every live prefetcher


@atexit.register
def _stop_prefetchers():
    # A generator left unfinished (training ends mid-epoch) is only closed when the interpreter
    # tears down, and a worker thread still inside a torch op at that point aborts the process
    # ("terminate called without an active exception"): stop and join the workers first.
    for stop, thread in list(_running):
        stop.set()
        thread.join()


def _prefetch(fn, args, depth):
    """Yields fn(a) for a in args, computed `depth` ahead in a background thread."""
    q, stop = queue.Queue(depth), threading.Event()

    def put(x):
        while not stop.is_set():
            try:
                return q.put(x, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            for a in args:
                if stop.is_set():
                    return
                put((0, fn(a)))
            put((1, None))
        except BaseException as e:  # re-raised in the consumer
            put((2, e))

    thread = threading.Thread(target=work, daemon=True)
    _running.add((stop, thread))
    thread.start()
    try:
        while True:
            kind, x = q.get()
            if kind == 1:
                return
            if kind == 2:
                raise x
            yield x
    finally:
        stop.set()
        thread.join()
        _running.discard((stop, thread))


class Loader:
    """Training batches. Step `step` of epoch `epoch` takes global batch `step` of a permutation
    seeded by (seed, epoch); rank r gets its slice [r*B, (r+1)*B). Augmentation randomness is
    seeded by (seed, epoch, step, rank), so batch(epoch, step) is a pure function: resuming at a
    step gives exactly the batches an uninterrupted run would have seen.

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
                 ratio=(3 / 4, 4 / 3), prefetch=4, pad=4, views=1, color_jitter=0.0):
        self.ds = Dataset(data_dir)
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
        self._perm = (None, None)

    def indices(self, epoch, step):
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f'step {step} outside [0, {self.steps_per_epoch})')
        e, perm = self._perm
        if e != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
            self._perm = (epoch, perm)
        start = (step * self.world_size + self.rank) * self.batch_size
        return perm[start:start + self.batch_size]

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
        return _prefetch(lambda s: self.batch(epoch, s), steps, self.prefetch)


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


def eval_batches(data_dir, batch_size, image_size, rank=0, world_size=1, device='cpu', prefetch=4):
    """Evaluation order, no augmentation: rank r reads its contiguous slice of the rows
    (common.shard_range).
    Yields (index int64 [b], images [b,3,S,S])."""
    ds = Dataset(data_dir)
    _warn_upsampling(data_dir, ds.image_size, image_size)
    N = len(ds)
    start, n = common.shard_range(N, rank, world_size)
    device = torch.device(device)

    def load(a):
        idx = np.arange(a, min(a + batch_size, start + n))
        buf = ds.pinned_images(idx, device.type == 'cuda')
        return torch.from_numpy(idx), plain(buf, device, image_size)

    return _prefetch(load, range(start, start + n, batch_size), prefetch)
