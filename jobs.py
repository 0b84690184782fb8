"""
What keeps a long job on a cluster safe: the process group and a lost rank's one line, the
stops of a training loop that say where to resume, signals (finish the step, checkpoint, leave)
and the out_dir checks and lock (one run per folder, one folder that every rank sees).
"""
import atexit
import contextlib
import datetime
import fcntl
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from runtime import stop, torchrun_report


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
