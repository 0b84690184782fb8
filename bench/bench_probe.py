"""
Linear-probe speed against scikit-learn, on the same CIFAR-like features and lambdas.

Features: CIFAR-10 (../shared/datasets/cifar10.tar.gz) through a random-init ViT-T/4 at 16 px
(torch seed 0; the 128-d projected output, a random-init tower of scripts/reproduce_cifar10.py);
the 50K training images split 40K train / 10K val as probe.py splits them (seed 0), the 10K
test images for the test accuracy.
  ours:        probe.py's fit (float32, probe_threads=1; features rotated onto their principal
               axes, centred, preconditioned L-BFGS; each search fit warm-started)
  alternative: sklearn.linear_model.LogisticRegression(solver='lbfgs', C=1/lambda,
               max_iter=1000) in float64, threads as scikit-learn sets them, cold starts (CLIP)
Both minimise the same objective; both searches are evaluation.search_lambda (15 fits), scored by
validation (top-1, -loss), then a refit on train+val at the chosen lambda.
  (a) one fit at a few lambdas; (b) the whole search + refit. Median of `repeats` runs.

    pip install scikit-learn     # benchmark only; not a requirement of the project
    python bench/bench_probe.py [--repeats=3] [--lambdas=1e-05,100] [--skip_sklearn_search=False]

Wall and CPU seconds are printed (the machine may be shared: compare ratios of one run).
Ends with one JSON line. Features are cached in data/bench_probe/ (git-ignored).
"""
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluation  # noqa: E402

TAR = os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar.gz')
CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
out = os.path.join(ROOT, 'data', 'bench_probe')
repeats = 3
lambdas = '1e-05,100'
skip_sklearn_search = False
threads = 1
for arg in sys.argv[1:]:
    key, _, val = arg[2:].partition('=')
    if key not in ('repeats', 'lambdas', 'skip_sklearn_search', 'threads', 'out'):
        raise SystemExit(f'unknown option {arg}')
    globals()[key] = (val == 'True') if key == 'skip_sklearn_search' else type(globals()[key])(val)


def features():
    """{train, test} x {x, y}: the tower's 128-d output for every CIFAR-10 image, cached."""
    path = os.path.join(out, 'vit_t4_random_16px.npz')
    if os.path.exists(path):
        return dict(np.load(path))
    if not os.path.exists(TAR):
        raise SystemExit(f'{TAR} is absent (a fresh clone has no ../shared): nothing to measure')
    import data
    import model
    count = 0
    with tarfile.open(TAR) as tf:  # JPEG bytes to paths built here, never the members' names
        for m in tf:
            parts = m.name.split('/')
            if m.isfile() and len(parts) == 4 and parts[1] in ('train', 'test') and parts[2] in CLASSES:
                d = os.path.join(out, 'folders', parts[1], parts[2])
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, f'{count:06d}.jpg'), 'wb') as f:
                    f.write(tf.extractfile(m).read())
                count += 1
    torch.manual_seed(0)
    vision, _ = model.create('ViT-T/4', image_size=16)
    vision.eval()
    res = {}
    for split in ('train', 'test'):
        d = os.path.join(out, split)
        src = os.path.join(out, 'folders', split)
        subprocess.run([sys.executable, 'prepare.py', f'--src={src}', f'--out={d}',
                        '--image_size=32', '--overwrite=True'], cwd=ROOT, check=True)
        t0 = time.time()
        res[f'{split}_x'] = evaluation.extract(vision, d, 256, 16, 'cpu', desc=split)['embed']
        res[f'{split}_y'] = np.asarray(data.Dataset(d).classes, np.int64)
        print(f'{split} features: {res[split + "_x"].shape} in {time.time() - t0:.0f}s', flush=True)
    np.savez(path, **res)
    return res


def timed(fn):
    """(result of the last run, median wall s, median CPU s) over `repeats` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.time(), time.process_time()
        r = fn()
        walls.append(time.time() - t0)
        cpus.append(time.process_time() - c0)
    return r, statistics.median(walls), statistics.median(cpus)


def sk_fit(x, y, lam, info=None):
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    with warnings.catch_warnings():  # 1000 iterations (the limit) is printed as such
        warnings.simplefilter('ignore', ConvergenceWarning)
        m = LogisticRegression(C=1 / lam, max_iter=1000).fit(x, y)
    if info is not None:
        info['iterations'] = int(m.n_iter_[0])
    return torch.tensor(m.coef_.T), torch.tensor(m.intercept_)


def val_score(W, b, x, y):
    logits = evaluation.logits_of(W, b, x)
    yt = torch.as_tensor(y)
    return (round(float((logits.argmax(1) == yt).double().mean()), 12),
            -float(torch.nn.functional.cross_entropy(logits.double(), yt)))


def sk_probe(x_tr, y_tr, x_va, y_va, x_te, y_te):
    """CLIP's protocol driven by scikit-learn: the same search, cold fits, refit, test."""
    lam, tried = evaluation.search_lambda(lambda l: val_score(*sk_fit(x_tr, y_tr, l), x_va, y_va))
    W, b = sk_fit(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]), lam)
    top1 = float((evaluation.logits_of(W, b, x_te).argmax(1).numpy() == y_te).mean())
    return dict(lambda_=lam, val_top1=tried[lam][0], top1=top1, lambdas_tried=len(tried))


if __name__ == '__main__':
    import sklearn
    f = features()
    tr, va = evaluation.split_train_val(len(f['train_y']), 0.2, 0)
    x_tr, y_tr, x_va, y_va = f['train_x'][tr], f['train_y'][tr], f['train_x'][va], f['train_y'][va]
    x_te, y_te = f['test_x'], f['test_y']
    x64 = [a.astype(np.float64) for a in (x_tr, x_va, x_te)]
    print(f'{len(y_tr)} x {x_tr.shape[1]} train, {len(y_va)} val, {len(y_te)} test; scikit-learn '
          f'{sklearn.__version__}, torch {torch.__version__}, OMP_NUM_THREADS='
          f'{os.environ.get("OMP_NUM_THREADS", "unset")}, load {os.getloadavg()[0]:.1f}', flush=True)
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])  # a one-off import, not the fit's
    rows, res = [], dict(bench='probe', n_train=len(y_tr), dim=int(x_tr.shape[1]), repeats=repeats)

    # (a) one fit. Ours as linear_probe runs it: on the principal axes (rotation timed in)
    def ours_fit(lam, info, dtype=torch.float32, n_threads=threads):
        with evaluation.cpu_threads(n_threads):
            P = evaluation.principal_axes(np.concatenate([x_tr, x_va])).to(dtype)
            W, b = evaluation.fit_logreg(torch.as_tensor(x_tr).to(dtype) @ P, y_tr, 10, lam, dtype=dtype,
                                    threads=n_threads, info=info)
        return P @ W, b
    for lam in map(float, lambdas.split(',')):
        for name, fn in ((f'ours float32, {threads} thread(s)', lambda i: ours_fit(lam, i)),
                         ('ours float32, 2 threads', lambda i: ours_fit(lam, i, n_threads=2)),
                         ('ours float64', lambda i: ours_fit(lam, i, torch.float64)),
                         ('scikit-learn', lambda i: sk_fit(x64[0], y_tr, lam, i))):
            info = {}
            (W, b), wall, cpu = timed(lambda: fn(info))
            acc = val_score(W, b, x_va, y_va)[0]
            rows.append((f'fit lambda={lam:g}', name, wall, cpu, acc, info.get('iterations')))
            print(f'  {rows[-1][0]:<18} {name:<26} {wall:7.2f} s wall {cpu:7.2f} s CPU  val top-1 '
                  f'{100 * acc:.2f}%  {info.get("iterations")} iterations', flush=True)

    # (b) the whole protocol: 15-fit search, refit on train+val, test accuracy
    quiet = dict(log=lambda s: None)
    searches = [(f'ours float32, {threads} thread(s)', lambda: evaluation.linear_probe(
                    x_tr, y_tr, x_va, y_va, x_te, y_te, 10, threads=threads, **quiet)),
                ('ours float32, 2 threads', lambda: evaluation.linear_probe(
                    x_tr, y_tr, x_va, y_va, x_te, y_te, 10, threads=2, **quiet)),
                ('ours float64', lambda: evaluation.linear_probe(
                    x_tr, y_tr, x_va, y_va, x_te, y_te, 10, dtype=torch.float64, **quiet))]
    if not skip_sklearn_search:
        searches.append(('scikit-learn', lambda: sk_probe(x64[0], y_tr, x64[1], y_va, x64[2], y_te)))
    for name, fn in searches:
        r, wall, cpu = timed(fn)
        rows.append(('search + refit', name, wall, cpu, r['top1'], r['lambdas_tried']))
        print(f'  search + refit     {name:<26} {wall:7.2f} s wall {cpu:7.2f} s CPU  test top-1 '
              f'{100 * r["top1"]:.2f}%  lambda {r["lambda_"]:.3g} (val {100 * r["val_top1"]:.2f}%, '
              f'{r["lambdas_tried"]} fits)', flush=True)
    print(f"\n{'case':<18} {'solver':<26} {'wall s':>8} {'CPU s':>8} {'top-1 %':>8} {'iters/fits':>10}")
    for case, name, wall, cpu, acc, n in rows:
        print(f'{case:<18} {name:<26} {wall:8.2f} {cpu:8.2f} {100 * acc:8.2f} {n!s:>10}')
    res['rows'] = [dict(case=c, solver=s, wall_s=round(w, 2), cpu_s=round(u, 2), top1=a, n=n)
                   for c, s, w, u, a, n in rows]
    print(json.dumps(res))
