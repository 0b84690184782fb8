"""
Stage 1 of MLCD (DESIGN.md §1.1): embed every training image with a teacher, spherical k-means
into k centres with faiss, keep each image's l nearest centres as its positive labels.

    python cluster.py --data_dir=data/synthetic --out_dir=out/cluster --num_classes=1000
    torchrun --nproc_per_node=8 cluster.py config/x.py --teacher=path/to/clip.pt

Phases, each kept on disk in out_dir and skipped when re-run:
  embed   -> embeddings.npy float16 [N, d], L2-normalised   (all ranks, contiguous row slices)
  kmeans  -> centroids.npy float32 [k, d]                    (rank 0, faiss; others wait)
  assign  -> labels.npy int32 [N, l], nearest centre first   (all ranks, streamed in chunks)
  report  -> cluster.json (always recomputed, it is cheap)
A finished phase leaves phase_<name>.json holding the settings that produced it. Re-running
with the same settings skips it; with different settings the run stops and names them: an
out_dir is ONE clustering that train.py runs point at, so it is never silently overwritten.
Cluster differently into a new out_dir (embeddings_path=<old>/embeddings.npy reuses the
embeddings), or pass force=True to redo every phase here.
"""
import os
import json
import time
from datetime import timedelta

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
import faiss
from tqdm import tqdm

# -----------------------------------------------------------------------------
# defaults
data_dir = 'data/synthetic'  # a data.py dataset (meta.json + shards)
out_dir = 'out/cluster'
embeddings_path = ''  # precomputed features .npy [N, d] (any float dtype): replaces the teacher
classes_path = ''  # ground truth int [N] for the report; default data_dir/classes.npy if present
teacher = 'pixels'  # 'pixels' or a checkpoint model.from_pretrained loads (paper: CLIP ViT-L/14)
teacher_text = False  # average with the caption embedding: the authors' (image + text) / 2
pixels_size = 16  # 'pixels' teacher: images area-downsampled to pixels_size^2 x 3 ...
pca_dim = 64  # ... then projected on the top pca_dim principal components
pca_samples = 20000  # images in the seeded sample the PCA is fitted on
batch_size = 256  # images per rank per teacher forward
num_classes = 1000  # k, the number of centres (paper: 1M for LAION-400M)
num_positives = 8  # l, labels kept per image (paper: 8)
niter = 20  # Lloyd iterations
max_points_per_centroid = 256  # k-means trains on a random sample of at most this * k points
seed = 0
assign_batch = 65536  # rows per faiss search in the assignment (bounds RAM)
force = False  # redo every phase even if finished
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    # rank 0 runs k-means alone (hours at LAION scale) while the others wait at a barrier
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', timeout=timedelta(hours=24))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
use_gpu_faiss = device.startswith('cuda') and faiss.get_num_gpus() > 0
os.makedirs(out_dir, exist_ok=True)
emb_path, cen_path, lab_path = (os.path.join(out_dir, f) for f in ('embeddings.npy', 'centroids.npy', 'labels.npy'))


def barrier():
    if ddp:
        dist.barrier()


def rank_slice(n, r, w):
    """Contiguous rows of rank r: n_r = n // w + (r < n % w), the same split as PartialFC."""
    start = r * (n // w) + min(r, n % w)
    return start, start + n // w + (r < n % w)


def npy_create(path, shape, dtype):
    """Rank 0 allocates the shared .npy; every rank then fills its own rows."""
    if master:
        np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape).flush()
    barrier()


def npy_write(path, start, values):
    # pwrite of exactly our rows, not a writable memmap: an mmap writes back whole pages, and on a
    # file system shared by several nodes a page straddling two ranks' slices could lose rows
    m = np.load(path, mmap_mode='r')
    values = np.ascontiguousarray(values, dtype=m.dtype)
    offset = m.offset + start * m.strides[0]
    del m
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, memoryview(values).cast('B'), offset)
    finally:
        os.close(fd)


def npy_rows(path, rows, dtype=np.float32):
    """Copy rows (a slice or sorted indices within a short range) out of a memmap that is dropped
    right after, so the file pages it touched stop counting towards this process's memory."""
    m = np.load(path, mmap_mode='r')
    out = np.array(m[rows], dtype=dtype)
    del m
    return out


def l2n(x):  # in place: no second copy of a chunk
    x /= np.maximum(np.sqrt(np.einsum('ij,ij->i', x, x)), 1e-12)[:, None]
    return x


def fail(msg):
    raise SystemExit(f'cluster.py: {msg}')


# -----------------------------------------------------------------------------
# inputs: how many rows, and check what we can before any work starts
ds = None
if embeddings_path:
    if not os.path.exists(embeddings_path):
        fail(f'embeddings_path {embeddings_path} does not exist')
    try:
        src = np.load(embeddings_path, mmap_mode='r')
    except Exception as e:
        fail(f'embeddings_path {embeddings_path} is not a .npy array: {e}')
    if src.ndim != 2 or src.dtype.kind != 'f':
        fail(f'embeddings_path {embeddings_path} must be a float [N, d] array, got {src.dtype} {list(src.shape)}')
    N = src.shape[0]
    del src
    if os.path.realpath(embeddings_path) == os.path.realpath(emb_path):
        fail(f'embeddings_path {embeddings_path} is the output of this out_dir; cluster it into another out_dir')
else:
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(meta_path):
        fail(f'no dataset at data_dir={data_dir}: {meta_path} is missing (write one with data.py)')
    meta = json.load(open(meta_path))
    for s in meta.get('shards', []):
        for key in ('images', 'texts') if teacher_text else ('images',):
            if s.get(key) and not os.path.exists(os.path.join(data_dir, s[key])):
                fail(f'missing shard {os.path.join(data_dir, s[key])} listed in {meta_path}')
    import data
    ds = data.Dataset(data_dir)
    N = len(ds)
    if teacher_text and not ds.meta.get('has_text'):
        fail(f'teacher_text=True but the dataset {data_dir} has no texts')
if not embeddings_path and teacher == 'pixels' and not 1 <= pca_dim <= 3 * pixels_size ** 2:
    fail(f'pca_dim={pca_dim} must be between 1 and 3 * pixels_size^2 = {3 * pixels_size ** 2} (the pixels teacher)')
if not embeddings_path and teacher != 'pixels' and not os.path.exists(teacher):
    fail(f'teacher {teacher} does not exist (a checkpoint path or "pixels")')
if teacher_text and (embeddings_path or teacher == 'pixels'):
    fail('teacher_text=True needs a checkpoint teacher with a text tower (not pixels or embeddings_path)')
if num_classes < 1 or num_classes > N:
    fail(f'num_classes={num_classes} must be between 1 and the number of images N={N}')
if max_points_per_centroid < 1 or niter < 1:
    fail(f'max_points_per_centroid={max_points_per_centroid} and niter={niter} must be >= 1')
if num_positives < 1 or num_positives > num_classes:
    fail(f'num_positives={num_positives} must be between 1 and num_classes={num_classes}')
cls_path = classes_path or (os.path.join(data_dir, 'classes.npy') if data_dir and not embeddings_path else '')
if classes_path and not os.path.exists(classes_path):
    fail(f'classes_path {classes_path} does not exist')
if cls_path and os.path.exists(cls_path) and np.load(cls_path, mmap_mode='r').shape != (N,):
    fail(f'{cls_path} has {np.load(cls_path, mmap_mode="r").shape} entries but there are N={N} images')

# -----------------------------------------------------------------------------
# which phases run: a phase runs if forced, unfinished, or anything before it ran in this run
if embeddings_path:
    keys = {'embed': dict(embeddings_path=os.path.realpath(embeddings_path))}
elif teacher == 'pixels':
    keys = {'embed': dict(data_dir=os.path.realpath(data_dir), teacher=teacher, pixels_size=pixels_size,
                          pca_dim=pca_dim, pca_samples=pca_samples, seed=seed)}
else:
    keys = {'embed': dict(data_dir=os.path.realpath(data_dir), teacher=os.path.realpath(teacher),
                          teacher_text=teacher_text)}
keys['kmeans'] = dict(num_classes=num_classes, niter=niter, max_points_per_centroid=max_points_per_centroid, seed=seed)
keys['assign'] = dict(num_positives=num_positives)
outputs = {'embed': emb_path, 'kmeans': cen_path, 'assign': lab_path}
state_path = lambda p: os.path.join(out_dir, f'phase_{p}.json')
todo, upstream = {}, False
for p in ('embed', 'kmeans', 'assign'):
    st = json.load(open(state_path(p))) if os.path.exists(state_path(p)) else None
    if force or upstream or st is None or not os.path.exists(outputs[p]):
        todo[p] = upstream = True
        continue
    diff = [f'{k}={st["config"].get(k)!r} (now {v!r})' for k, v in keys[p].items() if st['config'].get(k) != v]
    if set(st['config']) != set(keys[p]):
        diff.append(f'settings {sorted(st["config"])} (now {sorted(keys[p])})')
    if diff:
        fail(f'{state_path(p)}: the finished {p} phase in {out_dir} was made with {", ".join(diff)}; '
             f'pass force=True to redo it here, or use a new out_dir'
             + (f' (embeddings_path={emb_path} reuses the embeddings)' if p != 'embed' else ''))
    shape = list(np.load(outputs[p], mmap_mode='r').shape)
    if shape != st['shape']:
        fail(f'{outputs[p]} is {shape} but {state_path(p)} recorded {st["shape"]}: the file changed; force=True redoes it')
    todo[p] = False
barrier()  # every rank has decided before rank 0 removes any state below


def start_phase(p):
    # a phase about to rewrite its file invalidates itself and everything downstream
    if master:
        for q in ('embed', 'kmeans', 'assign')[('embed', 'kmeans', 'assign').index(p):]:
            if os.path.exists(state_path(q)):
                os.remove(state_path(q))
    barrier()
    return time.time()


def finish_phase(p, shape, t0, **extra):
    barrier()  # all ranks' rows are on disk
    if master:
        tmp = state_path(p) + '.tmp'
        json.dump(dict(config=keys[p], shape=list(shape), seconds=round(time.time() - t0, 2), **extra), open(tmp, 'w'))
        os.replace(tmp, state_path(p))
    times[p] = round(time.time() - t0, 2)


times = {}
for p in todo:
    if not todo[p] and master:
        print(f'skip {p}: {outputs[p]} is finished (force=True redoes it)')

# -----------------------------------------------------------------------------
# phase 1: embed
if todo['embed']:
    t0 = start_phase('embed')
    if embeddings_path:  # user features: normalise into our own float16 file, ranks split rows
        d = np.load(embeddings_path, mmap_mode='r').shape[1]
        npy_create(emb_path, (N, d), np.float16)
        r0, r1 = rank_slice(N, rank, world)
        for i in tqdm(range(r0, r1, assign_batch), desc='embed (copy)', disable=not master):
            npy_write(emb_path, i, l2n(npy_rows(embeddings_path, slice(i, min(i + assign_batch, r1)))))
    elif teacher == 'pixels':
        # Downsampled pixels + PCA: a deterministic teacher that needs no checkpoint. Each image is
        # pooled on its own (area average), so a row never depends on which batch it was in.
        def pool(idx):
            x = torch.from_numpy(ds.images(idx)).permute(0, 3, 1, 2).float()
            return F.adaptive_avg_pool2d(x, pixels_size).flatten(1).double().numpy() / 255.0
        D = 3 * pixels_size ** 2
        pca_path = os.path.join(out_dir, 'pixels_pca.npz')
        if master:  # fit once on rank 0 so every rank projects with the very same basis
            n = min(N, pca_samples)
            idx = np.sort(np.random.default_rng(seed).choice(N, n, replace=False))
            s, ss = np.zeros(D), np.zeros((D, D))
            for i in range(0, n, batch_size):
                x = pool(idx[i:i + batch_size])
                s += x.sum(0)
                ss += x.T @ x
            mean = s / n
            evals, evecs = np.linalg.eigh(ss / n - np.outer(mean, mean))  # covariance, ascending
            comps = evecs[:, ::-1][:, :pca_dim]
            comps *= np.where(comps[np.abs(comps).argmax(0), np.arange(pca_dim)] < 0, -1, 1)  # fix signs
            np.savez(pca_path, mean=mean, components=comps, explained=evals[::-1][:pca_dim] / evals.sum())
        barrier()
        pca = np.load(pca_path)
        d = pca_dim
        npy_create(emb_path, (N, d), np.float16)
        r0, r1 = rank_slice(N, rank, world)
        for i in tqdm(range(r0, r1, batch_size), desc='embed (pixels)', disable=not master):
            x = pool(np.arange(i, min(i + batch_size, r1)))
            npy_write(emb_path, i, l2n((x - pca['mean']) @ pca['components']))
    else:
        import model
        try:
            vision, text = model.from_pretrained(teacher)
        except ValueError as e:
            fail(f'teacher {teacher} cannot be loaded: {e}')
        vision = vision.to(device).eval()
        d = vision.embed_dim
        if teacher_text:
            if text is None:
                fail(f'teacher_text=True but the teacher {teacher} has no text tower')
            if text.embed_dim != d:
                fail(f'teacher {teacher}: image embed_dim {vision.embed_dim} != text embed_dim {text.embed_dim}')
            text = text.to(device).eval()
        npy_create(emb_path, (N, d), np.float16)
        autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.startswith('cuda'))
        r0, r1 = rank_slice(N, rank, world)
        batches = data.eval_batches(data_dir, batch_size, vision.image_size, rank=rank, world_size=world, device=device)
        for index, images in tqdm(batches, desc='embed (teacher)', disable=not master, total=-(-(r1 - r0) // batch_size)):
            with torch.no_grad(), autocast:
                e = F.normalize(vision(images).float(), dim=-1)
                if teacher_text:  # the authors' (image + text) / 2 on normalised features, renormalised
                    ids = torch.from_numpy(ds.texts(index.cpu().numpy())).to(device)
                    e = F.normalize((e + F.normalize(text(ids).float(), dim=-1)) / 2, dim=-1)
            index = index.cpu().numpy()
            assert (np.diff(index) == 1).all(), 'eval_batches yields contiguous rows'
            npy_write(emb_path, int(index[0]), e.cpu().numpy())
    finish_phase('embed', (N, d), t0)
d = np.load(emb_path, mmap_mode='r').shape[1]
k, l = num_classes, num_positives

# -----------------------------------------------------------------------------
# phase 2: spherical k-means on a seeded sample (rank 0; the sample is the only thing in RAM)
kmeans_obj = None
if todo['kmeans']:
    t0 = start_phase('kmeans')
    if master:
        n = min(N, max_points_per_centroid * k)
        idx = np.arange(N) if n == N else np.sort(np.random.default_rng(seed).choice(N, n, replace=False))
        x = np.empty((n, d), np.float32)
        # read the sample window by window of assign_batch rows: fancy indexing across the whole
        # memmap would map (and count as ours) most of the file's pages at once
        cuts = np.searchsorted(idx, np.arange(0, N + assign_batch, assign_batch))
        for a, b in tqdm(list(zip(cuts[:-1], cuts[1:])), desc='kmeans sample'):
            x[a:b] = npy_rows(emb_path, idx[a:b])
        # one faiss call per Lloyd iteration, for progress: the result equals one call with niter
        # (the state between iterations is just the centroids; empty clusters are split with a
        # fixed seed inside faiss). We sampled already, so faiss must not subsample again.
        km = faiss.Kmeans(d, k, niter=1, seed=seed, spherical=True, gpu=use_gpu_faiss,
                          max_points_per_centroid=n, min_points_per_centroid=1)
        pbar = tqdm(range(niter), desc=f'kmeans {n}x{d} -> {k}')
        for it in pbar:
            km.train(x, init_centroids=None if it == 0 else km.centroids)
            kmeans_obj = float(km.obj[-1]) / n  # mean cosine of a point to its centre
            pbar.set_postfix(mean_cos=f'{kmeans_obj:.4f}')
        np.save(cen_path, km.centroids.astype(np.float32))
        del x
    finish_phase('kmeans', (k, d), t0, mean_cos=kmeans_obj)
cen = np.load(cen_path)
if cen.shape[1] != d:
    fail(f'{cen_path} has dim {cen.shape[1]} but {emb_path} has dim {d}; force=True redoes it')
if master and kmeans_obj is None:
    kmeans_obj = json.load(open(state_path('kmeans'))).get('mean_cos')

# -----------------------------------------------------------------------------
# phase 3: assignment, every image's l nearest centres by inner product (= cosine, both unit)
if todo['assign']:
    t0 = start_phase('assign')
    index = faiss.IndexFlatIP(d)
    if use_gpu_faiss:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), torch.cuda.current_device(), index)
    index.add(cen)
    npy_create(lab_path, (N, l), np.int32)
    r0, r1 = rank_slice(N, rank, world)
    for i in tqdm(range(r0, r1, assign_batch), desc=f'assign top-{l}', disable=not master):
        _, I = index.search(npy_rows(emb_path, slice(i, min(i + assign_batch, r1))), l)  # sorted, nearest first
        npy_write(lab_path, i, I.astype(np.int32))
    finish_phase('assign', (N, l), t0)

# -----------------------------------------------------------------------------
# phase 4: report (rank 0): cluster sizes of the top-1 assignment, purity and NMI vs ground truth
if master:
    t0 = time.time()
    sizes = np.zeros(k, dtype=np.int64)
    for i in range(0, N, 1 << 22):
        sizes += np.bincount(npy_rows(lab_path, slice(i, i + (1 << 22)), np.int64)[:, 0], minlength=k)
    edges = [0, 1] + [2 ** j for j in range(1, int(np.log2(max(sizes.max(), 1))) + 2)]
    hist = {(f'{a}' if b == a + 1 else f'{a}-{b - 1}'): int(((sizes >= a) & (sizes < b)).sum())
            for a, b in zip(edges[:-1], edges[1:])}
    result = dict(N=N, d=d, k=k, l=l, teacher='embeddings_path' if embeddings_path else teacher,
                  teacher_text=teacher_text, kmeans_mean_cos=kmeans_obj,
                  sizes=dict(min=int(sizes.min()), median=float(np.median(sizes)), max=int(sizes.max()),
                             empty=int((sizes == 0).sum()), hist=hist))
    if cls_path and os.path.exists(cls_path):
        y = np.load(cls_path).astype(np.int64)
        top1 = npy_rows(lab_path, (slice(None), 0), np.int64)  # N ints, not embeddings
        # sparse contingency table: (cluster, class) pairs and their counts
        pairs, n_ij = np.unique(top1 * (y.max() + 1) + y, return_counts=True)
        ci, yj = pairs // (y.max() + 1), pairs % (y.max() + 1)
        a, b = np.bincount(top1, minlength=k).astype(np.float64), np.bincount(y).astype(np.float64)
        purity = np.maximum.reduceat(n_ij, np.r_[0, np.flatnonzero(np.diff(ci)) + 1]).sum() / N
        # NMI = I(U;V) / ((H(U) + H(V)) / 2), the arithmetic normalisation (sklearn's default)
        mi = (n_ij / N * np.log(N * n_ij / (a[ci] * b[yj]))).sum()
        h = lambda c: -(c[c > 0] / N * np.log(c[c > 0] / N)).sum()
        hu, hv = h(a), h(b)
        nmi = 1.0 if hu + hv == 0 else max(0.0, mi) / ((hu + hv) / 2)
        result.update(purity=float(purity), nmi=float(nmi), true_classes=int((b > 0).sum()))
    times['report'] = round(time.time() - t0, 2)
    result.update(phases={p: ('done' if todo[p] else 'skipped') for p in todo}, seconds=times,
                  faiss_gpu=use_gpu_faiss, world_size=world, out_dir=out_dir)
    json.dump(result, open(os.path.join(out_dir, 'cluster.json'), 'w'), indent=1)
    print(json.dumps(result))
barrier()
if ddp:
    dist.destroy_process_group()
