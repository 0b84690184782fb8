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

host: tensors that live on the host in a GPU run, so that reading them waits for nothing: on
CUDA, AdamW (capturable=False, fused=False) keeps its `step` counters on the CPU and reads them
with .item() every step; on a CPU run they look like any other read. Pass them (or a function
returning them, for tensors made inside the block) to leave their reads out.
Used by tests/ and bench/gpu.py (one copy: the bench imports it from here).
"""
import contextlib
import threading
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


class _Counter(TorchDispatchMode):
    def __init__(self, counts, host):
        super().__init__()
        self.counts, self.host = counts, host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs, self.host):
            self.counts[str(func)] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(host=()):
    """Yields a Counter {op name: times} of host-syncing ops run inside the block; reads of the
    tensors in `host` (see above) are not counted."""
    counts = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in ('tolist', 'numpy', 'cpu')}
    me = threading.get_ident()  # like the dispatch mode, count this thread only (not a loader's)

    def wrap(name, f):
        def counted(self, *a, **k):
            if threading.get_ident() == me:
                counts[f'Tensor.{name}'] += 1
            return f(self, *a, **k)
        return counted

    for name, f in saved.items():
        setattr(torch.Tensor, name, wrap(name, f))
    try:
        with _Counter(counts, host if callable(host) else lambda: host):
            yield counts
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)
