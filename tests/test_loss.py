"""loss.py against independent references: Eq. 4 / Eq. 5 written out in float64 over the full
[B, k] cosine matrix with explicit per-row negative masks, margin softmax cross-entropy, plain
CLIP InfoNCE, and 2 gloo processes against 1 process on the same global batch; forward and
backward of PartialFC run no op that would stall a GPU on a host sync."""
import faulthandler
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from contrastive import clip_loss
from loss import LOSSES, PartialFC, _CentreRows, init_centres, shard_range
from sync_count import count_syncs

SCALE, MARGIN = 64.0, 0.3


# -----------------------------------------------------------------------------
# independent references

def label_sets(labels):
    return [set(c for c in row.tolist() if c >= 0) for row in labels]


def neg_mask(labels, scored, k):
    """[B, k]: class c is a negative of row b iff c was scored and is not one of b's labels."""
    neg = torch.zeros(len(labels), k, dtype=torch.bool)
    for b, own in enumerate(label_sets(labels)):
        for c in set(scored) - own:
            neg[b, c] = True
    return neg


def ref_terms(labels, loss_type, drawn=None):
    """[row][term] -> the set of the term's positives: MLCD / MLC one term, the row's labels;
    onevision one term per drawn column (drawn [B, G]: columns of labels), its one label."""
    if loss_type != 'onevision':
        return [[own] for own in label_sets(labels)]
    return [[{c} if (c := int(labels[b, j])) >= 0 else set() for j in drawn[b].tolist()]
            for b in range(len(labels))]


def ref_loss(emb, weight, labels, loss_type, scored=None, drawn=None, scale=SCALE, margin=MARGIN):
    """The losses straight from their papers, float64, masks over the full [B, k] cosines. A row's
    terms (ref_terms) each have positives and negatives: the classes of scored[g] (default: all)
    less the term's positives. MLCD (Eq. 5) and MLC (Eq. 4) with the ArcFace margin; onevision:
    per term softmax cross-entropy with the CosFace margin (a term without a label adds 0). The
    mean over rows and terms."""
    e = emb / emb.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    cos = e @ w.t()
    B, k = cos.shape
    terms = ref_terms(labels, loss_type, drawn)
    G = len(terms[0])
    pos = torch.zeros(B, G, k, dtype=torch.bool)
    neg = torch.zeros(B, G, k, dtype=torch.bool)
    for n in range(B):
        for g, own in enumerate(terms[n]):
            pos[n, g, list(own)] = True
            neg[n, g, list(set(range(k) if scored is None else scored[g]) - own)] = True
    cos = cos[:, None, :]
    if loss_type == 'onevision':  # -log(e^{s_i} / (e^{s_i} + sum_j e^{s_j})), s_i = scale (cos - m)
        e_pos = torch.where(pos, torch.exp(scale * (cos - margin)), 0.0).sum(2)
        e_neg = torch.where(neg, torch.exp(scale * cos), 0.0).sum(2)
        has = pos.any(2)
        e_pos = torch.where(has, e_pos, 1.0)
        return torch.where(has, -torch.log(e_pos / (e_pos + e_neg)), 0.0).mean()
    theta = torch.acos(cos.clamp(-1, 1))
    # ArcFace margin; past theta + m = pi, insightface's monotonic continuation cos(theta) - m sin(m)
    s_pos = scale * torch.where(theta + margin <= math.pi, torch.cos(theta + margin),
                                cos - margin * math.sin(margin))
    s_neg = scale * cos
    P = torch.where(pos, torch.exp(-s_pos), 0.0).sum(2)  # sum_i exp(-s_i)
    N = torch.where(neg, torch.exp(s_neg), 0.0).sum(2)   # sum_j exp(s_j)
    if loss_type == 'mlcd':
        per = torch.log(1 + P) + torch.log(1 + N)        # Eq. 5
    else:
        per = torch.log(1 + N * P)                       # Eq. 4
    return per.mean()


def scored_set(pfc):
    """Per term, the local centres the last forward drew (S, or T with batch_positives_as_negatives)."""
    return [[c for c in row if c >= 0] for row in pfc.index.tolist()]


def ref_clip(img, txt, logit_scale):
    img = img / img.norm(dim=1, keepdim=True)
    txt = txt / txt.norm(dim=1, keepdim=True)
    logits = logit_scale * img @ txt.t()
    t = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t)) / 2


def make_labels(g, B, l, k, lo=0, hi=None, pad=True):
    hi = k if hi is None else hi
    labels = torch.randint(lo, hi, (B, l), generator=g)
    if l > 1:
        labels[0, 1] = labels[0, 0]  # a duplicated id counts once
        if pad:
            labels[1, l // 2:] = -1  # fewer than l labels
    return labels


def against_reference(pfc, emb, weight, labels, reference):
    """pfc's loss on (emb, labels) with centres `weight`, and reference(emb, weight), each
    backpropagated from its own leaf copies: (loss, emb leaf, reference loss, its emb and weight
    leaves); pfc.weight.grad holds the module's centre gradient."""
    with torch.no_grad():
        pfc.weight.copy_(weight)
    e1 = emb.clone().requires_grad_()
    loss = pfc(e1, labels)
    loss.backward()
    w2, e2 = weight.clone().requires_grad_(), emb.clone().requires_grad_()
    ref = reference(e2, w2)
    ref.backward()
    return loss, e1, ref, e2, w2


def close(a, b, rel):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-30)


# -----------------------------------------------------------------------------
# single process

@pytest.mark.parametrize('loss_type', LOSSES)
@pytest.mark.parametrize('l', [1, 8])
def test_matches_reference_float64(loss_type, l):
    g = torch.Generator().manual_seed(l)
    B, d, k = 12, 16, 40
    emb = torch.randn(B, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    labels = make_labels(g, B, l, k)
    labels[2] = -1  # a sample with no positives at all
    # theta + m > pi: the continuation cos(theta) - m sin(m)
    emb[3] = -weight[labels[3, 0]] + 0.01 * torch.randn(d, generator=g, dtype=torch.float64)
    pfc = PartialFC(d, k, sample_ratio=1.0, scale=SCALE, margin=MARGIN, loss_type=loss_type).double()
    loss, e1, ref, e2, w2 = against_reference(pfc, emb, weight, labels,
                                              lambda e, w: ref_loss(e, w, labels, loss_type, drawn=pfc.drawn))
    assert all(row == list(range(k)) for row in pfc.index.tolist())
    assert close(loss.detach(), ref.detach(), 1e-6)
    assert close(e1.grad, e2.grad, 1e-6)
    assert close(pfc.weight.grad, w2.grad, 1e-6)


@pytest.mark.parametrize('loss_type', LOSSES)
def test_float32_close_to_reference(loss_type):
    g = torch.Generator().manual_seed(7)
    B, d, k = 32, 32, 200
    emb, weight = torch.randn(B, d, generator=g), torch.randn(k, d, generator=g)
    labels = make_labels(g, B, 8, k)
    pfc = PartialFC(d, k, sample_ratio=1.0, loss_type=loss_type)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    e1 = emb.clone().requires_grad_()
    loss = pfc(e1, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    w2, e2 = weight.double().requires_grad_(), emb.double().requires_grad_()
    ref = ref_loss(e2, w2, labels, loss_type, drawn=pfc.drawn)
    ref.backward()
    assert close(loss.detach().double(), ref.detach(), 1e-5)
    assert close(e1.grad.double(), e2.grad, 1e-4)
    assert close(pfc.weight.grad.double(), w2.grad, 1e-4)


def single_label_case(seed, **kw):
    """16 rows of one label each over k = 30 centres, float64: (PartialFC with every centre
    scored, embeddings, targets, cosines [B, k])."""
    g = torch.Generator().manual_seed(seed)
    B, d, k = 16, 8, 30
    emb = torch.randn(B, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (B,), generator=g)
    pfc = PartialFC(d, k, sample_ratio=1.0, **kw).double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    return pfc, emb, target, F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()


def test_mlc_single_label_is_margin_softmax_cross_entropy():
    # Eq. 4 with l = 1: log(1 + sum_j e^{s_j} e^{-s_p}) = -log(e^{s_p} / (e^{s_p} + sum_j e^{s_j})),
    # the cross-entropy of a softmax over all k classes with the ArcFace margin on the target
    # (UNICOM); the "1 +" is the target's own term, nothing extra.
    pfc, emb, target, cos = single_label_case(3, loss_type='mlc')
    k = cos.shape[1]
    onehot = F.one_hot(target, k).bool()
    logits = SCALE * torch.where(onehot, torch.cos(torch.acos(cos) + MARGIN), cos)
    ce = F.cross_entropy(logits, target)
    assert close(pfc(emb, target[:, None]).detach(), ce, 1e-9)


def test_onevision_one_label_is_cosface_softmax_cross_entropy():
    # one draw of one label: the cross-entropy of a softmax over all k classes with the CosFace
    # margin on the target, s (cos - m), as F.cross_entropy computes it
    pfc, emb, target, cos = single_label_case(13, loss_type='onevision', draws=1, pool=1)
    k = cos.shape[1]
    logits = SCALE * (cos - MARGIN * F.one_hot(target, k).double())
    assert close(pfc(emb, target[:, None]).detach(), F.cross_entropy(logits, target), 1e-9)


def test_onevision_draws():
    # per row and step: `draws` distinct columns of its first `pool` labels, uniformly; a missing
    # label only when no other is left; the draw depends on draw_generator alone
    k, B, l = 50, 4, 12
    pfc = PartialFC(4, k, sample_ratio=0.2, loss_type='onevision', draws=3, pool=10)
    labels = torch.arange(B * l).view(B, l) % k
    labels[1, 2:] = -1  # 2 labels: drawn both, then a missing one
    emb = torch.randn(B, 4)
    counts = torch.zeros(B, l)
    for _ in range(3000):
        pfc(emb, labels)
        drawn = pfc.drawn
        assert drawn.shape == (B, 3) and (drawn < 10).all()
        assert all(len(set(row)) == 3 for row in drawn.tolist())
        assert set(drawn[1].tolist()) >= {0, 1}
        counts.scatter_add_(1, drawn, torch.ones(B, 3))
    expected = 3000 * 3 / 10
    others = counts[[0, 2, 3], :10]
    assert ((others - expected).abs() < 5 * math.sqrt(expected)).all() and counts[:, 10:].sum() == 0
    state = pfc.draw_generator.get_state()
    pfc(emb, labels)
    a = pfc.drawn.clone()
    pfc.draw_generator.set_state(state)
    pfc.generator.manual_seed(99)  # another draw of negatives, the same labels
    pfc(emb, labels)
    assert torch.equal(pfc.drawn, a)
    with pytest.raises(ValueError, match='draws'):
        PartialFC(4, k, loss_type='onevision', draws=4, pool=3)


def test_extreme_cosines_give_finite_gradients():
    d, k = 8, 6
    pfc = PartialFC(d, k, sample_ratio=1.0)
    w = pfc.weight.detach()
    emb = torch.stack([w[0], -w[1], w[2], w[3]]).clone().requires_grad_()  # cos exactly +-1
    labels = torch.tensor([[0, -1], [1, 0], [-1, -1], [3, 3]])
    loss = pfc(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and torch.isfinite(pfc.weight.grad).all()


@pytest.mark.parametrize('loss_type', LOSSES)
def test_non_finite_embeddings_give_a_nan_loss(loss_type):
    # a diverged tower must not read as a loss of 0 (the run would then go on and save it)
    torch.manual_seed(0)
    pfc = PartialFC(8, 20, sample_ratio=0.5, loss_type=loss_type)
    labels = torch.tensor([[0, 1], [2, -1], [3, 4]])
    for bad in (float('nan'), float('inf')):
        emb = torch.randn(3, 8)
        emb[1, 2] = bad
        assert torch.isnan(pfc(emb, labels)), bad
    emb = torch.full((3, 8), float('nan'))
    assert torch.isnan(pfc(emb, labels))


@pytest.mark.parametrize('old', [False, True])
@pytest.mark.parametrize('loss_type', LOSSES)
@pytest.mark.parametrize('B,l,k,ratio', [(12, 8, 200, 0.1), (4, 1, 200, 0.1), (12, 4, 40, 0.25)])
def test_sampled_matches_reference_float64(old, loss_type, B, l, k, ratio):
    # loss and gradients against Eq. 4 / 5 with explicit per-row negatives: the drawn set minus
    # the row's own labels. Default: S of round(r k) random centres, another row's positive is a
    # negative only if drawn. Old convention: T = every positive of the batch + random fill.
    g = torch.Generator().manual_seed(B * l + k)
    d = 16
    emb = torch.randn(B, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    labels = make_labels(g, B, l, k)
    pfc = PartialFC(d, k, sample_ratio=ratio, loss_type=loss_type,
                    batch_positives_as_negatives=old).double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    pfc.generator.manual_seed(B + l)
    e1 = emb.clone().requires_grad_()
    loss = pfc(e1, labels)
    loss.backward()
    terms = ref_terms(labels, loss_type, pfc.drawn)
    for g, drawn in enumerate(scored_set(pfc)):  # each term's own S
        positives = set().union(*(row[g] for row in terms))
        assert len(set(drawn)) == len(drawn)
        if old:
            assert positives <= set(drawn)
            assert len(drawn) == max(math.ceil(ratio * k), len(positives))
        else:
            assert len(drawn) == round(ratio * k)
            assert not positives <= set(drawn)  # some positives were not drawn: not negatives here
    positives = set().union(*(own for row in terms for own in row))
    w2, e2 = weight.clone().requires_grad_(), emb.clone().requires_grad_()
    ref = ref_loss(e2, w2, labels, loss_type, scored_set(pfc), pfc.drawn)
    ref.backward()
    assert close(loss.detach(), ref.detach(), 1e-9)
    assert close(e1.grad, e2.grad, 1e-8)
    assert close(pfc.weight.grad, w2.grad, 1e-8)
    # every positive got its gradient, drawn or not
    for c in positives:
        assert pfc.weight.grad[c].abs().max() > 0


@pytest.mark.parametrize('rows', [1, 5, 12])
def test_positives_in_chunks_match_reference_float64(rows):
    # the positives are scored `rows` rows of the batch at a time (12 = all at once), also in
    # backward: the same loss and gradients as Eq. 5 in float64, whatever the chunk
    g = torch.Generator().manual_seed(21)
    B, d, k, l = 12, 16, 60, 8
    emb = torch.randn(B, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    labels = make_labels(g, B, l, k)
    pfc = PartialFC(d, k, sample_ratio=0.2).double()
    pfc.positive_chunk = rows * l * d
    loss, e1, ref, e2, w2 = against_reference(
        pfc, emb, weight, labels,
        lambda e, w: ref_loss(e, w, labels, 'mlcd', scored_set(pfc)))
    assert close(loss.detach(), ref.detach(), 1e-9)
    assert close(e1.grad, e2.grad, 1e-8) and close(pfc.weight.grad, w2.grad, 1e-8)


def test_centre_rows_gradient_is_the_numerical_one():
    # _CentreRows' hand-written backward against finite differences (float64): cosines of each
    # row with its labels' centres, chunked, a centre used by several rows and one twice in a
    # row, plus the rows of S
    g = torch.Generator().manual_seed(22)
    B, d, n, l = 7, 5, 9, 3
    weight = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    e = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    lab = torch.randint(0, n, (B, l), generator=g)
    lab[0, 1] = lab[0, 0]
    index = torch.tensor([1, 4, 8])
    for rows in (1, 3, B):
        c, w_neg = _CentreRows.apply(weight, e, lab, index, rows)
        want = (weight[lab] * e[:, None]).sum(2) / weight[lab].norm(dim=2)
        assert close(c.detach(), want.detach(), 1e-12) and torch.equal(w_neg, weight[index])
        assert torch.autograd.gradcheck(lambda w, x: _CentreRows.apply(w, x, lab, index, rows),
                                        (weight, e))


class MaxNumel(TorchDispatchMode):
    """Records the element count of the biggest tensor any op makes while it is active."""
    biggest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                MaxNumel.biggest = max(MaxNumel.biggest, t.numel())
        return out


def test_no_global_positive_rows():
    # a rank keeps no [B l, d] copy of its centres (B: the global micro-batch): the positives are
    # scored a chunk at a time; the biggest tensor of forward + backward is B x d, the embeddings
    B, d, k, l = 256, 64, 200, 8
    pfc = PartialFC(d, k, sample_ratio=0.1)
    pfc.positive_chunk = 16 * l * d
    emb = torch.randn(B, d, requires_grad=True)
    with MaxNumel():
        pfc(emb, torch.randint(0, k, (B, l))).backward()
    assert MaxNumel.biggest == B * d < B * l * d // 4


def test_index_is_the_negative_set():
    # index= scores a given S; a row's label outside S is still its positive
    g = torch.Generator().manual_seed(4)
    B, d, k = 6, 8, 30
    emb = torch.randn(B, d, generator=g, dtype=torch.float64)
    labels = make_labels(g, B, 3, k)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    S = torch.tensor([0, 5, int(labels[3, 0]), 17, 29]).unique()
    assert not set().union(*label_sets(labels)) <= set(S.tolist())
    pfc = PartialFC(d, k, sample_ratio=0.5).double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    e1 = emb.clone().requires_grad_()
    loss = pfc(e1, labels, index=S)
    loss.backward()
    assert pfc.index.tolist() == [S.tolist()]
    w2, e2 = weight.clone().requires_grad_(), emb.clone().requires_grad_()
    ref = ref_loss(e2, w2, labels, 'mlcd', [S.tolist()])
    ref.backward()
    assert close(loss.detach(), ref.detach(), 1e-9)
    assert close(e1.grad, e2.grad, 1e-8) and close(pfc.weight.grad, w2.grad, 1e-8)


def test_negatives_per_row_are_S_minus_own_labels():
    # Centres orthonormal, embeddings orthogonal to all of them: every cosine is 0, so a row's
    # MLCD loss is log(1 + n_pos e^{sigma sin m}) + log(1 + #negatives), and #negatives can be read
    # back from it. It must be |S \ labels(b)| for every row, whatever the batch holds; S itself
    # depends only on the generator, not on the labels.
    k, r, scale = 60, 0.25, 1.0
    d = k + 1
    g = torch.Generator().manual_seed(8)
    B, l = 16, 8
    labels = torch.randint(0, 30, (B, l), generator=g)  # many positives shared between rows
    labels[3, 4:] = -1
    e = torch.zeros(B, d, dtype=torch.float64)
    e[:, k] = 1.0
    pfc = PartialFC(d, k, sample_ratio=r, scale=scale, loss_type='mlcd').double()
    with torch.no_grad():
        pfc.weight.copy_(torch.eye(k, d, dtype=torch.float64))
    state = pfc.generator.get_state()
    pfc(e, labels)
    S = set(scored_set(pfc)[0])
    assert len(S) == round(r * k)
    counts = []
    for b in range(B):
        pfc.generator.set_state(state)
        loss = pfc(e[b:b + 1], labels[b:b + 1]).item()
        assert set(scored_set(pfc)[0]) == S
        own = label_sets(labels[b:b + 1])[0]
        got = math.expm1(loss - math.log1p(len(own) * math.exp(scale * math.sin(MARGIN))))
        counts.append(len(S - own))
        assert abs(got - counts[-1]) < 1e-9
    # the batch's mean, and the old convention, where every positive of the batch is scored
    pfc.generator.set_state(state)
    pfc(e, labels)
    assert float(pfc.stats['num_neg']) == pytest.approx(sum(counts) / B)
    old = PartialFC(d, k, sample_ratio=r, batch_positives_as_negatives=True).double()
    old(e, labels)
    T = set(scored_set(old)[0])
    assert set().union(*label_sets(labels)) <= T
    old_counts = [len(T - own) for own in label_sets(labels)]
    assert float(old.stats['num_neg']) == pytest.approx(sum(old_counts) / B)


@pytest.mark.parametrize('old', [False, True])
def test_stats(old):
    g = torch.Generator().manual_seed(5)
    B, d, k = 10, 8, 50
    pfc = PartialFC(d, k, sample_ratio=0.3, batch_positives_as_negatives=old)
    emb = torch.randn(B, d, generator=g)
    labels = make_labels(g, B, 4, k)
    pfc(emb, labels)
    cos = F.normalize(emb, dim=1) @ F.normalize(pfc.weight.detach(), dim=1).t()  # [B, k]
    pos = ~neg_mask(labels, range(k), k)
    neg = neg_mask(labels, scored_set(pfc)[0], k)
    assert all(v.dim() == 0 for v in pfc.stats.values())
    assert float(pfc.stats['pos_cos']) == pytest.approx(cos[pos].mean().item(), abs=1e-6)
    assert float(pfc.stats['neg_cos']) == pytest.approx(cos[neg].mean().item(), abs=1e-6)
    assert float(pfc.stats['num_neg']) == pytest.approx(neg.sum().item() / B)


def test_sampler():
    k, ratio = 50, 0.2
    pfc = PartialFC(4, k, sample_ratio=ratio)
    labels = torch.tensor([[3, 7], [7, -1]])
    emb = torch.randn(2, 4)
    counts = torch.zeros(k)
    pfc.generator.manual_seed(0)
    for _ in range(2000):
        pfc(emb, labels)
        idx = pfc.index[0]
        assert idx.numel() == round(ratio * k)
        assert (idx[1:] > idx[:-1]).all()  # sorted, no repeats
        counts[idx] += 1
    expected = 2000 * ratio  # uniform over all 50 centres, positives included
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()
    # S depends on the generator only: other labels, the same draw
    pfc.generator.manual_seed(5)
    pfc(emb, labels)
    a = pfc.index.clone()
    pfc.generator.manual_seed(5)
    pfc(torch.randn(3, 4), torch.arange(30).view(3, 10))
    assert torch.equal(pfc.index, a)
    # seeded generator: the same draws again; its state can be saved and restored
    pfc.generator.manual_seed(123)
    pfc(emb, labels)
    a = pfc.index.clone()
    state = pfc.generator.get_state()
    pfc(emb, labels)
    b = pfc.index.clone()
    pfc.generator.set_state(state)
    pfc(emb, labels)
    assert torch.equal(pfc.index, b) and not torch.equal(a, b)
    pfc.generator.manual_seed(123)
    pfc(emb, labels)
    assert torch.equal(pfc.index, a)
    # round(r n): 0.3 * 10 is 3.0000000000000004 in floating point; at least one centre
    assert PartialFC(4, 10, sample_ratio=0.3).sample().numel() == 3
    assert PartialFC(4, 10, sample_ratio=0.01).sample().numel() == 1
    # ratio 1: every centre
    full = PartialFC(4, k, sample_ratio=1.0)
    full(emb, labels)
    assert full.index.tolist() == [list(range(k))]


def test_sampler_with_batch_positives():
    # the old convention: every positive of the batch, filled up to ceil(r k) with random centres
    k, ratio = 50, 0.2
    pfc = PartialFC(4, k, sample_ratio=ratio, batch_positives_as_negatives=True)
    labels = torch.tensor([[3, 7], [7, -1]])
    emb = torch.randn(2, 4)
    counts = torch.zeros(k)
    pfc.generator.manual_seed(0)
    for _ in range(2000):
        pfc(emb, labels)
        T = scored_set(pfc)[0]
        assert len(T) == math.ceil(ratio * k) and {3, 7} <= set(T) and len(set(T)) == len(T)
        counts[T] += 1
    assert counts[3] == counts[7] == 2000
    neg = torch.cat([counts[:3], counts[4:7], counts[8:]])
    expected = 2000 * (math.ceil(ratio * k) - 2) / (k - 2)  # uniform over the 48 others
    assert ((neg - expected).abs() < 5 * math.sqrt(expected)).all()
    # more positives than ceil(ratio * k): positives only
    many = torch.arange(20).view(2, 10)
    pfc(torch.randn(2, 4), many)
    assert sorted(scored_set(pfc)[0]) == list(range(20))
    # ceil(0.3 * 10) is 3, although 0.3 * 10 == 3.0000000000000004 in floating point
    ten = PartialFC(4, 10, sample_ratio=0.3, batch_positives_as_negatives=True)
    ten(emb, torch.tensor([[1], [-1]]))
    assert len(scored_set(ten)[0]) == 3 and 1 in scored_set(ten)[0]


def test_sync_counter_sees_syncs():
    # the counter itself: each of these would make the host wait for a GPU
    x, m, i = torch.randn(6), torch.rand(6) > 0.5, torch.tensor([1, 2])
    for f, name in [(lambda: x.sum().item(), '_local_scalar_dense'), (lambda: bool(m.any()), '_local'),
                    (lambda: x[m], 'index'), (lambda: x.masked_fill(m, 0).tolist(), 'tolist'),
                    (lambda: i.unique(), 'unique'), (lambda: m.nonzero(), 'nonzero'),
                    (lambda: torch.repeat_interleave(i, i), 'repeat_interleave'),
                    (lambda: PartialFC(4, 10).check_labels(i[None]), '_local_scalar_dense')]:
        with count_syncs() as syncs:
            f()
        assert any(name in op for op in syncs), (name, syncs)
    with count_syncs() as syncs:  # and not these
        x[i], x.masked_fill(m, 0), torch.repeat_interleave(i, i, output_size=3), x.topk(3)
    assert not syncs, syncs

    class ItemInBackward(torch.autograd.Function):  # and it sees the backward pass
        forward = staticmethod(lambda ctx, t: t.clone())
        backward = staticmethod(lambda ctx, grad: grad * (grad.sum().item() != 0))

    x.requires_grad_()
    with count_syncs() as syncs:
        ItemInBackward.apply(x).sum().backward()
    assert syncs == {'aten._local_scalar_dense.default': 1}, syncs


@pytest.mark.parametrize('old', [False, True])
@pytest.mark.parametrize('ratio', [0.3, 1.0])
@pytest.mark.parametrize('loss_type', LOSSES)
def test_no_host_sync(old, ratio, loss_type):
    # forward + backward of PartialFC: nothing that reads a device value on the host (the
    # positives in chunks of 4 rows: 2 chunks)
    g = torch.Generator().manual_seed(9)
    pfc = PartialFC(8, 40, sample_ratio=ratio, loss_type=loss_type, batch_positives_as_negatives=old)
    pfc.positive_chunk = 4 * 4 * 8
    emb = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = make_labels(g, 6, 4, 40)
    with count_syncs() as syncs:
        loss = pfc(emb, labels)
        loss.backward()
    assert not syncs, syncs
    assert torch.isfinite(loss) and emb.grad.abs().max() > 0


def test_no_batch_by_k_tensor_when_sampling():
    B, d, k = 256, 4, 100_000
    for old in (False, True):
        pfc = PartialFC(d, k, sample_ratio=0.01, batch_positives_as_negatives=old)
        emb = torch.randn(B, d, requires_grad=True)
        labels = torch.randint(0, k, (B, 8))
        MaxNumel.biggest = 0
        with MaxNumel():
            pfc(emb, labels).backward()
        # biggest: [B, 0.01 k (+ B l candidates when old)] cosines, far below [B, k]
        assert MaxNumel.biggest < B * k // 20


@pytest.mark.parametrize('loss_type', LOSSES)
@pytest.mark.parametrize('regime', ['start', 'trained'])
def test_bf16_autocast_close_to_fp32(loss_type, regime):
    # Stated tolerance. bf16 keeps 8 significant bits, so the cosines of the bf16 matmul differ by
    # up to ~2^-8 and the logits (scale 64) by up to ~0.25. Both losses are sums of two functions
    # that are 1-Lipschitz in the max-norm of the logits, so |L_bf16 - L_fp32| <= 2 scale max|dcos|,
    # in every regime. At the start of training (random centres, loss ~ 30-50) that is 1e-3
    # relative, gradients within cosine 0.999; near convergence (loss << 1) only the absolute bound
    # holds (a 0.1 logit error is a 10 % relative error of a loss of 1e-3).
    g = torch.Generator().manual_seed(11)
    B, d, k, l = 64, 64, 2000, 8
    weight = torch.randn(k, d, generator=g)
    labels = make_labels(g, B, l, k)
    if regime == 'start':
        emb = torch.randn(B, d, generator=g)
    else:  # one positive per row, each row close to it (MLC loss ~1e-13)
        labels = labels[:, :1]
        emb = F.normalize(weight[labels[:, 0]], dim=1) + 0.05 * torch.randn(B, d, generator=g)
    out = {}
    for name, enabled in [('fp32', False), ('bf16', True)]:
        pfc = PartialFC(d, k, sample_ratio=1.0, loss_type=loss_type)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        e = emb.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=enabled):
            loss = pfc(e, labels)
            cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
        loss.backward()
        out[name] = (loss.detach(), e.grad, pfc.weight.grad, cos.float())
    (l32, e32, w32, c32), (l16, e16, w16, c16) = out['fp32'], out['bf16']
    assert l16.dtype == torch.float32 and w16.dtype == torch.float32
    dcos = (c16 - c32).abs().max()
    assert 0 < dcos < 2 ** -7  # the matmul really ran in bf16
    assert l16 != l32 and abs(l16 - l32) <= 2 * SCALE * dcos
    if regime == 'start':
        assert abs(l16 - l32) / l32 < 1e-3
        assert F.cosine_similarity(e16.flatten(), e32.flatten(), dim=0) > 0.999
        assert F.cosine_similarity(w16.flatten(), w32.flatten(), dim=0) > 0.999


def test_bad_input():
    pfc = PartialFC(4, 10, sample_ratio=1.0)
    # label values are checked on request only (the check reads them on the host)
    for bad in ([[1], [10]], [[-2], [3]]):
        with pytest.raises(ValueError, match=r'labels must be in \[-1, 10\)'):
            pfc.check_labels(torch.tensor(bad))
    pfc.check_labels(torch.tensor([[-1, 0], [9, 9]]))
    with pytest.raises(ValueError, match='embeddings'):
        pfc(torch.randn(2, 5), torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match='labels must be'):
        pfc(torch.randn(2, 4), torch.tensor([[1], [2], [3]]))
    with pytest.raises(ValueError, match='index'):
        pfc(torch.randn(2, 4), torch.tensor([[1], [2]]), index=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match='loss_type'):
        PartialFC(4, 10, loss_type='arcface')
    with pytest.raises(ValueError, match='sample_ratio'):
        PartialFC(4, 10, sample_ratio=0.0)


def test_shard_range():
    for k, world in [(11, 2), (10, 3), (1_000_000, 8), (5, 8)]:
        ranges = [shard_range(k, r, world) for r in range(world)]
        assert sum(n for _, n in ranges) == k and ranges[0][0] == 0
        for (s0, n0), (s1, _) in zip(ranges, ranges[1:]):
            assert s0 + n0 == s1
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


def reference_centres(k, d, seed, block=4096):
    """The k x d initial centres as train.py drew them before init_centres moved to loss.py: row i
    is row i % block of randn(block, d) from a generator seeded (seed * 1_000_003 + i // block),
    times 0.01."""
    blocks = [torch.randn(block, d, generator=torch.Generator().manual_seed(seed * 1_000_003 + b))
              for b in range(-(-k // block))]
    return torch.cat(blocks)[:k] * 0.01


def test_init_centres_same_matrix_on_any_number_of_ranks():
    k, d = 9000, 5  # three blocks of 4096, the last one partial
    ref = reference_centres(k, d, seed=1337)
    for world in (1, 2, 3, 7):
        shards = [init_centres(*shard_range(k, r, world), d, 1337) for r in range(world)]
        assert torch.equal(torch.cat(shards), ref), world
    assert torch.equal(PartialFC(d, k, seed=1337).weight.data, ref)
    assert not torch.equal(init_centres(0, k, d, 1338), ref)
    torch.manual_seed(0)
    a = PartialFC(d, 100).weight.data  # no seed: one drawn from torch's RNG
    torch.manual_seed(0)
    assert torch.equal(PartialFC(d, 100).weight.data, a) and a.std() == pytest.approx(0.01, rel=0.1)


def test_clip_single_process():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    got = clip_loss(img, txt, scale)
    got.backward()
    grads = [img.grad, txt.grad, scale.grad]
    img2, txt2, scale2 = [t.detach().clone().requires_grad_() for t in (img, txt, scale)]
    ref = ref_clip(img2, txt2, scale2)
    ref.backward()
    assert close(got.detach(), ref.detach(), 1e-6)
    for a, b in zip(grads, [img2.grad, txt2.grad, scale2.grad]):
        assert close(a, b, 1e-6)


# -----------------------------------------------------------------------------
# 2 processes (gloo, CPU) against 1 process on the same global batch

WORLD, B_LOCAL, D_IN, D = 2, 4, 6, 5
CONFIGS = [  # k, l, sample_ratio, where the labels live, batch_positives_as_negatives
    (11, 1, 1.0, 'all', False),
    (11, 8, 1.0, 'all', False),
    (37, 8, 0.3, 'all', False),
    (37, 1, 0.3, 'all', False),
    (37, 8, 0.3, 'rank0', False),  # rank 1 holds no positive of the batch
    (37, 8, 1.0, 'rank1', False),  # rank 0 holds no positive of the batch
    (37, 8, 0.3, 'all', True),
    (37, 1, 0.3, 'rank0', True),
]
CASES = [(k, l, ratio, loss_type, where, old) for k, l, ratio, where, old in CONFIGS for loss_type in LOSSES]


def case_data(i):
    k, l, ratio, loss_type, where, _ = CASES[i]
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)
    weight = torch.randn(k, D, generator=g, dtype=torch.float64)
    s1 = shard_range(k, 1, WORLD)[0]
    lo, hi = {'all': (0, k), 'rank0': (0, s1), 'rank1': (s1, k)}[where]
    labels = make_labels(g, WORLD * B_LOCAL, l, k, lo, hi)
    torch.manual_seed(200 + i)
    backbone = nn.Linear(D_IN, D).double()
    return x, weight, labels, backbone


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = nn.Linear(D_IN, D), nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, a, b):
        return self.img(a), self.txt(b), self.logit_scale.exp()


def clip_data():
    g = torch.Generator().manual_seed(300)
    a = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)
    b = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)
    torch.manual_seed(301)
    return a, b, TwoTowers().double()


def _worker(rank, port, out_dir):
    faulthandler.enable()  # a rank killed by a signal (SIGABRT) leaves its threads' stacks in stderr
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    torch.manual_seed(0)
    init = PartialFC(D, 37).weight.detach()
    results = []
    for i, (k, l, ratio, loss_type, _, old) in enumerate(CASES):
        x, weight, labels, backbone = case_data(i)
        model = DDP(backbone)
        pfc = PartialFC(D, k, sample_ratio=ratio, scale=SCALE, margin=MARGIN, loss_type=loss_type,
                        batch_positives_as_negatives=old).double()
        with torch.no_grad():
            pfc.weight.copy_(weight[pfc.start:pfc.start + pfc.num_local])
        pfc.generator.manual_seed(10 * i + rank)
        pfc.draw_generator.manual_seed(i)  # the same on every rank
        pfc.positive_chunk = 3 * l * D  # the positives 3 rows at a time; 1 process: all at once
        with count_syncs() as syncs:  # collectives, but nothing that waits on a device value
            loss = pfc(model(x[rows]), labels[rows])
            loss.backward()
        drawn = [torch.tensor(row, dtype=torch.long) + pfc.start for row in scored_set(pfc)]
        results.append(dict(loss=loss.item(), start=pfc.start, index=drawn, syncs=dict(syncs), drawn=pfc.drawn,
                            centre_grad=pfc.weight.grad, stats={k: float(v) for k, v in pfc.stats.items()},
                            backbone_grad=[p.grad for p in backbone.parameters()]))
    a, b, towers = clip_data()
    model = DDP(towers)
    loss = clip_loss(*model(a[rows], b[rows]))
    loss.backward()
    clip = dict(loss=loss.item(), grads=[p.grad for p in towers.parameters()])
    torch.save(dict(cases=results, clip=clip, init=init), os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_process_results():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(port, tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f'rank{r}.pt'), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize('i', range(len(CASES)))
def test_partialfc_two_processes_equal_one(two_process_results, i):
    k, l, ratio, loss_type, where, old = CASES[i]
    r0, r1 = two_process_results[0]['cases'][i], two_process_results[1]['cases'][i]
    x, weight, labels, backbone = case_data(i)
    if loss_type == 'onevision':  # one draw of the global batch, the same on both ranks
        assert torch.equal(r0['drawn'], r1['drawn'])
    terms = ref_terms(labels, loss_type, r0['drawn'])
    for r, res in enumerate((r0, r1)):
        start, n = shard_range(k, r, WORLD)
        assert res['start'] == start and not res['syncs'], res['syncs']
        for g, drawn in enumerate(res['index']):  # each term's own S
            local = set((drawn - start).tolist())
            if old:  # every local positive of the term in the batch, filled up to ceil(r n)
                own = set(c - start for row in terms for c in row[g] if start <= c < start + n)
                assert own <= local and len(local) == max(math.ceil(ratio * n), len(own))
            else:
                assert len(local) == round(ratio * n)
    # the same sampled sets: 1 process scores the union of what the 2 ranks sampled, per term
    sets = [torch.cat([a, b]) for a, b in zip(r0['index'], r1['index'])]
    index = torch.full((len(sets), max(len(t) for t in sets)), -1)
    for g, t in enumerate(sets):
        index[g, :len(t)] = t
    if ratio < 1:
        assert all(len(t) < k for t in sets)
    pfc = PartialFC(D, k, sample_ratio=ratio, scale=SCALE, margin=MARGIN, loss_type=loss_type,
                    batch_positives_as_negatives=old).double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    pfc.draw_generator.manual_seed(i)
    loss = pfc(backbone(x), labels, index=index)
    loss.backward()
    if loss_type == 'onevision':
        assert torch.equal(pfc.drawn, r0['drawn'])
    # and the formula written from the paper with those sets (r = 1: every other class is a negative)
    ref = ref_loss(backbone(x).detach(), weight, labels, loss_type,
                   None if ratio == 1 else [t.tolist() for t in sets], r0['drawn'])
    assert close(loss.detach(), ref, 1e-9)
    for res in (r0, r1):
        assert res['loss'] == pytest.approx(loss.item(), rel=1e-10)
        assert res['stats']['pos_cos'] == pytest.approx(float(pfc.stats['pos_cos']), rel=1e-9, abs=1e-12)
        assert res['stats']['neg_cos'] == pytest.approx(float(pfc.stats['neg_cos']), rel=1e-9, abs=1e-12)
        assert res['stats']['num_neg'] == pytest.approx(float(pfc.stats['num_neg']), rel=1e-12)
        for got, want in zip(res['backbone_grad'], [p.grad for p in backbone.parameters()]):
            assert close(got, want, 1e-9)
        start = res['start']
        assert close(res['centre_grad'], pfc.weight.grad[start:start + res['centre_grad'].shape[0]], 1e-9)
    if where != 'all':  # the rank without positives still shaped the loss through its negatives
        empty = r1 if where == 'rank0' else r0
        assert empty['centre_grad'].abs().max() > 0


def test_clip_two_processes_equal_one(two_process_results):
    a, b, towers = clip_data()
    ref = ref_clip(*towers(a, b))
    ref.backward()
    for res in (two_process_results[0]['clip'], two_process_results[1]['clip']):
        assert res['loss'] == pytest.approx(ref.item(), rel=1e-10)
        for got, p in zip(res['grads'], towers.parameters()):
            assert close(got, p.grad, 1e-9)


def test_centre_init_independent_of_world_size(two_process_results):
    # same global seed: the 2 shards are the two halves of the 1-process centres, all distinct
    torch.manual_seed(0)
    full = PartialFC(D, 37).weight.detach()
    shards = [res['init'] for res in two_process_results]
    assert [s.shape[0] for s in shards] == [19, 18]
    assert torch.equal(torch.cat(shards), full)
    assert 0.005 < full.std() < 0.02 and torch.cdist(full, full).add(torch.eye(37)).min() > 0


def test_positive_logit_keeps_falling_past_pi_minus_margin():
    # Saturating cos(theta + m) at cos(pi) = -1 is flat for theta > pi - m: no gradient pulls such
    # a sample back, and true-label training with 10 classes collapsed there (every embedding
    # opposite every centre). With the continuation the loss keeps rising with theta up to pi.
    d = 3
    pfc = PartialFC(d, 2, sample_ratio=1.0, loss_type='mlcd').double()
    with torch.no_grad():
        pfc.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64))
    theta = torch.linspace(math.pi / 2, math.pi, 200, dtype=torch.float64)  # loss well above eps
    emb = torch.stack([theta.cos(), theta.sin(), 0 * theta], 1)
    with torch.no_grad():
        losses = torch.stack([pfc(emb[n:n + 1], torch.zeros(1, 1, dtype=torch.long)) for n in range(200)])
    assert (losses.diff() > 0).all()  # strictly increasing in theta, also past pi - m
