"""
Stage 1 of MLCD (paper Sec. 3.1): embed every training image with a teacher, spherical k-means
into k centres over all ranks, keep each image's l nearest centres as its positive labels.

    python cluster.py --data_dir=data/synthetic --out_dir=out/cluster --num_classes=1000
    torchrun --nproc_per_node=8 cluster.py --data_dir=data/laion400m --teacher=path/to/clip.pt

Phases, each kept on disk in out_dir and skipped when re-run:
  embed   -> embeddings.npy float16 [N, d], L2-normalised   (all ranks, contiguous row slices)
  kmeans  -> centroids.npy float32 [k, d]                    (all ranks, each on its share of the
                                                              sample; kmeans_state.npz resumes it)
  assign  -> labels.npy int32 [N, l], nearest centre first   (all ranks, streamed in chunks)
  report  -> cluster.json (always recomputed, it is cheap)
Each output is written under <name>.tmp and renamed when whole: a file of the final name is
complete, and a run that maps it (train.py) keeps the file it opened when force=True replaces it.
A finished phase leaves phase_<name>.json holding the settings that produced it and the data's
fingerprint (provenance.py), which train.py checks against its data_dir. Re-running
with the same settings skips it; with different settings the run stops and names them: an
out_dir is ONE clustering that train.py runs point at, so it is never silently overwritten.
Cluster differently into a new out_dir (embeddings_path=<old>/embeddings.npy reuses the
embeddings), or pass force=True to redo every phase here. A killed run re-run with the same
settings redoes an unfinished embed or assign phase and continues k-means from its last state.
"""
import os
import json
import time
import heapq
import signal
import resource

import runtime  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist

import data
import files
from files import npy_create, npy_write  # whole rows by positional writes
import jobs
import nearest
import phases
import provenance

# -----------------------------------------------------------------------------
# defaults
data_dir = 'data/synthetic'  # a data.py dataset (meta.json + shards)
out_dir = 'out/cluster'
embeddings_path = ''  # precomputed features .npy [N, d] (any float dtype): replaces the teacher
classes_path = ''  # ground truth int [N] for the report; default data_dir/classes.npy if present
teacher = 'pixels'  # 'pixels' or anything checkpoints.from_pretrained loads (paper: CLIP ViT-L/14)
teacher_text = False  # average with the caption embedding: the authors' (image + text) / 2
pixels_size = 16  # 'pixels' teacher: images area-downsampled to pixels_size^2 x 3 ...
pca_dim = 64  # ... then projected on the top pca_dim principal components
pca_samples = 20000  # images in the seeded sample the PCA is fitted on
batch_size = 256  # images per rank per teacher forward
num_classes = 0  # k, the number of centres (paper: 1M for LAION-400M); 0: N / 20 (at least l)
num_positives = 8  # l, labels kept per image (paper: 8)
niter = 20  # Lloyd iterations
max_points_per_centroid = 256  # k-means trains on a random sample of at most this * k points
kmeans_ckpt_interval = 5  # iterations between saves of kmeans_state.npz (where a killed run resumes)
seed = 0
assign_batch = 65536  # rows per search (bounds RAM); the torch search also keeps rows x k scores <= 1 GiB
search = 'auto'  # nearest-centre search: 'faiss' or 'torch' (matmul + top-k on device); auto: faiss,
#                  torch on CUDA when faiss has no GPUs, or when faiss is not installed
search_dtype = 'auto'  # the search's precision: 'float32', 'float16' or 'bfloat16'. A half-precision
#   search finds candidates, re-scored in float32 (labels as float32's, docs/scale.md); auto: float16
#   on CUDA (tensor cores; the embeddings are float16 already), float32 on CPUs
force = False  # redo every phase even if finished
timeout_minutes = 30.0  # a collective that waits longer than this fails instead of hanging
max_open_shards = 128  # shard files mapped at once per reader (LRU; data.MAX_OPEN_SHARDS)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
runtime.check_device(device)  # before anything is made: one line, no out_dir
# -----------------------------------------------------------------------------

# every phase splits its work evenly over the ranks: no rank waits long for another
ddp, rank, world, device = jobs.init_distributed(device, timeout_minutes)
master = rank == 0
jobs.exit_on_signals('finished phases are kept; the same command continues', master)
jobs.check_writable('out_dir', out_dir)
search, search_dtype, use_gpu_faiss = nearest.resolve(search, search_dtype, device)
emb_path, cen_path, lab_path = (os.path.join(out_dir, f) for f in ('embeddings.npy', 'centroids.npy', 'labels.npy'))
kms_path = os.path.join(out_dir, 'kmeans_state.npz')
SAMPLE_BLOCK = 1 << 16  # rows per block of the k-means sample draw (fixed: the sample must not depend
#                         on the world size)
kill_at, kill_count = os.environ.get('CLUSTER_KILL_AT', ''), {}


def kill_point(phase):
    # resume tests: CLUSTER_KILL_AT=<phase>:<n> SIGKILLs the process at the n-th pass here
    kill_count[phase] = kill_count.get(phase, 0) + 1
    if kill_at == f'{phase}:{kill_count[phase]}':
        os.kill(os.getpid(), signal.SIGKILL)


def barrier():
    if ddp:
        dist.barrier()


def rank_rows(n):
    """(start, end) of this rank's contiguous rows of n (runtime.shard_range)."""
    start, n_r = runtime.shard_range(n, rank, world)
    return start, start + n_r


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


emb_tmp = emb_path + '.tmp'
bad_rows = [0, []]  # this rank's non-finite feature rows: count, the first few


def check_finite(x, start):
    # a NaN or Inf feature would become NaN centres and one label for every image (the torch
    # search) or a faiss error: counted here, refused before any k-means work
    bad = np.flatnonzero(~np.isfinite(x).all(1))
    if len(bad):
        bad_rows[0] += len(bad)
        bad_rows[1] = (bad_rows[1] + (start + bad[:5]).tolist())[:5]


def refuse_non_finite():
    seen = [bad_rows]
    if ddp:
        seen = [None] * world
        dist.all_gather_object(seen, bad_rows)
    n = sum(c for c, _ in seen)
    if n:
        first = sorted(r for _, rows in seen for r in rows)[:5]
        if master and os.path.exists(emb_tmp):
            os.remove(emb_tmp)
        fail(f"{embeddings_path and f'embeddings_path={embeddings_path}' or f'teacher={teacher}'}: "
             f"{n:,} feature row(s) are not finite (NaN or Inf), first rows {first}; nothing was "
             'clustered: fix the features (or the teacher) and run again')


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
    if not os.path.exists(meta_path):  # no dataset, or an unfinished build: its one line
        data.open_dataset('data_dir', data_dir)
    try:
        missing = [os.path.join(data_dir, s[key]) for s in json.load(open(meta_path))['shards']
                   for key in (('images', 'texts') if teacher_text else ('images',))
                   if s.get(key) and not os.path.exists(os.path.join(data_dir, s[key]))]
    except Exception:  # not JSON, not a dataset's meta.json: open_dataset says what is wrong
        missing = []
    if missing:
        fail(f'missing shard {missing[0]} listed in {meta_path}')
    ds = data.open_dataset('data_dir', data_dir, max_open_shards)
    N = len(ds)
    if teacher_text and not ds.meta.get('has_text'):
        fail(f'teacher_text=True but the dataset {data_dir} has no texts')
if not embeddings_path and teacher == 'pixels' and not 1 <= pca_dim <= 3 * pixels_size ** 2:
    fail(f'pca_dim={pca_dim} must be between 1 and 3 * pixels_size^2 = {3 * pixels_size ** 2} (the pixels teacher)')
if not embeddings_path and teacher != 'pixels' and not os.path.exists(teacher):
    fail(f'teacher {teacher} does not exist (a checkpoint path or "pixels")')
if teacher_text and (embeddings_path or teacher == 'pixels'):
    fail('teacher_text=True needs a checkpoint teacher with a text tower (not pixels or embeddings_path)')
if num_classes == 0:  # 20 images a centre, as the quickstart's; CIFAR-10's recipe has 50, the paper 400
    num_classes = min(N, max(num_positives, N // 20))
    if rank == 0:
        print(f'num_classes=0: k = N / 20 = {num_classes:,} centres for {N:,} images')
if num_classes < 1 or num_classes > N:
    fail(f'num_classes={num_classes} must be between 1 and the number of images N={N}')
if max_points_per_centroid < 1 or niter < 1 or kmeans_ckpt_interval < 1 or assign_batch < 1:
    fail(f'max_points_per_centroid={max_points_per_centroid}, niter={niter}, '
         f'kmeans_ckpt_interval={kmeans_ckpt_interval} and assign_batch={assign_batch} must be >= 1')
if num_positives < 1 or num_positives > num_classes:
    fail(f'num_positives={num_positives} must be between 1 and num_classes={num_classes}')
cls_path = classes_path or (os.path.join(data_dir, 'classes.npy') if data_dir and not embeddings_path else '')
if classes_path and not os.path.exists(classes_path):
    fail(f'classes_path {classes_path} does not exist')
if cls_path and os.path.exists(cls_path):
    try:
        y = np.load(cls_path, mmap_mode='r')
    except Exception as e:
        fail(f'{cls_path} is not a .npy array ({str(e).splitlines()[0][:120]})')
    if y.shape != (N,):
        fail(f'{cls_path} has {y.shape} entries but there are N={N} images')
    if y.dtype.kind not in 'iu' or N and y.min() < 0:
        fail(f'{cls_path} must hold class ids >= 0 (int), got {y.dtype} with minimum {y.min()}')
    del y

# what the labels will name as their data (provenance.py): data_dir's fingerprint, read over all
# ranks; with embeddings_path, data_dir's when it holds N rows (the rows the features are of)
data_fp = None
if ds is not None or os.path.exists(os.path.join(data_dir, 'meta.json')):
    try:
        data_fp = provenance.data_fingerprint(data_dir, rank, world)
    except (ValueError, KeyError, TypeError) as e:
        if ds is not None:
            fail(f'data_dir={data_dir}: {e}')
    if data_fp is not None and data_fp['count'] != N:
        data_fp = None
    if embeddings_path and master:
        print(f'the labels will name data_dir={data_dir} as their data' if data_fp else
              f'embeddings_path: data_dir={data_dir} does not hold its {N:,} rows, so the labels '
              'name no data and train.py checks only the row count')

# only now: a run refused above leaves no empty folder; the lock, and one folder for all ranks
jobs.claim_out_dir(out_dir, ddp, rank, world, timeout_minutes)

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
if search_dtype != 'float32':  # a half-precision search is recorded (a float32 one: as before)
    keys['kmeans']['search_dtype'] = keys['assign']['search_dtype'] = search_dtype
outputs = {'embed': emb_path, 'kmeans': cen_path, 'assign': lab_path}
todo = phases.plan(out_dir, keys, outputs, force, data_fp, data_dir, fail)
barrier()  # every rank has decided before rank 0 removes any state below


def start_phase(p):
    # a phase about to rewrite its file invalidates itself and everything downstream (with the
    # k-means state of old embeddings)
    if master:
        phases.clear_from(p, out_dir, outputs, [kms_path] if p == 'embed' else [])
    barrier()
    return time.time()


def finish_phase(p, shape, t0, **extra):
    barrier()  # all ranks' rows are on disk
    if master:
        phases.finish(p, out_dir, outputs, keys[p], shape, data_fp, time.time() - t0, **extra)
    barrier()  # the file is under its final name before any rank reads it
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
        npy_create(emb_tmp, (N, d), np.float16)
        r0, r1 = rank_rows(N)
        for i in runtime.progress(range(r0, r1, assign_batch), desc='embed (copy)',
                                  disable=not master):
            x = npy_rows(embeddings_path, slice(i, min(i + assign_batch, r1)))
            check_finite(x, i)
            npy_write(emb_tmp, i, l2n(x))
            kill_point('embed')
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
            files.write_atomic(pca_path, lambda fh: np.savez(
                fh, mean=mean, components=comps, explained=evals[::-1][:pca_dim] / evals.sum()))
        barrier()
        pca = np.load(pca_path)
        d = pca_dim
        npy_create(emb_tmp, (N, d), np.float16)
        r0, r1 = rank_rows(N)
        for i in runtime.progress(range(r0, r1, batch_size), desc='embed (pixels)',
                                  disable=not master):
            x = pool(np.arange(i, min(i + batch_size, r1)))
            npy_write(emb_tmp, i, l2n((x - pca['mean']) @ pca['components']))
            kill_point('embed')
    else:
        import checkpoints
        try:
            vision, text = checkpoints.from_pretrained(teacher)
        except Exception as e:  # not a checkpoint: ValueError, or the reader's own errors
            fail(f'teacher {teacher} cannot be loaded: {str(e).splitlines()[0][:200]}')
        vision = vision.to(device).eval()
        d = vision.embed_dim
        if teacher_text:
            if text is None:
                fail(f'teacher_text=True but the teacher {teacher} has no text tower')
            if text.embed_dim != d:
                fail(f'teacher {teacher}: image embed_dim {vision.embed_dim} != text embed_dim {text.embed_dim}')
            text = text.to(device).eval()
        npy_create(emb_tmp, (N, d), np.float16)
        autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.startswith('cuda'))
        r0, r1 = rank_rows(N)
        batches = data.eval_batches(data_dir, batch_size, vision.image_size, rank=rank, world_size=world, device=device,
                                    max_open_shards=max_open_shards)
        for index, images in runtime.progress(batches, desc='embed (teacher)', disable=not master,
                                              total=-(-(r1 - r0) // batch_size)):
            with torch.no_grad(), autocast:
                e = F.normalize(vision(images).float(), dim=-1)
                if teacher_text:  # the authors' (image + text) / 2 on normalised features, renormalised
                    ids = torch.from_numpy(ds.texts(index.cpu().numpy())).to(device)
                    e = F.normalize((e + F.normalize(text(ids).float(), dim=-1)) / 2, dim=-1)
            index = index.cpu().numpy()
            assert (np.diff(index) == 1).all(), 'eval_batches yields contiguous rows'
            e = e.cpu().numpy()
            check_finite(e, int(index[0]))
            npy_write(emb_tmp, int(index[0]), e)
            kill_point('embed')
    refuse_non_finite()
    finish_phase('embed', (N, d), t0)
d = np.load(emb_path, mmap_mode='r').shape[1]
k, l = num_classes, num_positives
# rows per search; the torch search also holds rows x k scores: at most 1 GiB, on CUDA 1/16 of the
# device's memory (5 GiB on 80 GB: 2,560 rows at k = 1M in float16, a GEMM far longer than its copies)
score_size = 4 if search_dtype == 'float32' else 2
score_cap = (torch.cuda.get_device_properties(device).total_memory // 16 if device.startswith('cuda')
             else 1 << 30)
chunk_rows = assign_batch if search == 'faiss' else max(1, min(assign_batch, score_cap // (k * score_size)))

# -----------------------------------------------------------------------------
# phase 2: spherical k-means over all ranks. The sample is drawn from the seed alone; rank r holds
# only its contiguous slice of it (sorted by row). Centres are replicated; each iteration every
# rank assigns its points, and the per-centre sums and counts are all-reduced in float64. Every
# embedding is a float16 (a multiple of 2^-24, |x| <= 1), so these float64 sums are exact for
# fewer than 2^29 points per centre: the same in any order, hence bitwise the same centres for any
# world size, chunking or device, and every rank derives the same next centres from them.


def sample_share(n, a, b):
    """Rows [a, b) of the k-means sample (n of the N rows, sorted), as float16 [b - a, d]. Drawn
    per block of SAMPLE_BLOCK rows: how many rows each block gives (multivariate hypergeometric:
    a uniform n-subset), then which ones (uniform within the block), each from its own seed, so a
    rank draws and reads only the blocks its slice touches."""
    sizes = np.minimum(SAMPLE_BLOCK, N - np.arange(0, N, SAMPLE_BLOCK))
    counts = sizes if n == N else np.random.default_rng([seed, 0]).multivariate_hypergeometric(sizes, n)
    ends = np.cumsum(counts)
    starts = ends - counts
    x = np.empty((b - a, d), np.float16)
    for blk in runtime.progress(np.flatnonzero((ends > a) & (starts < b)), desc='kmeans sample',
                                disable=not master):
        lo = blk * SAMPLE_BLOCK
        rows = np.arange(lo, lo + sizes[blk])
        if counts[blk] < sizes[blk]:
            rng = np.random.default_rng([seed, 1, blk])
            rows = lo + np.sort(rng.choice(sizes[blk], counts[blk], replace=False))
        s0, s1 = max(a, starts[blk]), min(b, ends[blk])
        x[s0 - a:s1 - a] = npy_rows(emb_path, rows[s0 - starts[blk]:s1 - starts[blk]], np.float16)
    return x


def normalise(C):  # spherical k-means: a centre is the unit direction of its points' sum (in place)
    return C.div_(C.norm(dim=1, keepdim=True).clamp_min(1e-30))


def update(acc):
    """Next centres from the all-reduced [k, d + 1] float64 sums | counts. An empty centre takes a
    copy of the currently largest cluster, both nudged apart by +-1/1024 on alternate coordinates
    and splitting its count (faiss's split, but of the largest cluster, with no random draw)."""
    C, counts = normalise(acc[:, :d]), acc[:, d].cpu().numpy()  # C: a view, no second k x d copy
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        heap = [(-c, j) for j, c in enumerate(counts) if c > 0]  # largest first, then lowest id
        heapq.heapify(heap)
        eps = torch.full((d,), 1 / 1024, dtype=C.dtype, device=C.device)
        eps[1::2] *= -1
        moved = set()
        for j in empty:
            c, big = heapq.heappop(heap)
            C[j], C[big] = C[big] * (1 + eps), C[big] * (1 - eps)
            heapq.heappush(heap, (c + (-c) // 2, big))  # big keeps the larger half
            heapq.heappush(heap, (-((-c) // 2), j))
            moved |= {j, big}
        moved = torch.tensor(sorted(moved), device=C.device)
        C[moved] = normalise(C[moved])
    return C.float().contiguous(), len(empty)


kmeans_obj = None
if todo['kmeans']:
    t0 = start_phase('kmeans')
    n = min(N, max_points_per_centroid * k)
    a, b = rank_rows(n)
    if master:
        gib = lambda x: f'{x / 2 ** 30:.2f} GiB'
        share, cen_b, acc_b = (b - a) * d * 2, k * d * 4, k * (d + 1) * 8
        # a chunk: float32 rows to search, float64 rows | 1 to sum (twice, cat), results (+ scores)
        chunk = chunk_rows * (20 * d + 24) + (chunk_rows * k * score_size if search == 'torch' else 0)
        where = f' (share on the host, the rest on {device})' if device.startswith('cuda') else ''
        print(f'kmeans: {n:,} sample points over {world} rank(s); per rank: share {b - a:,} x {d} '
              f'float16 {gib(share)} + centres 2 x {gib(cen_b)} + sums {gib(acc_b)} + one chunk of '
              f'{chunk_rows:,} rows {gib(chunk)} = peak ~{gib(share + 2 * cen_b + acc_b + chunk)}{where}',
              flush=True)
    it0, objs, C = 0, [], None
    if os.path.exists(kms_path):  # a killed run's last state: continue from it if it is ours
        try:
            st = np.load(kms_path)
            st_keys, st_cen = json.loads(str(st['config'])), st['centroids']
            st_it, st_objs = int(st['iteration']), st['obj'].tolist()
        except Exception as e:
            fail(f'{kms_path} is unreadable ({e}); delete it to restart k-means')
        if st_keys == keys['kmeans'] and st_cen.shape == (k, d) and st_it <= niter:
            it0, objs, C = st_it, st_objs, torch.from_numpy(st_cen).to(device)
            if master:
                print(f'resume kmeans from {kms_path} at iteration {it0}/{niter}')
        elif master:
            print(f'ignoring {kms_path}: made with {st_keys}, now {keys["kmeans"]}')
    x = sample_share(n, a, b)
    if C is None:  # initial centres: k sample points chosen by the seed, each sent by the rank holding it
        pos = np.random.default_rng([seed, 2]).choice(n, k, replace=False)
        mine = (pos >= a) & (pos < b)
        C = torch.zeros(k, d, device=device)
        C[torch.from_numpy(mine)] = torch.from_numpy(x[pos[mine] - a]).to(device).float()
        if ddp:
            dist.all_reduce(C)  # one nonzero term per row: a copy
        C = normalise(C.double()).float()
    pbar = runtime.progress(range(it0, niter), desc=f'kmeans {n}x{d} -> {k}', disable=not master,
                            initial=it0, total=niter, unit='it')
    for it in pbar:
        f = nearest.searcher(C.cpu().numpy(), device, search, search_dtype, use_gpu_faiss)
        acc = torch.zeros(k, d + 1, dtype=torch.float64, device=device)  # per-centre sums | counts
        obj = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, b - a, chunk_rows):  # no bar of its own: one k-means bar, not niter
            D, I = f(x[i:i + chunk_rows], 1)
            xi = torch.from_numpy(x[i:i + chunk_rows]).to(device).double()
            acc.index_add_(0, I[:, 0], torch.cat([xi, torch.ones_like(xi[:, :1])], 1))
            obj += D.double().sum()
        if ddp:
            dist.all_reduce(acc)
            dist.all_reduce(obj)
        del f
        C, n_empty = update(acc)
        del acc
        objs.append(float(obj) / n)  # mean cosine of a point to its centre, before this update
        pbar.set_postfix(mean_cos=f'{objs[-1]:.4f}', empty=n_empty)
        if master and ((it + 1) % kmeans_ckpt_interval == 0) and it + 1 < niter:
            files.write_atomic(kms_path, lambda fh: np.savez(
                fh, centroids=C.cpu().numpy(), iteration=it + 1, obj=np.array(objs),
                config=json.dumps(keys['kmeans'])))
        kill_point('kmeans')
    kmeans_obj = objs[-1]
    if master:
        files.write_atomic(cen_path, lambda fh: np.save(fh, C.cpu().numpy()))
    del x
    finish_phase('kmeans', (k, d), t0, mean_cos=kmeans_obj)
    if master and os.path.exists(kms_path):
        os.remove(kms_path)
cen = np.load(cen_path)
if cen.shape[1] != d:
    fail(f'{cen_path} has dim {cen.shape[1]} but {emb_path} has dim {d}; force=True redoes it')
if master and kmeans_obj is None:
    kmeans_obj = json.load(open(phases.state_path(out_dir, 'kmeans'))).get('mean_cos')

# -----------------------------------------------------------------------------
# phase 3: assignment, every image's l nearest centres by inner product (= cosine, both unit)
if todo['assign']:
    t0 = start_phase('assign')
    f = nearest.searcher(cen, device, search, search_dtype, use_gpu_faiss)
    npy_create(lab_path + '.tmp', (N, l), np.int32)
    r0, r1 = rank_rows(N)
    starts = range(r0, r1, chunk_rows)
    # the next chunks are read in a thread while this one is searched
    rows = runtime.prefetched(lambda i: npy_rows(emb_path, slice(i, min(i + chunk_rows, r1)), np.float16),
                              starts, 2)
    for i, x in runtime.progress(zip(starts, rows), desc=f'assign top-{l}', disable=not master,
                                 total=len(starts)):
        _, I = f(x, l)  # sorted, nearest first
        npy_write(lab_path + '.tmp', i, I.cpu().numpy().astype(np.int32))
        kill_point('assign')
    finish_phase('assign', (N, l), t0)

# peak resident memory of every rank (Linux reports KiB), for the report
rss = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20] * world
if ddp:
    dist.all_gather_object(rss, rss[0])

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
                  search=search, faiss_gpu=use_gpu_faiss, world_size=world,
                  peak_rss_gib=[round(r, 3) for r in rss], out_dir=out_dir)
    files.save_json(os.path.join(out_dir, 'cluster.json'), result, indent=1)
    print(json.dumps(result))
barrier()
if ddp:
    dist.destroy_process_group()
