"""
Losses of MLCD (Multi-Label Cluster Discrimination, An et al., ECCV 2024):
- the losses as the papers write them, functions of the positive and negative cosines: MLCD
  (Eq. 5), MLC (Eq. 4), both with an ArcFace margin, and OneVision-Encoder's per-label softmax;
- PartialFC: k class centres sharded over ranks, a random fraction of the negatives sampled per
  step, and around the losses the sets, sums and collectives that make them exact on any number
  of ranks.
Works on one process and under torch.distributed (one process per GPU, or gloo on CPU).

Under torch.distributed every loss returns the GLOBAL-batch mean, the same on every rank, and
hands a rank's input rows world_size * d(loss)/d(rows), so that DDP's averaging gives exactly the
single-process gradient (docs/method.md, "Distributed PartialFC"). The centres, not DDP-wrapped, get
their exact gradient.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from runtime import shard_range  # rank r holds centres [start, start + n_r)


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -----------------------------------------------------------------------------
# The losses, as the papers write them. PartialFC (below) hands each one, for the B rows of the
# global micro-batch, each row's G terms (one for Eq. 4 and 5):
#   cos_pos [B, G, P]: the cosines of a term's positives (its labels' centres),
#   cos_neg [B, G, N]: the cosines of its candidate negatives held by this rank, -inf where a
#     candidate is not a negative of the row (so e^{scale cos} = 0: no term; not finite),
#   lse_pos(x), lse_neg(x): log sum_i exp(x_i) over a term's positives / negatives on all ranks
#     (x shaped like cos_pos / cos_neg; what is not a positive / negative does not count),
#   scale, margin: the settings.
# and takes the mean of what it returns, the loss of each term [B, G], over the global batch. A new
# loss is a function here and an entry in LOSSES: the float64 and the 1-vs-2-rank tests run over
# LOSSES. Everything else of PartialFC (sampling, shards, collectives) stays as it is.

def arcface(cos, m):
    """cos(theta + m) (ArcFace's additive angular margin, the paper's appendix) by the angle-sum
    identity (acos has an infinite gradient at +-1); past theta + m = pi it goes on as
    cos(theta) - m sin(m), as insightface does, so it keeps falling (docs/method.md, "Paper → code":
    a flat tail there is a trap training fell into)."""
    sin = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
    return torch.where(cos > -math.cos(m), cos * math.cos(m) - sin * math.sin(m), cos - m * math.sin(m))


def mlcd_loss(cos_pos, cos_neg, lse_pos, lse_neg, scale, margin):
    """MLCD, Eq. 5: log(1 + sum_i e^{-s_i}) + log(1 + sum_j e^{s_j}) over the positives i and the
    negatives j, s_i = scale cos(theta_i + margin), s_j = scale cos(theta_j)."""
    s_pos, s_neg = scale * arcface(cos_pos, margin), scale * cos_neg
    return F.softplus(lse_pos(-s_pos)) + F.softplus(lse_neg(s_neg))


def mlc_loss(cos_pos, cos_neg, lse_pos, lse_neg, scale, margin):
    """MLC, Eq. 4 (the ablation baseline of Table 6): log(1 + sum_j e^{s_j} sum_i e^{-s_i}), s as in
    Eq. 5: every positive is weighed against every negative in one term."""
    s_pos, s_neg = scale * arcface(cos_pos, margin), scale * cos_neg
    return F.softplus(lse_neg(s_neg) + lse_pos(-s_pos))


def onevision_loss(cos_pos, cos_neg, lse_pos, lse_neg, scale, margin):
    """OneVision-Encoder's multi-label recipe (EvolvingLMMs-Lab, 2026): each term is one label drawn from
    the row's nearest centres (PartialFC.terms), scored by softmax cross-entropy with a
    CosFace margin, -log(e^{s_i} / (e^{s_i} + sum_j e^{s_j})), s_i = scale (cos(theta_i) - margin),
    s_j = scale cos(theta_j). With one positive, log(1 + e^{-s_i} sum_j e^{s_j}) is Eq. 4."""
    s_pos, s_neg = scale * (cos_pos - margin), scale * cos_neg
    return F.softplus(lse_neg(s_neg) + lse_pos(-s_pos))


LOSSES = {'mlcd': mlcd_loss, 'mlc': mlc_loss, 'onevision': onevision_loss}

# -----------------------------------------------------------------------------
# differentiable collectives

class _AllGather(torch.autograd.Function):
    """Concatenate x [b, ...] from every rank (equal b) along dim 0, with gradient."""

    @staticmethod
    def forward(ctx, x):
        rank, world = rank_and_world()
        ctx.rank, ctx.b = rank, x.shape[0]
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather(list(out.chunk(world)), x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        # every rank used the gathered rows: a local row's gradient is the sum over ranks
        # (reduce-scatter on NCCL; elsewhere all-reduce and keep our slice)
        grad = grad.contiguous()
        if dist.get_backend() == 'nccl':
            out = torch.empty((ctx.b,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def all_gather_with_grad(x):
    """all_gather along dim 0 whose backward sums the gradients of all ranks (reduce-scatter).
    Identity without torch.distributed. Every rank must pass the same shape."""
    if rank_and_world()[1] == 1:
        return x
    return _AllGather.apply(x)


class _GatherRanks(torch.autograd.Function):
    """x [...] of every rank stacked to [W, ...]. Every rank computes the same loss from it, so the
    gradient of rank r's slice is the same on every rank and rank r keeps it: no collective in
    backward (an all_gather_with_grad would count it W times)."""

    @staticmethod
    def forward(ctx, x):
        rank, world = rank_and_world()
        ctx.rank = rank
        out = torch.empty((world,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather(list(out.unbind(0)), x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank]


def _logsumexp(x, mask=None):
    """log sum exp of x over its last dim (only where mask): -inf where nothing counts, with a zero
    gradient there (torch.logsumexp's is NaN); a NaN stays NaN, so that a diverged tower shows up
    as a NaN loss rather than as a loss of 0. One buffer of x's size (and one more for a mask)."""
    if mask is not None:
        x = x.masked_fill(~mask, float('-inf'))
    m = x.detach().amax(-1, keepdim=True)  # a constant for autograd: the result does not depend on it
    m = m.masked_fill(m == float('-inf'), 0.0)
    s = (x - m).exp_().sum(-1)
    nonempty = s != 0  # true for NaN too
    return torch.where(nonempty, m.squeeze(-1) + torch.where(nonempty, s, 1.0).log(), float('-inf'))


def logsumexp_over_ranks(x, mask=None):
    """log sum exp of x over its last dim where mask, and over all ranks: each rank's own, gathered
    and combined by one more log-sum-exp (one all_gather of x's size less its last dim)."""
    lse = _logsumexp(x, mask)
    if rank_and_world()[1] == 1:
        return lse
    return _logsumexp(_GatherRanks.apply(lse).movedim(0, -1))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


# -----------------------------------------------------------------------------
# MLCD / MLC over partial (sampled, sharded) class centres

class _CentreRows(torch.autograd.Function):
    """Both reads of a rank's centres w [n, d]: c [B, l], c[b, j] = w[lab[b, j]] . e[b] /
    |w[lab[b, j]]| (lab: local indices, e: unit rows), and w[index], the rows of S, with gradient.
    The positives are computed `rows` rows of e at a time and recomputed in backward, so the
    [B l, d] rows of the global micro-batch never exist (0.8 GB at 160 ranks, L/14, l = 8, 3x
    that in autograd's backward); one dense [n, d] gradient for both reads. Why not only the
    local pairs (~B l / world) in a fixed-capacity buffer: a rank can hold up to B l of them
    (tiny k, skewed clusters), and an exact fallback that does not read the count on the host
    must itself be shaped for B l. So each rank still does the B l d multiply-adds (masked where
    a label is not local), l / |S| of the negatives' (8 / 625 at 160 ranks), in the memory of
    one chunk (docs/partialfc_memory.md)."""

    @staticmethod
    def forward(ctx, weight, e, lab, index, rows):
        B, l = lab.shape
        c = torch.empty(B, l, dtype=e.dtype, device=e.device)
        with torch.autocast(e.device.type, enabled=False):  # fp32 dot: only B l d of the work
            for lo in range(0, B, rows):
                w = weight.index_select(0, lab[lo:lo + rows].flatten()).to(e.dtype)
                w = w.view(-1, l, e.shape[1])
                dot = torch.bmm(w, e[lo:lo + rows].unsqueeze(2)).squeeze(2)
                c[lo:lo + rows] = dot / w.norm(dim=2).clamp_min(1e-12)
        ctx.save_for_backward(weight, e, lab, index, c)
        ctx.rows = rows
        return c, weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_c, grad_neg):
        # autograd's formula for dot / max(|w|, eps), eps = 1e-12: d/de = w / |w|_eps,
        # d/dw = (e - c [|w| >= eps] w / |w|_eps) / |w|_eps
        weight, e, lab, index, c = ctx.saved_tensors
        B, l = lab.shape
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[0] else None
        grad_e = torch.empty_like(e) if ctx.needs_input_grad[1] else None
        if grad_w is not None:
            grad_w.index_add_(0, index, grad_neg.to(weight.dtype))
        with torch.autocast(e.device.type, enabled=False):
            _positive_grads(weight, e, lab, c, grad_c, grad_w, grad_e, ctx.rows)
        return grad_w, grad_e, None, None, None


def _positive_grads(weight, e, lab, c, grad_c, grad_w, grad_e, rows):
    """_CentreRows' backward of the positives, `rows` rows of e at a time: adds into grad_w
    [n, d], writes grad_e [B, d] (either may be None)."""
    B, l = lab.shape
    for lo in range(0, B, rows):
        sl = slice(lo, lo + rows)
        idx = lab[sl].flatten()
        w = weight.index_select(0, idx).to(e.dtype).view(-1, l, e.shape[1])
        norm = w.norm(dim=2)
        inv = 1.0 / norm.clamp_min(1e-12)
        g = grad_c[sl] * inv  # d(loss)/d(dot)
        if grad_e is not None:
            grad_e[sl] = torch.bmm(g.unsqueeze(1), w).squeeze(1)
        if grad_w is not None:  # w becomes its own gradient, in place: one [rows l, d] buffer
            w.mul_((-g * c[sl] * inv * (norm >= 1e-12)).unsqueeze(2))
            w.addcmul_(g.unsqueeze(2), e[sl].unsqueeze(1))
            grad_w.index_add_(0, idx, w.view(idx.numel(), -1).to(weight.dtype))


def init_centres(start, n, d, seed, block=4096):
    """Rows start..start+n of a k x d matrix of N(0, 0.01^2) centres drawn block by block, block b
    from a generator seeded with (seed, b): the global matrix is the same whatever the number of
    ranks, and no rank draws all k x d numbers."""
    w = torch.empty(n, d)
    for b in range(start // block, (start + n + block - 1) // block):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        rows = torch.randn(block, d, generator=g) * 0.01
        lo, hi = max(start, b * block), min(start + n, (b + 1) * block)
        w[lo - start:hi - start] = rows[lo - b * block:hi - b * block]
    return w


def check_settings(loss_type, sample_ratio, draws, pool, batch_positives_as_negatives=None):
    """PartialFC's loss settings, checked (ValueError) before any work: train.py calls it at
    start-up, PartialFC when it is made. Returns batch_positives_as_negatives, None resolved to
    the loss type's own sampling (insightface's, True, for 'onevision'; else False)."""
    if loss_type not in LOSSES:
        raise ValueError(f'loss_type must be one of {", ".join(LOSSES)}; got {loss_type!r}')
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f'sample_ratio must be in (0, 1], got {sample_ratio}')
    if not 1 <= draws <= pool:
        raise ValueError(f'draws must be in [1, pool], got draws={draws}, pool={pool}')
    if batch_positives_as_negatives not in (None, True, False):
        raise ValueError(f'batch_positives_as_negatives must be None, True or False, got '
                         f'{batch_positives_as_negatives!r}')
    return loss_type == 'onevision' if batch_positives_as_negatives is None else batch_positives_as_negatives


class PartialFC(nn.Module):
    """k class centres split over ranks. Each step every rank draws S, a uniform random subset of
    round(sample_ratio * n_r) of its n_r centres. A sample's positives are its own labels, always
    scored with their own centres; its negatives are S minus its labels, so another sample's
    positive is a negative only if the draw picked it, and |negatives| ~ r (k - l) whatever the
    batch (the paper's Omega'_n, Sec. 3). Returns the loss LOSSES[loss_type] (MLCD, Eq. 5, by
    default) averaged over the global batch. Every shape is fixed by the settings, not by the data:
    no host syncs. batch_positives_as_negatives=True is insightface's PartialFC sampling (docs/method.md,
    "Distributed PartialFC"); None: the loss type's own, True for 'onevision' (as OneVision-Encoder
    samples), False otherwise. loss_type='onevision': `draws` terms a row, labels drawn from its
    first `pool` (terms), each scored against a sample S of its own. seed: of the initial centres
    (init_centres); None draws one from torch's RNG."""

    def __init__(self, embed_dim, num_classes, sample_ratio=0.1, scale=64.0, margin=0.3,
                 loss_type='mlcd', batch_positives_as_negatives=None, draws=3, pool=10, seed=None):
        super().__init__()
        batch_positives_as_negatives = check_settings(loss_type, sample_ratio, draws, pool,
                                                      batch_positives_as_negatives)
        rank, world = rank_and_world()
        if num_classes < world:
            raise ValueError(f'num_classes ({num_classes}) must be at least the world size ({world})')
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.sample_ratio, self.scale, self.margin, self.loss_type = sample_ratio, scale, margin, loss_type
        self.batch_positives_as_negatives, self.draws, self.pool = batch_positives_as_negatives, draws, pool
        self.start, self.num_local = shard_range(num_classes, rank, world)
        if seed is None:  # one draw of torch's RNG: ranks seeded alike hold one k x d matrix
            seed = int(torch.randint(2**62, ())) % 2**40
        self.weight = nn.Parameter(init_centres(self.start, self.num_local, embed_dim, seed))
        self.generator = torch.Generator().manual_seed(rank)  # ranks draw different negatives
        self.draw_generator = torch.Generator().manual_seed(0)  # one draw for all ranks ('onevision')
        self.index = None  # [G, |S|] local indices of the last forward's S per term (-1: unused)
        self.drawn = None  # 'onevision': [B, G] the label columns the last forward drew
        # centre values per chunk of the positives (_CentreRows); None: 2^24 (64 MB fp32) on a GPU
        # (a chunk is ~20 kernel launches), else 2^20: in cache, 3x faster (1.5 vs 4.7 s, W = 160)
        self.positive_chunk = None
        self.stats = {}

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda(): the generators follow the weight (same initial seeds; a caller
        # restoring their states does so after moving the module)
        super()._apply(fn, *args, **kwargs)
        dev = self.weight.device
        if self.generator.device != dev:
            self.generator = torch.Generator(dev).manual_seed(self.generator.initial_seed())
            self.draw_generator = torch.Generator(dev).manual_seed(self.draw_generator.initial_seed())
        return self

    def extra_repr(self):
        return (f'embed_dim={self.embed_dim}, num_classes={self.num_classes}, local=[{self.start}, '
                f'{self.start + self.num_local}), sample_ratio={self.sample_ratio}, scale={self.scale}, '
                f'margin={self.margin}, loss_type={self.loss_type}, '
                f'batch_positives_as_negatives={self.batch_positives_as_negatives}' +
                (f', draws={self.draws}, pool={self.pool}' if self.loss_type == 'onevision' else ''))

    def check_labels(self, labels):
        """Opt-in check that labels are global ids in [0, k) or -1; raises ValueError. It reads the
        labels on the host (a device sync), so forward does not call it: an id outside [0, k) is
        there simply no rank's centre. train.py checks labels.npy once at start."""
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise ValueError(f'labels must be in [-1, {self.num_classes}), got '
                             f'[{int(labels.min())}, {int(labels.max())}]')

    # --- the sets of a step: positives, candidate negatives, negatives

    @torch.no_grad()
    def terms(self, labels):
        """[B, G, P] global class ids (-1: none): the positives of each row's G loss terms. MLCD and
        MLC: one term, the row's labels, a duplicated id counted once. 'onevision': `draws` terms of
        one label each, drawn without replacement from the row's first `pool` labels (its nearest
        centres; fewer if it has fewer), one draw for all ranks; self.drawn: their columns."""
        if self.loss_type != 'onevision':
            labels = labels.sort(dim=1).values
            repeat = labels[:, 1:] == labels[:, :-1]
            return torch.cat([labels[:, :1], labels[:, 1:].masked_fill(repeat, -1)], 1)[:, None]
        pool = labels[:, :self.pool]
        keys = torch.rand(pool.shape, generator=self.draw_generator, device=pool.device)
        keys += pool < 0  # a missing label is drawn only when no other is left
        self.drawn = keys.argsort(1)[:, :self.draws]
        return pool.gather(1, self.drawn)[:, :, None]

    @torch.no_grad()
    def sample(self):
        """S: sorted local indices of a uniform random subset of round(sample_ratio * n_r) local
        centres (at least one; all of them when that is n_r). Its size never depends on the data."""
        n, dev = self.num_local, self.weight.device
        num = min(n, max(1, round(self.sample_ratio * n)))
        if num == n:
            return torch.arange(n, device=dev)
        keys = torch.rand(n, generator=self.generator, device=dev)
        return keys.topk(num, sorted=False).indices.sort().values

    @torch.no_grad()
    def sample_with_positives(self, local_lab):
        """batch_positives_as_negatives: every local positive of the batch (local_lab [B, l], n_r
        where a label is not local), filled up to ceil(sample_ratio * n_r) with uniformly random
        local centres. That set's size depends on the batch, so it is returned as a fixed-size
        candidate list, positives first, of min(n_r, ceil(r n_r) + B l) local indices, and
        `valid`, true for the first max(ceil(r n_r), #positives): the ones in use (None: all)."""
        n, dev = self.num_local, self.weight.device
        num = math.ceil(round(self.sample_ratio * n, 6))  # round: 0.3 * 10 is 3.0000000000000004
        if num >= n:
            return torch.arange(n, device=dev), None
        # uniform random keys in [0, 1); positives get 2, so the top keys are the positives, then
        # a uniform random order of the other centres
        keys = torch.rand(n + 1, generator=self.generator, device=dev)
        keys = keys.index_fill_(0, local_lab.flatten(), 2.0)[:n]  # slot n: labels not local
        size = min(n, num + local_lab.numel())
        index = keys.topk(size).indices
        valid = torch.arange(size, device=dev) < (keys == 2.0).sum().clamp_min(num)
        return index, valid

    @torch.no_grad()
    def candidates(self, local, is_local, index=None):
        """Each term's S [G, N] (local centre indices) and which of its slots are in use [G, N] (None:
        all), a draw of its own per term. index: given sets, [N] or [G, N], -1 for an unused slot."""
        G = local.shape[1]
        if index is not None:
            index = index.to(self.weight.device).view(-1, index.shape[-1]).expand(G, -1)
            return index.clamp_min(0), index >= 0
        if not self.batch_positives_as_negatives:
            return torch.stack([self.sample() for _ in range(G)]), None
        picks = [self.sample_with_positives(torch.where(is_local[:, g], local[:, g], self.num_local))
                 for g in range(G)]
        valid = None if picks[0][1] is None else torch.stack([v for _, v in picks])
        return torch.stack([i for i, _ in picks]), valid

    @torch.no_grad()
    def not_negatives(self, local, is_local, index, valid):
        """[B, G, N]: slot j of term g's S is not a negative of row b: one of the term's positives (a
        row's own labels are not its negatives) or not in use; and own_col [B, G, P], the slot of
        each positive (N: not in S)."""
        (B, G), N, dev = local.shape[:2], index.shape[1], local.device
        slot = index if valid is None else index.masked_fill(~valid, self.num_local)
        col_of = torch.full((G, self.num_local + 1), N, dtype=torch.long, device=dev)  # N: not in S
        col_of.scatter_(1, slot, torch.arange(N, device=dev).expand(G, N))
        own_col = torch.where(is_local, col_of[torch.arange(G, device=dev)[:, None], local], N)
        own = torch.zeros(B, G, N + 1, dtype=torch.bool, device=dev).scatter_(2, own_col, True)
        own = own[..., :N]
        return (own if valid is None else own | ~valid), own_col

    @torch.no_grad()
    def _stats(self, cos_pos, is_local, cos_neg, own_col, valid):
        """Logging (paper Fig. 3): the mean positive and negative cosines and the negatives per term,
        all ranks; 0-d tensors, not floats: reading them would wait for the device every micro-batch.
        The negatives' sum as the used columns' less the positives': one pass over the cosines."""
        (B, G, N), dt = cos_neg.shape, cos_neg.dtype
        has = own_col < N  # a positive in its term's S (always a used slot)
        cols = cos_neg.sum(0) if valid is None else cos_neg.sum(0) * valid
        own = (cos_neg.gather(2, own_col.clamp_max(N - 1)) * has).sum()
        n_neg = (G * N if valid is None else valid.sum()) * B - has.sum()
        st = torch.stack([torch.where(is_local, cos_pos, 0).sum(), is_local.sum().to(dt),
                          cols.sum() - own, n_neg.to(dt)])
        if rank_and_world()[1] > 1:
            dist.all_reduce(st)
        return {'pos_cos': st[0] / st[1].clamp_min(1.0), 'neg_cos': st[2] / st[3].clamp_min(1.0),
                'num_neg': st[3] / B / G}

    def forward(self, embeddings, labels, index=None):
        """embeddings [b, d] (this rank's rows), labels [b, l] int64 global class ids, -1 = none
        (not checked: see check_labels). index: optional local centre indices to use as S instead
        of sampling, [|S|] or [G, |S|], -1 for an unused slot (with batch_positives_as_negatives:
        the whole scored set); tests use it to score the same set on any world size. Returns the
        mean over the global batch of the per-term loss, identical on every rank."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f'embeddings must be [b, {self.embed_dim}], got {tuple(embeddings.shape)}')
        if labels.dim() == 1:
            labels = labels[:, None]
        if labels.dim() != 2 or labels.shape[0] != embeddings.shape[0] or labels.shape[1] == 0:
            raise ValueError(f'labels must be [b, l] with b = {embeddings.shape[0]} and l >= 1, '
                             f'got {tuple(labels.shape)}')
        if index is not None and index.numel() == 0:
            raise ValueError('index must hold at least one centre')
        world, dev = rank_and_world()[1], self.weight.device
        dt = torch.promote_types(self.weight.dtype, torch.float32)  # loss math: fp32 (fp64 in tests)

        # the global batch; x's gradient times world_size undoes DDP's averaging (module docstring)
        x = embeddings.to(dev)
        if world > 1:
            x = _ScaleGrad.apply(all_gather_with_grad(x), float(world))
            labels = _AllGather.apply(labels.to(dev).contiguous())  # ints: no gradient
        pos = self.terms(labels.to(dev).long())  # [B, G, P]
        B, G = pos.shape[:2]
        is_local = (pos >= self.start) & (pos < self.start + self.num_local)
        local = torch.where(is_local, pos - self.start, 0)  # 0: any centre, masked out
        index, valid = self.candidates(local, is_local, index)
        self.index = index if valid is None else index.masked_fill(~valid, -1)

        # cosines; under autocast the negatives' matmul runs in bf16, everything else in fp32.
        # positives: each row against its own labels' centres, so a positive always counts (w.e / |w|:
        # F.normalize's formula), and the rows of S, in one autograd node; negatives: every row
        # against each term's S [B, G, |S|], never [B, k] when sample_ratio < 1
        e = F.normalize(x.to(dt), dim=1)
        chunk = self.positive_chunk or (2**24 if dev.type == 'cuda' else 2**20)
        cos_pos, w_neg = _CentreRows.apply(self.weight, e, local.view(B, -1), index.flatten(),
                                           max(1, chunk // (pos[0].numel() * self.embed_dim)))
        cos_pos = cos_pos.clamp(-1.0, 1.0).view(pos.shape)
        cos_neg = (e @ F.normalize(w_neg, dim=1).t()).to(dt)  # [B, G |S|]
        not_neg, own_col = self.not_negatives(local, is_local, index, valid)
        self.stats = self._stats(cos_pos, is_local, cos_neg.view(B, G, -1), own_col, valid)
        # in place (on the matmul's own output, not a view: no copy in backward): e^{s cos} = 0
        cos_neg = cos_neg.masked_fill_(not_neg.reshape(B, -1), float('-inf')).view(B, G, -1)

        # the loss of each term: its sums over positives and negatives run over all ranks' shards
        loss = LOSSES[self.loss_type](cos_pos, cos_neg, lambda z: logsumexp_over_ranks(z, is_local),
                                      lambda z: logsumexp_over_ranks(z), self.scale, self.margin)
        return loss.mean()
