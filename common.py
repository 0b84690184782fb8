"""
What the stage scripts share: threads, the process group and each rank's share of the rows, the
batch plan, the lr schedule, weight-decay groups, signals, atomic file writes, checkpoint files,
RNG state, log.jsonl and one-line stops.
Plain functions; each script still reads top to bottom and calls them where it needs them.

Import this module before torch: OMP_WAIT_POLICY is read once, when torch loads its OpenMP
runtime. PASSIVE (unless the user set a policy) makes idle OpenMP threads sleep instead of
spinning: on a loaded 2-core machine a 2-thread training step was 4x slower with the default
policy (median 9.2 s vs 2.2 s, ViT-T/4, batch 128), its threads spinning against other processes.
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import atexit  # noqa: E402 (after the environment is set)
import datetime  # noqa: E402
import contextlib  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402


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


# -----------------------------------------------------------------------------
# process group

def init_distributed(device, timeout_minutes):
    """(ddp, rank, world, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK);
    nccl on CUDA, gloo on CPU. Every collective (and the rendezvous) fails after timeout_minutes
    when a rank is gone; the rank that notices exits with a line saying so (see lost_rank), not
    with a traceback."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, device
    if not timeout_minutes > 0:
        raise SystemExit(f'config error: timeout_minutes must be > 0, got {timeout_minutes}')
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    sys.excepthook = lambda kind, e, tb: lost_rank(kind, e, tb, rank, timeout_minutes)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo',
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return True, rank, world, device


def lost_rank(kind, e, tb, rank, timeout_minutes):
    """sys.excepthook under DDP: a failed collective (a timeout, a closed connection) becomes one
    line naming the likely causes and the setting; any other error keeps its traceback."""
    text = str(e)
    comm = isinstance(e, getattr(dist, 'DistError', ())) or (
        isinstance(e, RuntimeError) and any(s in text for s in ('gloo', 'Timed out', 'Connection')))
    if not comm:
        return sys.__excepthook__(kind, e, tb)
    # to the real stderr: init_process_group wraps this hook and points sys.stderr at a buffer
    # that it would print only after we return, and we do not return
    cause = re.sub(r'\s*GLHF!.*$', '', text.splitlines()[0] if text else '')  # gloo's sign-off
    msg = (f'rank {rank}: lost contact with another rank (no answer within timeout_minutes='
           f'{timeout_minutes:g}, or its connection closed): a rank died, was stopped or '
           f'OOM-killed, or the network failed; see the other ranks\' output '
           f'({cause[-160:]})')
    sys.__stderr__.write(f'\n{msg}\n')  # a newline first: a progress bar may be mid-line
    sys.__stderr__.flush()
    torchrun_report(msg)
    release_out_dir()
    os._exit(1)  # not sys.exit: tearing down a process group with a peer gone can hang


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
# optimisation

def batch_plan(global_batch_size, world, micro_batch_size=0):
    """(global, micro, accum, note): the global batch actually used, micro x world x accum.
    accum is the fewest accumulation steps that keep micro <= micro_batch_size (0: no
    accumulation, each rank takes global / world); micro is then the one that brings the global
    batch nearest to the one asked (ties: the larger). A global batch that is not a multiple of
    the ranks (32768 on 80 GPUs) thus changes by less than world x accum / 2 images, and the
    learning rate applies as written. note says what was asked and why it changed ('' if not)."""
    if global_batch_size <= 0 or micro_batch_size < 0:
        raise SystemExit(f'config error: global_batch_size {global_batch_size} and micro_batch_size '
                         f'{micro_batch_size} must be positive')
    accum = 1 if micro_batch_size == 0 else -(-global_batch_size // (micro_batch_size * world))
    micro = max(1, (2 * global_batch_size + world * accum) // (2 * world * accum))
    got = micro * world * accum
    if got == global_batch_size:
        return got, micro, accum, ''
    why = (f'{world} ranks' if micro_batch_size == 0 else
           f'{world} ranks x a micro-batch <= micro_batch_size={micro_batch_size}')
    return got, micro, accum, (f'asked for global_batch_size={global_batch_size}, not a multiple '
                               f'of {why}: using the nearest, {got} '
                               f'({100 * (got / global_batch_size - 1):+.2f}%), learning rate as set')


def get_lr(it, learning_rate, min_lr, warmup_steps, max_steps):
    """Linear warm-up over warmup_steps, then cosine decay to min_lr at max_steps."""
    if it < warmup_steps:
        return learning_rate * (it + 1) / warmup_steps
    progress = min(1.0, (it - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(module, weight_decay, skip):
    """AdamW groups: decay on the matrices (linear, conv, projection: ndim >= 2) whose name
    contains none of `skip`; none on biases and LayerNorm gains (they shift and scale
    activations, decaying them only distorts the normalisation) or on the skipped ones (additive
    inputs and lookup tables such as position embeddings: decay would just erase them)."""
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        (decay if p.ndim >= 2 and not any(s in n for s in skip) else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def grad_norm(params, grad_clip):
    """The global gradient norm of params, clipped to grad_clip first when grad_clip > 0."""
    params = list(params)
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def grad_cache(forward, loss_fn, rows, micro, ddp_model=None):
    """The backward of a loss that couples the whole batch (a contrastive loss), `micro` rows at
    a time: the gradient cache (Gao et al., 2021, https://arxiv.org/abs/2101.06983).
      1. embed all `rows` micro-batch by micro-batch without gradients: forward(rows_slice, False);
      2. loss_fn(*embeddings) and its backward: the gradient of every embedding row (and of any
         parameter the loss holds itself, e.g. a temperature, which gets its whole gradient here);
      3. each micro-batch again with gradients, forward(rows_slice, True), back-propagating its
         slice of the embeddings' gradient.
    By the chain rule the parameters' gradients, summed over the micro-batches, are those of one
    forward over all rows (the same numbers up to rounding), and the activations of only one
    micro-batch are held. forward returns a list of embeddings, each [..., m, d] (rows on dim
    -2); on the second pass None in place of one without gradient (a frozen tower's, not run
    twice). ddp_model: a DDP module, all-reduced in the last micro-batch's backward only.
    Returns (loss, embeddings), detached."""
    chunks = [slice(i, min(i + micro, rows)) for i in range(0, rows, micro)]
    with torch.no_grad():
        parts = [forward(sl, False) for sl in chunks]
    embs = [torch.cat(p, dim=-2).requires_grad_() for p in zip(*parts)]
    loss = loss_fn(*embs)
    loss.backward()
    for i, sl in enumerate(chunks):
        if ddp_model is not None:
            ddp_model.require_backward_grad_sync = i == len(chunks) - 1
        out = [(o, e.grad[..., sl, :]) for o, e in zip(forward(sl, True), embs) if o is not None]
        torch.autograd.backward(*zip(*out))
    return loss.detach(), [e.detach() for e in embs]


def load_optimizer(optimizer, state, weight_decay):
    """Resume an optimizer of param_groups' two groups; the current config's weight decay wins
    over the saved one."""
    optimizer.load_state_dict(state)
    for group, wd in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group['weight_decay'] = wd


# -----------------------------------------------------------------------------
# one-line stops of a training loop; signals: finish the step, checkpoint, leave

def last_good(ckpt_path):
    return f'the last good checkpoint is {ckpt_path}' + ('' if os.path.exists(ckpt_path)
                                                          else ' (none yet)')


def stop_non_finite(what, step, loss, grad_norm, ckpt_path):
    """Before the optimizer step: the weights are still those of the last step."""
    stop(f"non-finite {', '.join(what)} at step {step + 1} (loss {loss}, gradient norm "
         f'{grad_norm}); nothing was updated or saved, {last_good(ckpt_path)}; a lower '
         'learning_rate or grad_clip may help')


def stop_unsaved(step, ckpt_path):
    stop(f'non-finite weights or optimizer state after step {step}: not saved; '
         + last_good(ckpt_path))


def stop_signalled(step, max_steps, ckpt_path, master=True):
    """The one line (rank 0's; the other ranks exit quietly) after the signal's checkpoint."""
    stop(f'stopped by {signalled or "a signal to another rank"} after step {step} of '
         f'{max_steps}; checkpoint {ckpt_path} written: continue with the same command and '
         '--init_from=resume', say=master)


signalled = None  # the name of the first SIGTERM / SIGINT / SIGHUP received, once one has come
# SIGHUP: a closed terminal or ssh session; its default action kills at once and loses every step
# since the last checkpoint, so it is treated like a preemption
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def catch_signals(master=True):
    """From now on the first SIGTERM, SIGINT or SIGHUP (a cluster's preemption, Ctrl-C, a closed
    terminal) only sets `signalled`; the training loop reads it once per step (folded into the
    step's one device read, so all ranks agree on the step), checkpoints and exits. A second
    signal exits at once. Only rank 0 (master) prints: torchrun passes a signal to every rank."""
    def handler(signum, frame):
        global signalled
        name = signal.Signals(signum).name
        if signalled is not None:
            msg = f'{name} after {signalled}: exiting now; the last checkpoint is unchanged'
            if master:
                say(f'\n{msg}')
            torchrun_report(msg)
            release_out_dir()
            os._exit(128 + signum)  # as a shell reports a process ended by that signal
        signalled = name
        if master:
            say(f'\n{name}: stopping after this step with a checkpoint (send it again to '
                'exit at once)')
    for s in SIGNALS:
        signal.signal(s, handler)


def say(line):
    """A line on stderr at once, from a signal handler (print is not safe there)."""
    try:
        sys.stderr.write(line + '\n')
        sys.stderr.flush()
    except (OSError, ValueError):  # SIGHUP: the terminal that stderr went to is gone
        pass


def exit_on_signals(kept, master=True):
    """For stages without a training loop (cluster.py, probe.py): SIGTERM, SIGINT and SIGHUP end
    the process at once with one line (rank 0's; exit status 1) instead of a KeyboardInterrupt
    traceback; every file is written whole or under a temporary name, so what is on disk under
    its final name is whole. `kept` says what remains."""
    def handler(signum, frame):
        msg = f'stopped by {signal.Signals(signum).name}: {kept}'
        if master:
            say(f'\n{msg}')
        torchrun_report(msg)
        release_out_dir()
        os._exit(1)  # not SystemExit: it could surface inside a collective and hang the teardown
    for s in SIGNALS:
        signal.signal(s, handler)


# -----------------------------------------------------------------------------
# files

def check_writable(key, path):
    """Before any work: the folder `path` (setting `key`) must be writable: a file is created
    and removed in it or, while it does not exist, in its nearest existing parent (the folder
    itself is created only when there is something to write)."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        if os.path.islink(parent):  # makedirs would say 'File exists'
            stop(f'{key}={path}: {parent} is a symbolic link to {os.readlink(parent)}, which '
                 'does not exist')
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        stop(f'{key}={path}: {parent} is not a directory')
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        stop(f'{key}={path}: cannot write in {parent} ({e.strerror})')


def check_out_dir(out_dir, init_from, overwrite):
    """Before any work. out_dir must be writable (check_writable). A new run must not replace a
    run's checkpoint without being told."""
    check_writable('out_dir', out_dir)
    if init_from != 'resume' and not overwrite and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
        stop(f'out_dir={out_dir} holds a checkpoint (ckpt.pt) that a new run would replace: '
             'continue it with --init_from=resume, or start over with --overwrite=True')


LOCK = '.lock'  # out_dir's lock file: who holds it (host, process id, since when)
held_locks = []  # (fd, path, made) of each out_dir lock this process holds (made: it made out_dir)


def claim_out_dir(out_dir, ddp, rank, world, timeout_minutes=30.0):
    """Once the inputs are checked, before the first write: out_dir is created, rank 0 takes
    its lock, and under DDP every rank must see the same folder. The lock is an flock on
    out_dir/.lock, which the operating system releases when the process ends, however it ends:
    a second run on the same out_dir (a resubmitted job) stops at once, naming the holder."""
    msg = [None]
    if rank == 0:
        msg[0] = take_lock(out_dir)
    if ddp:
        dist.broadcast_object_list(msg, src=0)
    if msg[0]:
        stop(msg[0])
    if ddp:
        check_shared(out_dir, rank, world, min(60.0, 15 * timeout_minutes))


def take_lock(out_dir, name=LOCK):
    """None once this process holds out_dir's lock (the file `name` in it), else the line saying
    why not. A process may hold several (prepare.py --holdout locks every folder it writes)."""
    path = os.path.join(out_dir, name)
    made = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 300).decode(errors='replace').strip() or 'starting up'
                os.close(fd)
                return (f'out_dir={out_dir} is in use by another run ({holder}): wait for it to '
                        'end, or use another out_dir')
            try:  # the file we locked is still the one at path (the holder removes it on exit)
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f'host {socket.gethostname()}, process {os.getpid()}, since '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S %Z")}\n'.encode())
    except OSError as e:
        return f'out_dir={out_dir}: cannot write ({e.strerror})'
    if not held_locks:
        atexit.register(release_out_dir)
    held_locks.append((fd, path, made))
    return None


def release_out_dir():
    """Remove the lock file, then let go of the lock (in that order: a process that opened the
    old file meanwhile sees that it is gone and takes a new one). A kill -9 leaves the file,
    unlocked: the next run takes it. An out_dir this run made and left empty (a stop on input
    found bad only when first read, e.g. a shard's header) is removed too."""
    while held_locks:
        fd, path, made = held_locks.pop()
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                os.rmdir(os.path.dirname(path))


def check_shared(out_dir, rank, world, wait_s):
    """Every rank writes a token file into out_dir and must find every other rank's: ranks on
    nodes whose out_dir is another folder (a local disk, another working directory) would keep
    their centre shards where a resume never finds them. A network file system may show a new
    file late (attribute caches: up to 60 s on NFS), so a rank looks again for up to wait_s."""
    token = [secrets.token_hex(6)]
    dist.broadcast_object_list(token, src=0)
    name = lambda r: os.path.join(out_dir, f'.rank{r}_of_{world}_{token[0]}')
    try:
        os.makedirs(out_dir, exist_ok=True)
        open(name(rank), 'w').close()
    except OSError:
        pass  # this rank then misses its own file, which the line below reports
    dist.barrier()
    t0 = time.time()
    while True:
        seen = [r for r in range(world) if os.path.exists(name(r))]
        if len(seen) == world or time.time() - t0 > wait_s:
            break
        time.sleep(0.5)
    views = [None] * world
    dist.all_gather_object(views, (socket.gethostname(), os.path.abspath(out_dir), seen))
    with contextlib.suppress(OSError):
        os.remove(name(rank))
    bad = [(r, v) for r, v in enumerate(views) if len(v[2]) != world]
    if bad:
        say = '; '.join(f'rank {r} (host {h}, {p}) sees the files of ranks {s}'
                        for r, (h, p, s) in bad[:4])
        stop(f'out_dir={out_dir} is not one folder that every rank sees: {say}; put out_dir on a '
             'file system shared by every node (centre shards and ckpt.pt live there)')


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


def open_dataset(key, path, max_open_shards=None):
    """data.Dataset(path); its errors become one line that names the setting the path came
    from (`data_dir=data/x: no meta.json ...`)."""
    from data import MAX_OPEN_SHARDS, Dataset
    try:
        return Dataset(path, max_open_shards or MAX_OPEN_SHARDS)
    except RecursionError:  # json's parser on thousands of nested brackets
        stop(f'{key}={path}: meta.json is nested too deeply to be a dataset description')
    except (ValueError, OSError) as e:
        stop(f"{key}={path}: {str(e).removeprefix(str(path) + ': ')}")


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


def auto_micro_batch(try_step, start, ddp, device):
    """micro_batch_size='auto': (the largest m of start, start // 2, ..., 1 for which
    try_step(m), one training micro-step of m images, does not run out of memory; the smallest m
    that did, or None). try_step must leave nothing behind (grads, RNG) whether it succeeds or not.
    Under DDP every rank tries the same m and all halve when any ran out (try_step runs
    collectives: the ranks must stay in lockstep). Stops with one line if even 1 image fails."""
    m, failed = max(1, start), None
    while True:
        oom = False
        try:
            # test hook (like cluster.py's CLUSTER_KILL_AT): MLCD_FAKE_OOM_ABOVE=n makes a try of
            # more than n images run out of memory before any collective, a small GPU for CPU tests
            if m > int(os.environ.get('MLCD_FAKE_OOM_ABOVE', m)):
                raise torch.OutOfMemoryError(f'MLCD_FAKE_OOM_ABOVE: {m} images')
            try_step(m)
        except torch.OutOfMemoryError:  # the exception (and the graph its frames hold) dies here
            oom = True
        if torch.device(device).type == 'cuda':
            torch.cuda.empty_cache()  # the failed try's blocks back, for the next, smaller one
        flag = torch.tensor([float(oom)], device=device)
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return m, failed
        if m == 1:
            stop(f'micro_batch_size=auto: even 1 image per forward does not fit on {device} (a '
                 'training micro-step ran out of memory)', say=not ddp or dist.get_rank() == 0)
        m, failed = m // 2, m


def auto_batch_plan(try_step, global_batch_size, world, ddp, device, unsplit):
    """micro_batch_size='auto' as batch_plan's (global, micro, accum, note): the search from the
    rank's whole share, rounded up (32768 on 80 ranks: 410, one micro-batch; 409 would be planned
    as 2 of 205), and a note saying what fits and why; unsplit: what it says when the whole share
    fits."""
    fits, failed = auto_micro_batch(try_step, -(-global_batch_size // world), ddp, device)
    global_batch_size, micro, accum, note = batch_plan(global_batch_size, world, fits)
    why = f'micro_batch_size=auto: {fits} fits on {device} ' + (
        f'({failed} ran out of memory)' if failed else f'({unsplit})')
    return global_batch_size, micro, accum, '; '.join(x for x in (why, note) if x)
