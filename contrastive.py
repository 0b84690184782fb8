"""
The contrastive losses of lit.py (and of the instance discrimination baselines): CLIP's symmetric
InfoNCE for a text tower against a locked image tower, UniCLIP's MP-NCE with its domain dependent
similarity, and SimCLR's NT-Xent. Like loss.py's, each returns the GLOBAL-batch mean under
torch.distributed and hands a rank's rows world_size * d(loss)/d(rows), so that DDP's averaging
gives the single-process gradient; each rank scores its own rows against all gathered ones.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from loss import all_gather_with_grad, rank_and_world


class WithValue(torch.autograd.Function):
    """Returns `value` in the forward pass and passes the gradient to `x` unchanged."""

    @staticmethod
    def forward(ctx, x, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# -----------------------------------------------------------------------------
# CLIP contrastive loss (for LiT)

def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE over the global batch. image_emb, text_emb: [b, d] this rank's rows
    (L2-normalised here); logit_scale: the multiplier (exp of the learnable log temperature,
    capped by the caller). Each rank scores its own rows against all gathered columns; the value
    returned is the global-batch mean, the same on every rank."""
    rank, world = rank_and_world()
    dt = torch.promote_types(image_emb.dtype, torch.float32)  # fp32 (fp64 in tests)
    img = F.normalize(image_emb.to(dt), dim=-1)
    txt = F.normalize(text_emb.to(dt), dim=-1)
    # the gather's backward sums the ranks' gradients: a row gets W * d(global mean)/d(row)
    img_all, txt_all = all_gather_with_grad(img), all_gather_with_grad(txt)
    target = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    loss = (F.cross_entropy(logit_scale * img @ txt_all.t(), target) +
            F.cross_entropy(logit_scale * txt @ img_all.t(), target)) / 2
    if world > 1:  # report the global mean; the gradient stays the one of this rank's share
        total = loss.detach().clone()
        dist.all_reduce(total)
        loss = WithValue.apply(loss, total / world)
    return loss


# -----------------------------------------------------------------------------
# Instance discrimination baselines: UniCLIP's MP-NCE and SimCLR's NT-Xent
#
# UniCLIP (Lee et al., NeurIPS 2022) has no public code: this is our reading of the paper, its
# three parts three switches (MP-NCE, + DomainSimilarity, + model.AugAwareVision); our choices
# are listed in docs/baselines.md, "Instance discrimination baselines (CLIP, UniCLIP, SimCLR)".

IMAGE, TEXT = 0, 1  # domain ids of mp_nce_loss rows


class DomainSimilarity(nn.Module):
    """UniCLIP's domain dependent similarity, as we read it: the logit of rows i, j is
        s_ij = t_{D(i)D(j)} * cos(z_i, z_j) + b_{D(i)D(j)}
    with a learnable scale t (the inverse temperature, t = exp(log t), capped at max_scale like
    CLIP's) and a learnable offset b per unordered domain pair: (image, image), (image, text),
    (text, text). per_domain=False: one scale for every pair and no offsets (plain MP-NCE).
    Text-text pairs are negatives (captions of different samples), and positives only when a
    sample has several captions. A shift of all three offsets by one constant leaves every loss
    unchanged (each anchor's logits move together), so their gradients sum to zero.
    forward() -> (scale [2, 2], offset [2, 2] or None), the arguments of mp_nce_loss.
    The parameters take no weight decay. Under DDP they are not DDP-wrapped: after backward,
    all-reduce their gradients and divide by the world size (see mp_nce_loss), then after each
    optimizer step call clamp_() (CLIP clamps its logit scale parameter the same way)."""

    def __init__(self, init_scale=1 / 0.07, max_scale=100.0, per_domain=True, offsets=True):
        super().__init__()
        if offsets and not per_domain:
            raise ValueError('offsets need per_domain=True (one shared offset cancels in every term)')
        if not 1.0 <= init_scale <= max_scale:
            raise ValueError(f'init_scale must be in [1, max_scale={max_scale}], got {init_scale}')
        n = 3 if per_domain else 1
        self.max_log_scale = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.full((n,), math.log(init_scale)))
        self.offset = nn.Parameter(torch.zeros(n)) if offsets else None
        pair = [[0, 1], [1, 2]] if per_domain else [[0, 0], [0, 0]]  # (i,i) (i,t) (t,t) -> slot
        self.register_buffer('pair', torch.tensor(pair), persistent=False)

    def forward(self):
        # the clamp only acts if clamp_() was skipped; its gradient passes at the bounds themselves
        scale = self.log_scale.clamp(0.0, self.max_log_scale).exp()[self.pair]
        return scale, (None if self.offset is None else self.offset[self.pair])

    @torch.no_grad()
    def clamp_(self):
        """Keep 1 <= scale <= max_scale: call after every optimizer step."""
        self.log_scale.clamp_(0.0, self.max_log_scale)


def mp_nce_loss(emb, domain, owner, scale, offset=None, pairs=None):
    """UniCLIP's MP-NCE (multi-positive NCE) over the global batch.
    emb [n, d]: this rank's rows, any mix of image views and texts (L2-normalised here);
    domain [n] int: each row's domain (IMAGE, TEXT), an index into scale / offset / pairs;
    owner [n] int: the GLOBAL id of the sample each row came from: rows with the same owner are
      each other's positives (multiview_rows builds the three for the usual layout);
    scale: a number or [D, D] tensor, the multiplier of the cosine per domain pair;
    offset: None or [D, D], added to the logit per domain pair (DomainSimilarity gives both);
    pairs: None, or [D, D] bool: domain pairs that are compared at all; a False pair is neither
      positive nor negative (e.g. [[0, 1], [1, 0]] scores images against texts only, as CLIP).
    Every rank must pass the same n. The rows of all ranks are gathered; every row a of this rank
    is an anchor, its positives P(a) are the other rows with its owner, its negatives N(a) every
    other row of the global batch, images and texts alike. Each positive gets its own term, the
    OTHER positives are not in its denominator (this is what sets MP-NCE apart from SupCon):
        l_a = 1/|P(a)| sum_{p in P(a)} -log( e^{s_ap} / (e^{s_ap} + sum_{n in N(a)} e^{s_an}) )
    Returns the mean of l_a over the anchors of the global batch with |P(a)| > 0 (the others are
    skipped; if there are none the loss is 0), the same value on every rank. Rows get
    W * d(loss)/d(rows), as in clip_loss; scale and offset get W times this rank's share, so the
    caller all-reduces their gradients and divides by W, as lit.py does for the logit scale."""
    if emb.dim() != 2 or domain.shape != emb.shape[:1] or owner.shape != emb.shape[:1]:
        raise ValueError(f'emb must be [n, d] and domain, owner [n]; got {tuple(emb.shape)}, '
                         f'{tuple(domain.shape)}, {tuple(owner.shape)}')
    rank, world = rank_and_world()
    dt = torch.promote_types(emb.dtype, torch.float32)  # fp32 (fp64 in tests)
    z = F.normalize(emb.to(dt), dim=-1)
    dev, n = z.device, z.shape[0]
    dom, own = domain.to(dev).long(), owner.to(dev).long()
    z_all = all_gather_with_grad(z)  # [N, d], N = W * n, rank-major
    if world > 1:  # ints: no gradient
        dom_all, own_all = all_gather_with_grad(dom.contiguous()), all_gather_with_grad(own.contiguous())
    else:
        dom_all, own_all = dom, own
    di, dj = dom[:, None], dom_all[None, :]

    # s_aj = t_{D(a)D(j)} cos(z_a, z_j) + b_{D(a)D(j)}  (domain dependent similarity)
    scale = torch.as_tensor(scale, dtype=dt, device=dev)
    logits = z @ z_all.t() * (scale[di, dj] if scale.dim() else scale)  # [n, N]
    if offset is not None:
        logits = logits + offset.to(dt)[di, dj]
    me = torch.arange(n, device=dev) + rank * n  # the anchors' own columns
    scored = me[:, None] != torch.arange(world * n, device=dev)[None, :]
    if pairs is not None:
        scored = scored & torch.as_tensor(pairs, dtype=torch.bool, device=dev)[di, dj]
    same = own[:, None] == own_all[None, :]
    pos, neg = scored & same, scored & ~same

    # -log(e^{s_ap} / (e^{s_ap} + sum_n e^{s_an})) = logaddexp(s_ap, log sum_n e^{s_an}) - s_ap
    # (not softplus(lse - s_ap): torch's softplus is linear past 20, off by up to e^-20)
    lse_neg = logits.masked_fill(~neg, float('-inf')).logsumexp(1)  # [n]
    terms = torch.where(pos, torch.logaddexp(logits, lse_neg[:, None]) - logits, 0.0)
    num_pos = pos.sum(1)
    local = (terms.sum(1) / num_pos.clamp_min(1)).sum()  # sum of l_a over this rank's anchors
    count = (num_pos > 0).sum().to(dt)
    if world > 1:  # the global number of anchors, and the global loss for the report
        both = torch.stack([local.detach(), count])
        dist.all_reduce(both)
        total, count = both[0], both[1]
    count = count.clamp_min(1.0)
    loss = local * (world / count)  # W x this rank's share: DDP's averaging makes it exact
    if world > 1:
        loss = WithValue.apply(loss, total / count)
    return loss


def multiview_rows(images, texts=None):
    """The loader's layout as mp_nce_loss rows. images [V, b, d]: V augmented views of this
    rank's b samples; texts: None, [b, d] or [T, b, d] (T captions per sample). Returns
    (emb [(V + T) b, d], domain, owner) with owner = rank * b + i, the sample's global index, so
    that the views and captions of one sample are each other's positives."""
    if images.dim() != 3:
        raise ValueError(f'images must be [V, b, d], got {tuple(images.shape)}')
    V, b, d = images.shape
    texts = images.new_empty(0, b, d) if texts is None else texts.reshape(-1, b, d)
    T = texts.shape[0]
    if V + T < 2:
        raise ValueError(f'{V} view(s) and {T} caption(s): a positive needs 2 rows per sample')
    dt = torch.promote_types(images.dtype, texts.dtype)
    emb = torch.cat([images.to(dt).reshape(V * b, d), texts.to(dt).reshape(T * b, d)])
    # filled on the device: a tensor from a host list would be a host-to-device copy every step
    domain = torch.full((V * b + T * b,), TEXT, device=images.device)
    domain[:V * b] = IMAGE
    owner = (torch.arange(b, device=images.device) + rank_and_world()[0] * b).repeat(V + T)
    return emb, domain, owner


def simclr_loss(views, logit_scale):
    """SimCLR's NT-Xent (Chen et al., ICML 2020) over the global batch. views [2, b, d]: two
    augmented views of this rank's b images (L2-normalised here); logit_scale: 1 / temperature.
    Every view of the gathered 2bW is an anchor; its positive is the other view of its image, its
    negatives the other 2bW - 2 views. Equal to mp_nce_loss(*multiview_rows(views), logit_scale)
    (one positive per anchor), written here as the usual cross-entropy. Gradient convention as
    clip_loss (a learnable logit_scale: all-reduce its gradient and divide by W)."""
    if views.dim() != 3 or views.shape[0] != 2:
        raise ValueError(f'views must be [2, b, d], got {tuple(views.shape)}')
    rank, world = rank_and_world()
    dt = torch.promote_types(views.dtype, torch.float32)
    b = views.shape[1]
    z = F.normalize(views.to(dt), dim=-1).flatten(0, 1)  # [2b, d]: view 0 rows, then view 1 rows
    z_all = all_gather_with_grad(z)  # [2bW, d]: rank r's rows at [2br, 2b(r + 1))
    rows = torch.arange(2 * b, device=z.device)
    me = rows + 2 * b * rank
    is_me = F.one_hot(me, 2 * b * world).bool()
    logits = (logit_scale * z @ z_all.t()).masked_fill(is_me, float('-inf'))  # no self-pairs
    target = (rows + b) % (2 * b) + 2 * b * rank  # the other view of the same image
    loss = F.cross_entropy(logits, target)
    if world > 1:  # report the global mean; the gradient stays the one of this rank's share
        total = loss.detach().clone()
        dist.all_reduce(total)
        loss = WithValue.apply(loss, total / world)
    return loss


def check_settings(loss, lock_image, views, precompute_features):
    """lit.py's loss settings, checked (ValueError) before any work: (locked, views), locked True
    for LiT (the image tower frozen), views 0 resolved to the loss's own (CLIP 1, else 2)."""
    if loss not in ('clip', 'uniclip', 'simclr'):
        raise ValueError(f"loss must be 'clip', 'uniclip' or 'simclr', got {loss!r}")
    locked = loss == 'clip' and lock_image
    views = views or (1 if loss == 'clip' else 2)
    need = {'clip': 1, 'simclr': 2}.get(loss)  # uniclip: any number
    if (need and views != need) or views < 1:
        raise ValueError(f"loss={loss!r} takes views={need or '>= 1'}, got {views}")
    if precompute_features and not locked:
        raise ValueError("precompute_features needs a frozen image tower (loss='clip', lock_image=True)")
    return locked, views
