"""
Losses of MLCD (Multi-Label Cluster Discrimination, An et al., ECCV 2024):
- PartialFC: k class centres sharded over ranks, a random fraction of the negatives sampled per
  step, and the MLCD (Eq. 5) or MLC (Eq. 4) loss with an ArcFace margin on the positives.
- clip_loss: the symmetric InfoNCE loss used to train a text tower against a locked image tower.
Works on one process and under torch.distributed (one process per GPU, or gloo on CPU).

Gradient convention under torch.distributed (both losses): the returned value is the mean over
the GLOBAL batch and is the same on every rank; the gradient that reaches a rank's input rows is
world_size * d(loss)/d(rows), so DDP's averaging (a division by world_size) of the backbone
gradient gives exactly the single-process gradient of the same global batch. Parameters that
live inside the loss and are not DDP-wrapped (the centres) get their exact gradient.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(num_classes, rank, world_size):
    """Contiguous class range [start, start + n) held by `rank` (DESIGN §4)."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


# -----------------------------------------------------------------------------
# differentiable collectives

class _AllGather(torch.autograd.Function):
    """Concatenate x [b, ...] from every rank (equal b) along dim 0, with gradient."""

    @staticmethod
    def forward(ctx, x):
        rank, world = _world()
        ctx.rank, ctx.b = rank, x.shape[0]
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather(list(out.chunk(world)), x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every rank used the gathered rows in its own loss, so the gradient of a local row is the
        # SUM over ranks of their gradients for it: a reduce-scatter on NCCL; other backends
        # all-reduce and keep their slice (same result, twice the traffic).
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
    if _world()[1] == 1:
        return x
    return _AllGather.apply(x)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the identity: every rank evaluates the SAME loss from the
    reduced value, so d(loss)/d(local term) = d(loss)/d(sum), which each rank already holds.
    (Summing in backward too would count that one loss world_size times.)"""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _WithValue(torch.autograd.Function):
    """Returns `value` in the forward pass and passes the gradient to `x` unchanged."""

    @staticmethod
    def forward(ctx, x, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


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

class PartialFC(nn.Module):
    """k class centres split over ranks. Each step every rank draws S, a uniform random subset of
    round(sample_ratio * n_r) of its n_r centres. A sample's positives are its own labels, always
    scored with their own centres; its negatives are S minus its labels, so another sample's
    positive is a negative only if the draw picked it, and |negatives| ~ r (k - l) whatever the
    batch (the paper's Omega'_n, Sec. 3). Returns the MLCD (Eq. 5) or MLC (Eq. 4) loss, averaged
    over the global batch. Every shape is fixed by the settings, not by the data: no host syncs.

    batch_positives_as_negatives=True is insightface's PartialFC instead, kept for comparison:
    every local positive of the global batch is scored, filled up to ceil(r n_r) with random
    centres, and each scored centre is a negative for every row that does not own it, so the
    batch's positives crowd out the random negatives and r depends on the batch size."""

    def __init__(self, embed_dim, num_classes, sample_ratio=0.1, scale=64.0, margin=0.3,
                 loss_type='mlcd', batch_positives_as_negatives=False):
        super().__init__()
        if loss_type not in ('mlcd', 'mlc'):
            raise ValueError(f"loss_type must be 'mlcd' or 'mlc', got {loss_type!r}")
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f'sample_ratio must be in (0, 1], got {sample_ratio}')
        rank, world = _world()
        if num_classes < world:
            raise ValueError(f'num_classes ({num_classes}) must be at least the world size ({world})')
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.sample_ratio, self.scale, self.margin, self.loss_type = sample_ratio, scale, margin, loss_type
        self.batch_positives_as_negatives = batch_positives_as_negatives
        self.start, self.num_local = shard_range(num_classes, rank, world)
        self.weight = nn.Parameter(self._init_shard(int(torch.randint(2**62, ())), embed_dim))
        self.generator = torch.Generator().manual_seed(rank)  # ranks draw different negatives
        self.index = None  # local indices of the last forward's S (-1: a candidate left unused)
        self.stats = {}

    def _init_shard(self, seed, embed_dim, chunk=65536):
        # N(0, 0.01) centres drawn in fixed chunks of classes, each from its own seeded generator:
        # with the same seed every world size holds slices of one k x d matrix (and no two ranks
        # start with equal centres), without any rank drawing all k x d numbers
        end = self.start + self.num_local
        w = torch.empty(self.num_local, embed_dim)
        for c in range(self.start // chunk, (end - 1) // chunk + 1 if self.num_local else 0):
            g = torch.Generator().manual_seed(seed + c)
            rows = torch.normal(0.0, 0.01, (min(chunk, self.num_classes - c * chunk), embed_dim), generator=g)
            lo, hi = max(self.start, c * chunk), min(end, (c + 1) * chunk)
            w[lo - self.start:hi - self.start] = rows[lo - c * chunk:hi - c * chunk]
        return w

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda(): the sampler's generator follows the weight (same initial seed; a
        # caller restoring a generator state does so after moving the module)
        super()._apply(fn, *args, **kwargs)
        if self.generator.device != self.weight.device:
            self.generator = torch.Generator(self.weight.device).manual_seed(self.generator.initial_seed())
        return self

    def extra_repr(self):
        return (f'embed_dim={self.embed_dim}, num_classes={self.num_classes}, local=[{self.start}, '
                f'{self.start + self.num_local}), sample_ratio={self.sample_ratio}, scale={self.scale}, '
                f'margin={self.margin}, loss_type={self.loss_type}, '
                f'batch_positives_as_negatives={self.batch_positives_as_negatives}')

    def check_labels(self, labels):
        """Opt-in check that labels are global ids in [0, k) or -1; raises ValueError. It reads the
        labels on the host (a device sync), so forward does not call it: an id outside [0, k) is
        there simply no rank's centre. train.py checks labels.npy once at start."""
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise ValueError(f'labels must be in [-1, {self.num_classes}), got '
                             f'[{int(labels.min())}, {int(labels.max())}]')

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

    def forward(self, embeddings, labels, index=None):
        """embeddings [b, d] (this rank's rows), labels [b, l] int64 global class ids, -1 = none
        (not checked: see check_labels). index: optional distinct local centre indices to use as S
        instead of sampling (with batch_positives_as_negatives: the whole scored set); tests use it to
        score the same set on any world size. Returns the mean over the global batch of the
        per-sample loss, identical on every rank."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f'embeddings must be [b, {self.embed_dim}], got {tuple(embeddings.shape)}')
        if labels.dim() == 1:
            labels = labels[:, None]
        if labels.dim() != 2 or labels.shape[0] != embeddings.shape[0] or labels.shape[1] == 0:
            raise ValueError(f'labels must be [b, l] with b = {embeddings.shape[0]} and l >= 1, '
                             f'got {tuple(labels.shape)}')
        if index is not None and index.numel() == 0:
            raise ValueError('index must hold at least one centre')
        rank, world = _world()
        dev, n = self.weight.device, self.num_local
        dt = torch.promote_types(self.weight.dtype, torch.float32)  # loss math: fp32 (fp64 in tests)

        # Gather the global batch. Each rank backpropagates only its own centres' share of
        # dL/dx; _AllGather's backward sums the shares into the exact dL/dx of the local rows.
        # DDP then DIVIDES the backbone gradient by world_size, although the true gradient of the
        # global mean is the SUM of the ranks' contributions: so scale the gradient by world_size.
        x = embeddings.to(dev)
        if world > 1:
            x = _ScaleGrad.apply(all_gather_with_grad(x), float(world))
            labels = _AllGather.apply(labels.to(dev).contiguous())  # ints: no gradient
        labels = labels.to(dev).long()
        B, l = labels.shape

        # a duplicated id in a row counts once: sort each row and blank repeats
        labels = labels.sort(dim=1).values
        repeat = labels[:, 1:] == labels[:, :-1]
        labels = torch.cat([labels[:, :1], labels[:, 1:].masked_fill(repeat, -1)], 1)
        is_local = (labels >= self.start) & (labels < self.start + n)  # [B, l]
        local_lab = torch.where(is_local, labels - self.start, 0)  # 0: any row, masked below

        # S, and which of its columns are in use (all but with batch_positives_as_negatives)
        valid = None
        if index is not None:
            index = index.to(dev)
        elif self.batch_positives_as_negatives:
            index, valid = self.sample_with_positives(torch.where(is_local, local_lab, n))
        else:
            index = self.sample()
        self.index = index if valid is None else index.masked_fill(~valid, -1)
        N = index.numel()

        # cosines; under autocast the matmuls run in bf16, everything after them in fp32
        e = F.normalize(x.to(dt), dim=1)
        # one gather for both (its backward writes one dense [n_r, d] gradient, not two)
        rows = self.weight.index_select(0, torch.cat([local_lab.flatten(), index]))
        w_pos, w_neg = rows.split([B * l, N])
        # positives: each row against its own labels' centres [B, l], so a positive always counts
        # (w.e / |w|: F.normalize's formula without a normalised copy of the [B l, d] rows)
        w_pos = w_pos.view(B, l, -1)
        c_pos = torch.bmm(w_pos, e.unsqueeze(2)).squeeze(2).to(dt)
        c_pos = (c_pos / w_pos.norm(dim=2).clamp_min(1e-12)).clamp(-1.0, 1.0)
        # negatives: every row against S [B, |S|], never [B, k] when sample_ratio < 1
        cos = (e @ F.normalize(w_neg, dim=1).t()).to(dt)
        # a row's own labels are not its negatives: find their columns in S (N: not in S)
        col_of = torch.full((n,), N, dtype=torch.long, device=dev)
        col_of.scatter_(0, index, torch.arange(N, device=dev))
        own_col = torch.where(is_local, col_of[local_lab], N)  # [B, l]
        own = torch.zeros(B, N + 1, dtype=torch.bool, device=dev).scatter_(1, own_col, True)[:, :N]

        # positives: s_i = scale * cos(theta_i + m) (ArcFace), computed as
        # cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), sin(theta) = sqrt(1 - cos^2) >= 0,
        # which equals the acos form without its infinite gradient at cos = +-1 (the clamp of
        # 1 - cos^2 only acts where cos is exactly +-1).
        # Where theta + m > pi (cos < -cos m), cos(theta + m) would turn back up. Saturating it at
        # cos(pi) = -1 instead is flat there, and that flat region is a trap: sending every
        # embedding to the antipode of every centre gives s_i = s_j = -scale and a loss of
        # log(1 + (k - 1)), below the loss at initialisation. Training on 10 true classes fell
        # into it within 100 steps (pos and neg cosine -> -1). So, as insightface's ArcFace does,
        # continue with cos(theta) - m sin(m) there: still decreasing in theta, still a gradient.
        sin_pos = (1.0 - c_pos * c_pos).clamp_min(1e-12).sqrt()
        cos_m = c_pos * math.cos(self.margin) - sin_pos * math.sin(self.margin)
        s_pos = self.scale * torch.where(c_pos > -math.cos(self.margin), cos_m,
                                         c_pos - self.margin * math.sin(self.margin))
        # logging statistics (paper Fig. 3) from the same cosines; they ride along in the all-reduce
        with torch.no_grad():
            has_own = own_col < N  # a row's label that is a column of S (always a used one)
            col_sum = cos.sum(0) if valid is None else cos.sum(0) * valid
            n_cols = N if valid is None else valid.sum()
            neg_sum = col_sum.sum() - (cos.gather(1, own_col.clamp_max(N - 1)) * has_own).sum()
            stats = torch.stack([(c_pos * is_local).sum(), is_local.sum().to(dt), neg_sum,
                                 (n_cols * B - has_own.sum()).to(dt)])
        # negatives: s_j = scale * cos(theta_j) over S minus the row's labels; in place from here
        # on, one [B, |S|] buffer besides the cosines
        s_neg = cos.mul(self.scale).masked_fill_(own, float('-inf'))
        if valid is not None:
            s_neg.masked_fill_(~valid, float('-inf'))

        # Per-sample log-sum-exp of -s_i (positives) and s_j (negatives) over ALL ranks,
        # max-stabilised: m = max over ranks of the local maxima, then sum over ranks of
        # sum exp(z - m). m is a constant for autograd (log-sum-exp does not depend on it).
        z_pos = (-s_pos).masked_fill(~is_local, float('-inf'))
        m = torch.stack([z_pos.detach().amax(1), s_neg.detach().amax(1)], 1)  # [B, 2]
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        m = torch.where(torch.isfinite(m), m, 0.0)  # a set empty on every rank: any finite m
        sums = torch.stack([(z_pos - m[:, :1]).exp().sum(1), s_neg.sub_(m[:, 1:]).exp_().sum(1)], 1)
        if world > 1:
            packed = _AllReduceSum.apply(torch.cat([sums.flatten(), stats]))
            sums, stats = packed[:2 * B].view(B, 2), packed[2 * B:].detach()
        nonempty = sums > 0
        lse = torch.where(nonempty, m + torch.where(nonempty, sums, 1.0).log(), float('-inf'))
        lse_pos, lse_neg = lse[:, 0], lse[:, 1]  # log sum_i exp(-s_i), log sum_j exp(s_j)

        if self.loss_type == 'mlcd':
            # Eq. 5: log(1 + sum_i exp(-s_i)) + log(1 + sum_j exp(s_j))
            loss = F.softplus(lse_pos) + F.softplus(lse_neg)
        else:
            # Eq. 4: log(1 + sum_j exp(s_j) * sum_i exp(-s_i))
            loss = F.softplus(lse_neg + lse_pos)
        # 0-d tensors, not floats: reading them would wait for the device on every micro-batch
        self.stats = {'pos_cos': stats[0] / stats[1].clamp_min(1.0),
                      'neg_cos': stats[2] / stats[3].clamp_min(1.0),
                      'num_neg': stats[3] / B}  # negatives per sample, all ranks
        return loss.mean()


# -----------------------------------------------------------------------------
# CLIP contrastive loss (for LiT)

def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE over the global batch. image_emb, text_emb: [b, d] this rank's rows
    (L2-normalised here); logit_scale: the multiplier (exp of the learnable log temperature,
    capped by the caller). Each rank scores its own rows against all gathered columns; the value
    returned is the global-batch mean, the same on every rank."""
    rank, world = _world()
    dt = torch.promote_types(image_emb.dtype, torch.float32)  # fp32 (fp64 in tests)
    img = F.normalize(image_emb.to(dt), dim=-1)
    txt = F.normalize(text_emb.to(dt), dim=-1)
    # Rank r's loss_r is the mean over its rows; the global mean is (1/W) sum_r loss_r. The
    # gather's backward sums every rank's gradient for a row, so a row receives
    # sum_r d loss_r/d row = W * d(global mean)/d row, and DDP's division by W makes it exact.
    img_all, txt_all = all_gather_with_grad(img), all_gather_with_grad(txt)
    target = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    loss = (F.cross_entropy(logit_scale * img @ txt_all.t(), target) +
            F.cross_entropy(logit_scale * txt @ img_all.t(), target)) / 2
    if world > 1:  # report the global mean; the gradient stays the one of this rank's share
        total = loss.detach().clone()
        dist.all_reduce(total)
        loss = _WithValue.apply(loss, total / world)
    return loss
