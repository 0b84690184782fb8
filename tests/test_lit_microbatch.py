"""lit.py's micro-batches (micro_batch_size) through the gradient cache (optim.grad_cache): in
float64 the step gives the one-shot step's gradients, towers and temperatures alike, for clip
(LiT from precomputed features, and CLIP from scratch), uniclip and simclr, on 1 process and on
2 gloo ranks under DDP; lit.py with micro-batches trains as it does without them (1 process and
2 ranks) and resumes exactly; the frozen features are written as whole rows by every rank."""
import faulthandler
import json
import math
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import files
import optim
import model
import prepare
from data import eval_batches
from contrastive import DomainSimilarity, clip_loss, mp_nce_loss, multiview_rows, simclr_loss
from model import AugAwareVision, TextTransformer, Towers, VisionTransformer
from sync_count import count_syncs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('lit', 'clip', 'uniclip', 'simclr')
B, WORLD, D, CTX, VOCAB = 12, 2, 8, 10, 40  # global batch, ranks, embedding, text length, vocab


# -----------------------------------------------------------------------------
# float64: the gradient cache against the one-shot step, lit.py's four modes

def build(mode):
    """The towers, the loss's own parameters and a global batch of B rows, in float64; the same
    on every process (seeded)."""
    torch.manual_seed(0)
    vision = None
    if mode != 'lit':  # trained (uniclip: augmentation-aware); LiT reads frozen features
        vit = VisionTransformer(image_size=8, patch_size=4, width=16, layers=1, heads=2,
                                embed_dim=D, act='gelu')
        vision = AugAwareVision(vit, 5 if mode == 'uniclip' else 0, hidden=8)
        if mode == 'uniclip':  # its MLP's last layer starts at zero: no gradient before it
            nn.init.normal_(vision.mlp[2].weight, std=0.1)
    text = None if mode == 'simclr' else TextTransformer(CTX, VOCAB, width=16, layers=2, heads=2,
                                                         embed_dim=D)
    towers = Towers(vision, text).double()
    if mode == 'uniclip':
        temps = DomainSimilarity(1 / 0.07, 100.0).double()
        with torch.no_grad():  # non-zero offsets, so that their gradients differ per pair
            temps.offset.copy_(torch.tensor([0.3, -0.2, 0.1]))
    else:
        temps = nn.ParameterList([nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))])
    g = torch.Generator().manual_seed(1)
    views = 2 if mode in ('uniclip', 'simclr') else 1
    length = torch.randint(2, CTX + 1, (B,), generator=g)  # captions of different lengths
    ids = torch.randint(1, VOCAB - 1, (B, CTX), generator=g)
    ids[torch.arange(CTX)[None] >= length[:, None]] = 0
    ids[torch.arange(B), length - 1] = VOCAB - 1  # the end token: the highest id
    data = {'images': torch.randn(views, B, 3, 8, 8, generator=g, dtype=torch.float64),
            'aug': torch.rand(views, B, 5, generator=g, dtype=torch.float64),
            'texts': ids, 'features': torch.randn(B, D, generator=g, dtype=torch.float64)}
    return towers, temps, data


def rows_of(data, rows):
    """The rows (a slice) of a batch: images and aug carry the views first."""
    return {k: v[:, rows] if k in ('images', 'aug') else v[rows] for k, v in data.items()}


def embed(mode, net, plain, data, rows, again=False):
    """lit.py's embed: [image, text] of the batch's rows, image [V, m, d] when trained; the
    frozen features (LiT) are not re-run on the second pass."""
    net = net if torch.is_grad_enabled() else plain
    texts = None if mode == 'simclr' else data['texts'][rows]
    if mode == 'lit':
        return [None if again else data['features'][rows], net(None, None, texts)[1]]
    images, aug = data['images'][:, rows], data['aug'][:, rows]
    img, txt = net(images.flatten(0, 1), aug.flatten(0, 1), texts)
    return [img.view(images.shape[0], -1, D)] + ([] if txt is None else [txt])


def loss_of(mode, temps):
    def contrastive(img, txt=None):  # lit.py's contrastive_loss
        if mode == 'lit':
            return clip_loss(img, txt, temps[0].exp())
        if mode == 'clip':
            return clip_loss(img[0], txt, temps[0].exp())
        if mode == 'simclr':
            return simclr_loss(img, temps[0].exp())
        return mp_nce_loss(*multiview_rows(img, txt), *temps())
    return contrastive


def one_shot(mode):
    """The reference: one process, the whole global batch through the towers at once."""
    towers, temps, data = build(mode)
    with count_syncs() as syncs:
        loss = loss_of(mode, temps)(*embed(mode, towers, towers, data, slice(None)))
        loss.backward()
    return loss.item(), [p.grad for p in [*towers.parameters(), *temps.parameters()]], syncs


def grad_cached(mode, micro, rank=0, world=1):
    """This rank's share of the global batch through optim.grad_cache, micro rows at a time;
    under DDP the temperatures' gradients are averaged by hand, as lit.py does."""
    towers, temps, data = build(mode)
    b = B // world
    data = rows_of(data, slice(rank * b, (rank + 1) * b))
    net = DDP(towers) if world > 1 else towers
    calls = []

    def forward(rows, again):
        calls.append((rows.start, rows.stop, again, torch.is_grad_enabled()))
        return embed(mode, net, towers, data, rows, again)

    with count_syncs() as syncs:  # host reads of the device: lit.py's step has one, after this
        loss, embs = optim.grad_cache(forward, loss_of(mode, temps), b, micro,
                                      net if world > 1 else None)
    for p in temps.parameters():
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world
    return (loss.item(), [p.grad for p in [*towers.parameters(), *temps.parameters()]], calls,
            syncs)


def mismatches(got, want, tol=1e-10):
    """The tensors that differ by more than tol x the largest gradient entry (relative to each
    tensor's own size, the key biases' exactly-zero gradients would compare rounding noise)."""
    scale = max(w.abs().max() for w in want)
    return [i for i, (g, w) in enumerate(zip(got, want)) if (g - w).abs().max() > tol * scale]


@pytest.mark.parametrize('mode', MODES)
def test_grad_cache_gives_the_one_shot_gradients_float64(mode):
    want_loss, want, want_syncs = one_shot(mode)
    got_loss, got, calls, syncs = grad_cached(mode, micro=5)
    assert syncs == want_syncs  # none but the loss's own (simclr's one_hot checks its range)
    # 3 micro-batches (5, 5, 2 rows): embedded without gradients, then again with them
    assert calls == [(0, 5, False, False), (5, 10, False, False), (10, 12, False, False),
                     (0, 5, True, True), (5, 10, True, True), (10, 12, True, True)]
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    assert len(got) == len(want)
    assert not [i for i, w in enumerate(want) if not w.abs().max() > 1e-6], 'a zero gradient'
    assert not mismatches(got, want)


def _worker(rank, port, out_dir):
    faulthandler.enable()  # a rank killed by a signal (SIGABRT) leaves its threads' stacks in stderr
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    # 6 rows per rank in micro-batches of 4 and 2
    out = {mode: grad_cached(mode, micro=4, rank=rank, world=WORLD)[:2] for mode in MODES}
    torch.save(out, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_ranks():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(port, tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f'rank{r}.pt'), weights_only=True)
                for r in range(WORLD)]


@pytest.mark.parametrize('mode', MODES)
def test_grad_cache_on_two_ranks_gives_the_one_process_gradients_float64(two_ranks, mode):
    want_loss, want, _ = one_shot(mode)
    for res in two_ranks:  # every rank: the global loss and the global batch's gradients
        got_loss, got = res[mode]
        assert got_loss == pytest.approx(want_loss, rel=1e-12)
        assert not mismatches(got, want)


def test_npy_write_writes_exactly_its_rows(tmp_path):
    path = str(tmp_path / 'x.npy')
    files.npy_create(path, (10, 3), np.float32)
    before = open(path, 'rb').read()
    rows = np.arange(12, dtype=np.float64).reshape(4, 3)  # converted to the file's dtype
    files.npy_write(path, 5, rows)
    after = open(path, 'rb').read()
    x = np.load(path)
    assert x.dtype == np.float32 and x.shape == (10, 3)
    assert np.array_equal(x[5:9], rows) and not x[:5].any() and not x[9:].any()
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    start = len(before) - 10 * 3 * 4 + 5 * 3 * 4  # the header, then 5 rows of 12 bytes
    assert len(after) == len(before) and start <= min(changed) and max(changed) < start + 4 * 12


# -----------------------------------------------------------------------------
# lit.py with micro-batches (fp32, the synthetic set)

TINY = ['--global_batch_size=32', '--text_width=64', '--text_layers=1', '--text_heads=2',
        '--warmup_steps=2', '--learning_rate=2e-3', '--log_interval=1', '--device=cpu', '--seed=3',
        '--max_steps=6']
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_CBWR='AUTO,STRICT')  # as tests/test_lit.py


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('lit_micro')
    prepare.build('synthetic', str(d / 'syn'), image_size=32, count=160, seed=0, workers=1,
                  progress=False)
    torch.manual_seed(0)
    vision, _ = model.create('ViT-T/4', layers=2)
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict()}, d / 'vision.pt')
    return d


def lit(setup, out, *args, nproc=1):
    pre = [sys.executable]
    if nproc > 1:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        pre += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}']
    p = subprocess.run(pre + ['lit.py', f'--data_dir={setup / "syn"}',
                              f'--vision_checkpoint={setup / "vision.pt"}',
                              f'--out_dir={setup / out}', *TINY, *args],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    log = [json.loads(line) for line in open(setup / out / 'log.jsonl')]
    return result, log, p.stdout.splitlines()[0]


def ckpt(setup, out):
    return torch.load(setup / out / 'ckpt.pt', weights_only=True)


def split_qkv_bias(sd):
    """The key bias (middle third of qkv.bias) has an exactly zero gradient (softmax ignores a
    constant added to every key's score), so Adam turns rounding noise into +-lr steps there:
    compare the query and value biases only."""
    for name in [n for n in sd if n.endswith('attn.qkv.bias')]:
        q, _, v = sd.pop(name).chunk(3)
        sd[name + '.q'], sd[name + '.v'] = q, v
    return sd


def same_training(a_log, b_log, a, b, keys):
    assert np.allclose([r['loss'] for r in a_log], [r['loss'] for r in b_log], rtol=1e-5, atol=0)
    assert np.allclose([r['grad_norm'] for r in a_log], [r['grad_norm'] for r in b_log], rtol=1e-4)
    for key in keys:
        sa, sb = split_qkv_bias(dict(a[key])), split_qkv_bias(dict(b[key]))
        bad = [n for n in sa if not torch.allclose(sa[n], sb[n], rtol=1e-4, atol=1e-5)]
        assert not bad, (key, bad)


@pytest.fixture(scope='module')
def lit_one_shot(setup):
    return lit(setup, 'one', '--precompute_features=True')


@pytest.fixture(scope='module')
def lit_micro(setup):
    return lit(setup, 'micro', '--precompute_features=True', '--micro_batch_size=8')


def test_lit_micro_batches_train_as_one_shot(setup, lit_one_shot, lit_micro):
    one, one_log, _ = lit_one_shot
    micro, micro_log, first = lit_micro
    assert one['micro_batches'] == 1 and micro['micro_batches'] == 4
    assert first == 'global batch 32 = 1 rank(s) x 32 images in 4 micro-batches of 8'
    assert len(micro_log) == 6 and micro['vision_unchanged'] is True
    same_training(one_log, micro_log, ckpt(setup, 'one'), ckpt(setup, 'micro'), ['text'])
    assert torch.allclose(ckpt(setup, 'one')['logit_scale'], ckpt(setup, 'micro')['logit_scale'],
                          rtol=1e-6)


def test_uniclip_micro_batches_train_as_one_shot(setup):
    # augmented views (rrc + colour), captions, the augmentation-aware embedding, domain scales
    args = ['--loss=uniclip', '--image_size=16', '--color_jitter=0.5', '--max_steps=2',
            '--global_batch_size=36']
    _, one_log, _ = lit(setup, 'uni_one', *args)
    micro, micro_log, _ = lit(setup, 'uni_micro', *args, '--micro_batch_size=12')
    assert micro['micro_batches'] == 3 and micro['global_batch_size'] == 36
    same_training(one_log, micro_log, ckpt(setup, 'uni_one'), ckpt(setup, 'uni_micro'),
                  ['aug_vision', 'text'])
    for k in ('scales', 'offsets'):
        assert np.allclose([r[k] for r in one_log], [r[k] for r in micro_log], rtol=1e-5, atol=1e-6)


def test_two_ranks_with_micro_batches_match_one_process(setup, lit_one_shot):
    one, one_log, _ = lit_one_shot
    two, two_log, first = lit(setup, 'two', '--precompute_features=True', '--micro_batch_size=4',
                              '--stop_at=3', nproc=2)
    assert first == 'global batch 32 = 2 rank(s) x 16 images in 4 micro-batches of 4'
    assert two['world_size'] == 2 and two['micro_batches'] == 4
    assert np.allclose([r['loss'] for r in one_log[:3]], [r['loss'] for r in two_log], rtol=1e-5)
    assert np.allclose([r['grad_norm'] for r in one_log[:3]], [r['grad_norm'] for r in two_log],
                       rtol=1e-4)
    # each rank wrote its slice of the frozen features, whole rows: all equal the tower's
    vision, _ = model.create('ViT-T/4', layers=2)
    vision.load_state_dict(torch.load(setup / 'vision.pt', weights_only=True)['vision'])
    with torch.no_grad():
        want = torch.cat([vision(x) for _, x in eval_batches(str(setup / 'syn'), 64, 32)])
    feats = torch.from_numpy(np.load(setup / 'two' / 'image_features.npy'))
    assert feats.shape == want.shape and torch.allclose(feats, want, rtol=1e-4, atol=1e-5)


def test_resume_with_micro_batches_is_exact(setup, lit_micro):
    micro, micro_log, _ = lit_micro
    lit(setup, 'parts', '--precompute_features=True', '--micro_batch_size=8', '--stop_at=3')
    part, log, _ = lit(setup, 'parts', '--precompute_features=True', '--micro_batch_size=8',
                       '--init_from=resume')
    assert [r['step'] for r in log] == list(range(1, 7))
    assert [r['loss'] for r in log] == [r['loss'] for r in micro_log]  # bitwise, from JSON
    a, b = ckpt(setup, 'micro'), ckpt(setup, 'parts')
    assert all(torch.equal(a['text'][k], b['text'][k]) for k in a['text'])
    assert torch.equal(a['logit_scale'], b['logit_scale'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k])
                                          for i in sa for k in ('exp_avg', 'exp_avg_sq'))


@pytest.mark.parametrize('name', ['lit_vitb16', 'lit_vitl14'])
def test_lit_paper_configs_split_the_32k_batch_on_one_node(name):
    """Table 9's learning rate, lit.py's 32K default batch, and micro_batch_size='auto': the
    micro-batches that bring one 8-GPU node's 4,096 captions per GPU down to what an 80 GB GPU
    holds (bench/bench_lit_memory.py's estimates: 2048 for B/16, 1024 for L/14) are what its
    halving from 4,096 reaches, each splitting the share exactly."""
    p = subprocess.run([sys.executable, 'lit.py', f'config/{name}.py', '--help'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = dict(x.split('  # ')[0].strip()[2:].split('=', 1) for x in p.stdout.splitlines()
               if x.startswith('  --'))
    lr, micro = {'lit_vitb16': ('0.0005', 2048), 'lit_vitl14': ('0.0004', 1024)}[name]
    assert (got['learning_rate'], got['micro_batch_size'], got['global_batch_size']) == (
        lr, "'auto'", '32768')
    assert micro in [4096 >> i for i in range(4)]  # a step of 'auto's halving from 32768 / 8
    assert optim.batch_plan(32768, 8, micro) == (32768, micro, 4096 // micro, '')
    assert optim.batch_plan(32768, 80, -(-32768 // 80))[:3] == (32800, 410, 1)  # 10 nodes: one each
