"""
Stage 4: evaluate a frozen image tower three ways.

1. Linear probe as in CLIP (Radford et al. 2021, appendix A.3): features of the frozen tower
   (eval transform), L-BFGS multinomial logistic regression with up to 1,000 iterations, L2
   strength chosen by CLIP's parametric binary search on a validation split, retrained on
   train+val, reported on test as top-1 and mean-per-class accuracy. Several features
   ('pooled', 'cls', 'embed') can be probed in one run; features are extracted once.
2. Zero-shot classification: class names x prompt templates through the text tower.
3. Image-text retrieval R@1/5/10 in both directions (one caption per image).

    python probe.py --checkpoint=out/lit/ckpt.pt --train_dir=data/cifar_train --test_dir=data/cifar_test
    python probe.py --checkpoint=pixels --train_dir=... --test_dir=...   # raw-pixel baseline
    torchrun --nproc_per_node=8 probe.py ...   # features on 8 GPUs, rank 0 fits and writes

The checkpoint is anything checkpoints.from_pretrained reads (ours, OpenAI CLIP, open_clip,
Hugging Face CLIP directories), or 'pixels': the flattened, CLIP-normalised pixels are the features.

Features for the probe are used raw by default (feature_norm='none'), as CLIP did with scikit-learn:
the lambda search absorbs the overall feature scale, and a probe result then says something about
the features as the tower emits them. 'standardize' (train statistics) or 'l2' are options.
The logistic regression runs on the GPU when there is one (float32 by default everywhere).
The math lives in small functions at the top so that tests can import them; the script body
runs only when this file is executed.
"""
import contextlib
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
        loss = (loss + s.log().sum(dtype=torch.float64)) / n + lam / (2 * n) * W.double().pow(2).sum()
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
    n = (hi - lo) * per_decade
    scores = {}

    def s(k):
        if k not in scores:
            scores[k] = score(10 ** (lo + k / per_decade))
        return scores[k]

    def best_of(ks):
        return max(ks, key=lambda k: (s(k), k))  # tie -> larger k, i.e. larger lambda

    step = 2 * per_decade  # the coarse sweep: every second decade
    best = best_of(range(n, -1, -step))
    while step > 1:
        step //= 2
        best = best_of([k for k in (best - step, best, best + step) if 0 <= k <= n])
    return 10 ** (lo + best / per_decade), {10 ** (lo + k / per_decade): v for k, v in sorted(scores.items())}


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
        score = probe_score(x_tr, y_tr, x_va, y_va, num_classes, max_iter, dtype, tol, threads, fitted)

        def logged(lam):
            t0 = time.time()
            s = score(lam)
            log(f'  lambda {lam:9.3g}  val top-1 {100 * s[0]:6.2f}  val loss {-s[1]:.4f}  '
                f'({time.time() - t0:.1f}s)')
            return s
        lam, tried = search_lambda(logged)
        W, b = fit_logreg(torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va]), num_classes, lam, max_iter,
                          dtype, tol, fitted[lam], threads)
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
def extract(vision, data_dir, batch_size, image_size, device, rank=0, world_size=1, desc=''):
    """Every image of a dataset through the frozen tower (eval transform, no augmentation).
    Returns {'cls', 'pooled', 'embed'}, float32 numpy arrays [N, d] in dataset order:
    cls = the class token before the final LayerNorm, pooled = after it and before the
    projection (what CLIP's linear probes use, appendix A.3), embed = the projected output (what
    MLCD trains; zero-shot and retrieval compare it with text). vision=None means raw pixels:
    all three are the flattened normalised pixels (one array). Under torch.distributed rank r
    embeds its contiguous slice (data.eval_batches) and rank 0 gathers the whole set; the other
    ranks get None."""
    from tqdm import tqdm
    import data
    N = len(data.Dataset(data_dir))
    n = N // world_size + (rank < N % world_size)
    start = rank * (N // world_size) + min(rank, N % world_size)  # data.eval_batches' slice
    out = None
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=str(device).startswith('cuda'))
    batches = data.eval_batches(data_dir, batch_size, image_size, rank, world_size, device)
    for index, images in tqdm(batches, total=math.ceil(n / batch_size), desc=desc, leave=False,
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
    m = N // world_size + (N % world_size > 0)
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
            full[k] = np.concatenate([p[:N // world_size + (r < N % world_size)].cpu().numpy()
                                      for r, p in enumerate(parts)])
    return full if rank == 0 else None


def parse_features(spec, default_norm):
    """'pooled,cls:standardize' -> [('pooled', default_norm), ('cls', 'standardize')]."""
    out = []
    for item in spec.split(','):
        name, _, norm = item.strip().partition(':')
        norm = norm or default_norm
        if name not in FEATURES or norm not in NORMS:
            raise ValueError(f"{item!r}: a feature is one of {', '.join(FEATURES)}, optionally followed "
                             f"by ':' and a normalisation, one of {', '.join(NORMS)}")
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
    """list of str -> [n, embed_dim] float32 (CPU) through the text tower, CLIP BPE via
    tokenizer.tokenize."""
    from tokenizer import tokenize

    def encode(strings):
        out = []
        for s in range(0, len(strings), batch_size):
            ids = torch.as_tensor(tokenize(strings[s:s + batch_size], text.context_length), device=device)
            out.append(text(ids).float().cpu())
        return torch.cat(out)
    return encode


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    # defaults as plain globals (python probe.py [config/x.py] [--key=value ...])
    out_dir = 'out/probe'
    checkpoint = ''        # anything checkpoints.from_pretrained reads, or 'pixels' (raw pixels)
    image_size = 0         # 0: the tower's own resolution (for 'pixels': the dataset's)
    act = ''               # '' (the checkpoint's; OpenAI: quick_gelu) or 'gelu' for open_clip GELU weights
    train_dir = ''         # linear probe: training shards (with classes.npy); '' skips the probe
    val_dir = ''           # '' carves val_fraction of train_dir (seeded) for the lambda search
    test_dir = ''          # linear probe and zero-shot evaluation shards
    val_fraction = 0.2
    seed = 0
    max_iter = 1000        # L-BFGS iterations per fit (CLIP: 1,000)
    features = 'pooled'    # probed features, comma-separated, each optionally ':none', ':l2' or
                           # ':standardize': 'pooled' (after ln_post, before the projection: what
                           # CLIP probes), 'cls' (before ln_post), 'embed' (projected). The first
                           # is probe.json's 'linear_probe'; all are in 'linear_probes'
    feature_norm = 'none'  # for entries without one: 'none' (CLIP: raw), 'l2', 'standardize'
                           # (mean and std of the training part)
    probe_dtype = 'float32'  # the logistic regression's precision ('float64': slower, same optimum)
    probe_tol = 1e-4       # a fit stops at max |gradient| <= probe_tol * max |gradient at zero|
    probe_threads = 1      # CPU threads of the fits (small ops: 1 is fastest); 0: torch's setting
    zero_shot = True       # on test_dir, when the checkpoint has a text tower and test_dir class names
    templates = ''         # file with one prompt template per line, '{}' = class name; '' = CLIP's 80
    retrieval_dir = ''     # shards with one caption per image; '' skips retrieval
    batch_size = 256
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cache_features = False  # keep features in out_dir and reuse them on the next run
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

    import hashlib
    import checkpoints
    import data

    # torchrun: every rank embeds its slice of each dataset, rank 0 gathers, fits and writes
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, world = 0, 1
    if ddp:
        import torch.distributed as dist
        if device.startswith('cuda'):
            device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    if not checkpoint:
        raise SystemExit('probe.py: set --checkpoint=<path> (or --checkpoint=pixels)')
    try:
        probes = parse_features(features, feature_norm)
    except ValueError as e:
        raise SystemExit(f'probe.py: features: {e}')
    if probe_dtype not in ('float32', 'float64'):
        raise SystemExit(f"probe.py: probe_dtype must be 'float32' or 'float64' (got {probe_dtype!r})")
    for key, d in (('train_dir', train_dir), ('val_dir', val_dir), ('test_dir', test_dir),
                   ('retrieval_dir', retrieval_dir)):
        if d and not os.path.exists(os.path.join(d, 'meta.json')):
            raise SystemExit(f'probe.py: {key}={d} has no meta.json (build it with prepare.py)')
    if train_dir and not test_dir:
        raise SystemExit('probe.py: the linear probe needs --test_dir as well as --train_dir')

    if checkpoint == 'pixels':
        vision = text = None
        size = image_size or data.Dataset(train_dir or test_dir or retrieval_dir).image_size
    else:
        if not os.path.exists(checkpoint):
            raise SystemExit(f'probe.py: checkpoint {checkpoint} does not exist')
        try:
            vision, text = checkpoints.from_pretrained(checkpoint, image_size=image_size or None,
                                                       act=act or None)
        except ValueError as e:
            raise SystemExit(f'probe.py: checkpoint: {e}')
        vision.to(device).eval().requires_grad_(False)
        if text is not None:
            text.to(device).eval().requires_grad_(False)
        size = vision.image_size
    os.makedirs(out_dir, exist_ok=True)  # only now: a run refused above leaves no empty folder

    memo = {}

    def features_of(d, desc=''):
        """{'cls', 'pooled', 'embed'} of a dataset, once per run; from out_dir's cache when allowed.
        Under torchrun every rank must call it for the same datasets in the same order."""
        if d in memo:
            return memo[d]
        key = f'v2|{os.path.abspath(checkpoint)}|{os.path.abspath(d)}|{size}'
        for p in (checkpoint, os.path.join(d, 'meta.json')):
            key += f'|{os.path.getmtime(p)}' if os.path.exists(p) else ''
        path = os.path.join(out_dir, f'features_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz')
        hit = [cache_features and os.path.exists(path)]
        if ddp:  # rank 0's view of the cache decides for all
            dist.broadcast_object_list(hit, 0, device=torch.device(device))
        if hit[0]:  # an array equal to 'pooled' (pixels; no projection) is stored once
            f = np.load(path) if rank == 0 else None
            memo[d] = f and {k: f[k if k in f.files else 'pooled'] for k in FEATURES}
        else:
            memo[d] = f = extract(vision, d, batch_size, size, device, rank, world, desc)
            if cache_features and rank == 0:
                np.savez(path + '.tmp.npz', **{k: v for k, v in f.items()
                                               if k == 'pooled' or v is not f['pooled']})
                os.replace(path + '.tmp.npz', path)
        return memo[d]

    def labels_of(d):
        ds = data.Dataset(d)
        if ds.classes is None:
            raise SystemExit(f'probe.py: {d} has no classes.npy; classification needs labels')
        return np.asarray(ds.classes, np.int64), ds.classnames

    # every dataset's features first (all ranks take part), then rank 0 alone evaluates
    zero_shot_on = zero_shot and test_dir and text is not None and data.Dataset(test_dir).classnames
    retrieval_on = (retrieval_dir and text is not None
                    and data.Dataset(retrieval_dir).meta.get('has_text'))
    needed = [train_dir, val_dir, test_dir] if train_dir else []
    needed += [test_dir] if zero_shot_on else []
    needed += [retrieval_dir] if retrieval_on else []
    t0 = time.time()
    for d in dict.fromkeys(x for x in needed if x):
        features_of(d, f'features {os.path.basename(os.path.normpath(d))}')
    if ddp:
        dist.destroy_process_group()
        if rank != 0:
            raise SystemExit(0)

    results = dict(checkpoint=checkpoint, image_size=size)
    table = []  # (evaluation, metric, value) rows of the printed table

    # (1) linear probe --------------------------------------------------------
    if train_dir:
        y_train, _ = labels_of(train_dir)
        y_test, _ = labels_of(test_dir)
        if val_dir:
            y_val, y_tr = labels_of(val_dir)[0], y_train
        else:
            tr, va = split_train_val(len(y_train), val_fraction, seed)
            y_tr, y_val = y_train[tr], y_train[va]
        num_classes = int(max(y_tr.max(), y_val.max(), y_test.max())) + 1
        results['linear_probes'] = {}
        for name, norm in probes:
            t1 = time.time()
            x_train, x_test = features_of(train_dir)[name], features_of(test_dir)[name]
            if val_dir:
                x_tr, x_val = x_train, features_of(val_dir)[name]
            else:
                x_tr, x_val = x_train[tr], x_train[va]
            x_tr, x_val, x_test = normalise(norm, x_tr, x_val, x_test)
            print(f'linear probe: {len(y_tr)} train / {len(y_val)} val / {len(y_test)} test, '
                  f'{x_tr.shape[1]}-d {name} features ({norm}), {num_classes} classes')
            lp = linear_probe(x_tr, y_tr, x_val, y_val, x_test, y_test, num_classes, max_iter,
                              getattr(torch, probe_dtype), probe_tol, probe_threads, device)
            r = dict(top1=lp['top1'], mean_per_class=lp['mean_per_class'], val_top1=lp['val_top1'],
                     l2_lambda=lp['lambda_'], lambdas_tried=lp['lambdas_tried'], feature=name,
                     feature_norm=norm, dim=int(x_tr.shape[1]), n_train=len(y_tr), n_val=len(y_val),
                     n_test=len(y_test), seconds=round(time.time() - t1, 1))
            results['linear_probes'][f'{name}:{norm}'] = r
            results.setdefault('linear_probe', r)  # the first: what single-probe readers use
            ev = 'linear probe' + (f' {name}:{norm}' if len(probes) > 1 else '')
            table += [(ev, 'top-1', 100 * lp['top1']),
                      (ev, 'mean per class', 100 * lp['mean_per_class']),
                      (ev, f"lambda (of {lp['lambdas_tried']} tried)", lp['lambda_'])]

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
            img = F.normalize(torch.as_tensor(features_of(test_dir)['embed']), dim=-1)
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
            img = F.normalize(torch.as_tensor(features_of(retrieval_dir)['embed']), dim=-1)
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
    w = max([14] + [len(ev) for ev, _, _ in table])
    print(f"\n{'evaluation':<{w}} {'metric':<24} {'value':>10}")
    for ev, metric, v in table:
        print(f'{ev:<{w}} {metric:<24} {v:>10.4g}')
    with open(os.path.join(out_dir, 'probe.json'), 'w') as f:
        json.dump(results, f)
    print(json.dumps(results))
