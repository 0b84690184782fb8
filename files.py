"""
Files a run writes and reads back: atomic writes (temporary name, fsync, rename), checkpoints
loaded with weights_only, checksums and fingerprints, .npy rows written by several ranks,
RNG state, JSON without NaN and log.jsonl.
"""
import contextlib
import hashlib
import json
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from runtime import stop


def load_checkpoint(path, what, keys):
    """load() of a checkpoint that must be a dict holding `keys` (a state dict, a tensor or
    another stage's checkpoint would otherwise fail later with a KeyError)."""
    ck = load(path, what)
    missing = [k for k in keys if k not in ck] if isinstance(ck, dict) else list(keys)
    if missing:
        stop(f'{what}: {path} is not a checkpoint of this script (it has no '
             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    return ck


def check_same_run(ckpt_path, was, now):
    """A resume must continue the run in ckpt_path: `now` (what defines the run, as this
    command sets it) must equal `was` (as recorded when the run started); keys an older
    checkpoint did not record are not compared. Stops with one line listing every difference."""
    plain = lambda x: json.loads(json.dumps(x))  # tuples and lists compare equal
    diff = [f'{k}={plain(was[k])!r} (now {plain(v)!r})' for k, v in now.items()
            if k in was and plain(was[k]) != plain(v)]
    if diff:
        stop(f"{ckpt_path}: written with {', '.join(diff)}; resume with the settings it was "
             'written with, or start a new run in another out_dir')


def sample_rows(n, rows=65536):
    """Up to `rows` evenly spaced row indices of [0, n) (all of a smaller n), for fingerprint."""
    return np.unique(np.linspace(0, n - 1, min(n, rows)).round().astype(np.int64))


def fingerprint(array, sample):
    """SHA-256 (16 hex digits) of an array's dtype and shape and of its rows at sample_rows:
    65,536 rows that every rank reads anyway, and two clusterings, which differ in most rows,
    never share it."""
    h = hashlib.sha256(f'{array.dtype.str} {list(array.shape)}'.encode())
    h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:16]


def state_sha256(obj):
    """Hex digest of a checkpoint's nested dicts, lists, tensors and plain values, in a fixed
    order (dict keys sorted): a centre shard's checksum covers its RNG state too."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, dict):
            for k in sorted(x):
                h.update(repr(k).encode())
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b'[%d' % len(x))
            for v in x:
                visit(v)
        elif isinstance(x, torch.Tensor):
            h.update(f'{x.dtype}{list(x.shape)}'.encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(x).encode())
    visit(obj)
    return h.hexdigest()


def load(path, what, mmap=False):
    """torch.load(weights_only=True) of a file the run wrote itself; a missing, empty, truncated
    or foreign file stops with one line naming it and `what` it is for."""
    if not os.path.exists(path):
        stop(f'{what}: {path} is missing')
    if os.path.getsize(path) == 0:
        stop(f'{what}: {path} is empty (0 bytes)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # the reader's errors: RuntimeError, EOFError, UnpicklingError, ...
        stop(f'{what}: {path} is truncated or not a checkpoint ({str(e).splitlines()[0][:120]})')


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """A file opened under a temporary name (path + '.tmp'), flushed to disk and renamed onto
    path, then the folder is fsynced, when the block ends: readers see the old file or the new
    one, and a crash leaves the old one. An error inside the block leaves path untouched (and
    no temporary file)."""
    tmp = path + '.tmp'
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or '.')


def fsync_dir(path):
    """fsync a folder: a rename is an entry in its folder, which a power loss can lose until the
    folder itself reaches the disk (file systems differ; ext4 without this may keep the old)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save through atomic_open."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def save(obj, path):
    """The checkpoint commit: write to a temporary name, fsync, rename (atomic_save); a
    failed write (a full disk) leaves the previous file in place and stops with one line."""
    try:
        atomic_save(obj, path)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer turns an OSError into this
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        stop(f'{path}: write failed ({cause.strerror}); the previous checkpoint is unchanged')


def npy_create(path, shape, dtype):
    """Rank 0 allocates a .npy of `shape` (zeros: sparse on most file systems); every rank then
    fills its own rows with npy_write. Returns once every rank can open it (a barrier)."""
    ddp = dist.is_available() and dist.is_initialized()
    if not ddp or dist.get_rank() == 0:
        try:
            np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape).flush()
        except OSError as e:
            stop(f'{path}: cannot be created ({e.strerror}); finished files are kept')
    if ddp:
        dist.barrier()


def npy_write(path, start, values):
    """Rows start.. of the .npy at path become `values`, by positional writes of exactly those
    bytes. Not a writable memmap: an mmap writes back whole pages, and on a file system shared
    by several nodes (NFS) a page straddling two ranks' slices could lose one rank's rows."""
    m = np.load(path, mmap_mode='r')
    values = np.ascontiguousarray(values, dtype=m.dtype)
    offset = m.offset + start * m.strides[0]
    del m
    buf = memoryview(values).cast('B')
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            while buf:  # Linux writes at most 2 GiB per call
                n = os.pwrite(fd, buf, offset)
                buf, offset = buf[n:], offset + n
        finally:
            os.close(fd)
    except OSError as e:  # a full disk: a file allocated sparse fills as it is written
        stop(f'{path}: write failed ({e.strerror}); it stays unfinished under this name, finished '
             'files are kept')


def rng_state(device):
    """Every RNG a training step draws from, as plain types and tensors (weights_only loads it)."""
    s, py = np.random.get_state(), random.getstate()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if torch.device(device).type == 'cuda' else None,
            'numpy': [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])],
            'python': [py[0], list(py[1]), py[2]]}


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    if torch.device(device).type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'], device)
    np.random.set_state((state['numpy'][0], np.array(state['numpy'][1], dtype=np.uint32), *state['numpy'][2:]))
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))


def json_safe(x):
    """x with every non-finite float as None: JSON has no NaN (json.dump would write a bare NaN
    that strict readers refuse)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_atomic(path, write, mode='wb'):
    """write(f) through atomic_open; a failed write (a full disk) stops with one line and leaves
    the previous file, if any, as it was."""
    try:
        with atomic_open(path, mode) as f:
            write(f)
    except OSError as e:
        stop(f'{path}: write failed ({e.strerror}); the previous file, if any, is unchanged')


def save_json(path, obj, **kwargs):
    """json.dump through write_atomic: readers see the old file or the new one."""
    write_atomic(path, lambda f: json.dump(json_safe(obj), f, allow_nan=False, **kwargs), 'w')


def rename(tmp, path):
    """A file written whole under a temporary name takes its final name (atomic_open's commit for
    files that several ranks fill, e.g. with npy_write)."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or '.')


def module_sha256(module):
    """SHA-256 of every parameter and buffer, bit for bit: proves a frozen tower never changed."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256(*tensors):
    """Hex digest of the tensors' bytes, in order (checksums of centre shards)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def all_finite(tensors):
    """One bool for many tensors (one device read)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def trim_log(path, step):
    """Resume at `step`: keep the records of steps <= step of log.jsonl and drop the rest,
    including a torn last line (a write cut short by a full disk or a crash); rewritten
    atomically. Returns how many unreadable lines were dropped."""
    if not os.path.exists(path):
        return 0
    kept, torn = [], 0
    with open(path, 'rb') as f:
        for line in f:
            try:
                rec = json.loads(line) if line.endswith(b'\n') else None
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get('step'), int):
                torn += bool(line.strip())
            elif rec['step'] <= step:
                kept.append(line)
    with atomic_open(path) as f:
        f.writelines(kept)
    return torn


def start_log(path, step):
    """Rank 0, before the loop. A resume (step > 0) drops the records past the checkpoint and a
    torn last line (trim_log); a new run removes the log of the run it replaces."""
    try:
        if step > 0 and trim_log(path, step):
            print(f'{path}: dropped unreadable line(s), e.g. one cut short by a full disk')
        elif step == 0 and os.path.exists(path):
            os.remove(path)
    except OSError as e:  # a full disk: atomic_open left the log as it was
        stop(f'{path}: write failed ({e.strerror}) while dropping the records past step {step}; '
             'the log and the checkpoint are unchanged')


def log_line(path, record):
    """Append one JSON line to log.jsonl (its folder made on the first record); a failed write
    (a full disk) stops the run with one line."""
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:
        stop(f'{path}: write failed ({e.strerror}) at step {record.get("step")}; the last '
             'checkpoint is unchanged')
