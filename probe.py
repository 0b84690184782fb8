"""
Stage 4: evaluate a frozen image tower three ways.

1. Linear probe as in CLIP (Radford et al. 2021, appendix A.3): features of the frozen tower
   (eval transform), L-BFGS multinomial logistic regression with up to 1,000 iterations, L2
   strength chosen by CLIP's parametric binary search on a validation split, retrained on
   train+val, reported on test as top-1 and mean-per-class accuracy. Several features
   ('pooled', 'cls', 'embed') can be probed in one run; features are extracted once.
2. Zero-shot classification: class names x prompt templates through the text tower.
3. Image-text retrieval R@1/5/10 in both directions (one caption per image).

    python probe.py --checkpoint=out/lit/ckpt.pt --train_dir=data/cifar_train \
        --test_dir=data/cifar_test
    python probe.py --checkpoint=pixels --train_dir=... --test_dir=...   # raw-pixel baseline
    torchrun --nproc_per_node=8 probe.py ...   # features on 8 GPUs, rank 0 fits and writes

The checkpoint is anything checkpoints.from_pretrained reads (ours, OpenAI CLIP, open_clip,
Hugging Face CLIP directories), or 'pixels': the flattened, CLIP-normalised pixels are the features.

Features for the probe are used raw by default (feature_norm='none'), as CLIP did with scikit-learn:
the lambda search absorbs the overall feature scale, and a probe result then says something about
the features as the tower emits them. 'standardize' (train statistics) or 'l2' are options.
The logistic regression runs on the GPU when there is one (float32 by default everywhere).
The evaluations themselves are functions in evaluation.py; this script runs them top to bottom.
"""
import hashlib
import json
import os
import time

import runtime  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoints
import data
from evaluation import (CLIP_TEMPLATES, FEATURES, extract, linear_probe, normalise, parse_features,
                        retrieval_recall, split_train_val, text_encoder, topk_accuracy,
                        zero_shot_weights)
import files
import jobs

# -----------------------------------------------------------------------------
# defaults as plain globals (python probe.py [config/x.py] [--key=value ...])
out_dir = 'out/probe'
checkpoint = ''        # anything checkpoints.from_pretrained reads, or 'pixels' (raw pixels)
image_size = 0         # 0: the tower's own resolution (for 'pixels': the dataset's)
act = ''               # '' (the checkpoint's; OpenAI: quick_gelu) or 'gelu' (open_clip GELU)
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
max_open_shards = 128  # shard files mapped at once per reader (LRU; data.MAX_OPEN_SHARDS)
timeout_minutes = 30.0  # torchrun: a rank waiting this long for another (dead, stopped) exits
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
runtime.check_device(device)  # before anything is made: one line, no out_dir
# -----------------------------------------------------------------------------

# torchrun: every rank embeds its slice of each dataset, rank 0 gathers, fits and writes
ddp, rank, world, device = jobs.init_distributed(device, timeout_minutes)
jobs.exit_on_signals('probe.json is written only at the end (cached features are whole)', rank == 0)
jobs.check_writable('out_dir', out_dir)
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
    # bad meta.json, shards: one line
    y = data.open_dataset(key, d, max_open_shards).classes if d else None
    if y is not None and len(y) and y.min() < 0:
        runtime.stop(f'{key}={d}: classes.npy holds {y.min()}; every image needs a class id >= 0')
if train_dir and not test_dir:
    raise SystemExit('probe.py: the linear probe needs --test_dir as well as --train_dir')

if checkpoint == 'pixels':
    vision = text = None
    size = image_size or data.Dataset(train_dir or test_dir or retrieval_dir,
                                      max_open_shards).image_size
else:
    if not os.path.exists(checkpoint):
        raise SystemExit(f'probe.py: checkpoint {checkpoint} does not exist')
    try:
        vision, text = checkpoints.from_pretrained(checkpoint, image_size=image_size or None,
                                                   act=act or None)
    except Exception as e:  # not a checkpoint: ValueError, or the reader's own errors
        raise SystemExit(f"probe.py: checkpoint: {str(e).splitlines()[0][:200]}")
    vision.to(device).eval().requires_grad_(False)
    if text is not None:
        text.to(device).eval().requires_grad_(False)
    size = vision.image_size
# only now: a run refused above leaves no empty folder; the lock, and one folder for all ranks
jobs.claim_out_dir(out_dir, ddp, rank, world, timeout_minutes)

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
        memo[d] = f = extract(vision, d, batch_size, size, device, rank, world, desc,
                              max_open_shards)
        if cache_features and rank == 0:
            with files.atomic_open(path) as fh:
                np.savez(fh, **{k: v for k, v in f.items()
                                if k == 'pooled' or v is not f['pooled']})
    return memo[d]


def majority_share(y):
    """The accuracy of always answering the most frequent test class: the chance level of an
    accuracy on these labels (1 / classes when they are balanced)."""
    return float(np.bincount(np.asarray(y)).max() / len(y))


def labels_of(d):
    ds = data.Dataset(d, max_open_shards)
    if ds.classes is None:
        raise SystemExit(f'probe.py: {d} has no classes.npy; classification needs labels')
    return np.asarray(ds.classes, np.int64), ds.classnames

# every dataset's features first (all ranks take part), then rank 0 alone evaluates
zero_shot_on = (zero_shot and test_dir and text is not None
                and data.Dataset(test_dir, max_open_shards).classnames)
retrieval_on = (retrieval_dir and text is not None
                and data.Dataset(retrieval_dir, max_open_shards).meta.get('has_text'))
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
                 n_test=len(y_test), chance=majority_share(y_test), seconds=round(time.time() - t1, 1))
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
                raise SystemExit(f"probe.py: {templates}: every line needs a '{{}}' for the "
                                 'class name')
        else:
            tpl = CLIP_TEMPLATES
        cls = zero_shot_weights(text_encoder(text, batch_size, device), classnames, tpl)
        img = F.normalize(torch.as_tensor(features_of(test_dir)['embed']), dim=-1)
        logits = img @ cls.T
        zs = dict(top1=topk_accuracy(logits, y_test, 1), top5=topk_accuracy(logits, y_test, 5),
                  templates=len(tpl), classes=len(classnames), n=len(y_test), chance=majority_share(y_test))
        results['zero_shot'] = zs
        table += [('zero-shot', 'top-1', 100 * zs['top1']),
                  ('zero-shot', 'top-5', 100 * zs['top5'])]

# (3) retrieval -------------------------------------------------------------
if retrieval_dir:
    ds = data.Dataset(retrieval_dir, max_open_shards)
    if text is None or not ds.meta.get('has_text'):
        why = ('the checkpoint has no text tower' if text is None
               else f'{retrieval_dir} has no captions')
        print(f'retrieval skipped: {why}')
        results['retrieval'] = dict(skipped=why)
    else:
        img = F.normalize(torch.as_tensor(features_of(retrieval_dir)['embed']), dim=-1)
        txt = []
        with torch.no_grad():
            for s in range(0, len(ds), batch_size):
                ids = ds.texts(np.arange(s, min(s + batch_size, len(ds))))
                ids = torch.as_tensor(ids, device=device)
                txt.append(text(ids).float().cpu())
        txt = F.normalize(torch.cat(txt), dim=-1)
        rt = retrieval_recall(img, txt)
        results['retrieval'] = dict(**rt, n=len(ds), chance=1 / len(ds))  # R@1 of a random ranking
        table += [('retrieval', k, 100 * v) for k, v in rt.items()]

results['seconds'] = round(time.time() - t0, 1)
w = max([14] + [len(ev) for ev, _, _ in table])
print(f"\n{'evaluation':<{w}} {'metric':<24} {'value':>10}")
for ev, metric, v in table:
    print(f'{ev:<{w}} {metric:<24} {v:>10.4g}')
files.save_json(os.path.join(out_dir, 'probe.json'), results)
print(json.dumps(results))
