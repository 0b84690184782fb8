"""
Writes datasets in the format data.py describes: image sources -> uint8 .npy shards + CLIP BPE
caption ids (tokenizer.py), decoded by several worker processes; an interrupted build resumes.

    python prepare.py --src=path/to/imagefolder --out=data/mine --image_size=224
    python prepare.py --src='laion/{00000..41455}.tar' --out=data/laion   (img2dataset's tars:
        also 'laion/*.tar', 'a/{0000..0099}.tar::b/*.tar'; one shard per tar, see
        docs/prepare_laion.md; --part=i --parts=n on n machines, then once without them)
    python prepare.py --src=captions.tsv --out=data/cc       (lines of path<TAB>caption)
    python prepare.py --src=synthetic --count=10000 --image_size=32 --out=data/synthetic
"""
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time

import numpy as np
import torch
from PIL import Image

import runtime
import files
import jobs
import shards
from data import CONTEXT_LENGTH, shard_file
from sources import Skip, _open_source, _tar_items, decode  # what a worker reads and decodes
from synthetic import synthetic_one
from tokenizer import tokenize

# -----------------------------------------------------------------------------
# worker: one source item -> (i, key, image or None, tokens or None, class, skip reason or None)

_worker = {}


class WorkerError(Exception):
    """An unexpected error on one item (a bug, out of memory; not bad input): the build stops."""


def _init_worker(image_size, max_pixels, seed, has_text, out, max_bytes, pool=True):
    _worker.update(image_size=image_size, max_pixels=max_pixels, seed=seed, has_text=has_text,
                   out=out, max_bytes=max_bytes)
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


def _tar_shard(job):
    """Worker: tar number s -> shard s, written and recorded by this process. A shard is a pure
    function of its tar, so shards finish in any order and a resumed build skips finished tars
    without opening them; each worker holds one tar and one shard file open."""
    s, path = job
    out, S = _worker['out'], _worker['image_size']
    shard, texts, skipped, n = shards.ImageShard(os.path.join(out, shard_file('images', s)), S), [], [], 0
    for key, kind, payload, caption, url in _tar_items(path, _worker['max_bytes']):
        _, _, img, tokens, _, reason = _process((n, key, kind, payload, caption, None))
        n += 1
        if reason is None:
            shard.write(img, key)
            texts.append(tokens)
        else:
            skipped.append([key, reason] + ([url] if url else []))
    return s, shards.finish_shard(out, s, shard, texts, None, skipped, n)


def _run_tars(jobs, n_tars, out, done, pool, progress):
    """Tar s -> shard s, tars spread over the workers; returns the images written."""
    name = os.path.basename(out.rstrip('/'))
    n_new = 0
    with runtime.progress(total=n_tars, initial=len(done), disable=not progress,
                          desc=f'data {name}', unit='tar') as bar:
        for s, record in (pool.imap_unordered(_tar_shard, jobs) if pool else map(_tar_shard, jobs)):
            done[s] = record
            n_new += record['count']
            bar.update(1)
    return n_new


def _run_items(stream, total, out, done, shard_size, has_text, classnames, pool, workers,
               progress):
    """Items in source order, decoded by the workers; shard s holds items [s * shard_size,
    (s + 1) * shard_size). Returns the images written."""
    # ordered results, with at most `bound` items in flight, so that memory stays bounded even
    # when the source reads bytes faster than the workers decode them
    bound, stop = threading.BoundedSemaphore(workers * 64), threading.Event()

    def bounded(it):  # runs in the pool's task thread: it must end once the build stops
        for x in it:
            while not bound.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield x

    n_new, cur = 0, None
    name = os.path.basename(out.rstrip('/'))
    try:
        results = pool.imap(_process, bounded(stream), chunksize=16) if pool else \
            map(_process, stream)
        bar = runtime.progress(total=total, initial=sum(d['items'] for d in done.values()),
                               disable=not progress, desc=f'data {name}', unit='img')
        for i, key, img, tokens, cls, reason in results:
            if pool:
                bound.release()
            s = i // shard_size
            if cur is None or s != cur[0]:
                if cur is not None:
                    done[cur[0]] = shards.finish_shard(out, *cur)
                path = os.path.join(out, shard_file('images', s))
                shard = shards.ImageShard(path, _worker['image_size'])
                cur = [s, shard, [] if has_text else None, [] if classnames else None, [], 0]
            if reason is None:
                cur[1].write(img, key)
                if has_text:
                    cur[2].append(tokens)
                if classnames:
                    cur[3].append(cls)
                n_new += 1
            else:
                cur[4].append([key, reason])
            cur[5] += 1
            bar.update(1)
        if cur is not None:
            done[cur[0]] = shards.finish_shard(out, *cur)
        bar.close()
    finally:
        stop.set()
    return n_new


def build(src, out, image_size=224, count=10000, seed=0, shard_size=10000, workers=None,
          overwrite=False, max_pixels=Image.MAX_IMAGE_PIXELS, progress=True, part=0, parts=1):
    """Write the shards of `src` into `out` and return meta. Resumes an interrupted build of the
    same settings; refuses to touch a finished one unless overwrite=True. With parts > 1 (tars
    only) it builds the tars s with s % parts == part and returns None: machines sharing `out`
    build the parts at once, and a run without parts then writes meta.json."""
    workers = workers or len(os.sched_getaffinity(0))
    kind, items, tars, missing, classnames, has_text = _open_source(src)
    if not 0 <= part < parts or (parts > 1 and kind != 'tar'):
        raise ValueError(f'part={part}, parts={parts}: a part in [0, parts) of a tar source')
    params = dict(src=src, image_size=image_size, shard_size=shard_size, max_pixels=max_pixels,
                  **(dict(count=count, seed=seed) if kind == 'synthetic' else {}))
    if kind == 'tar':  # one shard per tar; a tar that appears or goes would renumber them
        del params['shard_size']
        params['tars'] = dict(count=len(tars), missing=len(missing), sha256=hashlib.sha256(
            '\n'.join(tars).encode('utf-8', 'surrogateescape')).hexdigest())
    if missing:
        print(f'warning: --src={src}: {len(missing):,} of {len(tars) + len(missing):,} tar files '
              f'do not exist (first: {missing[0]}); building from the {len(tars):,} that do '
              '(listed in meta.json)', file=sys.stderr)
    done = _start(out, params, overwrite)  # the shards an interrupted run finished are kept
    skip = lambda i: i // shard_size in done  # noqa: E731
    if kind == 'synthetic':
        total = count
        stream = ((i, str(i), 'synthetic', i, None, None) for i in range(count) if not skip(i))
    elif kind != 'tar':
        total = len(items)
        stream = ((i,) + it for i, it in enumerate(items) if not skip(i))
        if total == 0:
            raise ValueError(f'--src={src}: no images found')
    if has_text:
        tokenize([''])  # loads the vocabulary here, once, so forked workers inherit it

    t0 = time.time()
    # a member larger than an uncompressed RGBA image of max_pixels is not an image we could use
    init = (image_size, max_pixels, seed, has_text, out, 4 * max_pixels + 2 ** 20)
    if kind == 'tar':
        todo = [(s, p) for s, p in enumerate(tars) if s not in done and s % parts == part]
        run = lambda pool: _run_tars(todo, len(tars), out, done, pool, progress)  # noqa: E731
        workers = min(workers, len(todo))
    else:
        run = lambda pool: _run_items(stream, total, out, done, shard_size, has_text,  # noqa: E731
                                      classnames, pool, workers, progress)
    n_new = _in_workers(run, workers, init, out)
    if parts > 1:
        return None
    return _finish(out, src, kind, done, params, image_size, has_text, classnames, missing,
                   time.time() - t0, n_new)


def _start(out, params, overwrite):
    """Before any shard: out holds nothing, or an unfinished build of the same params (its
    finished shards' records are returned, {shard: record}), or it is cleared (overwrite)."""
    os.makedirs(out, exist_ok=True)
    state_path, meta_path = os.path.join(out, 'build.json'), os.path.join(out, 'meta.json')
    if os.path.exists(meta_path) or os.path.exists(state_path):
        if overwrite:
            shards.clear(out)
        elif os.path.exists(meta_path):
            raise ValueError(f'{meta_path} exists: {out} holds a finished dataset; pass '
                             '--overwrite=True to rebuild it')
        elif json.load(open(state_path)) != params:
            raise ValueError(f'{out} holds an unfinished build with other settings ({state_path}: '
                             f'{json.load(open(state_path))}); pass --overwrite=True to start over')
    shards.write_file(state_path, lambda f: json.dump(params, f), 'w')  # parts on several machines
    # a shard's record is written last, so a shard with a record is whole
    return {int(os.path.basename(p)[6:-5]): json.load(open(p))
            for p in glob.glob(os.path.join(out, 'shard_*.json'))}


def _in_workers(run, workers, init, out):
    """run(pool) with a pool of `workers` decoding processes (none for one); on any failure or
    interrupt the pool ends and the temporary files of this build are removed."""
    _init_worker(*init, pool=False)
    pool = multiprocessing.Pool(workers, _init_worker, init) if workers > 1 else None
    pids = {os.getpid()} | {p.pid for p in (pool._pool if pool else ())}  # whose .tmp files
    try:
        try:
            return run(pool)
        except OSError as e:  # inputs that cannot be read are skipped: this is writing the shards
            raise ValueError(f'out={out}: cannot write a shard ({type(e).__name__}: {e})') from None
        finally:
            if pool:
                pool.terminate()
                pool.join()
    except BaseException:
        shards.remove_tmp(out, pids | {p.pid for p in (pool._pool if pool else ())})  # + replacements
        raise


def _finish(out, src, kind, done, params, image_size, has_text, classnames, missing, seconds, n_new):
    """Every shard is on disk: classes.npy, then meta.json last (its presence means "finished"),
    then the build's own records go. Returns meta."""
    order = sorted(done)
    assert order == list(range(len(order))), f'missing shard records in {out}'
    count_all = sum(done[s]['count'] for s in order)
    if count_all == 0:
        n = sum(done[s]['items'] for s in order)
        first = next((d['skipped'][0] for d in done.values() if d['skipped']), None)
        raise ValueError(f'--src={src}: none of the {n} items could be read (first: {first})')
    if classnames is not None:
        classes = np.concatenate([np.array(done[s]['classes'], np.int32) for s in order])
        shards.write_file(os.path.join(out, 'classes.npy'), lambda f: np.save(f, classes))
    skipped = [x for s in order for x in done[s]['skipped']]
    flat = [k for s in order for k in done[s].get('flat', [])]
    reasons = {}
    for item in skipped:  # [key, reason], or [key, reason, url] where a tar's key.json has one
        reasons[item[1].split(':')[0]] = reasons.get(item[1].split(':')[0], 0) + 1
    listed = [dict(images=shard_file('images', s), count=done[s]['count'],
                   texts=shard_file('texts', s) if has_text else None, sources=shards.sources_file(s))
              for s in order if done[s]['count']]  # all-skipped shards left out
    meta = dict(count=count_all, image_size=image_size, has_text=has_text, classnames=classnames,
                source=src, source_type=kind, context_length=CONTEXT_LENGTH if has_text else None,
                shards=listed, skipped=dict(count=len(skipped), reasons=reasons, items=skipped),
                missing_tars=dict(count=len(missing), names=missing[:1000]) if missing else None,
                flat=dict(count=len(flat), items=flat[:1000]),
                build=dict(params, seconds=round(seconds, 3),
                           images_per_s=round(n_new / max(seconds, 1e-9), 1)))
    files.save_json(os.path.join(out, 'meta.json'), meta)
    for s in order:
        empty = ([shard_file('images', s), shard_file('texts', s), shards.sources_file(s)]
                 if not done[s]['count'] else [])
        for f in [f'shard_{s:05d}.json'] + empty:
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    for p in glob.glob(os.path.join(out, '*_[0-9]*.*.[0-9]*.tmp')):  # from workers killed earlier
        os.remove(p)
    os.remove(os.path.join(out, 'build.json'))
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
    # tar builds have one shard per tar and no shard_size: keep the largest tar's
    per_shard = (ds.meta['build'].get('shard_size')
                 or max(sh['count'] for sh in ds.meta['shards']))
    has_text = ds.meta['has_text']
    os.makedirs(out, exist_ok=True)
    shards.clear(out)
    written = []
    for s, a in enumerate(range(0, len(rows), per_shard)):
        idx = rows[a:a + per_shard]
        shard, texts = shards.ImageShard(os.path.join(out, shard_file('images', s)), ds.image_size), []
        for b in range(0, len(idx), chunk):
            for img, key in zip(ds.images(idx[b:b + chunk]), ds.sources(idx[b:b + chunk])):
                shard.write(img, key, check_flat=False)
            if has_text:
                texts.append(ds.texts(idx[b:b + chunk]).astype(np.uint16))
        shard.close()
        if has_text:
            shards.write_file(os.path.join(out, shard_file('texts', s)),
                              lambda f: np.save(f, np.concatenate(texts)))
        written.append(dict(images=shard_file('images', s), count=len(idx),
                            texts=shard_file('texts', s) if has_text else None,
                            sources=shards.sources_file(s)))
    if ds.classes is not None:
        shards.write_file(os.path.join(out, 'classes.npy'),
                          lambda f: np.save(f, ds.classes[rows].astype(np.int32)))
    meta = dict(ds.meta, count=len(rows), shards=written, split=split)
    if split['part'] == 'holdout':  # what was skipped is listed once, in the other part
        meta['skipped'] = dict(count=0, reasons={}, items=[])
    files.save_json(os.path.join(out, 'meta.json'), meta)
    return meta


def build_holdout(src, out, fraction, seed=0, overwrite=False, **kwargs):
    """build() into <out>.all, then split it: <out>_holdout gets `fraction` of every class (seeded
    by `seed`), <out> the rest, and <out>.all is removed. Returns (meta of out, meta of holdout).
    An interrupted build resumes in <out>.all; an interrupted split starts the split again."""
    if not 0 < fraction < 1:
        raise ValueError(f'--holdout={fraction}: must be a fraction in (0, 1), e.g. 0.2')
    out, held_dir, full = holdout_dirs(out)
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
    keep = np.setdiff1d(np.arange(meta['count']), held)
    try:
        hmeta = write_rows(full, held, held_dir, dict(split, part='holdout'))
        meta = write_rows(full, keep, out, dict(split, part='train'))
    except BaseException:  # a full disk: the split's partial shards go, as a build's do
        for d in (held_dir, out):
            shards.remove_tmp(d, {os.getpid()})
        raise
    shutil.rmtree(full)
    return meta, hmeta


def holdout_dirs(out):
    """The folders a --holdout build writes: (<out>, <out>_holdout, <out>.all)."""
    out = out.rstrip('/')
    return out, out + '_holdout', out + '.all'

# -----------------------------------------------------------------------------
# one build per output at a time: the stages' lock (jobs.take_lock) on every folder it writes,
# so that prepare.py never writes into a running stage's out_dir or another build's out either


def lock_outputs(out, dirs, name=jobs.LOCK):
    """None once this process holds the lock of every folder in dirs, else the one line to
    stop with; on a refusal the locks taken go, and with them the folders this run made (take_lock
    creates the folder)."""
    for d in dirs:
        busy = jobs.take_lock(d, name)
        if busy:
            jobs.release_out_dir()
            where = f'out={out}' if d == out.rstrip('/') or d == out else f'out={out}: {d}'
            return busy.replace(f'out_dir={d}', where, 1)
    return None


def check_links(out, dirs):
    """One line for a folder that is a symbolic link to nothing (makedirs: 'File exists')."""
    for d in dirs:
        d = d.rstrip('/')
        if os.path.islink(d) and not os.path.exists(d):
            where = f'out={out}: ' + ('' if d == out.rstrip('/') else f'{d} ')
            raise SystemExit(f'{where}is a symbolic link to {os.readlink(d)}, which does not exist')

# -----------------------------------------------------------------------------


if __name__ == '__main__':
    # settings, overridden by --key=value (the module's UPPER_CASE constants are not settings)
    src = 'synthetic'       # image folder (class sub-folders); tars: a file, glob or brace
    #                         range ('laion/{00000..41455}.tar'), '::' joins several; a
    #                         path<TAB>caption list; or 'synthetic'
    out = 'data/synthetic'  # output directory
    image_size = 224        # stored side: shorter side resized to this, centre-cropped
    count = 10000           # synthetic only: number of images
    seed = 0                # synthetic images; the holdout draw
    shard_size = 10000      # source items per shard (resume granularity); tars: one shard each
    workers = 0             # decoding processes (0: one per CPU core)
    overwrite = False       # rebuild a finished output
    max_pixels = Image.MAX_IMAGE_PIXELS  # larger images are skipped (decompression bombs)
    part = 0                # tars: build only the tars s with s % parts == part (one machine)
    parts = 1               # machines sharing out; then a run without part/parts writes meta.json
    holdout = 0.0           # > 0: this share of every class (drawn with seed) goes to a second
    #                         dataset, <out>_holdout, to test a probe on; <out> keeps the rest
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    dirs = holdout_dirs(out) if holdout else [out]
    check_links(out, dirs)
    jobs.check_writable('out', out)  # a file, a read-only folder: one line before any work
    # parts on several machines build one out at once: each locks its own part
    busy = lock_outputs(out, dirs, jobs.LOCK if parts == 1 else f'.lock.part{part}of{parts}')
    if busy:
        raise SystemExit(busy)
    try:
        kwargs = dict(image_size=image_size, count=count, shard_size=shard_size,
                      workers=workers or None, max_pixels=max_pixels)
        if holdout and parts > 1:
            raise ValueError(f'holdout={holdout}: splits a whole build; build the parts first, '
                             'then run with --holdout and without part/parts')
        if holdout:
            meta, held = build_holdout(src, out, holdout, seed=seed, overwrite=overwrite, **kwargs)
        else:
            meta = build(src, out, seed=seed, overwrite=overwrite, part=part, parts=parts,
                         **kwargs)
    except (ValueError, WorkerError) as e:
        raise SystemExit(str(e))
    except OSError as e:  # writing classes.npy or a split: a full disk; no .tmp is left
        # a write through an open file has no filename; anything else (a missing vocabulary)
        # is named as it is, not called a failed write
        why = (f'write failed ({e.strerror})' if e.strerror and not e.filename
               else f'{type(e).__name__}: {e}'.splitlines()[0])
        raise SystemExit(f'out={out}: {why}; finished shards are kept, the same command continues')
    if meta is None:
        done = len(glob.glob(os.path.join(out, 'shard_*.json')))
        print(f'part {part} of {parts} built; {done} shards of the whole are done. When every part '
              'is, the same command without part/parts writes meta.json')
        raise SystemExit(0)
    result = dict(out=out, count=meta['count'], shards=len(meta['shards']),
                  image_size=meta['image_size'], has_text=meta['has_text'],
                  classes=len(meta['classnames']) if meta['classnames'] else None,
                  skipped=meta['skipped']['count'], skipped_reasons=meta['skipped']['reasons'],
                  seconds=meta['build']['seconds'], images_per_s=meta['build']['images_per_s'])
    if holdout:
        result.update(holdout=out.rstrip('/') + '_holdout', holdout_count=held['count'])
    print(json.dumps(result))
    items = meta['skipped']['items']
    if items:  # named here too, not only in meta.json: the first 5 (reason in short)
        names = ', '.join(f"{k} ({r.split(':')[0]})" for k, r, *_url in items[:5])
        more = f', and {len(items) - 5} more' if len(items) > 5 else ''
        print(f"skipped {len(items)} input(s): {names}{more} (all in {out}/meta.json)",
              file=sys.stderr)
    flat = meta.get('flat') or dict(count=0)  # none in a split resumed from an older <out>.all
    if flat['count']:  # the meta.json that stays: with --holdout, not <out>.all's
        print(f"warning: {flat['count']:,} image(s) decode to one flat colour (first: "
              f"{', '.join(map(str, flat['items'][:3]))}); kept, listed in "
              f"{os.path.join(out, 'meta.json')} under 'flat'", file=sys.stderr)
    files.save_json(os.path.join(out, 'data.json'), result)
