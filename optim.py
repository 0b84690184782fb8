"""
The optimisation step's pieces shared by train.py and lit.py: the batch plan (and
micro_batch_size='auto'), the lr schedule, AdamW's weight-decay groups, the gradient norm and
the gradient cache for a loss that couples the whole batch.
"""
import math
import os

import torch
import torch.distributed as dist

from runtime import stop


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
