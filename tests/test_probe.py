"""evaluation.py and probe.py: the linear probe (L-BFGS logistic regression, CLIP's lambda
search), zero-shot and retrieval metrics, checked against brute force and hand-built cases with
known answers; the script end to end on the synthetic set (raw pixels and a random-weight
checkpoint)."""
import ast
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    # the fits here are tiny: thread start-up and contention cost more than the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(n, d, classes, spread, seed):
    """Gaussian class clusters: means ~N(0, I), within-class noise `spread`."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    return (means[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_probe_separable_features_reach_100_percent():
    x, y = blobs(600, 16, 5, 0.1, seed=0)
    # separable by construction: the nearest class mean classifies every point correctly
    x_tr, y_tr, x_va, y_va, x_te, y_te = x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:]
    out = evaluation.linear_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, 5, max_iter=200, log=lambda s: None)
    assert out['top1'] == 1.0 and out['mean_per_class'] == 1.0
    assert out['lambdas_tried'] <= 15  # 7 coarse values + at most 2 per halving (4 halvings)


def test_fit_logreg_reaches_the_optimum():
    # first-order optimality of  mean CE + lam/(2n) ||W||^2, written out independently:
    # dW = X^T (softmax(XW + b) - onehot) / n + lam/n W = 0, db = mean(softmax - onehot) = 0
    x, y = blobs(200, 8, 3, 1.5, seed=1)
    lam = 3.0
    W, b = evaluation.fit_logreg(x, y, 3, lam, max_iter=1000, dtype=torch.float64, tol=1e-10)
    X = torch.tensor(x, dtype=torch.float64)
    P = torch.softmax(X @ W + b, 1) - F.one_hot(torch.tensor(y), 3).double()
    gW = X.T @ P / len(y) + lam / len(y) * W
    gb = P.mean(0)
    assert gW.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    assert W.abs().max() > 0.1  # and it moved away from the zero start


def objective_grad(x, y, lam, W, b):
    """Gradient of  mean CE + lam/(2n) ||W||^2  by autograd through F.cross_entropy, float64."""
    X, Y = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    W, b = W.double().clone().requires_grad_(True), b.double().clone().requires_grad_(True)
    (F.cross_entropy(X @ W + b, Y) + lam / (2 * len(Y)) * W.pow(2).sum()).backward()
    return W.grad, b.grad


def test_fit_logreg_optimum_on_every_path():
    # features far from zero mean (the fit centres them: the optimum must be the uncentred
    # objective's), unequal scales, overlapping classes; three lambdas
    x, y = blobs(300, 6, 4, 1.0, seed=2)
    x = x * np.linspace(0.5, 3, 6, dtype=np.float32) + 5
    for lam in (1e-3, 1.0, 30.0):
        W, b = evaluation.fit_logreg(x, y, 4, lam, dtype=torch.float64, tol=1e-10)
        gW, gb = objective_grad(x, y, lam, W, b)
        assert gW.abs().max() < 1e-6 and gb.abs().max() < 1e-6
        # the path features take on a GPU: float32 tensors on the device, default tolerance
        W32, b32 = evaluation.fit_logreg(torch.tensor(x), torch.tensor(y), 4, lam)
        assert W32.dtype == torch.float32 and W32.device == torch.tensor(x).device
        assert torch.allclose(W32.double(), W, rtol=0, atol=2e-3 * W.abs().max())
        assert torch.allclose(b32.double(), b, rtol=0, atol=2e-3 * b.abs().max())
        agree = evaluation.logits_of(W32, b32, x).argmax(1) == evaluation.logits_of(W, b, x).argmax(1)
        assert agree.double().mean() >= 0.99


def test_warm_start_reaches_the_cold_optimum():
    x, y = blobs(400, 8, 5, 1.5, seed=4)
    x = x + 3  # off-centre, so that the start's bias conversion matters
    for lam, start_lam in ((0.1, 100.0), (10.0, 0.01), (1.0, 1.3)):
        cold_info, warm_info = {}, {}
        cold = evaluation.fit_logreg(x, y, 5, lam, dtype=torch.float64, tol=1e-8, info=cold_info)
        init = evaluation.fit_logreg(x, y, 5, start_lam, dtype=torch.float64)
        warm = evaluation.fit_logreg(x, y, 5, lam, dtype=torch.float64, tol=1e-8, init=init, info=warm_info)
        for a, c in zip(warm, cold):
            assert torch.allclose(a, c, rtol=0, atol=1e-6 * cold[0].abs().max())
        if start_lam == 1.3:  # a neighbouring lambda is a good start
            assert warm_info['iterations'] < cold_info['iterations']
    # from the optimum itself (the start converted to centred, preconditioned variables and
    # back): nothing left to do, the same weights
    info = {}
    again = evaluation.fit_logreg(x, y, 5, 1.0, dtype=torch.float64, init=cold, info=info)
    assert info['iterations'] == 0
    assert torch.allclose(again[0], cold[0], rtol=0, atol=1e-12) and torch.allclose(again[1], cold[1], rtol=0, atol=1e-12)
    # a warm-started search scores every lambda like the cold (pure) one, up to the tolerance
    score = evaluation.probe_score(x[:200], y[:200], x[200:], y[200:], 5, fitted={})
    pure = evaluation.probe_score(x[:200], y[:200], x[200:], y[200:], 5)
    for lam in evaluation.lambda_grid(-4, 4, 2)[::-1]:
        (acc_w, nll_w), (acc_c, nll_c) = score(lam), pure(lam)
        # (at the default tolerance, so a boundary point may flip: 1 of 200)
        assert round(200 * abs(acc_w - acc_c)) <= 2 and abs(nll_w - nll_c) < 2e-3


def test_linear_probe_same_result_from_tensors_and_arrays():
    # the script moves the features to `device` as tensors; numpy in gives the same answer
    x, y = blobs(300, 10, 3, 2.0, seed=3)
    parts = (x[:150], y[:150], x[150:220], y[150:220], x[220:], y[220:])
    a = evaluation.linear_probe(*parts, 3, log=lambda s: None)
    b = evaluation.linear_probe(*(torch.tensor(p) for p in parts), 3, log=lambda s: None, device='cpu')
    assert (a['lambda_'], a['top1'], a['mean_per_class']) == (b['lambda_'], b['top1'], b['mean_per_class'])
    c = evaluation.linear_probe(*parts, 3, dtype=torch.float64, log=lambda s: None)
    assert abs(c['top1'] - a['top1']) <= 1 / 80 and np.isclose(np.log10(c['lambda_']), np.log10(a['lambda_']), atol=0.26)


def test_lambda_search_matches_brute_force_grid():
    # a real probe: noisy classes, so that the validation score has an interior peak
    x, y = blobs(160, 10, 3, 2.0, seed=3)
    score = evaluation.probe_score(x[:80], y[:80], x[80:], y[80:], 3, max_iter=100)
    lam, tried = evaluation.search_lambda(score)
    grid = evaluation.lambda_grid()
    assert len(grid) == 97 and np.isclose(grid[0], 1e-6) and np.isclose(grid[-1], 1e6)
    scores = [score(g) for g in grid]
    best = max(range(len(grid)), key=lambda k: (scores[k], k))  # same tie rule: larger lambda
    assert 0 < best < 96, 'the case should have an interior optimum'
    assert np.isclose(lam, grid[best]) and len(tried) == 15
    # the coarse sweep is CLIP's [1e-6, 1e-4, ..., 1e6]
    assert all(any(np.isclose(t, 10.0 ** e) for t in tried) for e in range(-6, 7, 2))


def test_lambda_search_finds_the_peak_of_any_unimodal_score():
    grid = np.log10(evaluation.lambda_grid())
    for peak in grid:
        lam, tried = evaluation.search_lambda(lambda l: -abs(np.log10(l) - peak))
        assert np.isclose(np.log10(lam), peak) and len(tried) <= 15


def test_class_accuracy_top1_and_mean_per_class():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])  # class 0: 3/4, class 1: 1/2, class 2: 2/2
    top1, mpc = evaluation.class_accuracy(pred, y, 4)  # class 3 absent: not in the mean
    assert top1 == 6 / 8 and np.isclose(mpc, (0.75 + 0.5 + 1.0) / 3)


def test_split_train_val_is_a_seeded_partition():
    tr, va = evaluation.split_train_val(100, 0.2, seed=5)
    assert len(va) == 20 and sorted(np.concatenate([tr, va])) == list(range(100))
    tr2, va2 = evaluation.split_train_val(100, 0.2, seed=5)
    assert (va == va2).all() and not (va == evaluation.split_train_val(100, 0.2, seed=6)[1]).all()


def test_zero_shot_hand_built():
    # a text "encoder" that puts each class name on its own axis and the template on a 4th axis,
    # so the classifier row of class c must be normalise(e_c + w * e_3) for the template weights
    axes = {'cat': 0, 'dog': 1, 'car': 2}

    def encode(strings):
        out = torch.zeros(len(strings), 4)
        for i, s in enumerate(strings):
            name = s.split()[-1].rstrip('.')
            out[i, axes[name]] = 2.0  # the norm differs per template: normalised away first
            out[i, 3] = 2.0 if s.startswith('a photo') else 0.0
        return out
    W = evaluation.zero_shot_weights(encode, ['cat', 'dog', 'car'], ['a photo of a {}.', 'art of a {}.'])
    # template 1 -> (1, 0, 0, 1)/sqrt2, template 2 -> (1, 0, 0, 0); mean, renormalised:
    expect = F.normalize(torch.tensor([1 + 2 ** -0.5, 0, 0, 2 ** -0.5]), dim=0)
    assert torch.allclose(W[0], expect, atol=1e-6) and torch.allclose(W[2], expect[[1, 2, 0, 3]], atol=1e-6)
    images = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.2, 0.9, 0, 0], [0, 0.5, 0.6, 0]])
    y = torch.tensor([0, 1, 2, 0, 1])  # the last two are planted errors: predicted 1 and 2
    logits = F.normalize(images, dim=1) @ W.T
    assert evaluation.topk_accuracy(logits, y, 1) == 3 / 5
    assert evaluation.topk_accuracy(logits, y, 2) == 1.0  # both errors have the truth second
    assert evaluation.topk_accuracy(logits, y, 5) == 1.0  # k > classes means all of them


def test_retrieval_recall_hand_built():
    # sim = identity, then plant errors: image 3's caption is beaten by 6 other captions;
    # caption 7 is beaten by 2 other images (rank 2); ties do not count against the answer
    n = 20
    sim = torch.eye(n, dtype=torch.float64)
    sim[3, [0, 1, 2, 4, 5, 6]] = 2.0   # row 3: i2t rank 6; columns 0,1,2,4,5,6: t2i rank 1
    sim[[8, 9], 7] = 1.5               # column 7: t2i rank 2; rows 8, 9: i2t rank 1
    sim[10, 11] = 1.0                  # a tie with the diagonal: no change
    # image queries: rank 6 (image 3), rank 1 (images 8, 9), rank 0 otherwise
    # text queries: rank 1 (texts 0, 1, 2, 4, 5, 6), rank 2 (text 7), rank 0 otherwise
    r = evaluation.retrieval_recall(sim, torch.eye(n, dtype=torch.float64))  # img @ I^T = sim
    assert r['i2t_R@1'] == 17 / 20 and r['i2t_R@5'] == 19 / 20 and r['i2t_R@10'] == 1.0
    assert r['t2i_R@1'] == 13 / 20 and r['t2i_R@5'] == 1.0 and r['t2i_R@10'] == 1.0
    # the chunked ranks equal the unchunked ones
    for a, b in zip(evaluation.retrieval_ranks(sim, torch.eye(n, dtype=torch.float64), chunk=3),
                    evaluation.retrieval_ranks(sim, torch.eye(n, dtype=torch.float64))):
        assert (a == b).all()


def test_templates_are_clips_80():
    spec = importlib.util.find_spec('open_clip')
    assert spec is not None, 'tests need open_clip_torch: pip install --no-deps open_clip_torch==3.3.0'
    path = os.path.join(list(spec.submodule_search_locations)[0], 'zero_shot_metadata.py')
    tree = ast.parse(open(path).read())  # read, never imported (its dependencies are absent)
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], 'id', '') == 'OPENAI_IMAGENET_TEMPLATES')
    ref = [''.join(v.value if isinstance(v, ast.Constant) else '{}' for v in lam.body.values)
           for lam in node.value.elts]
    assert evaluation.CLIP_TEMPLATES == ref and len(ref) == 80


# -----------------------------------------------------------------------------
# the script end to end, checked against the towers run directly on the stored images


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    import prepare
    import model
    d = tmp_path_factory.mktemp('probe')
    prepare.build('synthetic', str(d / 'train'), image_size=32, count=200, seed=0, workers=1, progress=False)
    prepare.build('synthetic', str(d / 'test'), image_size=32, count=100, seed=1, workers=1, progress=False)
    torch.manual_seed(0)
    vision, text = model.create('ViT-T/4', layers=1)
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict(),
                'text_config': text.config, 'text': text.state_dict()}, d / 'both.pt')
    (d / 'templates.txt').write_text('a photo of a {}.\n\nart of the {}.\n')
    return d


def run_probe(d, out, *args, nproc=1):
    launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone',
                                  f'--nproc_per_node={nproc}'] if nproc > 1 else [])
    cmd = launch + ['probe.py', f'--out_dir={d / out}', '--cache_features=True', '--device=cpu', *args]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES=''),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == json.load(open(d / out / 'probe.json'))
    return result


def cached(d, out):
    """The features the script cached, in file order (names are hashes)."""
    return [np.load(f) for f in sorted((d / out).glob('features_*.npz'), key=os.path.getmtime)]


def pixels(data_dir):
    """The eval transform at the stored size, written out independently: x/255, CLIP mean/std."""
    import data
    import transforms
    ds = data.Dataset(str(data_dir))
    x = ds.images(np.arange(len(ds))).astype(np.float64) / 255
    x = (x - np.array(transforms.CLIP_MEAN)) / np.array(transforms.CLIP_STD)
    return x.transpose(0, 3, 1, 2).reshape(len(ds), -1), np.asarray(ds.classes)


def test_probe_script_raw_pixels(sets):
    r = run_probe(sets, 'px', '--checkpoint=pixels', f'--train_dir={sets / "train"}',
                  f'--test_dir={sets / "test"}', '--max_iter=30', '--seed=4')
    lp = r['linear_probe']
    assert lp['dim'] == 3072 and (lp['n_train'], lp['n_val'], lp['n_test']) == (160, 40, 100)
    assert 'zero_shot' in r and 'skipped' in r['zero_shot']  # no text tower
    (tr_f, te_f) = cached(sets, 'px')
    x_tr, y_tr = pixels(sets / 'train')
    x_te, y_te = pixels(sets / 'test')
    assert np.allclose(tr_f['pooled'], x_tr, atol=1e-5) and np.allclose(te_f['pooled'], x_te, atol=1e-5)
    # refit with the reported lambda on the same seeded split and train+val: the same test accuracy
    W, b = evaluation.fit_logreg(tr_f['pooled'], y_tr, 6, lp['l2_lambda'], max_iter=30)
    top1, mpc = evaluation.class_accuracy(evaluation.logits_of(W, b, te_f['pooled']).argmax(1).numpy(), y_te, 6)
    assert (top1, mpc) == (lp['top1'], lp['mean_per_class'])


def test_probe_script_zero_shot_and_retrieval(sets):
    import checkpoints
    import data
    import tokenizer
    r = run_probe(sets, 'ck', f'--checkpoint={sets / "both.pt"}', f'--test_dir={sets / "test"}',
                  f'--retrieval_dir={sets / "test"}', f'--templates={sets / "templates.txt"}')
    vision, text = checkpoints.from_pretrained(str(sets / 'both.pt'))
    x, y = pixels(sets / 'test')
    with torch.no_grad():
        img = vision(torch.tensor(x, dtype=torch.float32).view(-1, 3, 32, 32))
    (feats,) = cached(sets, 'ck')
    assert np.allclose(feats['embed'], img.numpy(), atol=1e-4)
    img = F.normalize(torch.as_tensor(feats['embed']), dim=-1)
    ds = data.Dataset(str(sets / 'test'))
    with torch.no_grad():  # zero-shot: mean of the normalised prompt embeddings per class
        cls = torch.stack([F.normalize(F.normalize(text(torch.as_tensor(tokenizer.tokenize(
            [f'a photo of a {c}.', f'art of the {c}.']))), dim=-1).mean(0), dim=0) for c in ds.classnames])
        txt = F.normalize(text(torch.as_tensor(ds.texts(np.arange(len(ds))))), dim=-1)
    assert r['zero_shot']['templates'] == 2
    assert r['zero_shot']['top1'] == float(((img @ cls.T).argmax(1).numpy() == y).mean())
    # retrieval with argsort ranks (no tie handling needed for random real-valued embeddings)
    sim = img @ txt.T
    i2t = (sim.argsort(1, descending=True) == torch.arange(len(ds))[:, None]).float().argmax(1)
    t2i = (sim.T.argsort(1, descending=True) == torch.arange(len(ds))[:, None]).float().argmax(1)
    for k in (1, 5, 10):
        assert r['retrieval'][f'i2t_R@{k}'] == float((i2t < k).double().mean())
        assert r['retrieval'][f't2i_R@{k}'] == float((t2i < k).double().mean())


@pytest.fixture(scope='module')
def odd(sets):
    """101 images: 2 ranks embed uneven slices (51 + 50); batch_size=17 puts the batch edges of
    one process and of two at the same places (17 divides 51)."""
    import prepare
    prepare.build('synthetic', str(sets / 'odd'), image_size=32, count=101, seed=2, workers=1, progress=False)
    return sets / 'odd'


def several(sets, odd):
    return [f'--checkpoint={sets / "both.pt"}', f'--train_dir={odd}', f'--test_dir={odd}',
            f'--retrieval_dir={odd}', f'--templates={sets / "templates.txt"}', '--batch_size=17',
            '--features=pooled,cls:standardize,embed:l2']


def test_probe_script_several_features(sets, odd):
    import checkpoints
    r = run_probe(sets, 'several', *several(sets, odd))
    lps = r['linear_probes']
    assert list(lps) == ['pooled:none', 'cls:standardize', 'embed:l2']
    assert r['linear_probe'] == lps['pooled:none']  # what single-probe readers take
    assert [(p['feature'], p['feature_norm'], p['dim']) for p in lps.values()] == \
        [('pooled', 'none', 192), ('cls', 'standardize', 192), ('embed', 'l2', 128)]
    # the three features, extracted once: the tower run directly on the stored images
    (feats,) = cached(sets, 'several')
    vision, _ = checkpoints.from_pretrained(str(sets / 'both.pt'))
    x, y = pixels(odd)
    with torch.no_grad():
        images = torch.tensor(x, dtype=torch.float32).view(-1, 3, 32, 32)
        cls = vision.forward_tokens(images)[:, 0]
        expect = dict(cls=cls, pooled=vision.ln_post(cls), embed=vision(images))
    for k, v in expect.items():
        assert np.allclose(feats[k], v.numpy(), atol=1e-4), k
    # every probe: the script's split, the normalisation written out here, CLIP's protocol
    tr, va = evaluation.split_train_val(len(y), 0.2, 0)
    for key, res in lps.items():
        name, norm = key.split(':')
        a = feats[name]
        if norm == 'standardize':  # training part's statistics
            a = (a - a[tr].mean(0)) / (a[tr].std(0) + 1e-6)
        elif norm == 'l2':
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        out = evaluation.linear_probe(a[tr], y[tr], a[va], y[va], a, y, int(y.max()) + 1, log=lambda s: None)
        assert (out['lambda_'], out['top1'], out['mean_per_class']) == \
            (res['l2_lambda'], res['top1'], res['mean_per_class']), key


def test_probe_script_two_ranks_equal_one(sets, odd):
    # torchrun, 2 CPU ranks (gloo): each embeds its slice, rank 0 gathers and evaluates
    one = run_probe(sets, 'one_rank', *several(sets, odd))
    two = run_probe(sets, 'two_ranks', *several(sets, odd), nproc=2)
    (a,), (b,) = cached(sets, 'one_rank'), cached(sets, 'two_ranks')
    assert sorted(a.files) == sorted(b.files) == ['cls', 'embed', 'pooled']
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k

    def timeless(r):
        r = {k: v for k, v in r.items() if k != 'seconds'}
        r['linear_probes'] = {k: {**v, 'seconds': 0} for k, v in r['linear_probes'].items()}
        r['linear_probe'] = {**r['linear_probe'], 'seconds': 0}
        return r
    assert timeless(one) == timeless(two)
    assert 'zero_shot' in two and 'i2t_R@1' in two['retrieval']  # rank 0 went on with the text tower


def test_refused_runs_say_which_setting_and_leave_no_folder(tmp_path):
    cases = [(['--checkpoint=nope.pt'], 'probe.py: checkpoint nope.pt does not exist'),
             (['--checkpoint=pixels', f'--train_dir={tmp_path}/none', f'--test_dir={tmp_path}/none'],
              f'probe.py: train_dir={tmp_path}/none has no meta.json'),
             (['--checkpoint=pixels', '--features=pooled:l3'], 'probe.py: features:')]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f'out{i}'
        p = subprocess.run([sys.executable, 'probe.py', f'--out_dir={out}', '--device=cpu', *args], cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(message), p.stderr
        assert not out.exists()
