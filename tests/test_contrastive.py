"""The instance discrimination losses of contrastive.py (UniCLIP's MP-NCE with domain dependent
similarity, SimCLR's NT-Xent) and model.AugAwareVision, against float64 references written from
the formulas with loops over every pair, against clip_loss, and 2 gloo processes against 1."""
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
from torch.nn.parallel import DistributedDataParallel as DDP

from contrastive import IMAGE, TEXT, DomainSimilarity, clip_loss, mp_nce_loss, multiview_rows, simclr_loss
from model import AugAwareVision, VisionTransformer

# -----------------------------------------------------------------------------
# independent references: one logit at a time, one term at a time


def ref_mp_nce(emb, domain, owner, scale, offset=None, pairs=None, other_pos_in_denominator=False):
    """mean over anchors with a positive of 1/|P| sum_p -log(e^s_ap / (e^s_ap + sum_n e^s_an)).
    other_pos_in_denominator=True: the SupCon-style variant that MP-NCE is NOT."""
    z = emb / emb.norm(dim=1, keepdim=True)
    dom, own = domain.tolist(), owner.tolist()
    N = len(dom)

    def s(i, j):
        t = scale[dom[i], dom[j]] if torch.is_tensor(scale) and scale.dim() else scale
        v = t * torch.dot(z[i], z[j])
        return v if offset is None else v + offset[dom[i], dom[j]]

    per_anchor = []
    for a in range(N):
        cols = [j for j in range(N) if j != a and (pairs is None or pairs[dom[a]][dom[j]])]
        P = [j for j in cols if own[j] == own[a]]
        Neg = [j for j in cols if own[j] != own[a]]
        if not P:
            continue
        terms = []
        for p in P:
            den = torch.exp(s(a, p)) + sum(torch.exp(s(a, n)) for n in Neg)
            if other_pos_in_denominator:
                den = den + sum(torch.exp(s(a, q)) for q in P if q != p)
            terms.append(-torch.log(torch.exp(s(a, p)) / den))
        per_anchor.append(torch.stack(terms).mean())
    return torch.stack(per_anchor).mean()


def ref_nt_xent(v1, v2, t):
    """SimCLR: 2b views; anchor k, positive its pair, denominator every view but k."""
    z = torch.cat([v1, v2])
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], v1.shape[0]
    losses = []
    for k in range(n):
        p = (k + b) % n
        den = sum(torch.exp(t * torch.dot(z[k], z[j])) for j in range(n) if j != k)
        losses.append(-torch.log(torch.exp(t * torch.dot(z[k], z[p])) / den))
    return torch.stack(losses).mean()


def close(a, b, rel):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-30)


def leaf(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def sims(init, **kw):
    """Two identical DomainSimilarity modules in float64 with distinct scales and offsets."""
    out = []
    for _ in range(2):
        sim = DomainSimilarity(**kw).double()
        with torch.no_grad():
            sim.log_scale.copy_(torch.tensor(init[:sim.log_scale.numel()], dtype=torch.float64).log())
            if sim.offset is not None:
                sim.offset.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        out.append(sim)
    return out


# -----------------------------------------------------------------------------
# MP-NCE against the reference

CASES = {  # name: (views V, captions T, b, DomainSimilarity settings)
    'views2+text, domain similarity': (2, 1, 5, dict(per_domain=True, offsets=True)),
    'views2+text, scales only': (2, 1, 4, dict(per_domain=True, offsets=False)),
    'views3, one scale': (3, 0, 4, dict(per_domain=False, offsets=False)),
    'views2+2 captions, domain similarity': (2, 2, 3, dict(per_domain=True, offsets=True)),
}


@pytest.mark.parametrize('name', list(CASES))
def test_mp_nce_matches_reference(name):
    V, T, b, kw = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    img, txt = leaf(torch.randn(V, b, 6, generator=g, dtype=torch.float64),
                    torch.randn(T, b, 6, generator=g, dtype=torch.float64))
    sim, sim2 = sims([9.0, 14.0, 20.0], **kw)
    got = mp_nce_loss(*multiview_rows(img, txt if T else None), *sim())
    got.backward()
    img2, txt2 = leaf(img, txt)
    emb, domain, owner = multiview_rows(img2, txt2 if T else None)
    assert domain.tolist() == [IMAGE] * V * b + [TEXT] * T * b
    assert owner.tolist() == list(range(b)) * (V + T)
    ref = ref_mp_nce(emb, domain, owner, *sim2())
    ref.backward()
    assert close(got.detach(), ref.detach(), 1e-12)
    pairs = [(img.grad, img2.grad), (sim.log_scale.grad, sim2.log_scale.grad)]
    if T:
        pairs.append((txt.grad, txt2.grad))
    if sim.offset is not None:
        pairs.append((sim.offset.grad, sim2.offset.grad))
    for a, r in pairs:
        assert close(a, r, 1e-9)


def test_irregular_owners_pairs_mask_and_skipped_anchors():
    # any grouping: groups of 1 (an anchor without a positive: skipped), 2, 3 and 4 rows, mixed
    # domains, and a pairs mask that drops text-text comparisons
    g = torch.Generator().manual_seed(7)
    owner = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5])
    domain = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0])
    emb, = leaf(torch.randn(13, 5, generator=g, dtype=torch.float64))
    scale = torch.tensor([[10.0, 16.0], [16.0, 7.0]], dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([[0.0, -0.4], [-0.4, 0.6]], dtype=torch.float64, requires_grad=True)
    pairs = [[True, True], [True, False]]
    got = mp_nce_loss(emb, domain, owner, scale, offset, pairs)
    got.backward()
    emb2, scale2, offset2 = leaf(emb, scale, offset)
    ref = ref_mp_nce(emb2, domain, owner, scale2, offset2, pairs)
    ref.backward()
    assert close(got.detach(), ref.detach(), 1e-12)
    for a, r in [(emb.grad, emb2.grad), (scale.grad, scale2.grad), (offset.grad, offset2.grad)]:
        assert close(a, r, 1e-9)
    # the pairs mask matters here (without it rows 4 and 5 are each other's positives)
    assert abs(mp_nce_loss(emb, domain, owner, scale, offset).item() - got.item()) > 1e-3


def test_other_positives_are_not_in_the_denominator():
    # 3 views: every anchor has 2 positives; views of one image close together, so the other
    # positive would weigh heavily in a denominator that included it
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    views = base + 0.3 * torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    emb, domain, owner = multiview_rows(views)
    got = mp_nce_loss(emb, domain, owner, 12.0)
    mp = ref_mp_nce(emb, domain, owner, 12.0)
    supcon = ref_mp_nce(emb, domain, owner, 12.0, other_pos_in_denominator=True)
    assert got.item() == pytest.approx(mp.item(), rel=1e-10)
    assert supcon.item() - got.item() > 0.1  # the excluded terms are not negligible here


def test_one_positive_image_text_is_clip_loss():
    # one view, one caption, images scored only against texts: MP-NCE is CLIP's symmetric InfoNCE
    g = torch.Generator().manual_seed(4)
    img, txt = leaf(torch.randn(7, 6, generator=g, dtype=torch.float64),
                    torch.randn(7, 6, generator=g, dtype=torch.float64))
    scale, = leaf(torch.tensor(13.0, dtype=torch.float64))
    got = mp_nce_loss(*multiview_rows(img[None], txt), scale, pairs=[[False, True], [True, False]])
    got.backward()
    img2, txt2, scale2 = leaf(img, txt, scale)
    ref = clip_loss(img2, txt2, scale2)
    ref.backward()
    assert close(got.detach(), ref.detach(), 1e-12)
    for a, r in [(img.grad, img2.grad), (txt.grad, txt2.grad), (scale.grad, scale2.grad)]:
        assert close(a, r, 1e-10)
    # in UniCLIP's universal space the other images and texts are negatives too: not CLIP
    both = mp_nce_loss(*multiview_rows(img[None], txt), scale).item()
    assert both - got.item() > 0.1


def test_simclr_is_nt_xent_and_equals_mp_nce_with_two_views():
    # one positive per anchor and one shared scale: MP-NCE's denominator is e^s_ap plus every
    # negative, i.e. every other row, which is NT-Xent's: the two are the same loss
    g = torch.Generator().manual_seed(5)
    views, = leaf(torch.randn(2, 6, 8, generator=g, dtype=torch.float64))
    scale, = leaf(torch.tensor(10.0, dtype=torch.float64))
    got = simclr_loss(views, scale)
    got.backward()
    views2, scale2 = leaf(views, scale)
    ref = ref_nt_xent(views2[0], views2[1], scale2)
    ref.backward()
    assert close(got.detach(), ref.detach(), 1e-12)
    assert close(views.grad, views2.grad, 1e-10) and close(scale.grad, scale2.grad, 1e-10)
    views3, scale3 = leaf(views, scale)
    mp = mp_nce_loss(*multiview_rows(views3), scale3)
    mp.backward()
    assert close(mp.detach(), got.detach(), 1e-12)
    assert close(views3.grad, views.grad, 1e-10) and close(scale3.grad, scale.grad, 1e-10)


def test_domain_scales_and_offsets_get_gradients():
    g = torch.Generator().manual_seed(6)
    img = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    txt = torch.randn(6, 8, generator=g, dtype=torch.float64)
    sim = sims([9.0, 14.0, 20.0], per_domain=True, offsets=True)[0]
    rows = multiview_rows(img, txt)
    loss = mp_nce_loss(*rows, *sim())
    loss.backward()
    # every domain pair (text-text too: captions of other samples are negatives) learns
    assert (sim.log_scale.grad.abs() > 1e-6).all() and (sim.offset.grad.abs() > 1e-6).all()
    # a common shift of the three offsets moves each anchor's logits together: no effect
    assert abs(sim.offset.grad.sum().item()) < 1e-12
    with torch.no_grad():
        sim.offset += 0.7
    assert mp_nce_loss(*rows, *sim()).item() == pytest.approx(loss.item(), rel=1e-10)


def test_switches():
    shared = DomainSimilarity(per_domain=False, offsets=False)
    scale, offset = shared()
    assert offset is None and shared.log_scale.numel() == 1 and len(list(shared.parameters())) == 1
    assert torch.allclose(scale, torch.full((2, 2), 1 / 0.07))
    full = DomainSimilarity()
    assert full.log_scale.numel() == 3 and full.offset.numel() == 3
    with torch.no_grad():
        full.log_scale.copy_(torch.tensor([1.0, 2.0, 3.0]))
    scale, offset = full()
    assert torch.allclose(scale, torch.tensor([[1.0, 2.0], [2.0, 3.0]]).exp())
    assert torch.equal(offset, torch.zeros(2, 2))
    with pytest.raises(ValueError, match='offsets need per_domain'):
        DomainSimilarity(per_domain=False, offsets=True)


def test_temperature_cap():
    sim = DomainSimilarity(max_scale=100.0)
    with torch.no_grad():
        sim.log_scale.copy_(torch.tensor([math.log(250.0), math.log(30.0), -0.5]))
    scale, _ = sim()  # capped even before clamp_(): 100 and 1 at the bounds
    assert scale[0, 0].item() == pytest.approx(100.0) and scale[1, 1].item() == pytest.approx(1.0)
    assert scale[0, 1].item() == pytest.approx(30.0)
    sim.clamp_()
    assert sim.log_scale.tolist() == pytest.approx([math.log(100.0), math.log(30.0), 0.0])
    # at the cap the gradient still flows (the parameter can come back down) ...
    g = torch.Generator().manual_seed(8)
    img, txt = torch.randn(2, 5, 8, generator=g), torch.randn(5, 8, generator=g)
    mp_nce_loss(*multiview_rows(img, txt), *sim()).backward()
    assert (sim.log_scale.grad != 0).all()
    # ... and a step that pushes past it ends at the cap again
    opt = torch.optim.SGD(sim.parameters(), lr=1.0)
    sim.log_scale.grad = torch.tensor([-5.0, 0.0, 5.0])
    opt.step()
    sim.clamp_()
    assert sim.log_scale.tolist() == pytest.approx([math.log(100.0), math.log(30.0), 0.0])
    with pytest.raises(ValueError, match='init_scale'):
        DomainSimilarity(init_scale=200.0)


def test_float32_close_to_float64():
    g = torch.Generator().manual_seed(9)
    img = torch.randn(2, 16, 32, generator=g, dtype=torch.float64)
    txt = torch.randn(16, 32, generator=g, dtype=torch.float64)
    scale = torch.tensor([[60.0, 100.0], [100.0, 30.0]], dtype=torch.float64)
    offset = torch.tensor([[1.0, -2.0], [-2.0, 0.5]], dtype=torch.float64)
    ref = mp_nce_loss(*multiview_rows(img, txt), scale, offset)
    got = mp_nce_loss(*multiview_rows(img.float(), txt.bfloat16()), scale.float(), offset.float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)  # bf16 text rows: ~3 digits
    got = mp_nce_loss(*multiview_rows(img.float(), txt.float()), scale.float(), offset.float())
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match='views must be'):
        simclr_loss(torch.randn(3, 4, 5), 10.0)
    with pytest.raises(ValueError, match='images must be'):
        multiview_rows(torch.randn(4, 5))
    with pytest.raises(ValueError, match='2 rows per sample'):
        multiview_rows(torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match='domain, owner'):
        mp_nce_loss(torch.randn(4, 5), torch.zeros(4).long(), torch.zeros(3).long(), 1.0)


# -----------------------------------------------------------------------------
# the augmentation-aware image embedding


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(image_size=8, patch_size=4, width=8, layers=1, heads=2, embed_dim=6)


def random_aug(g, n, p=5):
    box = torch.rand(n, 4, generator=g) * 0.5 + torch.tensor([0.25, 0.25, 0.5, 0.5])
    flip = (torch.rand(n, 1, generator=g) < 0.5).float()
    return torch.cat([box, flip, torch.rand(n, p - 5, generator=g)], 1)  # then colour parameters


def test_aug_aware_disabled_is_the_plain_tower():
    g = torch.Generator().manual_seed(10)
    vit = tiny_vit()
    model = AugAwareVision(vit, aug_dim=0)
    assert list(model.parameters()) == list(vit.parameters())  # nothing added
    x = torch.randn(4, 3, 8, 8, generator=g)
    want = vit(x)
    for aug in (None, random_aug(g, 4), random_aug(g, 4)):
        assert torch.equal(model(x, aug), want)


def test_aug_aware_embedding_depends_on_aug():
    g = torch.Generator().manual_seed(11)
    vit = tiny_vit()
    model = AugAwareVision(vit, aug_dim=7)
    x = torch.randn(4, 3, 8, 8, generator=g)
    a, b = random_aug(g, 4, 7), random_aug(g, 4, 7)
    # the last layer starts at zero: the plain tower's embedding, whatever the aug ...
    assert torch.allclose(model(x, a), vit(x), atol=1e-6)
    # ... but it receives a gradient, so training moves it off zero
    model(x, a).square().sum().backward()
    assert model.mlp[2].weight.grad.abs().max() > 0
    nn.init.normal_(model.mlp[2].weight, std=0.5)
    ea, eb = model(x, a), model(x, b)
    assert torch.equal(model(x, a), ea)  # a function of (image, aug)
    assert (ea - eb).norm(dim=1).min() > 1e-3  # every row changes with its aug
    # only the aug term differs: the same shift for one aug whatever the image
    y = torch.randn(4, 3, 8, 8, generator=g)
    d_x, d_y = model(x, a) - model(x, b), model(y, a) - model(y, b)
    assert torch.allclose(d_x, d_y, atol=1e-5)
    # aug = None is the unaugmented view, and folded() is a plain tower computing exactly that
    ident = torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.0, 0.0, 0.0]]).expand(4, -1)
    assert torch.equal(model(x), model(x, ident))
    flat = model.folded()
    assert type(flat) is VisionTransformer and torch.allclose(flat(x), model(x), atol=1e-6)
    assert not torch.allclose(flat(x), vit(x), atol=1e-3)
    with pytest.raises(ValueError, match='aug must be'):
        model(x, a[:, :5])
    with pytest.raises(ValueError, match='identity has'):
        AugAwareVision(vit, aug_dim=7, identity=[0.5, 0.5, 1.0, 1.0, 0.0])


# -----------------------------------------------------------------------------
# 2 processes (gloo, CPU) against 1 process on the same global batch

WORLD, B, V, D_IN, AUG = 2, 3, 2, 5, 5  # B: samples per rank


class Towers(nn.Module):
    """An augmentation-aware tiny ViT and a linear text tower, one DDP module."""

    def __init__(self):
        super().__init__()
        self.img = AugAwareVision(tiny_vit(1), aug_dim=AUG)
        nn.init.normal_(self.img.mlp[2].weight, std=0.5)
        self.txt = nn.Linear(D_IN, 6)

    def forward(self, images, aug, texts):  # images [V, b, 3, 8, 8], aug [V, b, p], texts [b, D_IN]
        v, b = images.shape[:2]
        return self.img(images.flatten(0, 1), aug.flatten(0, 1)).view(v, b, -1), self.txt(texts)


def dist_data():
    g = torch.Generator().manual_seed(400)
    images = torch.randn(V, WORLD * B, 3, 8, 8, generator=g, dtype=torch.float64)
    aug = random_aug(g, V * WORLD * B).view(V, WORLD * B, AUG).double()
    texts = torch.randn(WORLD * B, D_IN, generator=g, dtype=torch.float64)
    # rows whose positives sit on the other rank: owners of one group spread over both ranks
    x = torch.randn(WORLD * 6, D_IN, generator=g, dtype=torch.float64)
    owner = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 6, 5])
    domain = torch.tensor([0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0])
    return images, aug, texts, x, owner, domain


def models():
    torch.manual_seed(401)
    return Towers().double(), nn.Linear(D_IN, 4).double()


def run_loss(i, rank, world):
    """Loss i on this rank's share of the global batch (world 1: all of it), its value, the
    gradients of the model (DDP-wrapped under world > 1) and of the scales, reduced as
    mp_nce_loss's docstring says."""
    images, aug, texts, x, owner, domain = dist_data()
    cols, rows = slice(rank * B, (rank + 1) * B), slice(rank * 6, (rank + 1) * 6)
    if world == 1:
        cols = rows = slice(None)
    towers, lin = models()
    model = [towers, towers.img, lin][i]  # the module whose parameters the loss reaches
    run = DDP(model) if world > 1 else model
    sim = sims([9.0, 14.0, 20.0], per_domain=i != 1, offsets=i != 1)[0]
    if i == 0:  # UniCLIP: 2 augmentation-aware views and a caption per sample
        loss = mp_nce_loss(*multiview_rows(*run(images[:, cols], aug[:, cols], texts[cols])), *sim())
    elif i == 1:  # SimCLR, the shared scale learnable
        emb = run(images[:, cols].flatten(0, 1), aug[:, cols].flatten(0, 1)).view(V, -1, 6)
        loss = simclr_loss(emb, sim()[0][0, 0])
    else:  # any owner layout, positives on both ranks
        loss = mp_nce_loss(run(x[rows]), domain[rows], owner[rows], *sim())
    loss.backward()
    sim_grads = [p.grad.clone() for p in sim.parameters()]
    if world > 1:
        for gr in sim_grads:
            dist.all_reduce(gr)
            gr /= world
    return dict(loss=loss.item(), grads=[p.grad.clone() for p in model.parameters()], sim=sim_grads)


def _worker(rank, port, out_dir):
    faulthandler.enable()  # a rank killed by a signal (SIGABRT) leaves its threads' stacks in stderr
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    out = [run_loss(i, rank, WORLD) for i in range(3)]
    torch.save(out, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_process_results():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(port, tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f'rank{r}.pt'), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize('i', range(3))
def test_two_processes_equal_one(two_process_results, i):
    # the 1-process batch lists the rows in another order than the gather (views, then texts,
    # of all samples) and the loss does not depend on the order; owners are global indices
    ref = run_loss(i, 0, 1)
    if i == 0:  # and the formula itself
        images, aug, texts = dist_data()[:3]
        towers = models()[0]
        sim = sims([9.0, 14.0, 20.0])[0]
        with torch.no_grad():
            want = ref_mp_nce(*multiview_rows(*towers(images, aug, texts)), *sim())
        assert ref['loss'] == pytest.approx(want.item(), rel=1e-10)
    for res in (two_process_results[0][i], two_process_results[1][i]):
        assert res['loss'] == pytest.approx(ref['loss'], rel=1e-10)
        for got, want in zip(res['grads'], ref['grads']):
            assert close(got, want, 1e-9)
        for got, want in zip(res['sim'], ref['sim']):
            assert close(got, want, 1e-9) and want.abs().min() > 0
