"""
The evaluations probe.py runs on a frozen image tower, as functions (tests and benchmarks import
them):
- CLIP's linear probe (Radford et al. 2021, appendix A.3): multinomial logistic regression by
  L-BFGS (fit_logreg), the L2 strength by CLIP's parametric binary search on a validation split
  (search_lambda), refit on train+val, top-1 and mean-per-class accuracy (linear_probe);
- zero-shot classification with CLIP's 80 prompt templates (zero_shot_weights, topk_accuracy);
- image-text retrieval R@k in both directions (retrieval_recall);
- the tower's features of a dataset, over ranks (extract);
- train.py's monitor: leave-one-out kNN accuracy over ranks (knn_accuracy).
"""
import contextlib
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import Dataset, eval_batches
from runtime import progress, shard_range

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


def fit_logreg(x, y, num_classes, lam, max_iter=1000, dtype=torch.float32, tol=1e-4, init=None,
               threads=1, precondition=True, info=None):
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS (strong Wolfe).

    Minimises  sum_i CE(W x_i + b, y_i) + lam/2 ||W||^2  (the bias is not penalised), the
    objective of scikit-learn's LogisticRegression(C=1/lam, solver='lbfgs') that CLIP used,
    divided by n (same minimiser). x: [n, d] array or tensor; the fit runs on x's device.
    Two exact changes of variables speed it up; neither changes the objective or its minimiser:
    - the features are centred (W x + b = W (x - mu) + b + W mu: the bias is not penalised);
    - L-BFGS runs on V with W = V diag(q), q_j = (c var_j + lam/n)^(-1/2) ~ the inverse
      square root of the Hessian's diagonal (var_j: the variance of feature j; c = (1 - 1/C)/C,
      the softmax curvature at W = 0). It is the whole Hessian's when the features are
      uncorrelated: linear_probe first rotates them onto their principal axes.
    Stops when max |gradient| <= tol * max |gradient at zero| (a scale-free test, well above
    float32's rounding, ~1e-5 of that yardstick), when a step no longer changes the loss or
    the weights at dtype's resolution, or after max_iter iterations.
    init=(W, b): start there, e.g. the fit of a nearby lambda (warm start: same optimum).
    threads: CPU threads for the fit; its ops are small, and idle or contended threads cost
    more than they add (0: torch's setting). info: a dict to receive the iteration counts.
    Returns (W [d, C], b [C]) as tensors of `dtype` on x's device.
    """
    with cpu_threads(threads):
        return _fit_logreg(x, y, num_classes, lam, max_iter, dtype, tol, init, precondition, info)


@contextlib.contextmanager
def cpu_threads(n):
    """torch's CPU thread count set to n inside the block (0: unchanged)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def principal_axes(x):
    """Orthonormal [d, r] basis of the centred rows of x, float64: the eigenvectors of their
    covariance (r = d), or, when there are fewer rows than dimensions, the r = n right
    singular vectors (the directions the rows span; a fit's weights are zero elsewhere)."""
    x = torch.as_tensor(x)
    xc = x - x.mean(0)
    if len(x) < x.shape[1]:
        return torch.linalg.svd(xc.double(), full_matrices=False).Vh.T
    return torch.linalg.eigh((xc.T @ xc).double()).eigenvectors  # any orthonormal basis is exact


def _fit_logreg(x, y, num_classes, lam, max_iter, dtype, tol, init, precondition, info):
    x = torch.as_tensor(x).to(dtype)
    y = torch.as_tensor(y, device=x.device).long()
    n, d = x.shape
    mu = x.mean(0)
    xT = x.T.contiguous()  # [d, n]: logits come out [C, n], the softmax runs over rows
    xT -= mu[:, None]
    q = torch.ones(d, dtype=dtype, device=x.device)  # W = V diag(q)
    if precondition:
        q = (xT.var(1, correction=0) * (1 - 1 / num_classes) / num_classes + lam / n).rsqrt()
    V = torch.zeros(num_classes, d, dtype=dtype, device=x.device)
    b = torch.zeros(num_classes, 1, dtype=dtype, device=x.device)
    cols = torch.arange(n, device=x.device)

    def loss_grad():
        # mean CE + lam/(2n) ||W||^2 and its gradient, written out (no autograd graph), in
        # place on one [C, n] buffer; the loss summed in float64 so that the line search
        # sees changes below float32's resolution
        W = V * q
        L = torch.addmm(b, W, xT)                  # logits [C, n]
        m = L.amax(0)
        loss = (m - L[y, cols]).sum(dtype=torch.float64)
        L.sub_(m).exp_()
        s = L.sum(0)
        loss = ((loss + s.log().sum(dtype=torch.float64)) / n
                + lam / (2 * n) * W.double().pow(2).sum())
        L.div_(s * n)
        L[y, cols] -= 1 / n                        # (softmax - onehot) / n = d loss / d logits
        return loss, torch.addmm(W, L, xT.T, beta=lam / n) * q, L.sum(1, keepdim=True)

    _, gV, gb = loss_grad()
    scale = max(float(gV.abs().max()), float(gb.abs().max()))  # the yardstick: gradient at zero
    if init is not None:  # (W, b) on uncentred features -> (V, b) here
        V.copy_(init[0].T / q)
        b.copy_((init[1] + mu @ init[0])[:, None])
    V.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([V, b], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=tol * scale, tolerance_change=torch.finfo(dtype).eps,
                            line_search_fn='strong_wolfe')

    def closure():
        with torch.no_grad():
            loss, V.grad, b.grad = loss_grad()
        return loss
    opt.step(closure)  # one step() runs up to max_iter L-BFGS iterations
    if info is not None:
        state = opt.state[opt.param_groups[0]['params'][0]]
        info.update(iterations=state['n_iter'], evaluations=state['func_evals'])
    W = (V.detach() * q).T
    return W, b.detach()[:, 0] - mu @ W


def logits_of(W, b, x):
    return torch.as_tensor(x, device=W.device).to(W.dtype) @ W + b


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
    ties go to the larger lambda (the simpler model). The coarse sweep runs from the largest
    lambda down, so that a warm-started score() always has a simpler fit nearby to start from.
    Returns (best lambda, {lambda: score}).
    """
    grid = lambda_grid(lo, hi, per_decade)
    n = len(grid) - 1
    scores = {}

    def s(k):
        if k not in scores:
            scores[k] = score(grid[k])
        return scores[k]

    def best_of(ks):
        return max(ks, key=lambda k: (s(k), k))  # tie -> larger k, i.e. larger lambda

    step = 2 * per_decade  # the coarse sweep: every second decade
    best = best_of(range(n, -1, -step))
    while step > 1:
        step //= 2
        best = best_of([k for k in (best - step, best, best + step) if 0 <= k <= n])
    return grid[best], {grid[k]: v for k, v in sorted(scores.items())}


def probe_score(x_tr, y_tr, x_va, y_va, num_classes, max_iter=1000, dtype=torch.float32,
                tol=1e-4, threads=1, fitted=None):
    """The validation score the lambda search maximises: (top-1, -cross-entropy). Accuracy is
    CLIP's criterion; the validation loss only breaks its ties (accuracy is a step function of
    lambda, so plateaus are common on small validation sets). With a dict `fitted`, every fit is
    kept there ({lambda: (W, b)}) and starts from the one of the nearest lambda already fitted
    (warm start); without it a score is a pure function of lambda (every fit starts at zero)."""
    yv = torch.as_tensor(y_va, device=getattr(x_va, 'device', None)).long()

    def score(lam):
        init = None
        if fitted:
            init = fitted[min(fitted, key=lambda k: abs(math.log(k / lam)))]
        W, b = fit_logreg(x_tr, y_tr, num_classes, lam, max_iter, dtype, tol, init, threads)
        if fitted is not None:
            fitted[lam] = W, b
        logits = logits_of(W, b, x_va)
        return (round(float((logits.argmax(1) == yv).double().mean()), 12),
                -float(F.cross_entropy(logits, yv)))
    return score


def linear_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, num_classes, max_iter=1000,
                 dtype=torch.float32, tol=1e-4, threads=1, device='cpu', log=print):
    """Search lambda on (train, val), refit on train+val, report on test. Everything runs on
    `device` (features are moved there once); each fit starts from the nearest one before it.
    The refit starts from the train-only fit at the chosen lambda."""
    x_tr, y_tr, x_va, y_va, x_te = (torch.as_tensor(a, device=device)
                                    for a in (x_tr, y_tr, x_va, y_va, x_te))
    fitted = {}
    with cpu_threads(threads):
        # the fits run on the features' coordinates along the principal axes of train+val: a
        # rotation keeps ||W|| and so the objective (and W x), and makes fit_logreg's diagonal
        # preconditioner the full one (10-20x fewer iterations on tower features)
        P = principal_axes(torch.cat([x_tr, x_va])).to(dtype)
        x_tr, x_va, x_te = (x.to(dtype) @ P for x in (x_tr, x_va, x_te))
        score = probe_score(x_tr, y_tr, x_va, y_va, num_classes, max_iter, dtype, tol, threads,
                            fitted)

        def logged(lam):
            t0 = time.time()
            s = score(lam)
            log(f'  lambda {lam:9.3g}  val top-1 {100 * s[0]:6.2f}  val loss {-s[1]:.4f}  '
                f'({time.time() - t0:.1f}s)')
            return s
        lam, tried = search_lambda(logged)
        W, b = fit_logreg(torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va]), num_classes, lam,
                          max_iter, dtype, tol, fitted[lam], threads)
        top1, mpc = class_accuracy(logits_of(W, b, x_te).argmax(1).cpu().numpy(), y_te, num_classes)
    return dict(lambda_=lam, val_top1=tried[lam][0], top1=top1, mean_per_class=mpc,
                lambdas_tried=len(tried), W=P @ W, b=b)


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


FEATURES = ('cls', 'pooled', 'embed')
NORMS = ('none', 'l2', 'standardize')


@torch.no_grad()
def extract(vision, data_dir, batch_size, image_size, device, rank=0, world_size=1, desc='',
            max_open_shards=128):
    """Every image of a dataset through the frozen tower (eval transform, no augmentation).
    Returns {'cls', 'pooled', 'embed'}, float32 numpy arrays [N, d] in dataset order:
    cls = the class token before the final LayerNorm, pooled = after it and before the
    projection (what CLIP's linear probes use, appendix A.3), embed = the projected output (what
    MLCD trains; zero-shot and retrieval compare it with text). vision=None means raw pixels:
    all three are the flattened normalised pixels (one array). Under torch.distributed rank r
    embeds its contiguous slice (data.eval_batches) and rank 0 gathers the whole set; the other
    ranks get None."""
    import data
    N = len(data.Dataset(data_dir, max_open_shards))
    start, n = shard_range(N, rank, world_size)  # data.eval_batches' slice
    out = None
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=str(device).startswith('cuda'))
    batches = data.eval_batches(data_dir, batch_size, image_size, rank, world_size, device,
                                max_open_shards=max_open_shards)
    for index, images in progress(batches, total=math.ceil(n / batch_size), desc=desc, leave=False,
                                  disable=rank > 0):
        if vision is None:
            c = p = e = images.flatten(1).float()
        else:
            with autocast:
                c = vision.forward_tokens(images)[:, 0]
                p = vision.ln_post(c)
                e = vision.proj(p) if vision.proj is not None else p
        if out is None:  # one array per distinct tensor (pixels: one; no projection: two)
            out = {'cls': np.zeros((n, c.shape[1]), np.float32)}
            out['pooled'] = out['cls'] if p is c else np.zeros((n, p.shape[1]), np.float32)
            out['embed'] = out['pooled'] if e is p else np.zeros((n, e.shape[1]), np.float32)
        index = index.cpu().numpy() - start
        for k, v, same in (('cls', c, False), ('pooled', p, p is c), ('embed', e, e is p)):
            if not same:
                out[k][index] = v.float().cpu().numpy()
    if world_size == 1:
        return out
    return gather_features(out, N, rank, world_size, device)


def gather_features(out, N, rank, world_size, device):
    """Each rank's {name: [n_r, d]} slice -> on rank 0 the [N, d] arrays in rank order, which is
    dataset order (the slices are contiguous). Slices are padded to the largest, n_0."""
    import torch.distributed as dist
    device = device if str(device).startswith('cuda') else 'cpu'  # nccl: cuda tensors; gloo: cpu
    # the widths (and which arrays alias) from rank 0, which always holds images (N >= 1)
    meta = [None if out is None else [(k, v.shape[1], [j for j in FEATURES if out[j] is v][0])
                                      for k, v in out.items()]]
    dist.broadcast_object_list(meta, 0, device=torch.device(device))
    m = shard_range(N, 0, world_size)[1]
    full = {}
    for k, d, first in meta[0]:
        if first != k:  # an alias of an earlier array
            full[k] = full.get(first)
            continue
        t = torch.zeros(m, d, device=device)
        if out is not None:
            t[:len(out[k])] = torch.from_numpy(out[k])
        parts = [torch.empty_like(t) for _ in range(world_size)] if rank == 0 else None
        dist.gather(t, parts, dst=0)
        if rank == 0:
            full[k] = np.concatenate([p[:shard_range(N, r, world_size)[1]].cpu().numpy()
                                      for r, p in enumerate(parts)])
    return full if rank == 0 else None


def parse_features(spec, default_norm):
    """'pooled,cls:standardize' -> [('pooled', default_norm), ('cls', 'standardize')]."""
    out = []
    for item in spec.split(','):
        name, _, norm = item.strip().partition(':')
        norm = norm or default_norm
        if name not in FEATURES or norm not in NORMS:
            raise ValueError(f"{item!r}: a feature is one of {', '.join(FEATURES)}, optionally "
                             f"followed by ':' and a normalisation, one of {', '.join(NORMS)}")
        if (name, norm) not in out:
            out.append((name, norm))
    return out


def normalise(how, x_tr, *others):
    """Feature normalisation: 'none', 'l2' (each row to unit length) or 'standardize' (every
    dimension to zero mean, unit variance with the statistics of x_tr only)."""
    xs = (x_tr, *others)
    if how == 'l2':
        return tuple(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in xs)
    if how == 'standardize':
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
        return tuple((x - mu) / sd for x in xs)
    return xs


@torch.no_grad()
def text_encoder(text, batch_size, device):
    """list of str -> [n, embed_dim] float32 (CPU) through the text tower (CLIP BPE)."""
    from tokenizer import tokenize

    def encode(strings):
        out = []
        for s in range(0, len(strings), batch_size):
            ids = tokenize(strings[s:s + batch_size], text.context_length)
            ids = torch.as_tensor(ids, device=device)
            out.append(text(ids).float().cpu())
        return torch.cat(out)
    return encode


@torch.no_grad()
def knn_accuracy(tower, data_dir, batch_size, knn_k, rank, world, device, ctx, max_open_shards):
    """Leave-one-out weighted kNN (cosine, k = knn_k, weights exp(s / 0.07)) over data_dir, a
    cheap monitor of the features. Every rank embeds its contiguous slice of the images, the
    features are all-gathered, each rank scores its own slice against all of them, and the
    counts of correct votes are summed: no rank waits while another works. Returns (accuracy,
    the k used, the majority class's share: the accuracy of a vote that ignores the image)."""
    ds = Dataset(data_dir, max_open_shards)
    start, n = shard_range(len(ds), rank, world)  # eval_batches' slice
    tower.eval()
    mine = torch.zeros(n, tower.embed_dim, device=device)
    for idx, images in eval_batches(data_dir, batch_size, tower.image_size, rank=rank,
                                    world_size=world, device=device,
                                    max_open_shards=max_open_shards):
        with ctx:
            mine[idx.to(device) - start] = F.normalize(tower(images).float(), dim=-1)
    tower.train()
    f = mine
    if world > 1:  # slices differ by at most one row: pad, gather, drop the padding
        rows = -(-len(ds) // world)
        fs = [torch.empty(rows, tower.embed_dim, device=device) for _ in range(world)]
        dist.all_gather(fs, torch.cat([mine, mine.new_zeros(rows - n, tower.embed_dim)]))
        f = torch.cat([x[:shard_range(len(ds), r, world)[1]] for r, x in enumerate(fs)])
    y = torch.as_tensor(np.asarray(ds.classes), dtype=torch.long, device=device)
    nc = int(y.max()) + 1
    counts = torch.bincount(y)
    # leaving an image out leaves its own class one member short: with k near the class size that
    # alone pulls the vote below chance (3 classes of 20, uninformative features: 0.29 at k = 20,
    # 0 at k = 59, 0.32 at k = 5), so k stays under half the smallest class
    k = max(1, min(knn_k, (int(counts[counts > 0].min()) - 1) // 2, len(f) - 1))
    correct = torch.zeros((), dtype=torch.long, device=device)
    for a in range(start, start + n, 1024):
        sim = f[a:min(a + 1024, start + n)] @ f.T
        rows = torch.arange(len(sim), device=device)
        sim[rows, rows + a] = -2.0  # leave one out
        s, j = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), nc, device=device).scatter_add_(1, y[j], (s / 0.07).exp())
        correct += (votes.argmax(1) == y[a:a + len(sim)]).sum()
    if world > 1:
        dist.all_reduce(correct)
    return correct.item() / len(f), k, counts.max().item() / len(f)
