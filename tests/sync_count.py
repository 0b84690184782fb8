"""count_syncs(): count the operations that would make the host wait for the device on CUDA.

    with count_syncs() as syncs:
        loss = pfc(x, labels); loss.backward()
    assert not syncs, syncs

Works on any device, so a CPU test can show that a CUDA step would not stall: a
TorchDispatchMode sees every aten op that reaches a kernel (autograd's backward ops included) and
counts those whose output size or value the host must read: .item() / bool() / int() / float()
(aten._local_scalar_dense), nonzero, unique, masked_select, boolean-mask indexing (it lowers to
nonzero), repeat_interleave without output_size, bincount, equal / allclose, copies to the CPU.
Tensor.tolist / .numpy / .cpu are counted by name as well: on a CPU tensor they reach no kernel.
Only top-level ops are seen; a sync hidden inside a kernel is not (on a GPU,
torch.cuda.set_sync_debug_mode('error') checks those).

copies=True counts host-to-device copies too, keyed '... (host to device)': torch's blocking copy
to a GPU waits for the stream (cudaMemcpyAsync, then cudaStreamSynchronize), so a step should have
none; with non_blocking=True (from pinned memory) it does not wait and is not counted. On a GPU a
copy is seen as it is: Tensor.to / .cuda / copy_ from a CPU tensor to a device one. On a CPU
every tensor is a host tensor, so a tensor counts as one only where it would be on the host in a
GPU run: made inside the block from host data (torch.from_numpy, torch.tensor / as_tensor without
a device, and whatever ops compute from those alone) or in `host`; its .to(device) / .cuda() /
copy_ into another tensor is the copy (the result is the device's: an op on it is not a host op,
and a second .to of the same tensor is not seen, as .to returns the tensor itself on a CPU).
torch.tensor / torch.as_tensor of Python or numpy data with a device are copies on either.

host: tensors that live on the host in a GPU run, so that reading them waits for nothing: on
CUDA, AdamW (capturable=False, fused=False) keeps its `step` counters on the CPU and reads them
with .item() every step; on a CPU run they look like any other read. Pass them (or a function
returning them, for tensors made inside the block) to leave their reads out.
Used by tests/ and bench/gpu.py (one copy: the bench imports it from here).
"""
import contextlib
import threading
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ALWAYS = {aten._local_scalar_dense, aten.nonzero, aten._unique, aten._unique2, aten.unique_dim,
          aten.unique_consecutive, aten.masked_select, aten.bincount, aten.equal, aten.allclose}


def _is_sync(func, args, kwargs, host):
    op = func.overloadpacket
    if op is aten._local_scalar_dense and any(args[0].data_ptr() == t.data_ptr() for t in host()):
        return False
    if op in ALWAYS:
        return True
    if op in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                   for t in (args[1] if len(args) > 1 else ()) if t is not None)
    if op is aten.repeat_interleave:
        return kwargs.get('output_size') is None  # a tensor of repeats: the host needs their sum
    if op in (aten._to_copy, aten.copy_):  # device -> host
        src = args[1] if op is aten.copy_ else args[0]
        dst = args[0].device if op is aten.copy_ else kwargs.get('device')
        return (isinstance(src, torch.Tensor) and src.device.type != 'cpu' and dst is not None
                and torch.device(dst).type == 'cpu')
    return False


class _Copies:
    """copies=True: which CPU tensors would be on the host in a GPU run (made inside the block from
    host data, or in `host`), and whether a copy is a waiting host-to-device one."""

    def __init__(self, host):
        self.host, self.made = host, weakref.WeakValueDictionary()  # id -> tensor

    def mark(self, t):
        if isinstance(t, torch.Tensor) and t.device.type == 'cpu':
            self.made[id(t)] = t
        return t

    def marked(self, t):
        return isinstance(t, torch.Tensor) and t.device.type == 'cpu' and (
            self.made.get(id(t)) is t or any(t.untyped_storage().data_ptr() ==
                                             h.untyped_storage().data_ptr() for h in self.host()))

    def copied(self, src, dst_device, non_blocking):
        """Whether src to dst_device is a host-to-device copy that waits: to a GPU, any CPU
        tensor; to the CPU (a CPU run's device), a marked one, which is the device's after."""
        if non_blocking or dst_device is None or not isinstance(src, torch.Tensor) or \
                src.device.type != 'cpu':
            return False
        if torch.device(dst_device).type != 'cpu':
            return True
        if not self.marked(src):
            return False
        self.made.pop(id(src), None)
        return True


def _device_of(args, kwargs):
    """The device a Tensor.to(...) call names (a device, or a tensor to match), else None."""
    first = kwargs.get('device', kwargs.get('other', args[1] if len(args) > 1 else None))
    if isinstance(first, torch.Tensor):
        return first.device
    return first if isinstance(first, (str, int, torch.device)) and not isinstance(first, bool) else None


class _Counter(TorchDispatchMode):
    def __init__(self, counts, host, copies):
        super().__init__()
        self.counts, self.host, self.copies = counts, host, copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs, self.host):
            self.counts[str(func)] += 1
        c = self.copies
        if c is not None and func.overloadpacket is aten.copy_ and not c.marked(args[0]) and \
                c.copied(args[1], args[0].device, kwargs.get('non_blocking', args[2:3] == (True,))):
            self.counts[f'{func} (host to device)'] += 1
        out = func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if c is not None and tensors and all(c.marked(a) for a in tensors):
            for o in out if isinstance(out, (tuple, list)) else (out,):
                c.mark(o)  # computed from host tensors alone: a host tensor
        return out


def _copy_patches(counts, copies, mine):
    """{(owner, name): replacement} of the calls that copy to a device or make host tensors."""
    saved = {(torch.Tensor, 'to'): torch.Tensor.to, (torch.Tensor, 'cuda'): torch.Tensor.cuda,
             (torch, 'tensor'): torch.tensor, (torch, 'as_tensor'): torch.as_tensor,
             (torch, 'from_numpy'): torch.from_numpy}

    def to(self, *a, **k):
        nb = k.get('non_blocking', True in a[1:])  # to(device, dtype, non_blocking) / to(other, nb)
        if mine() and copies.copied(self, _device_of((self,) + a, k), nb):
            counts['Tensor.to (host to device)'] += 1
        return saved[torch.Tensor, 'to'](self, *a, **k)

    def cuda(self, device=None, non_blocking=False, **k):
        if mine() and copies.copied(self, 'cuda' if device is None else device, non_blocking):
            counts['Tensor.cuda (host to device)'] += 1
        return saved[torch.Tensor, 'cuda'](self, device, non_blocking, **k)

    def factory(name):
        def make(data, *a, **k):
            dev = k.get('device', a[1] if name == 'as_tensor' and len(a) > 1 else None)
            if not mine() or isinstance(data, torch.Tensor):  # a tensor: as .to
                if mine() and dev is not None and copies.copied(data, dev, False):
                    counts[f'torch.{name} (host to device)'] += 1
                return saved[torch, name](data, *a, **k)
            if dev is not None:  # Python or numpy data: always a copy from the host
                counts[f'torch.{name} (host to device)'] += 1
                return saved[torch, name](data, *a, **k)
            return copies.mark(saved[torch, name](data, *a, **k))
        return make

    return saved, {(torch.Tensor, 'to'): to, (torch.Tensor, 'cuda'): cuda,
                   (torch, 'tensor'): factory('tensor'), (torch, 'as_tensor'): factory('as_tensor'),
                   (torch, 'from_numpy'): lambda x: copies.mark(saved[torch, 'from_numpy'](x))
                   if mine() else saved[torch, 'from_numpy'](x)}


@contextlib.contextmanager
def count_syncs(host=(), copies=False):
    """Yields a Counter {op name: times} of host-syncing ops run inside the block; reads of the
    tensors in `host` (see above) are not counted; copies=True: and the host-to-device copies."""
    counts = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in ('tolist', 'numpy', 'cpu')}
    me = threading.get_ident()  # like the dispatch mode, count this thread only (not a loader's)
    host_fn = host if callable(host) else lambda: host
    c = _Copies(host_fn) if copies else None
    patched = _copy_patches(counts, c, lambda: threading.get_ident() == me) if copies else ({}, {})

    def wrap(name, f):
        def counted(self, *a, **k):
            if threading.get_ident() == me:
                counts[f'Tensor.{name}'] += 1
            return f(self, *a, **k)
        return counted

    for name, f in saved.items():
        setattr(torch.Tensor, name, wrap(name, f))
    for (owner, name), f in patched[1].items():
        setattr(owner, name, f)
    try:
        with _Counter(counts, host_fn, c):
            yield counts
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)
        for (owner, name), f in patched[0].items():
            setattr(owner, name, f)
