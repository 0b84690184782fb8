"""
The activation memory of lit.py's trained text tower per caption, the number that sizes LiT's
micro-batches (micro_batch_size): the bytes autograd keeps for the backward (saved tensors,
counted once per storage, the weights left out) for a forward of b captions of the full 77
tokens, at two batch sizes; per caption = the difference / the difference in captions.
  fp32:          the CPU run's dtype, measured;
  bf16 autocast: CPU autocast, an estimate of a CUDA bf16 run (its op lists differ a little:
                 on CUDA, LayerNorm and softmax outputs stay fp32 as here, matmul inputs bf16);
  on CUDA (device=cuda): the same count under CUDA's bf16 autocast, and the peak of
                 torch.cuda.max_memory_allocated over a forward + backward of `micro` captions
                 above what was allocated before (activations, gradients, allocator slack).
Also the step time of the gradient cache against the one-shot step (median of `runs`, side by
side, fp32 on CPU, a small text tower): the cache adds one forward without gradients.

    python bench/bench_lit_memory.py                  # CPU: ViT-B/16 and ViT-L/14 text towers
    python bench/bench_lit_memory.py --device=cuda    # the GPU check: measured in bf16 too

Prints one JSON line per preset, then one for the timing.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import runtime  # noqa: E402,F401 (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
import optim  # noqa: E402
from contrastive import clip_loss  # noqa: E402
from model import PRESETS, TextTransformer  # noqa: E402

presets = 'ViT-B/16,ViT-L/14'
batches = (2, 6)  # captions per forward for the difference
device = 'cpu'
micro = 256  # device=cuda: captions per forward for the peak-memory measurement
threads = 2
runs = 5  # timing: medians of this many steps of each
exec(open(os.path.join(ROOT, 'configurator.py')).read())
torch.set_num_threads(threads)


def captions(b, vocab, generator):
    ids = torch.randint(1, vocab - 1, (b, 77), generator=generator)
    ids[:, -1] = vocab - 1  # the end token (the highest id) last: all 77 tokens are used
    return ids.to(device)


def saved_bytes(text, ids, autocast):
    """Bytes autograd holds after the forward of ids: every saved tensor's storage, once, the
    parameters' own storages left out."""
    params = {p.untyped_storage().data_ptr() for p in text.parameters()}
    held = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = text(ids)
    del out
    return sum(held.values())


def per_caption(text, vocab, autocast):
    g = torch.Generator().manual_seed(0)
    a, b = (saved_bytes(text, captions(n, vocab, g), autocast) for n in batches)
    return (b - a) / (batches[1] - batches[0])


def cuda_peak(text, vocab):
    """Peak bytes above the resting ones over a bf16 forward + backward of `micro` captions."""
    ids = captions(micro, vocab, torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = text(ids).float()
    out.square().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    text.zero_grad(set_to_none=True)
    return peak


for name in [p for p in presets.split(',') if p]:
    cfg = PRESETS[name]['text']
    torch.manual_seed(0)
    text = TextTransformer(**cfg).to(device)
    rec = {'preset': name, 'text_tower': {k: cfg[k] for k in ('width', 'layers', 'heads')},
           'params_M': round(text.num_params() / 1e6, 1), 'device': device,
           'fp32_MB_per_caption': per_caption(text, cfg['vocab_size'], torch.autocast(
               'cpu', enabled=False)) / 1e6}
    if device == 'cpu':
        rec['bf16_cpu_autocast_MB_per_caption_estimate'] = per_caption(
            text, cfg['vocab_size'], torch.autocast('cpu', dtype=torch.bfloat16)) / 1e6
    else:
        rec['bf16_MB_per_caption'] = per_caption(
            text, cfg['vocab_size'], torch.autocast('cuda', dtype=torch.bfloat16)) / 1e6
        rec[f'bf16_peak_GiB_at_{micro}'] = cuda_peak(text, cfg['vocab_size']) / 2 ** 30
        rec['gpu'] = torch.cuda.get_device_name()
    print(json.dumps(rec), flush=True)
    del text

# -----------------------------------------------------------------------------
# step time: one-shot vs the gradient cache, the same batch, side by side
torch.manual_seed(0)
text = TextTransformer(vocab_size=1000, width=128, layers=2, heads=2, embed_dim=64).to(device)
g = torch.Generator().manual_seed(1)
b, m = 64, 16
ids = captions(b, 1000, g)
img = torch.randn(b, 64, generator=g).to(device)
scale = torch.tensor(14.3, device=device, requires_grad=True)


def one_shot():
    clip_loss(img, text(ids), scale).backward()


def cached():
    optim.grad_cache(lambda rows, again: [None if again else img[rows], text(ids[rows])],
                     lambda i, t: clip_loss(i, t, scale), b, m)


times = {'one_shot': [], 'grad_cache': []}
for _ in range(runs + 1):  # the first round warms up
    for key, fn in (('one_shot', one_shot), ('grad_cache', cached)):
        t0 = time.perf_counter()
        fn()
        if device == 'cuda':
            torch.cuda.synchronize()
        times[key].append(time.perf_counter() - t0)
        text.zero_grad(set_to_none=True)
med = {k: float(np.median(v[1:])) for k, v in times.items()}
print(json.dumps({'step_s_median': med, 'ratio': med['grad_cache'] / med['one_shot'],
                  'batch': b, 'micro': m, 'threads': threads, 'device': device}))
