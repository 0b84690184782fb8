"""loss.py against independent references: Eq. 4 / Eq. 5 written out in float64 over the full
[B, k] cosine matrix, margin softmax cross-entropy, plain CLIP InfoNCE, and 2 gloo processes
against 1 process on the same global batch."""
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

from loss import PartialFC, clip_loss, shard_range

SCALE, MARGIN = 64.0, 0.3


# -----------------------------------------------------------------------------
# independent references

def ref_loss(emb, weight, labels, loss_type, scale=SCALE, margin=MARGIN):
    """Eq. 4 / Eq. 5 straight from the paper, float64, masks over the full [B, k] cosines."""
    e = emb / emb.norm(dim=1, keepdim=True)
    w = weight / weight.norm(dim=1, keepdim=True)
    cos = e @ w.t()
    B, k = cos.shape
    pos = torch.zeros(B, k, dtype=torch.bool)
    for n in range(B):
        for c in labels[n].tolist():
            if c >= 0:
                pos[n, c] = True
    theta = torch.acos(cos.clamp(-1, 1))
    # ArcFace margin; past theta + m = pi, insightface's monotonic continuation cos(theta) - m sin(m)
    s_pos = scale * torch.where(theta + margin <= math.pi, torch.cos(theta + margin),
                                cos - margin * math.sin(margin))
    s_neg = scale * cos
    P = torch.where(pos, torch.exp(-s_pos), 0.0).sum(1)  # sum_i exp(-s_i)
    N = torch.where(pos, 0.0, torch.exp(s_neg)).sum(1)   # sum_j exp(s_j)
    if loss_type == 'mlcd':
        per = torch.log(1 + P) + torch.log(1 + N)        # Eq. 5
    else:
        per = torch.log(1 + N * P)                       # Eq. 4
    return per.mean()


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


def close(a, b, rel):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-30)


# -----------------------------------------------------------------------------
# single process

@pytest.mark.parametrize('loss_type', ['mlcd', 'mlc'])
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
    with torch.no_grad():
        pfc.weight.copy_(weight)
    e1 = emb.clone().requires_grad_()
    loss = pfc(e1, labels)
    loss.backward()
    w2, e2 = weight.clone().requires_grad_(), emb.clone().requires_grad_()
    ref = ref_loss(e2, w2, labels, loss_type)
    ref.backward()
    assert pfc.index.tolist() == list(range(k))
    assert close(loss.detach(), ref.detach(), 1e-6)
    assert close(e1.grad, e2.grad, 1e-6)
    assert close(pfc.weight.grad, w2.grad, 1e-6)


@pytest.mark.parametrize('loss_type', ['mlcd', 'mlc'])
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
    ref = ref_loss(e2, w2, labels, loss_type)
    ref.backward()
    assert close(loss.detach().double(), ref.detach(), 1e-5)
    assert close(e1.grad.double(), e2.grad, 1e-4)
    assert close(pfc.weight.grad.double(), w2.grad, 1e-4)


def test_mlc_single_label_is_margin_softmax_cross_entropy():
    # Eq. 4 with l = 1: log(1 + sum_j e^{s_j} e^{-s_p}) = -log(e^{s_p} / (e^{s_p} + sum_j e^{s_j})),
    # the cross-entropy of a softmax over all k classes with the ArcFace margin on the target
    # (UNICOM); the "1 +" is the target's own term, nothing extra.
    g = torch.Generator().manual_seed(3)
    B, d, k = 16, 8, 30
    emb = torch.randn(B, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (B,), generator=g)
    pfc = PartialFC(d, k, sample_ratio=1.0, loss_type='mlc').double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
    onehot = F.one_hot(target, k).bool()
    logits = SCALE * torch.where(onehot, torch.cos(torch.acos(cos) + MARGIN), cos)
    ce = F.cross_entropy(logits, target)
    assert close(pfc(emb, target[:, None]).detach(), ce, 1e-9)


def test_extreme_cosines_give_finite_gradients():
    d, k = 8, 6
    pfc = PartialFC(d, k, sample_ratio=1.0)
    w = pfc.weight.detach()
    emb = torch.stack([w[0], -w[1], w[2], w[3]]).clone().requires_grad_()  # cos exactly +-1
    labels = torch.tensor([[0, -1], [1, 0], [-1, -1], [3, 3]])
    loss = pfc(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and torch.isfinite(pfc.weight.grad).all()


def test_stats():
    g = torch.Generator().manual_seed(5)
    B, d, k = 10, 8, 50
    pfc = PartialFC(d, k, sample_ratio=0.5)
    emb = torch.randn(B, d, generator=g)
    labels = make_labels(g, B, 4, k)
    pfc(emb, labels)
    idx = pfc.index
    cos = F.normalize(emb, dim=1) @ F.normalize(pfc.weight.detach()[idx], dim=1).t()
    pos = (labels[:, :, None] == idx[None, None, :]).any(1)  # [B, k_sampled]
    assert float(pfc.stats['pos_cos']) == pytest.approx(cos[pos].mean().item(), abs=1e-6)
    assert float(pfc.stats['neg_cos']) == pytest.approx(cos[~pos].mean().item(), abs=1e-6)


def test_sampler():
    k, ratio = 50, 0.2
    pfc = PartialFC(4, k, sample_ratio=ratio)
    labels = torch.tensor([[3, 7], [7, -1]])
    emb = torch.randn(2, 4)
    counts = torch.zeros(k)
    pfc.generator.manual_seed(0)
    for _ in range(2000):
        pfc(emb, labels)
        idx = pfc.index
        assert idx.numel() == math.ceil(ratio * k) and {3, 7} <= set(idx.tolist())
        assert (idx[1:] > idx[:-1]).all()  # sorted, no repeats
        counts[idx] += 1
    assert counts[3] == counts[7] == 2000
    neg = torch.cat([counts[:3], counts[4:7], counts[8:]])
    expected = 2000 * (math.ceil(ratio * k) - 2) / (k - 2)  # uniform over the 48 negatives
    assert ((neg - expected).abs() < 5 * math.sqrt(expected)).all()
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
    # more positives than ceil(ratio * k): positives only
    many = torch.arange(20).view(2, 10)
    pfc(torch.randn(2, 4), many)
    assert pfc.index.tolist() == list(range(20))
    # ceil(0.3 * 10) is 3, although 0.3 * 10 == 3.0000000000000004 in floating point
    ten = PartialFC(4, 10, sample_ratio=0.3)
    ten(emb, torch.tensor([[1], [-1]]))
    assert ten.index.numel() == 3 and 1 in ten.index.tolist()
    # ratio 1: every centre
    full = PartialFC(4, k, sample_ratio=1.0)
    full(emb, labels)
    assert full.index.tolist() == list(range(k))


def test_no_batch_by_k_tensor_when_sampling():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    MaxNumel.biggest = max(MaxNumel.biggest, t.numel())
            return out

    B, d, k = 256, 4, 100_000
    pfc = PartialFC(d, k, sample_ratio=0.01)
    emb = torch.randn(B, d, requires_grad=True)
    labels = torch.randint(0, k, (B, 8))
    with MaxNumel():
        pfc(emb, labels).backward()
    # biggest: [B, ~0.01 k + positives] cosines, far below [B, k] (weight and its grad: k * d)
    assert MaxNumel.biggest < B * k // 20


@pytest.mark.parametrize('loss_type', ['mlcd', 'mlc'])
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
    with pytest.raises(ValueError, match='labels'):
        pfc(torch.randn(2, 4), torch.tensor([[1], [10]]))
    with pytest.raises(ValueError, match='embeddings'):
        pfc(torch.randn(2, 5), torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match='index'):
        pfc(torch.randn(2, 4), torch.tensor([[1], [2]]), index=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match='loss_type'):
        PartialFC(4, 10, loss_type='arcface')


def test_shard_range():
    for k, world in [(11, 2), (10, 3), (1_000_000, 8), (5, 8)]:
        ranges = [shard_range(k, r, world) for r in range(world)]
        assert sum(n for _, n in ranges) == k and ranges[0][0] == 0
        for (s0, n0), (s1, _) in zip(ranges, ranges[1:]):
            assert s0 + n0 == s1
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


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
CASES = [  # k, l, sample_ratio, loss_type, where the labels live
    (11, 1, 1.0, 'mlcd', 'all'),
    (11, 8, 1.0, 'mlc', 'all'),
    (37, 8, 0.3, 'mlcd', 'all'),
    (37, 1, 0.3, 'mlc', 'all'),
    (37, 8, 0.3, 'mlcd', 'rank0'),  # rank 1 holds no positive of the batch
    (37, 8, 1.0, 'mlc', 'rank1'),   # rank 0 holds no positive of the batch
]


def case_data(i):
    k, l, ratio, loss_type, where = CASES[i]
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
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    torch.manual_seed(0)
    init = PartialFC(D, 37).weight.detach()
    results = []
    for i, (k, l, ratio, loss_type, _) in enumerate(CASES):
        x, weight, labels, backbone = case_data(i)
        model = DDP(backbone)
        pfc = PartialFC(D, k, sample_ratio=ratio, scale=SCALE, margin=MARGIN, loss_type=loss_type).double()
        with torch.no_grad():
            pfc.weight.copy_(weight[pfc.start:pfc.start + pfc.num_local])
        pfc.generator.manual_seed(10 * i + rank)
        loss = pfc(model(x[rows]), labels[rows])
        loss.backward()
        results.append(dict(loss=loss.item(), start=pfc.start, index=pfc.index + pfc.start,
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
    k, l, ratio, loss_type, where = CASES[i]
    r0, r1 = two_process_results[0]['cases'][i], two_process_results[1]['cases'][i]
    # the same sampled set: 1 process scores the union of what the 2 ranks sampled
    index = torch.cat([r0['index'], r1['index']])
    for r, res in enumerate((r0, r1)):
        start, n = shard_range(k, r, WORLD)
        assert res['start'] == start
        local = res['index'] - start
        assert local.numel() >= (n if ratio == 1 else math.ceil(ratio * n))
    if ratio < 1:
        assert index.numel() < k
    x, weight, labels, backbone = case_data(i)
    pfc = PartialFC(D, k, sample_ratio=ratio, scale=SCALE, margin=MARGIN, loss_type=loss_type).double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    loss = pfc(backbone(x), labels, index=index)
    loss.backward()
    if ratio == 1:  # and the paper's formula
        ref = ref_loss(backbone(x).detach(), weight, labels, loss_type)
        assert close(loss.detach(), ref, 1e-9)
    for res in (r0, r1):
        assert res['loss'] == pytest.approx(loss.item(), rel=1e-10)
        assert res['stats']['pos_cos'] == pytest.approx(float(pfc.stats['pos_cos']), rel=1e-9, abs=1e-12)
        assert res['stats']['neg_cos'] == pytest.approx(float(pfc.stats['neg_cos']), rel=1e-9, abs=1e-12)
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
