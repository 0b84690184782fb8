"""
Stage 4: evaluate a frozen image tower three ways (DESIGN.md §1.4).

1. Linear probe as in CLIP (Radford et al. 2021, appendix A.3): features of the frozen tower
   (eval transform), L-BFGS multinomial logistic regression with up to 1,000 iterations, L2
   strength chosen by CLIP's parametric binary search on a validation split, retrained on
   train+val, reported on test as top-1 and mean-per-class accuracy.
2. Zero-shot classification: class names x prompt templates through the text tower.
3. Image-text retrieval R@1/5/10 in both directions (one caption per image).

    python probe.py --checkpoint=out/lit/ckpt.pt --train_dir=data/cifar_train --test_dir=data/cifar_test
    python probe.py --checkpoint=pixels --train_dir=... --test_dir=...   # raw-pixel baseline

The checkpoint is anything model.from_pretrained reads (ours, OpenAI CLIP, open_clip, Hugging
Face CLIP directories), or 'pixels': the flattened, CLIP-normalised pixels are the features.

Features for the probe are used raw by default (feature_norm='none'), as CLIP did with scikit-learn:
the lambda search absorbs the overall feature scale, and a probe result then says something about
the features as the tower emits them. 'standardize' (train statistics) or 'l2' are options.
The math lives in small functions at the top so that tests can import them; the script body
runs only when this file is executed.
"""
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

# CLIP's 80 prompt templates for ImageNet (CLIP repo, notebooks/Prompt_Engineering_for_ImageNet),
# '{}' marks the class name. tests/test_probe.py checks them against open_clip's copy.
CLIP_TEMPLATES = [
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'graffiti of a {}.', 'a bad photo of the {}.', 'a cropped photo of the {}.',
    'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.',
    'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.',
    'a photo of the cool {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.',
    'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.', 'a pixelated photo of a {}.',
    'itap of the {}.', 'a jpeg corrupted photo of the {}.', 'a good photo of a {}.',
    'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.',
    'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.',
    'a photo of a cool {}.', 'a photo of a small {}.', 'a tattoo of the {}.',
]

# -----------------------------------------------------------------------------
# linear probe


def fit_logreg(x, y, num_classes, lam, max_iter=1000, dtype=torch.float64, tol=1e-6):
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS (strong Wolfe).

    Minimises  sum_i CE(W x_i + b, y_i) + lam/2 ||W||^2  (the bias is not penalised), the
    objective of scikit-learn's LogisticRegression(C=1/lam, solver='lbfgs') that CLIP used.
    Divided by n so that gradients (and the tolerance) do not scale with the data size; the
    minimiser is the same. Starts from zero every time, so a fit is a pure function of its
    inputs (the lambda search and a brute-force grid then score a lambda identically).
    Returns (W [d, C], b [C]) as tensors of `dtype`.
    """
    x = torch.as_tensor(np.asarray(x), dtype=dtype)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    n, d = x.shape
    W = torch.zeros(num_classes, d, dtype=dtype, requires_grad=True)  # [C, d]: its gradient G.T @ x is contiguous
    b = torch.zeros(num_classes, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=tol,
                            tolerance_change=1e-12, line_search_fn='strong_wolfe')

    onehot = F.one_hot(y, num_classes).to(dtype)

    def closure():
        # the gradient written out rather than by autograd, whose x.T @ G reads the (large,
        # memory-bound) feature matrix column-wise, ~3x slower than G.T @ x on a CPU
        with torch.no_grad():
            logits = x @ W.T + b
            loss = torch.logsumexp(logits, 1).mean() - (logits * onehot).sum() / n + lam / (2 * n) * W.pow(2).sum()
            G = (torch.softmax(logits, 1) - onehot) / n  # d mean CE / d logits
            W.grad = G.T @ x + (lam / n) * W
            b.grad = G.sum(0)
        return loss
    opt.step(closure)  # one step() runs up to max_iter L-BFGS iterations
    return W.detach().T, b.detach()


def logits_of(W, b, x):
    return torch.as_tensor(np.asarray(x), dtype=W.dtype) @ W + b


def class_accuracy(pred, y, num_classes):
    """(top-1, mean-per-class accuracy); classes absent from y do not count in the mean."""
    pred, y = np.asarray(pred), np.asarray(y)
    correct = pred == y
    per_class = [correct[y == c].mean() for c in range(num_classes) if (y == c).any()]
    return float(correct.mean()), float(np.mean(per_class))


def lambda_grid(lo=-6, hi=6, per_decade=8):
    """CLIP's candidate set: lambda in [10^lo, 10^hi], `per_decade` log-spaced steps a decade
    (96 steps, 97 values for the defaults)."""
    return [10 ** (lo + k / per_decade) for k in range((hi - lo) * per_decade + 1)]


def search_lambda(score, lo=-6, hi=6, per_decade=8):
    """CLIP's parametric binary search for the L2 strength (Radford et al. 2021, appendix A.3):
    "a hyperparameter sweep on the validation sets over the range between 10^-6 and 10^6, with
    96 logarithmically spaced steps. To save compute required for the sweeps, we perform a
    parametric binary search that starts with lambda = [10^-6, 10^-4, 10^-2, 1, 10^2, 10^4, 10^6]
    and iteratively halves the interval around the peak until it reaches a resolution of 8 steps
    per decade."

    Concretely, on the grid index k (lambda = 10^(lo + k/per_decade)): score every 2*per_decade-th
    index (7 values), then with step = per_decade, per_decade/2, ..., 1 score the two neighbours
    best-step and best+step of the current peak and move the peak to the best of the three.
    7 + 2*4 = 15 fits instead of 97. `score(lam)` returns anything comparable, larger is better;
    ties go to the larger lambda (the simpler model). Returns (best lambda, {lambda: score}).
    """
    n = (hi - lo) * per_decade
    scores = {}

    def s(k):
        if k not in scores:
            scores[k] = score(10 ** (lo + k / per_decade))
        return scores[k]

    def best_of(ks):
        return max(ks, key=lambda k: (s(k), k))  # tie -> larger k, i.e. larger lambda

    step = 2 * per_decade  # the coarse sweep: every second decade
    best = best_of(range(0, n + 1, step))
    while step > 1:
        step //= 2
        best = best_of([k for k in (best - step, best, best + step) if 0 <= k <= n])
    return 10 ** (lo + best / per_decade), {10 ** (lo + k / per_decade): v for k, v in sorted(scores.items())}


def probe_score(x_tr, y_tr, x_va, y_va, num_classes, max_iter=1000, dtype=torch.float64):
    """The validation score the lambda search maximises: (top-1, -cross-entropy). Accuracy is
    CLIP's criterion; the validation loss only breaks its ties (accuracy is a step function of
    lambda, so plateaus are common on small validation sets)."""
    yv = torch.as_tensor(np.asarray(y_va), dtype=torch.long)

    def score(lam):
        W, b = fit_logreg(x_tr, y_tr, num_classes, lam, max_iter, dtype)
        logits = logits_of(W, b, x_va)
        return (round(float((logits.argmax(1) == yv).double().mean()), 12),
                -float(F.cross_entropy(logits, yv)))
    return score


def linear_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes, max_iter=1000,
                 dtype=torch.float64, log=print):
    """Search lambda on (train, val), refit on train+val, report on test."""
    score = probe_score(x_tr, y_tr, x_va, y_va, num_classes, max_iter, dtype)

    def logged(lam):
        t0 = time.time()
        s = score(lam)
        log(f'  lambda {lam:9.3g}  val top-1 {100 * s[0]:6.2f}  val loss {-s[1]:.4f}  ({time.time() - t0:.1f}s)')
        return s
    lam, tried = search_lambda(logged)
    W, b = fit_logreg(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]), num_classes, lam,
                      max_iter, dtype)
    top1, mpc = class_accuracy(logits_of(W, b, x_te).argmax(1).numpy(), y_te, num_classes)
    return dict(lambda_=lam, val_top1=tried[lam][0], top1=top1, mean_per_class=mpc,
                lambdas_tried=len(tried))


def split_train_val(n, val_fraction, seed):
    """A seeded random split of range(n) into (train, val) index arrays, both sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# -----------------------------------------------------------------------------
# zero-shot and retrieval


def zero_shot_weights(encode_text, classnames, templates):
    """One L2-normalised classifier row per class: the mean of the L2-normalised text
    embeddings of every template filled with the class name, renormalised (CLIP's recipe).
    `encode_text(list of str) -> [n, d] tensor`."""
    rows = []
    for name in classnames:
        e = F.normalize(encode_text([t.replace('{}', name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def topk_accuracy(logits, y, k=1):
    """Fraction of rows whose label is among the k largest logits."""
    logits, y = torch.as_tensor(logits), torch.as_tensor(y, dtype=torch.long)
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == y[:, None]).any(1).double().mean())


def retrieval_ranks(image_emb, text_emb, chunk=4096):
    """For one caption per image (text i describes image i): the 0-based rank of the right answer
    for every image query (i2t) and every text query (t2i), counting the strictly better wrong
    ones, so a tie does not push the right answer down. Chunked: never holds the n x n matrix."""
    img, txt = torch.as_tensor(image_emb), torch.as_tensor(text_emb)
    n = img.shape[0]
    ranks = []
    for a, b in ((img, txt), (txt, img)):  # i2t: rows are images; t2i: rows are texts
        r = torch.empty(n, dtype=torch.long)
        for s in range(0, n, chunk):
            sim = a[s:s + chunk] @ b.T  # [c, n]
            right = sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])]
            r[s:s + chunk] = (sim > right[:, None]).sum(1)
        ranks.append(r)
    return ranks[0], ranks[1]


def retrieval_recall(image_emb, text_emb, ks=(1, 5, 10)):
    """R@k = fraction of queries whose right answer ranks in the top k, both directions.
    Returns {'i2t_R@1': ..., ..., 't2i_R@10': ...}."""
    out = {}
    for name, rank in zip(('i2t', 't2i'), retrieval_ranks(image_emb, text_emb)):
        for k in ks:
            out[f'{name}_R@{k}'] = float((rank < k).double().mean())
    return out


# -----------------------------------------------------------------------------
# features of a frozen tower


@torch.no_grad()
def extract(vision, data_dir, batch_size, image_size, device, desc=''):
    """Every image of a dataset through the frozen tower (eval transform, no augmentation).
    vision=None means raw pixels. Returns (pooled, embedding) float32 numpy arrays in dataset
    order: pooled = the post-ln class token before the projection (what CLIP's linear probes
    use, appendix A.3), embedding = the projected output (what zero-shot and retrieval compare
    with text); for raw pixels both are the flattened normalised pixels."""
    from tqdm import tqdm
    import data
    n = len(data.Dataset(data_dir))
    pooled = embed = None
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=str(device).startswith('cuda'))
    for index, images in tqdm(data.eval_batches(data_dir, batch_size, image_size, device=device),
                              total=math.ceil(n / batch_size), desc=desc, leave=False):
        if vision is None:
            p = e = images.flatten(1).float()
        else:
            with autocast:
                p = vision.ln_post(vision.forward_tokens(images)[:, 0])
                e = vision.proj(p) if vision.proj is not None else p
        if pooled is None:
            pooled = np.zeros((n, p.shape[1]), np.float32)
            embed = pooled if e is p else np.zeros((n, e.shape[1]), np.float32)
        index = index.cpu().numpy()
        pooled[index] = p.float().cpu().numpy()
        embed[index] = e.float().cpu().numpy()
    return pooled, embed


@torch.no_grad()
def text_encoder(text, batch_size, device):
    """list of str -> [n, embed_dim] float32 (CPU) through the text tower, CLIP BPE via data.tokenize."""
    import data

    def encode(strings):
        out = []
        for s in range(0, len(strings), batch_size):
            ids = torch.as_tensor(data.tokenize(strings[s:s + batch_size], text.context_length), device=device)
            out.append(text(ids).float().cpu())
        return torch.cat(out)
    return encode


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    # defaults as plain globals (python probe.py [config/x.py] [--key=value ...])
    out_dir = 'out/probe'
    checkpoint = ''        # anything model.from_pretrained reads, or 'pixels' (raw-pixel features)
    image_size = 0         # 0: the tower's own resolution (for 'pixels': the dataset's)
    act = ''               # '' (the checkpoint's; OpenAI: quick_gelu) or 'gelu' for open_clip GELU weights
    train_dir = ''         # linear probe: training shards (with classes.npy); '' skips the probe
    val_dir = ''           # '' carves val_fraction of train_dir (seeded) for the lambda search
    test_dir = ''          # linear probe and zero-shot evaluation shards
    val_fraction = 0.2
    seed = 0
    max_iter = 1000        # L-BFGS iterations per fit (CLIP: 1,000)
    feature = 'pooled'     # 'pooled': before the projection, as CLIP probes ViTs; 'embed': projected
    feature_norm = 'none'  # 'none' (CLIP: raw features), 'l2', or 'standardize' (train mean/std)
    probe_dtype = 'float64'  # the logistic regression's precision (float32 halves time and memory)
    zero_shot = True       # on test_dir, when the checkpoint has a text tower and test_dir class names
    templates = ''         # file with one prompt template per line, '{}' = class name; '' = CLIP's 80
    retrieval_dir = ''     # shards with one caption per image; '' skips retrieval
    batch_size = 256
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cache_features = False  # keep features in out_dir and reuse them on the next run
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

    import hashlib
    import model
    import data

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    if not checkpoint:
        raise SystemExit('probe.py: set --checkpoint=<path> (or --checkpoint=pixels)')
    if feature not in ('pooled', 'embed') or feature_norm not in ('none', 'l2', 'standardize'):
        raise SystemExit(f"probe.py: feature must be 'pooled' or 'embed' (got {feature!r}) and "
                         f"feature_norm 'none', 'l2' or 'standardize' (got {feature_norm!r})")
    for key, d in (('train_dir', train_dir), ('val_dir', val_dir), ('test_dir', test_dir),
                   ('retrieval_dir', retrieval_dir)):
        if d and not os.path.exists(os.path.join(d, 'meta.json')):
            raise SystemExit(f'probe.py: {key}={d} has no meta.json (build it with data.py)')
    if train_dir and not test_dir:
        raise SystemExit('probe.py: the linear probe needs --test_dir as well as --train_dir')

    if checkpoint == 'pixels':
        vision = text = None
        size = image_size or data.Dataset(train_dir or test_dir or retrieval_dir).image_size
    else:
        if not os.path.exists(checkpoint):
            raise SystemExit(f'probe.py: checkpoint {checkpoint} does not exist')
        try:
            vision, text = model.from_pretrained(checkpoint, image_size=image_size or None, act=act or None)
        except ValueError as e:
            raise SystemExit(f'probe.py: checkpoint: {e}')
        vision.to(device).eval().requires_grad_(False)
        if text is not None:
            text.to(device).eval().requires_grad_(False)
        size = vision.image_size

    memo = {}

    def features(d, desc):
        """(pooled, embed) of a dataset, once per run; from out_dir's cache when allowed."""
        if d in memo:
            return memo[d]
        key = f'{os.path.abspath(checkpoint)}|{os.path.abspath(d)}|{size}'
        for p in (checkpoint, os.path.join(d, 'meta.json')):
            key += f'|{os.path.getmtime(p)}' if os.path.exists(p) else ''
        path = os.path.join(out_dir, f'features_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz')
        if cache_features and os.path.exists(path):
            f = np.load(path)
            memo[d] = f['pooled'], f['embed']
        else:
            memo[d] = extract(vision, d, batch_size, size, device, desc)
            if cache_features:
                np.savez(path + '.tmp.npz', pooled=memo[d][0], embed=memo[d][1])
                os.replace(path + '.tmp.npz', path)
        return memo[d]

    def labels_of(d):
        ds = data.Dataset(d)
        if ds.classes is None:
            raise SystemExit(f'probe.py: {d} has no classes.npy; classification needs labels')
        return np.asarray(ds.classes, np.int64), ds.classnames

    results = dict(checkpoint=checkpoint, image_size=size)
    table = []  # (evaluation, metric, value) rows of the printed table
    t0 = time.time()

    # (1) linear probe --------------------------------------------------------
    if train_dir:
        x_train = features(train_dir, 'train features')[0 if feature == 'pooled' else 1]
        y_train, _ = labels_of(train_dir)
        x_test = features(test_dir, 'test features')[0 if feature == 'pooled' else 1]
        y_test, _ = labels_of(test_dir)
        if val_dir:
            x_val, x_tr = features(val_dir, 'val features')[0 if feature == 'pooled' else 1], x_train
            y_val, y_tr = labels_of(val_dir)[0], y_train
        else:
            tr, va = split_train_val(len(y_train), val_fraction, seed)
            x_tr, y_tr, x_val, y_val = x_train[tr], y_train[tr], x_train[va], y_train[va]
        if feature_norm == 'l2':
            x_tr, x_val, x_test = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                                   for x in (x_tr, x_val, x_test))
        elif feature_norm == 'standardize':  # statistics of the training part only
            mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
            x_tr, x_val, x_test = ((x - mu) / sd for x in (x_tr, x_val, x_test))
        num_classes = int(max(y_tr.max(), y_val.max(), y_test.max())) + 1
        print(f'linear probe: {len(y_tr)} train / {len(y_val)} val / {len(y_test)} test, '
              f'{x_tr.shape[1]}-d {feature} features, {num_classes} classes')
        lp = linear_probe(x_tr, y_tr, x_val, y_val, x_test, y_test, num_classes, max_iter,
                          getattr(torch, probe_dtype))
        results['linear_probe'] = dict(top1=lp['top1'], mean_per_class=lp['mean_per_class'],
                                       val_top1=lp['val_top1'], l2_lambda=lp['lambda_'],
                                       lambdas_tried=lp['lambdas_tried'], feature=feature,
                                       feature_norm=feature_norm, dim=int(x_tr.shape[1]),
                                       n_train=len(y_tr), n_val=len(y_val), n_test=len(y_test))
        table += [('linear probe', 'top-1', 100 * lp['top1']),
                  ('linear probe', 'mean per class', 100 * lp['mean_per_class']),
                  ('linear probe', f"lambda (of {lp['lambdas_tried']} tried)", lp['lambda_'])]

    # (2) zero-shot -------------------------------------------------------------
    if zero_shot and test_dir:
        y_test, classnames = labels_of(test_dir)
        why = ('the checkpoint has no text tower' if text is None else
               f'{test_dir}/meta.json has no classnames' if not classnames else None)
        if why:
            print(f'zero-shot skipped: {why}')
            results['zero_shot'] = dict(skipped=why)
        else:
            if templates:
                if not os.path.exists(templates):
                    raise SystemExit(f'probe.py: templates file {templates} does not exist')
                tpl = [t.strip() for t in open(templates) if t.strip()]
                if not tpl or any('{}' not in t for t in tpl):
                    raise SystemExit(f"probe.py: {templates}: every line needs a '{{}}' for the class name")
            else:
                tpl = CLIP_TEMPLATES
            cls = zero_shot_weights(text_encoder(text, batch_size, device), classnames, tpl)
            img = F.normalize(torch.as_tensor(features(test_dir, 'test features')[1]), dim=-1)
            logits = img @ cls.T
            zs = dict(top1=topk_accuracy(logits, y_test, 1), top5=topk_accuracy(logits, y_test, 5),
                      templates=len(tpl), classes=len(classnames), n=len(y_test))
            results['zero_shot'] = zs
            table += [('zero-shot', 'top-1', 100 * zs['top1']), ('zero-shot', 'top-5', 100 * zs['top5'])]

    # (3) retrieval -------------------------------------------------------------
    if retrieval_dir:
        ds = data.Dataset(retrieval_dir)
        if text is None or not ds.meta.get('has_text'):
            why = 'the checkpoint has no text tower' if text is None else f'{retrieval_dir} has no captions'
            print(f'retrieval skipped: {why}')
            results['retrieval'] = dict(skipped=why)
        else:
            img = F.normalize(torch.as_tensor(features(retrieval_dir, 'retrieval features')[1]), dim=-1)
            txt = []
            with torch.no_grad():
                for s in range(0, len(ds), batch_size):
                    ids = torch.as_tensor(ds.texts(np.arange(s, min(s + batch_size, len(ds)))), device=device)
                    txt.append(text(ids).float().cpu())
            txt = F.normalize(torch.cat(txt), dim=-1)
            rt = retrieval_recall(img, txt)
            results['retrieval'] = dict(**rt, n=len(ds))
            table += [('retrieval', k, 100 * v) for k, v in rt.items()]

    results['seconds'] = round(time.time() - t0, 1)
    print(f"\n{'evaluation':<14} {'metric':<24} {'value':>10}")
    for ev, metric, v in table:
        print(f'{ev:<14} {metric:<24} {v:>10.4g}')
    with open(os.path.join(out_dir, 'probe.json'), 'w') as f:
        json.dump(results, f)
    print(json.dumps(results))
