"""
Writes datasets in the format data.py describes: image sources -> uint8 .npy shards + CLIP BPE
caption ids (tokenizer.py), decoded by several worker processes; an interrupted build resumes.

    python prepare.py --src=path/to/imagefolder --out=data/mine --image_size=224
    python prepare.py --src='laion/{00000..00099}.tar' ...   (a glob: --src='laion/*.tar')
    python prepare.py --src=captions.tsv --out=data/cc       (lines of path<TAB>caption)
    python prepare.py --src=synthetic --count=10000 --image_size=32 --out=data/synthetic
"""
import glob
import io
import json
import multiprocessing
import os
import posixpath
import re
import shutil
import sys
import tarfile
import threading
import time
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps

import common
from data import CONTEXT_LENGTH, shard_file
from synthetic import SHAPES, synthetic_one
from tokenizer import tokenize

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')

# -----------------------------------------------------------------------------
# decoding one image: any PIL mode -> upright RGB, shorter side -> S, centre crop


class Skip(Exception):
    """An input that cannot become a sample; the message is the reason recorded in meta.json."""


def to_rgb(im):
    """Any PIL mode to RGB. Transparent pixels are composited on WHITE (web images with alpha are
    mostly logos and cut-outs drawn for a white page; dropping alpha would expose whatever colour
    the invisible pixels happen to hold). 16-bit grey is scaled (v / 257), not clipped."""
    if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
        a = np.asarray(im).astype(np.float64) / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
    if 'transparency' in im.info or im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        im = im.convert('RGBA')
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        white.alpha_composite(im)
        im = white
    return im if im.mode == 'RGB' else im.convert('RGB')


def decode(data, image_size, max_pixels=Image.MAX_IMAGE_PIXELS):
    """Encoded image bytes -> uint8 [S, S, 3]. Raises Skip(reason)."""
    if not data:
        raise Skip('empty file')
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:  # checked from the header, before anything is decoded
            raise Skip(f'too large: {w}x{h} pixels (max_pixels={max_pixels})')
        im.draft('RGB', (image_size, image_size))  # JPEG: decode at 1/2..1/8 scale, sides stay >= S
        try:
            im = ImageOps.exif_transpose(im)  # camera orientation tag -> upright pixels
        except Exception:
            pass  # a broken EXIF block does not make the pixels unusable
        im = to_rgb(im)
        w, h = im.size
        m = min(w, h)
        box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)  # centre square, source pixels
        # one bicubic resampling of it to S x S (PIL's resize is antialiased when shrinking)
        im = im.resize((image_size, image_size), Image.BICUBIC, box=box)
        return np.asarray(im, dtype=np.uint8)
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip(f'too large: {e}')
    except Exception as e:  # corrupt, truncated, unknown format
        raise Skip(f'unreadable: {type(e).__name__}: {e}')

# -----------------------------------------------------------------------------
# sources: each yields (i, key, kind, payload, caption, class) in a fixed order, so that shard
# s always holds source items [s * shard_size, (s+1) * shard_size): that is what makes resume exact


def _is_image(name):
    ext = name.rsplit('.', 1)[-1].lower()
    return ext in IMAGE_EXTS and not posixpath.basename(name).startswith('.')


def _folder_source(root):
    classnames = sorted(d for d in os.listdir(root)
                        if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
    dirs = [(os.path.join(root, d), c) for c, d in enumerate(classnames)] or [(root, None)]
    files = []
    for d, c in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            files += [(os.path.join(dirpath, f), c) for f in sorted(filenames) if _is_image(f)]
    items = [(os.path.relpath(p, root).replace(os.sep, '/'), 'path', p, None, c) for p, c in files]
    return items, (classnames or None)


def _list_source(path):
    base, items, bad = os.path.dirname(os.path.abspath(path)), [], []
    with open(path, 'rb') as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip(b'\r\n')
            if not line.strip():
                continue
            try:
                line.decode('utf-8')
            except UnicodeDecodeError:
                bad.append(n)
            p, _, caption = line.partition(b'\t')
            p = os.fsdecode(p)  # a path is file-system bytes: non-UTF-8 names still open
            caption = caption.decode('utf-8', 'replace')
            items.append((p, 'path', os.path.join(base, p), caption, None))
    if bad:  # decoded as tar captions are, with U+FFFD for the bad bytes
        more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
        print(f'warning: {path}: line {bad[0]}{more} not valid UTF-8; undecodable bytes in '
              'captions replaced by U+FFFD', file=sys.stderr)
    return items


def _tar_source(paths, skip):
    """Groups consecutive members by key (webdataset: dir/key.ext), reads them in memory only.
    A truncated or corrupt tar keeps the samples read before the damage; the rest of it becomes
    one skipped item named by the tar's path, and the build goes on."""
    i = 0
    for path in paths:
        try:
            with tarfile.open(path) as tf:
                groups, key = [], None
                for m in tf:
                    if not m.isfile():
                        continue
                    d, base = posixpath.split(m.name)
                    stem, _, ext = base.partition('.')
                    k = posixpath.join(d, stem)
                    if k != key:
                        groups.append((k, {}))
                        key = k
                    groups[-1][1][ext.lower()] = m
                    if len(groups) > 1:  # a group is complete once the next key starts
                        item = _tar_item(tf, path, i, *groups.pop(0), skip(i))
                        yield item
                        i += 1
                for g in groups:
                    item = _tar_item(tf, path, i, *g, skip(i))
                    yield item
                    i += 1
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            print(f'warning: {path}: truncated or corrupt tar ({type(e).__name__}: {e}); '
                  'the rest of it is skipped', file=sys.stderr)
            reason = f'truncated or corrupt tar: {type(e).__name__}: {e}'
            yield (i, path, 'none' if skip(i) else 'bad', reason, None, None)
            i += 1


def _tar_item(tf, path, i, key, members, skipped):
    key = f'{path}:{key}'
    img = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if skipped:
        return (i, key, 'none', None, None, None)
    data = tf.extractfile(img).read() if img is not None else None
    caption = None
    if 'txt' in members:
        caption = tf.extractfile(members['txt']).read().decode('utf-8', 'replace')
    return (i, key, 'bytes' if img is not None else 'missing', data, caption, None)


def _open_source(src):
    """-> (type, items (list or None), tar paths (or None), classnames, has_text)"""
    if src == 'synthetic':
        return 'synthetic', None, None, list(SHAPES), True
    if os.path.isdir(src):
        items, classnames = _folder_source(src)
        return 'folder', items, None, classnames, False
    if src.endswith('.tar') or any(ch in src for ch in '*?['):
        paths = sorted(glob.glob(src))
        if not paths:
            raise ValueError(f'--src={src}: no tar file matches')
        return 'tar', None, paths, None, True
    if os.path.isfile(src):
        return 'list', _list_source(src), None, None, True
    raise ValueError(f'--src={src}: not an image folder, a tar file or glob, a path<TAB>caption '
                     'list, or "synthetic"')

# -----------------------------------------------------------------------------
# worker: one source item -> (i, key, image or None, tokens or None, class, skip reason or None)

_worker = {}


class WorkerError(Exception):
    """An unexpected error on one item (a bug, out of memory; not bad input): the build stops."""


def _init_worker(image_size, max_pixels, seed, has_text, pool=True):
    _worker.update(image_size=image_size, max_pixels=max_pixels, seed=seed, has_text=has_text)
    Image.MAX_IMAGE_PIXELS = max_pixels
    if pool:
        torch.set_num_threads(1)  # parallelism comes from the processes


def _process(item):
    i, key, kind, payload, caption, cls = item
    S = _worker['image_size']
    try:
        if kind == 'synthetic':
            img, caption, cls = synthetic_one(payload, S, _worker['seed'])
        else:
            if kind in ('missing', 'bad'):
                raise Skip(payload if kind == 'bad' else 'missing')
            if kind == 'path':
                try:
                    with open(payload, 'rb') as f:
                        payload = f.read()
                except OSError as e:
                    missing = isinstance(e, FileNotFoundError)
                    raise Skip('missing' if missing else f'unreadable: {e}')
            if _worker['has_text'] and not (caption or '').strip():
                raise Skip('empty caption')
            img = decode(payload, S, _worker['max_pixels'])
        tokens = tokenize([caption])[0].astype(np.uint16) if _worker['has_text'] else None
        return i, key, img, tokens, cls, None
    except Skip as e:
        return i, key, None, None, cls, str(e)
    except Exception as e:  # one line naming the item, instead of a remote traceback
        raise WorkerError(f'{key}: {type(e).__name__}: {e}'.replace('\n', ' ')) from None

# -----------------------------------------------------------------------------
# shard writer


def _atomic_npy(path, arr):
    with common.atomic_open(path) as f:
        np.save(f, arr)


class _ImageShard:
    """Streams rows into images_XXXXX.npy.tmp (memory stays at one row); the .npy header is
    rewritten with the final row count (numpy pads it for this) and the file renamed into place."""

    def __init__(self, path, image_size):
        self.path, self.n, self.S = path, 0, image_size
        self.f = open(path + '.tmp', 'wb')
        self.header_len = self._header()

    def _header(self):
        self.f.seek(0)
        shape = (self.n, self.S, self.S, 3)
        np.lib.format.write_array_header_1_0(
            self.f, {'descr': '|u1', 'fortran_order': False, 'shape': shape})
        return self.f.tell()

    def write(self, img):
        self.f.write(img.tobytes())
        self.n += 1

    def close(self):
        assert self._header() == self.header_len  # same length, so the rows are untouched
        self.f.close()
        os.replace(self.path + '.tmp', self.path)


def _clear(out):
    for p in glob.glob(os.path.join(out, '*')):
        base = os.path.basename(p)
        if re.fullmatch(r'((images|texts|shard)_\d+\.(npy|json)'
                        r'|classes\.npy|meta\.json|build\.json|data\.json)(\.tmp)?', base):
            os.remove(p)


def build(src, out, image_size=224, count=10000, seed=0, shard_size=10000, workers=None,
          overwrite=False, max_pixels=Image.MAX_IMAGE_PIXELS, progress=True):
    """Write the shards of `src` into `out` and return meta. Resumes an interrupted build of the
    same settings; refuses to touch a finished one unless overwrite=True."""
    from tqdm import tqdm
    workers = workers or len(os.sched_getaffinity(0))
    kind, items, tars, classnames, has_text = _open_source(src)
    params = dict(src=src, image_size=image_size, shard_size=shard_size, max_pixels=max_pixels,
                  **(dict(count=count, seed=seed) if kind == 'synthetic' else {}))
    os.makedirs(out, exist_ok=True)
    state_path, meta_path = os.path.join(out, 'build.json'), os.path.join(out, 'meta.json')
    if os.path.exists(meta_path) or os.path.exists(state_path):
        if overwrite:
            _clear(out)
        elif os.path.exists(meta_path):
            raise ValueError(f'{meta_path} exists: {out} holds a finished dataset; pass '
                             '--overwrite=True to rebuild it')
        elif json.load(open(state_path)) != params:
            raise ValueError(f'{out} holds an unfinished build with other settings ({state_path}: '
                             f'{json.load(open(state_path))}); pass --overwrite=True to start over')
    common.save_json(state_path, params)

    # shards that an interrupted run finished are kept (their record is written last)
    done = {}
    for p in glob.glob(os.path.join(out, 'shard_*.json')):
        done[int(os.path.basename(p)[6:-5])] = json.load(open(p))
    skip = lambda i: i // shard_size in done
    if kind == 'synthetic':
        total = count
        stream = ((i, str(i), 'synthetic', i, None, None) for i in range(count) if not skip(i))
    elif kind == 'tar':
        total = None
        stream = (it for it in _tar_source(tars, skip) if it[2] != 'none')
    else:
        total = len(items)
        stream = ((i,) + it for i, it in enumerate(items) if not skip(i))
    if total == 0:
        raise ValueError(f'--src={src}: no images found')
    if has_text:
        tokenize([''])  # loads the vocabulary here, once, so forked workers inherit it

    def finish(s, shard, texts, classes, skipped, n_items):
        shard.close()
        if has_text:
            texts = np.array(texts, np.uint16).reshape(-1, CONTEXT_LENGTH)
            _atomic_npy(os.path.join(out, shard_file('texts', s)), texts)
        done[s] = dict(count=shard.n, items=n_items, skipped=skipped,
                       classes=classes if classnames is not None else None)
        common.save_json(os.path.join(out, f'shard_{s:05d}.json'), done[s])

    # ordered results, with at most `bound` items in flight, so that memory stays bounded even
    # when the source streams bytes out of tar files faster than the workers decode them
    bound, stop = threading.BoundedSemaphore(workers * 64), threading.Event()

    def bounded(it):  # runs in the pool's task thread: it must end once the build stops
        for x in it:
            while not bound.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield x

    t0, n_new = time.time(), 0
    init = (image_size, max_pixels, seed, has_text)
    pool = multiprocessing.Pool(workers, _init_worker, init) if workers > 1 else None
    try:
        if pool:
            results = pool.imap(_process, bounded(stream), chunksize=16)
        else:
            _init_worker(*init, pool=False)
            results = map(_process, stream)
        cur = None
        name = os.path.basename(out.rstrip('/'))
        bar = tqdm(total=total, initial=sum(d['items'] for d in done.values()),
                   disable=not progress, desc=f'data {name}', unit='img')
        for i, key, img, tokens, cls, reason in results:
            if pool:
                bound.release()
            s = i // shard_size
            if cur is None or s != cur[0]:
                if cur is not None:
                    finish(*cur)
                shard = _ImageShard(os.path.join(out, shard_file('images', s)), image_size)
                cur = (s, shard, [], [], [], 0)
            s, shard, texts, classes, skipped, n_items = cur
            if reason is None:
                shard.write(img)
                if has_text:
                    texts.append(tokens)
                classes.append(cls)
                n_new += 1
            else:
                skipped.append([key, reason])
            cur = (s, shard, texts, classes, skipped, n_items + 1)
            bar.update(1)
        if cur is not None:
            finish(*cur)
        bar.close()
    finally:
        stop.set()
        if pool:
            pool.terminate()
            pool.join()

    # every shard is on disk: classes.npy, then meta.json last (its presence means "finished")
    order = sorted(done)
    assert order == list(range(len(order))), f'missing shard records in {out}'
    count_all = sum(done[s]['count'] for s in order)
    if count_all == 0:
        n = sum(done[s]['items'] for s in order)
        first = next((d['skipped'][0] for d in done.values() if d['skipped']), None)
        raise ValueError(f'--src={src}: none of the {n} items could be read (first: {first})')
    if classnames is not None:
        classes = np.concatenate([np.array(done[s]['classes'], np.int32) for s in order])
        _atomic_npy(os.path.join(out, 'classes.npy'), classes)
    skipped = [x for s in order for x in done[s]['skipped']]
    reasons = {}
    for _, r in skipped:
        reasons[r.split(':')[0]] = reasons.get(r.split(':')[0], 0) + 1
    seconds = time.time() - t0
    shards = [dict(images=shard_file('images', s), count=done[s]['count'],
                   texts=shard_file('texts', s) if has_text else None)
              for s in order if done[s]['count']]  # all-skipped shards left out
    meta = dict(count=count_all, image_size=image_size, has_text=has_text, classnames=classnames,
                source=src, source_type=kind, context_length=CONTEXT_LENGTH if has_text else None,
                shards=shards, skipped=dict(count=len(skipped), reasons=reasons, items=skipped),
                build=dict(params, seconds=round(seconds, 3),
                           images_per_s=round(n_new / max(seconds, 1e-9), 1)))
    common.save_json(meta_path, meta)
    for s in order:
        empty = [shard_file('images', s), shard_file('texts', s)] if not done[s]['count'] else []
        for f in [f'shard_{s:05d}.json'] + empty:
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    os.remove(state_path)
    return meta

# -----------------------------------------------------------------------------
# a held-out part: a seeded share of every class moved into a second dataset, so that a linear
# probe is tested on images that neither pre-training nor the probe's fit has seen


def holdout_rows(classes, n, fraction, seed):
    """Sorted ids of the held-out rows: round(fraction * n_c) of each class c (at least one, never
    a whole class), drawn with `seed`; without classes (None), of all n rows."""
    groups = [np.arange(n)] if classes is None else [np.flatnonzero(classes == c)
                                                    for c in np.unique(classes)]
    rng, held = np.random.default_rng(seed), []
    for rows in groups:
        m = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.append(rng.permutation(rows)[:m])
    return np.sort(np.concatenate(held)).astype(np.int64)


def write_rows(src_dir, rows, out, split, chunk=1024):
    """A dataset of the given rows of the finished dataset src_dir: new shards, the same meta
    (plus `split`), meta.json last. Rows are copied `chunk` at a time (bounded memory)."""
    from data import Dataset
    ds = Dataset(src_dir)
    has_text, per_shard = ds.meta['has_text'], ds.meta['build']['shard_size']
    os.makedirs(out, exist_ok=True)
    _clear(out)
    shards = []
    for s, a in enumerate(range(0, len(rows), per_shard)):
        idx = rows[a:a + per_shard]
        shard, texts = _ImageShard(os.path.join(out, shard_file('images', s)), ds.image_size), []
        for b in range(0, len(idx), chunk):
            for img in ds.images(idx[b:b + chunk]):
                shard.write(img)
            if has_text:
                texts.append(ds.texts(idx[b:b + chunk]).astype(np.uint16))
        shard.close()
        if has_text:
            _atomic_npy(os.path.join(out, shard_file('texts', s)), np.concatenate(texts))
        shards.append(dict(images=shard_file('images', s), count=len(idx),
                           texts=shard_file('texts', s) if has_text else None))
    if ds.classes is not None:
        _atomic_npy(os.path.join(out, 'classes.npy'), ds.classes[rows].astype(np.int32))
    meta = dict(ds.meta, count=len(rows), shards=shards, split=split)
    if split['part'] == 'holdout':  # what was skipped is listed once, in the other part
        meta['skipped'] = dict(count=0, reasons={}, items=[])
    common.save_json(os.path.join(out, 'meta.json'), meta)
    return meta


def build_holdout(src, out, fraction, seed=0, overwrite=False, **kwargs):
    """build() into <out>.all, then split it: <out>_holdout gets `fraction` of every class (seeded
    by `seed`), <out> the rest, and <out>.all is removed. Returns (meta of out, meta of holdout).
    An interrupted build resumes in <out>.all; an interrupted split starts the split again."""
    if not 0 < fraction < 1:
        raise ValueError(f'--holdout={fraction}: must be a fraction in (0, 1), e.g. 0.2')
    out = out.rstrip('/')
    held_dir, full = out + '_holdout', out + '.all'
    for d in (out, held_dir):
        if os.path.exists(os.path.join(d, 'meta.json')) and not overwrite:
            raise ValueError(f'{d}/meta.json exists: {d} holds a finished dataset; pass '
                             '--overwrite=True to rebuild it')
    if os.path.exists(os.path.join(full, 'meta.json')) and not overwrite:
        meta = json.load(open(os.path.join(full, 'meta.json')))  # built; the split was cut short
    else:
        meta = build(src, full, seed=seed, overwrite=overwrite, **kwargs)
    cp = os.path.join(full, 'classes.npy')
    held = holdout_rows(np.load(cp) if os.path.exists(cp) else None, meta['count'], fraction, seed)
    if len(held) == 0:
        raise ValueError(f'--holdout={fraction}: {meta["count"]} image(s) leave none to hold out')
    split = dict(fraction=fraction, seed=seed, of=meta['count'], stratified=os.path.exists(cp))
    hmeta = write_rows(full, held, held_dir, dict(split, part='holdout'))
    keep = np.setdiff1d(np.arange(meta['count']), held)
    meta = write_rows(full, keep, out, dict(split, part='train'))
    shutil.rmtree(full)
    return meta, hmeta

# -----------------------------------------------------------------------------


if __name__ == '__main__':
    # settings, overridden by --key=value (the module's UPPER_CASE constants are not settings)
    src = 'synthetic'       # image folder (class sub-folders), tar file/glob, path<TAB>caption
    #                         list, or 'synthetic'
    out = 'data/synthetic'  # output directory
    image_size = 224        # stored side: shorter side resized to this, centre-cropped
    count = 10000           # synthetic only: number of images
    seed = 0                # synthetic images; the holdout draw
    shard_size = 10000      # source items per shard file (bounded memory, resume granularity)
    workers = 0             # decoding processes (0: one per CPU core)
    overwrite = False       # rebuild a finished output
    max_pixels = Image.MAX_IMAGE_PIXELS  # larger images are skipped (decompression bombs)
    holdout = 0.0           # > 0: this share of every class (drawn with seed) goes to a second
    #                         dataset, <out>_holdout, to test a probe on; <out> keeps the rest
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    try:
        kwargs = dict(image_size=image_size, count=count, shard_size=shard_size,
                      workers=workers or None, max_pixels=max_pixels)
        if holdout:
            meta, held = build_holdout(src, out, holdout, seed=seed, overwrite=overwrite, **kwargs)
        else:
            meta = build(src, out, seed=seed, overwrite=overwrite, **kwargs)
    except (ValueError, WorkerError) as e:
        raise SystemExit(str(e))
    result = dict(out=out, count=meta['count'], shards=len(meta['shards']),
                  image_size=meta['image_size'], has_text=meta['has_text'],
                  classes=len(meta['classnames']) if meta['classnames'] else None,
                  skipped=meta['skipped']['count'], skipped_reasons=meta['skipped']['reasons'],
                  seconds=meta['build']['seconds'], images_per_s=meta['build']['images_per_s'])
    if holdout:
        result.update(holdout=out.rstrip('/') + '_holdout', holdout_count=held['count'])
    print(json.dumps(result))
    common.save_json(os.path.join(out, 'data.json'), result)
