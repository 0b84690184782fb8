"""
The process every stage script runs in: torch's threads, one-line stops, the device check,
bf16 autocast, each rank's share of the rows, the run id, progress bars and prefetch threads.

Import this module before torch: OMP_WAIT_POLICY is read once, when torch loads its OpenMP
runtime. PASSIVE (unless the user set a policy) makes idle OpenMP threads sleep instead of
spinning: on a loaded 2-core machine a 2-thread training step was 4x slower with the default
policy (median 9.2 s vs 2.2 s, ViT-T/4, batch 128), its threads spinning against other processes.
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import atexit
import contextlib
import json
import math
import queue
import secrets
import sys
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm


def set_threads(threads):
    """torch's intra-op threads for this process, returned. 0 picks: $OMP_NUM_THREADS when set,
    else the CPUs this process may run on divided by the processes per node (torchrun's
    LOCAL_WORLD_SIZE), so that ranks on one machine do not oversubscribe it."""
    if threads <= 0:
        env = os.environ.get('OMP_NUM_THREADS', '')
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        threads = (int(env) if env.isdigit() and int(env) > 0
                   else max(1, cpus // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
    torch.set_num_threads(threads)
    return threads


def stop(msg, say=True):
    """Leave with a one-line message (exit status 1); files on disk are not touched. Progress bars
    are closed first, so that the message is the last line. say=False: exit status 1 without the
    line (the other ranks of a stop that rank 0 reports)."""
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()
    torchrun_report(msg)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(msg if say else 1)


def check_device(device, key='device'):
    """Stop with one line unless `device` works here ('cpu', 'cuda' or 'cuda:<i>', with a CUDA
    torch and that GPU visible; under torchrun 'cuda' means cuda:LOCAL_RANK). Called right after
    the settings, before any folder is made: a bad device must not leave a partial out_dir."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = 'cpu' + (f', cuda (cuda:0..cuda:{n - 1})' if n > 1 else ', cuda' if n else '')
    kind, _, index = str(device).partition(':')
    if kind == 'cpu' and not index:
        return
    if kind != 'cuda' or index and not index.isdigit():
        stop(f'{key}={device}: unknown device (cpu, cuda or cuda:<i>); available here: {here}')
    if torch.version.cuda is None:
        stop(f'{key}={device}: this torch ({torch.__version__}) is built without CUDA; '
             f'available here: {here}')
    if n == 0:
        seen = os.environ.get('CUDA_VISIBLE_DEVICES')
        stop(f'{key}={device}: no CUDA GPU is visible' + (f' (CUDA_VISIBLE_DEVICES={seen!r})'
             if seen is not None else '') + f'; available here: {here}')
    i = int(index or os.environ.get('LOCAL_RANK', 0))
    if i >= n:
        what = f'cuda:{index}' if index else f'torchrun local rank {i}'
        stop(f'{key}={device}: {what} needs {i + 1} GPUs, {n} visible; available here: {here}')


def torchrun_report(msg):
    """Under torchrun, the line also goes to the error file torchrun reads: its failure report
    (printed after ours, with torchrun's own traceback) then names it as the root cause instead
    of 'To enable traceback see: ...'."""
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if path:
        with contextlib.suppress(OSError):
            with open(path, 'w') as f:
                json.dump({'message': msg, 'timestamp': int(time.time())}, f)


# dense bf16 tensor-core peak per GPU (FLOP/s), for MFU (first match in the device name)
PEAK_FLOPS = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'A100': 312e12}


def peak_flops(device):
    """The bf16 peak of a known CUDA device, else None (no MFU is reported)."""
    if torch.device(device).type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def autocast(device, dtype):
    """bf16 autocast on CUDA when dtype is 'bfloat16'; nothing for 'float32' (and on the CPU,
    which runs fp32). 'float16' is refused: its 5-bit exponent needs a loss scaler (GradScaler),
    which the training loops do not run, and bf16 has none of that on the A100 and later."""
    if dtype not in ('bfloat16', 'float32'):
        stop(f"dtype={dtype}: must be 'bfloat16' (bf16 autocast on CUDA) or 'float32'; float16 "
             'would need a loss scaler, which this project does not run')
    if torch.device(device).type == 'cuda' and dtype == 'bfloat16':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shard_range(n, rank, world_size):
    """(start, n_r): `rank` holds the contiguous rows [start, start + n_r) of n, the first
    n % world_size ranks one more. Every split over ranks uses it: PartialFC's centres, the
    embedding, k-means and assignment rows of cluster.py, the features of probe.py."""
    base, extra = divmod(n, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def run_id(ddp):
    """A random id for a new run, the same on every rank; stored in every file the run writes so
    that files of two runs are never mixed."""
    rid = [secrets.token_hex(8)]
    if ddp:
        dist.broadcast_object_list(rid, src=0)
    return rid[0]


# -----------------------------------------------------------------------------
# progress bars

PROGRESS_SECONDS = 30  # at most one line per bar this often when stderr is not a terminal


class _Lines:
    """tqdm's file when stderr is a log, not a terminal: each redraw ('\\r' + text) becomes one
    line, at most one per PROGRESS_SECONDS (set_postfix redraws at once); the last state is
    written when the bar ends or is erased (a blank write)."""

    def __init__(self, f):
        self.f, self.last, self.pending = f, -math.inf, None

    def write(self, s):
        if not s:  # tqdm's cursor moves to its own line
            return
        s = s.replace('\r', '').replace('\x1b[A', '').strip()
        now = time.monotonic()
        if s and now - self.last < PROGRESS_SECONDS:
            self.pending = s
            return
        s, self.pending = s or self.pending, None
        if s:
            self.f.write(s + '\n')
            self.last = now

    def flush(self):
        self.f.flush()


def progress(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) on stderr. On a terminal a plain bar; into a log file a line at
    most every PROGRESS_SECONDS (plus the first and the last): tqdm's carriage-return redraws
    would otherwise make the log one huge line."""
    if not sys.stderr.isatty():
        kwargs = dict(kwargs, file=_Lines(sys.stderr), mininterval=PROGRESS_SECONDS,
                      maxinterval=PROGRESS_SECONDS, dynamic_ncols=False, ncols=100)
    return tqdm(iterable, **kwargs)


# -----------------------------------------------------------------------------
# a prefetch thread: the loader's batches, lit.py's precomputed features, cluster.py's rows

class OneLine(Exception):
    """An error whose message says it all (a bad shard, a failed prefetch): raised in a prefetch
    thread, it stops the main thread with that one line instead of a traceback."""


_running = set()  # (stop event, thread) of every live prefetcher


@atexit.register
def _stop_prefetchers():
    # A generator left unfinished (training ends mid-epoch) is only closed when the interpreter
    # tears down, and a worker thread still inside a torch op at that point aborts the process
    # ("terminate called without an active exception"): stop and join the workers first.
    for done, thread in list(_running):
        done.set()
        thread.join()


def prefetched(fn, args, depth):
    """Yields fn(a) for a in args, computed `depth` ahead in a background thread."""
    q, done = queue.Queue(depth), threading.Event()

    def put(x):
        while not done.is_set():
            try:
                return q.put(x, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            for a in args:
                if done.is_set():
                    return
                put((0, fn(a)))
            put((1, None))
        except BaseException as e:  # re-raised in the consumer
            put((2, e))

    thread = threading.Thread(target=work, daemon=True)
    _running.add((done, thread))
    thread.start()
    try:
        while True:
            kind, x = q.get()
            if kind == 1:
                return
            if kind == 2:
                if isinstance(x, OneLine):  # a bad shard, too many open files: one line
                    stop(str(x))
                raise x
            yield x
    finally:
        done.set()
        thread.join()
        _running.discard((done, thread))
