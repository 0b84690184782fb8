"""
What one stage hands the next names the data it was made from: a dataset's fingerprint, recorded
by every producer (cluster.py's phase files, lit.py's image_features.json, train.py's and lit.py's
ckpt.pt) and compared by every consumer and every resume, which refuse other data in one line
that lists what differs.

The fingerprint is cheap at LAION's size, not a hash of 60 TB: a digest of meta.json (less its
build timing) and, for every shard, of its files' names, sizes and .npy headers and of three of
its rows (first, middle, last; at most ROW_BYTES from the middle of each row). A shard swapped for
one of another dataset, anywhere, changes its digest. The shards are split over the ranks (shard
s on rank s % world), so each rank reads 1/world of them, and one digest per shard (8 hex digits)
is kept, so that a refusal can name the shard that differs. At 40,000 shards that is 320 KB of
digests and, per rank of 8, 5,000 file opens and ~240 MB of reads (docs/failures.md, "Data
fingerprint").
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist

import files
import runtime

ROW_BYTES = 16384  # bytes read from the middle of each sampled row (a 224 px row is 150,528)


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def _read_npy(path, texts_max):
    """(bytes to hash, max value or -1) of one shard file: its size, header and sampled rows;
    with texts_max every row is read (captions: 154 bytes a row), for the max token id too."""
    from data import _read_header  # checks the header against the file's size
    with open(path, 'rb') as f:
        shape, dtype, offset = _read_header(f, path)
        n = shape[0] if shape else 0
        row = int(np.prod(shape[1:])) * dtype.itemsize
        parts = [f'{os.path.basename(path)} {os.fstat(f.fileno()).st_size} {dtype.str} {list(shape)}'.encode()]
        if texts_max and n:
            rows = np.fromfile(f, dtype, count=n * row // dtype.itemsize, offset=0)
            parts.append(rows.tobytes())
            return b'|'.join(parts), int(rows.max())
        take = min(row, ROW_BYTES)
        for i in sorted({0, n // 2, n - 1}) if n else ():
            parts.append(os.pread(f.fileno(), take, offset + i * row + (row - take) // 2))
    return b'|'.join(parts), -1


def _shard_digest(data_dir, shard, all_texts):
    """'<images digest>' or '<images digest>+<texts digest>' (8 hex digits each: the features
    of the images alone can be keyed by the first), and the max token id (-1 unless all_texts)."""
    parts, hi = [], -1
    for kind in ('images', 'texts'):
        if shard.get(kind):
            b, m = _read_npy(os.path.join(data_dir, str(shard[kind])), all_texts and kind == 'texts')
            parts.append(_digest(b)[:8])
            hi = max(hi, m)
    return '+'.join(parts), hi


def data_fingerprint(data_dir, rank=0, world=1, all_texts=False):
    """The fingerprint of the dataset in data_dir, the same on every rank: {'count', 'meta',
    'shards': [digest per shard]}. all_texts: every caption is hashed (lit.py reads them all
    anyway to check the token ids; a changed caption anywhere then changes it) and
    'max_token' is added. A shard that cannot be read raises ValueError on every rank."""
    with open(os.path.join(data_dir, 'meta.json'), encoding='utf-8') as f:
        meta = json.load(f)
    shards = meta['shards']
    mine, err, hi = {}, None, -1
    for s in range(rank, len(shards), world):
        try:
            mine[s], m = _shard_digest(data_dir, shards[s], all_texts)
            hi = max(hi, m)
        except (OSError, ValueError) as e:  # reported by every rank, after the gather
            err = err or (str(e) if str(e).startswith(data_dir) else
                          f'{os.path.join(data_dir, str(shards[s]["images"]))}: {e}')
    parts = [(mine, err, hi)]
    if world > 1 and dist.is_available() and dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, (mine, err, hi))
    errs = [e for _, e, _ in parts if e]
    if errs:
        raise ValueError(errs[0])
    digests = {s: d for p, _, _ in parts for s, d in p.items()}
    meta.pop('build', None)  # timings: a rebuild of the same data has other ones
    fp = dict(count=int(meta.get('count', 0)),
              meta=_digest(json.dumps(meta, sort_keys=True).encode())[:16],
              shards=[digests[s] for s in range(len(shards))])
    if all_texts:
        fp['max_token'] = max(h for _, _, h in parts)
    return fp


def short(fp, images_only=False):
    """A 16-digit digest of a whole fingerprint; images_only: of the images' shards alone (what
    the features of a frozen tower depend on)."""
    core = {k: fp[k] for k in ('count', 'meta', 'shards')}
    if images_only:
        core = dict(count=fp['count'], shards=[d.split('+')[0] for d in fp['shards']])
    return _digest(json.dumps(core, sort_keys=True).encode())[:16]


def differences(was, now, data_dir=None):
    """What differs between two fingerprints, in words ([] when none)."""
    if short(was) == short(now):
        return []
    out = []
    if was['count'] != now['count']:
        out.append(f"{was['count']:,} rows (now {now['count']:,})")
    if len(was['shards']) != len(now['shards']):
        out.append(f"{len(was['shards']):,} shards (now {len(now['shards']):,})")
    else:
        meta = json.load(open(os.path.join(data_dir, 'meta.json')))['shards'] if data_dir else None
        for i, kind in enumerate(('images', 'texts')):  # the digests' two halves
            part = lambda d: (d.split('+') + [''])[i]  # noqa: E731
            bad = [s for s, (a, b) in enumerate(zip(was['shards'], now['shards']))
                   if part(a) != part(b)]
            if bad:
                names = [str(meta[s].get(kind)) if meta else f'shard {s}' for s in bad[:3]]
                out.append(f"{kind} shard{'s' if len(bad) > 1 else ''} {', '.join(names)}"
                           + (f' and {len(bad) - 3:,} more' if len(bad) > 3 else ''))
    if was['meta'] != now['meta']:
        out.append('meta.json')
    return out


def same_data(what, was, now, data_dir):
    """None when fingerprint `was` (recorded by `what`) is `now` (data_dir's), else the line to
    stop with, listing what differs."""
    diff = differences(was, now, data_dir)
    if not diff:
        return None
    return (f"{what} was made from other data than data_dir={data_dir}: it differs in "
            f"{'; '.join(diff)}")


# -----------------------------------------------------------------------------
# a cluster.py out_dir as train.py's labels_dir

CLUSTER_FILES = ('phase_embed.json', 'phase_kmeans.json', 'embeddings.npy', 'embeddings.npy.tmp',
                 'centroids.npy', 'kmeans_state.npz', 'labels.npy.tmp', 'cluster.json')


def cluster_record(labels_dir):
    """phase_assign.json of the cluster.py out_dir labels_dir (its settings, labels' shape and
    data fingerprint); None for labels.npy made by hand (no file of cluster.py beside it).
    Raises ValueError with the line to stop with when cluster.py has not finished there."""
    path = os.path.join(labels_dir, 'phase_assign.json')
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = None
    if not isinstance(rec, dict):
        if not any(os.path.exists(os.path.join(labels_dir, f)) for f in CLUSTER_FILES):
            return None
        phase = next(p for p in ('embed', 'kmeans', 'assign')
                     if not os.path.exists(os.path.join(labels_dir, f'phase_{p}.json')))
        raise ValueError(f'labels_dir={labels_dir}: cluster.py has not finished there (its {phase} '
                         f'phase did not end; no {path}): re-run cluster.py with '
                         f'out_dir={labels_dir}, it continues where it stopped')
    labels = os.path.join(labels_dir, 'labels.npy')
    if not os.path.exists(labels):
        raise ValueError(f'labels_dir={labels_dir}: {path} says the labels are finished, but '
                         f'{labels} is missing: re-run cluster.py with out_dir={labels_dir} '
                         'force=True')
    try:
        shape = list(np.load(labels, mmap_mode='r').shape)
    except (OSError, ValueError):  # not a .npy file: train.py's own check names it next
        return rec
    if shape != rec.get('shape'):
        raise ValueError(f'labels_dir={labels_dir}: labels.npy is {shape} but {path} recorded '
                         f"{rec.get('shape')}: the file changed after cluster.py wrote it")
    return rec


def labels_data(labels_dir, data_dir, rank, world):
    """train.py, before any work: data_dir's fingerprint, once labels_dir holds finished labels
    of this very data (cluster.py's record); stops with one line otherwise. Labels without a
    record (made by hand) are taken with a note: only their row count can be checked."""
    try:
        rec = cluster_record(labels_dir)
        fp = data_fingerprint(data_dir, rank, world)
    except ValueError as e:
        runtime.stop(str(e))
    was = (rec or {}).get('data')
    line = was and same_data(f'labels_dir={labels_dir}', was, fp, data_dir)
    if line:
        runtime.stop(f'{line}: cluster this data_dir into a new out_dir, or point data_dir at the '
                     'data the labels are of')
    if not was and rank == 0:
        print(f'labels_dir={labels_dir}: its labels name no data (not from cluster.py, or '
              'clustered from embeddings_path alone): only their row count is checked')
    return fp


def check_resume(ckpt, fp, ckpt_path, data_dir):
    """A resume must read the data its checkpoint was trained on (older checkpoints that recorded
    none are not compared)."""
    line = ckpt.get('data') and same_data(ckpt_path, ckpt['data'], fp, data_dir)
    if line:
        runtime.stop(f'{line}: resume on the data it was written with, or start a new run in '
                     'another out_dir')


def open_labels(labels_dir, data_dir, n_images):
    """train.py: labels_dir/labels.npy, memory-mapped, once it is int [N, l] (nearest centre
    first) with one row per image of data_dir; stops with one line otherwise."""
    path = os.path.join(labels_dir, 'labels.npy')
    if not os.path.exists(path):
        runtime.stop(f'labels_dir={labels_dir}: no labels.npy (run cluster.py with out_dir={labels_dir})')
    try:
        labels = np.load(path, mmap_mode='r')
    except (ValueError, OSError) as e:
        runtime.stop(f'labels_dir={labels_dir}: labels.npy is not a readable .npy file ({e})')
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        runtime.stop(f'labels_dir={labels_dir}: labels.npy must be int [N, l] (nearest centre '
                     f'first), got {labels.dtype} {list(labels.shape)}')
    if labels.shape[0] != n_images:
        runtime.stop(f'labels_dir={labels_dir}: labels.npy has {labels.shape[0]} label rows but '
                     f'data_dir={data_dir} has {n_images} images')
    return labels


def check_label_ids(labels, labels_dir, num_classes, rank, world, device):
    """(num_classes, the labels' fingerprint: what a resume compares) once every id of the
    labels (the columns train.py uses) is in [0, num_classes) or -1 (none); num_classes 0: the
    rows of labels_dir/centroids.npy, else the largest id + 1. Each rank scans its slice and keeps
    its rows of files.sample_rows, then all-reduce and all-gather."""
    lo, hi = torch.tensor([1 << 62]), torch.tensor([-(1 << 62)])
    s, n = runtime.shard_range(len(labels), rank, world)
    idx, mine = files.sample_rows(len(labels)), [np.asarray(labels[:0])]
    for i in range(s, s + n, 1 << 20):
        chunk = np.asarray(labels[i:min(i + (1 << 20), s + n)])
        lo = torch.minimum(lo, torch.tensor([int(chunk.min())]))
        hi = torch.maximum(hi, torch.tensor([int(chunk.max())]))
        mine.append(chunk[idx[(idx >= i) & (idx < i + len(chunk))] - i])
    rows = [np.concatenate(mine)]
    if world > 1:  # gloo and nccl both reduce int64; MIN as MAX of the negation keeps one op kind
        both = torch.cat([-lo, hi]).to(device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        lo, hi = -both[:1].cpu(), both[1:].cpu()
        rows = [None] * world
        dist.all_gather_object(rows, np.concatenate(mine))
    lo, hi = int(lo), int(hi)
    if hi < 0:
        runtime.stop(f'labels_dir={labels_dir}: labels.npy must be int [N, l] with class ids, but '
                     'every id is -1 (no label)')
    centroids = os.path.join(labels_dir, 'centroids.npy')
    if num_classes == 0:
        num_classes = np.load(centroids, mmap_mode='r').shape[0] if os.path.exists(centroids) else hi + 1
    if hi >= num_classes or lo < -1:
        runtime.stop(f"{os.path.join(labels_dir, 'labels.npy')}: label ids span [{lo}, {hi}] but "
                     f'num_classes is {num_classes} (ids must be in [0, num_classes), -1 = none)')
    return num_classes, files.fingerprint(labels, np.concatenate(rows))


def fingerprint_and_tokens(data_dir, rank, world, vocab_size):
    """lit.py: data_dir's fingerprint, with every caption in it when the text tower is
    trained: the same pass checks that every token id is < vocab_size. Each rank reads its share
    of the shards, through files it opens and closes itself (no shard maps beside the loader's).
    LAION-400M's 62 GB of ids take ~40 s on 8 ranks, if the disk reads 1.5 GB/s."""
    try:
        fp = data_fingerprint(data_dir, rank, world, all_texts=bool(vocab_size))
    except ValueError as e:
        runtime.stop(str(e))
    if vocab_size and fp['max_token'] >= vocab_size:
        runtime.stop(f"data_dir={data_dir}: caption token ids reach {fp['max_token']}, but the "
                     f'text tower has vocab_size={vocab_size} (ids 0..{vocab_size - 1}): the '
                     'texts_*.npy shards are not of its tokenizer')
    return fp
