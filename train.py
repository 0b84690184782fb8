"""
Stage 2: MLCD pre-training (An et al., ECCV 2024, Sec. 3). A ViT embeds each image; its
L2-normalised embedding is scored against learnable class centres, the l nearest cluster centres
of the image (labels.npy from cluster.py) being positives and a random fraction r of the others
negatives (PartialFC, loss.py). The image tower is replicated with DDP; the centres are sharded
over ranks and never replicated.

One CPU process:   python train.py config/tiny.py --data_dir=D --labels_dir=C  (see the config)
One 8-GPU node:    torchrun --standalone --nproc_per_node=8 train.py config/vitl14.py
Several nodes:     torchrun --nnodes=N --node_rank=i --master_addr=... --nproc_per_node=8 train.py ...
                   (out_dir must be on a file system every rank sees: centre shards live there)
Continue a run:    python train.py config/cifar10.py --init_from=resume   (any number of ranks)

A run stops with one line, never leaving a checkpoint from a bad state: on a non-finite
embedding, loss, gradient or weight, bad input, a rank that stops answering (timeout_minutes),
or SIGTERM / SIGINT (after the current step and a checkpoint; exit status 1, resume with
--init_from=resume).
"""
import json
import os
import time

import runtime  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import centres
from checkpoints import from_pretrained
import data
from data import Loader
from evaluation import knn_accuracy
import files
from files import rng_state, set_rng_state
import jobs
from loss import PartialFC, check_settings
from model import PRESETS, VisionTransformer
import optim
import provenance
from runtime import stop

# -----------------------------------------------------------------------------
# default config values: ViT-B/16 on the paper's recipe (Tables 9, 10); config/*.py override them
# I/O
out_dir = 'out/train'
data_dir = 'data/laion400m'  # a data.py dataset
labels_dir = 'out/cluster'  # a cluster.py out_dir: labels.npy [N, l] int32 (+ centroids.npy)
init_from = 'scratch'  # 'scratch' | 'resume' (out_dir/ckpt.pt) | a checkpoint from_pretrained loads
overwrite = False  # start a new run in an out_dir that holds a checkpoint (replacing it)
log_interval = 10  # steps between log lines
ckpt_interval = 1000  # steps between checkpoints (one is always written at the end)
eval_data_dir = ''  # optional dataset with classes.npy: leave-one-out kNN accuracy, for monitoring
eval_interval = 0  # steps between kNN evaluations (0: only at the end, if eval_data_dir is set)
eval_batch_size = 256
knn_k = 20
wandb_log = False  # used only if wandb is installed
wandb_project = 'mlcd'
wandb_run_name = 'train'
# model
model = 'ViT-B/16'  # a model.py preset, used when init_from='scratch'
image_size = 0  # 0: the preset's (or the loaded checkpoint's) resolution
# MLCD loss (Eq. 5) and PartialFC
loss_type = 'mlcd'  # 'mlcd' (Eq. 5) | 'mlc' (Eq. 4, the ablation baseline of Table 6) |
                    # 'onevision' (OneVision-Encoder's: per draw a CosFace softmax, loss.py)
num_classes = 0  # k; 0: rows of labels_dir/centroids.npy, else max label + 1
num_positives = 0  # l: the first l columns of labels.npy; 0: all (cluster.py's; Table 5: 8 is best)
sample_ratio = 0.1  # r: fraction of negative centres sampled per step (Table 5: 0.1)
batch_positives_as_negatives = None  # True: insightface's sampling (docs/method.md); None: the
                                     # loss type's own (True for 'onevision', else False)
onevision_draws = 3  # 'onevision': labels drawn per image and step, each its own softmax term,
onevision_pool = 10  # from its first onevision_pool labels (its nearest centres)
margin = 0.3  # margin on positives: ArcFace's angular one (paper appendix); 'onevision': CosFace's
scale = 64.0  # sigma; the paper does not give it, 64 is the ArcFace / UNICOM value
# optimisation
global_batch_size = 32768  # images per optimizer step over all ranks (paper: 32K); when it is
                           # not a multiple of the ranks, the nearest one is used (first line)
micro_batch_size = 256  # most images per rank per forward (0: no limit; 'auto': the most that
                        # fits on this device, tried at start-up); accumulation does the rest
epochs = 32
max_steps = 0  # 0: epochs * steps per epoch; sets the length of the lr schedule
stop_at = 0  # end this invocation (with a checkpoint) after this step, schedule unchanged; 0: never
learning_rate = 5e-4  # Table 9: 5e-4 for ViT-B, 4e-4 for ViT-L
min_lr = 0.0  # end of the cosine decay
warmup_steps = 2000
weight_decay = 0.2
centre_weight_decay = 0.0  # see the optimizer section for why the centres get none
beta1 = 0.9
beta2 = 0.98  # the paper gives no betas / eps; these are CLIP's for ViTs
adam_eps = 1e-6
grad_clip = 1.0  # max global grad norm of the image tower; 0: off
# system
seed = 1337
augment = 'rrc'  # 'rrc' (random resized crop + flip) | 'pad_crop' (reflect-pad, crop, flip) | 'flip' | 'none'
crop_scale = (0.4, 1.0)  # 'rrc': range of the crop's area fraction
pad = 4  # 'pad_crop': pixels of reflection padding on each side (CIFAR's recipe at 32 px)
color_jitter = 0.0  # SimCLR's colour distortion strength after the crop (0: off; SimCLR: 0.5)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'  # autocast dtype on CUDA ('float32' turns it off; 'float16' is refused); CPU runs fp32
compile = False  # torch.compile the image tower
grad_checkpointing = False  # recompute each block in the backward: activations ~30x smaller (docs/scale.md)
threads = 0  # CPU threads per process; 0: $OMP_NUM_THREADS, else the usable CPUs / ranks per node
timeout_minutes = 30.0  # a rank waiting this long for another (dead, stopped, OOM-killed) exits
max_open_shards = 128  # shard files mapped at once per reader (LRU; data.MAX_OPEN_SHARDS)
_TAKES_AUTO = ('micro_batch_size',)  # int settings that configurator.py also lets be 'auto'
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
runtime.check_device(device)  # before anything is made: one line, no out_dir
# -----------------------------------------------------------------------------

try:  # the loss settings, before the data and the tower (PartialFC runs the same check)
    batch_positives_as_negatives = check_settings(loss_type, sample_ratio, onevision_draws,
                                                  onevision_pool, batch_positives_as_negatives)
except ValueError as e:
    raise SystemExit(f'config error: {e}')
threads = runtime.set_threads(threads)
ddp, rank, world, device = jobs.init_distributed(device, timeout_minutes)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
# bf16 autocast for the tower only; PartialFC runs outside it in fp32, because s * cos(theta) with
# s = 64 would carry ~0.25 of logit error at bf16's 8-bit mantissa
ctx = runtime.autocast(device, dtype)
# the global batch: micro x ranks x accumulation steps, the nearest to the one asked ('auto':
# planned once the tower and centres exist and a micro-step has been tried, below)
auto_micro = micro_batch_size == 'auto'
if not auto_micro:
    global_batch_size, micro_batch_size, accum, batch_note = optim.batch_plan(
        global_batch_size, world, micro_batch_size)
jobs.check_out_dir(out_dir, init_from, overwrite)
torch.manual_seed(seed)  # the same on every rank: same initial tower (DDP broadcasts it anyway)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
log_path = os.path.join(out_dir, 'log.jsonl')

# -----------------------------------------------------------------------------
# data and labels, checked before any work
dataset = data.open_dataset('data_dir', data_dir, max_open_shards)
if eval_data_dir and data.open_dataset('eval_data_dir', eval_data_dir,
                                       max_open_shards).classes is None:
    stop(f'eval_data_dir={eval_data_dir}: no classes.npy, so no kNN accuracy (it needs classes)')
# labels of finished cluster.py work on this very data (provenance.py); the fingerprint of the data
# goes into every checkpoint, so that a resume on other data is refused
data_fingerprint = provenance.labels_data(labels_dir, data_dir, rank, world)
all_labels = provenance.open_labels(labels_dir, data_dir, len(dataset))  # [N, l], memory-mapped
num_positives = num_positives or all_labels.shape[1]
if not 1 <= num_positives <= all_labels.shape[1]:
    stop(f"config error: num_positives {num_positives} but {os.path.join(labels_dir, 'labels.npy')} "
         f'has {all_labels.shape[1]} columns')
if loss_type == 'onevision' and onevision_pool > num_positives:
    stop(f'config error: onevision_pool {onevision_pool} draws from the first {onevision_pool} '
         f'labels but num_positives is {num_positives} (labels.npy has {all_labels.shape[1]} columns)')
labels = all_labels[:, :num_positives]  # the l nearest centres, nearest first


def print_batch_plan():  # the first line of the run
    if master:
        print(f'global batch {global_batch_size} = {world} rank(s) x {accum} accumulation step(s) '
              f'x {micro_batch_size} images' + (f' ({batch_note})' if batch_note else ''))


if not auto_micro:
    print_batch_plan()
# k, and the labels' fingerprint (a resume must train on the same labels); ids checked in [0, k)
num_classes, labels_fingerprint = provenance.check_label_ids(labels, labels_dir, num_classes,
                                                             rank, world, device)

jobs.claim_out_dir(out_dir, ddp, rank, world, timeout_minutes)  # the lock; one folder for all
# what defines this run: a resume must ask for the same (the rest, margin and scale included,
# may change like the learning rate: README)
run_setup = dict(labels=labels_fingerprint, num_classes=num_classes, num_positives=num_positives,
                 loss_type=loss_type, sample_ratio=sample_ratio, model=model,
                 image_size=image_size, batch_positives_as_negatives=batch_positives_as_negatives,
                 **(dict(onevision_draws=onevision_draws, onevision_pool=onevision_pool)
                    if loss_type == 'onevision' else {}))

# -----------------------------------------------------------------------------
# the image tower
ckpt = None
if init_from == 'resume':
    ckpt = files.load_checkpoint(ckpt_path, 'init_from=resume', (
        'vision_config', 'vision', 'optimizer', 'step', 'world_size', 'num_classes', 'embed_dim',
        'centres', 'rng'))
    files.check_same_run(ckpt_path, ckpt.get('run_setup', {}), run_setup)
    provenance.check_resume(ckpt, data_fingerprint, ckpt_path, data_dir)
    vision = VisionTransformer(**ckpt['vision_config'])
    vision.load_state_dict(ckpt['vision'])
elif init_from == 'scratch':
    if model not in PRESETS:
        stop(f"config error: model {model!r} is not one of {', '.join(PRESETS)}")
    vcfg = dict(PRESETS[model]['vision'])
    vcfg['image_size'] = image_size or vcfg['image_size']
    vision = VisionTransformer(**vcfg)
else:  # a checkpoint: ours, OpenAI, open_clip or Hugging Face
    try:
        vision, _ = from_pretrained(init_from, image_size=image_size or None)
    except (ValueError, OSError) as e:
        stop(f'init_from={init_from}: {str(e).removeprefix(init_from + ": ")}')
vision.to(device)
vision.grad_checkpointing = grad_checkpointing
embed_dim = vision.embed_dim
run_id = ckpt['run_id'] if ckpt is not None and 'run_id' in ckpt else runtime.run_id(ddp)


# -----------------------------------------------------------------------------
# class centres: this rank's contiguous shard [start, start + n) of the k x d matrix W, drawn from
# the seed alone (the same matrix on any number of ranks)
pfc = PartialFC(embed_dim, num_classes, sample_ratio=sample_ratio, scale=scale, margin=margin,
                loss_type=loss_type, batch_positives_as_negatives=batch_positives_as_negatives,
                draws=onevision_draws, pool=onevision_pool, seed=seed).to(device)


def seed_samplers(step, micro):
    """PartialFC's samplers keyed by (seed, step, micro-batch), as the loader's batches are: each
    rank its own negatives, one draw of labels ('onevision') on all ranks. Nothing to store: a
    resume draws what the uninterrupted run draws, on either device kind and any number of ranks
    (a CPU and a CUDA generator give different numbers for one seed, so a run is exact per kind)."""
    key = lambda *k: int(np.random.SeedSequence([seed, step, micro, *k]).generate_state(1, np.uint64)[0])  # noqa: E731
    pfc.generator.manual_seed(key(0, rank))
    pfc.draw_generator.manual_seed(key(1))

# -----------------------------------------------------------------------------
# optimizers: AdamW for the tower (replicated; weight decay on matrices only, not the position
# embedding) and a separate AdamW for this rank's centre shard (its state is per rank, never
# all-reduced)
optimizer = torch.optim.AdamW(optim.param_groups(vision, weight_decay, skip=('pos_embed',)),
                             lr=learning_rate, betas=(beta1, beta2), eps=adam_eps)
# Dense AdamW on the centres, as insightface and unicom: an unsampled row keeps drifting along its
# momentum (a lazy update would cut the centres' effective lr by about r), and no weight decay:
# the loss sees only w / |w| (docs/method.md, "AdamW on the centres")
optimizer_c = torch.optim.AdamW([pfc.weight], lr=learning_rate, betas=(beta1, beta2), eps=adam_eps,
                                weight_decay=centre_weight_decay)

# -----------------------------------------------------------------------------
# resume: tower, optimizer, counters, RNG; centres re-read row by row from the old shards


step, resumed_global = 0, None
if ckpt is not None:
    if (ckpt['num_classes'], ckpt['embed_dim']) != (num_classes, embed_dim):
        stop(f"{ckpt_path}: has {ckpt['num_classes']} centres of dim {ckpt['embed_dim']}, "
             f'config asks for {num_classes} of dim {embed_dim}')
    step = ckpt['step']
    optim.load_optimizer(optimizer, ckpt['optimizer'], weight_decay)
    # this rank's rows, re-read from every old shard that holds some (any old number of ranks)
    set_rng_state(centres.restore(pfc, optimizer_c, ckpt, ckpt_path, out_dir, rank, world), device)
    if ckpt['world_size'] != world and master:
        print(f"resuming {ckpt['world_size']} ranks on {world}: centres re-sharded")
    resumed_global = ckpt.get('global_batch_size')
    del ckpt

# -----------------------------------------------------------------------------
# micro_batch_size='auto': the largest micro-batch (from global / ranks down, halving) whose
# training micro-step runs on this device; tried on the raw tower before DDP, all ranks together
# (PartialFC's forward all-gathers), and leaving nothing behind: no grads, the RNG as before.


def try_micro_step(m):
    """One micro-step of m images of the run's shape: tower under autocast, loss, backward."""
    rng = rng_state(device)
    # on a fresh run the Adam moments (2 fp32 copies of tower and centre shard) come at the first
    # step: held here as empty tensors, so that what fits now still fits then
    reserve = [torch.empty_like(p) for opt in (optimizer, optimizer_c) if not opt.state
               for g in opt.param_groups for p in g['params'] for _ in range(2)]
    try:
        images = torch.zeros(m, 3, vision.image_size, vision.image_size, device=device)
        with ctx:
            emb = vision(images)  # not yet compiled or DDP-wrapped
        pfc(emb.float(), torch.zeros(m, num_positives, dtype=torch.long, device=device)).backward()
    finally:
        del reserve
        optimizer.zero_grad(set_to_none=True)
        optimizer_c.zero_grad(set_to_none=True)
        set_rng_state(rng, device)


if auto_micro:
    global_batch_size, micro_batch_size, accum, batch_note = optim.auto_batch_plan(
        try_micro_step, global_batch_size, world, ddp, device, 'no accumulation needed')
    print_batch_plan()
if master and resumed_global not in (None, global_batch_size):
    print(f'the global batch changes from {resumed_global} to {global_batch_size} on this number '
          'of ranks')

# -----------------------------------------------------------------------------
# the data
if len(dataset) < global_batch_size:
    steps_per_epoch = 0
else:
    try:
        loader = Loader(data_dir, micro_batch_size, vision.image_size, labels=labels, rank=rank,
                        world_size=world, seed=seed, augment=augment, device=device,
                        scale=tuple(crop_scale), pad=pad, color_jitter=color_jitter,
                        max_open_shards=max_open_shards)
    except ValueError as e:  # a bad augmentation setting
        stop(f'config error: {e}')
    steps_per_epoch = loader.steps_per_epoch // accum  # optimizer steps
if steps_per_epoch == 0:
    stop(f'data_dir={data_dir}: {len(dataset)} images are fewer than one global batch of '
         f'{global_batch_size}')
max_steps = max_steps or epochs * steps_per_epoch

# -----------------------------------------------------------------------------
# compile and wrap; the centre shard stays outside DDP (it is not replicated)
raw_vision = vision
if compile:
    vision = torch.compile(vision)
if ddp:
    vision = DDP(vision, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None,
                gradient_as_bucket_view=True)  # grads live in the buckets: no second copy

def save_checkpoint():
    """Every rank writes its centre shard under a step-tagged name; then rank 0 writes ckpt.pt,
    which names them and holds their checksums. ckpt.pt is the commit point: until its rename,
    the previous ckpt.pt and the shards it names are untouched, so a crash at any moment leaves
    one complete checkpoint. Nothing is written from non-finite weights or optimizer state.
    The other ranks wait for rank 0's write in a collective: it must take less than
    timeout_minutes (seconds for ViT-L: ~1.2 GB of tower and Adam state)."""
    st = optimizer_c.state[pfc.weight]
    tensors = [*raw_vision.parameters(), pfc.weight, st['exp_avg'], st['exp_avg_sq']]
    tensors += [s[k] for s in optimizer.state.values() for k in ('exp_avg', 'exp_avg_sq')]
    bad = torch.tensor(float(not files.all_finite(tensors)), device=device)
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        jobs.stop_unsaved(step, ckpt_path)
    os.makedirs(out_dir, exist_ok=True)
    names = centres.shard_names(step, world)
    sums = centres.save_shard(pfc, optimizer_c, step, run_id, out_dir, rank, world, device)
    if master:
        files.save({'vision_config': raw_vision.config, 'vision': raw_vision.state_dict(),
                    'optimizer': optimizer.state_dict(), 'step': step,
                    'epoch': step / steps_per_epoch, 'world_size': world, 'run_id': run_id,
                    'global_batch_size': global_batch_size, 'num_classes': num_classes,
                    'embed_dim': embed_dim, 'centres': names, 'shards_sha256': sums,
                    'run_setup': run_setup, 'data': data_fingerprint, 'rng': rng_state(device),
                    'config': config}, ckpt_path)
        centres.remove_stale(out_dir, names)
    if ddp:
        dist.barrier()


# -----------------------------------------------------------------------------
# logging
if master:
    print(f'{world} rank(s), {accum} micro-batches of {micro_batch_size} per rank per step, '
          f'{steps_per_epoch} steps per epoch, {max_steps} steps; {num_classes} centres '
          f'(this rank {pfc.start}+{pfc.num_local}), {raw_vision.num_params() / 1e6:.1f}M tower '
          f'parameters, device {device}, {threads} thread(s), run {run_id}')
run = None
if wandb_log and master:
    try:
        import wandb
        run = wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    except ImportError:
        print('wandb_log=True but wandb is not installed: logging to log.jsonl only')
if master:
    files.start_log(log_path, step)


def log(record):
    if master:
        files.log_line(log_path, record)
        if run is not None:
            run.log(record, step=record['step'])


# -----------------------------------------------------------------------------
# training loop
flops_per_image = 3 * raw_vision.flops()  # forward + backward (2x forward) of the tower
peak = runtime.peak_flops(device)
last = {'loss': None, 'pos_cos': None, 'neg_cos': None, 'grad_norm': None, 'images_per_s': None,
        'mfu': None, 'knn_acc': None}
pbar = runtime.progress(total=max_steps, initial=step, disable=not master, dynamic_ncols=True,
                        desc='train')
batches, batches_epoch = None, -1
t_log, wait, images_seen, t_start = time.time(), 0.0, 0, time.time()
saved = None  # the step of the last checkpoint this invocation wrote
end = min(max_steps, stop_at) if stop_at else max_steps
jobs.catch_signals(master)  # SIGTERM / SIGINT / SIGHUP: finish the step, checkpoint, exit
while step < end:
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    if epoch != batches_epoch:  # the loader's steps are micro-batches: accum of them per step
        if batches is not None:
            batches.close()
        batches, batches_epoch = loader.iterate(epoch, start_step=step_in_epoch * accum), epoch
    lr = optim.get_lr(step, learning_rate, min_lr, warmup_steps, max_steps)
    for opt in (optimizer, optimizer_c):
        for group in opt.param_groups:
            group['lr'] = lr
    loss_sum, pos_cos, neg_cos = 0.0, 0.0, 0.0  # device tensors after the first micro-batch
    emb_finite = torch.ones((), dtype=torch.bool, device=device)
    for micro in range(accum):
        t0 = time.time()
        batch = next(batches)
        wait += time.time() - t0
        if ddp:  # all-reduce the tower's gradients on the last micro-batch only
            vision.require_backward_grad_sync = micro == accum - 1
        with ctx:
            emb = vision(batch['images'])
        emb_finite &= torch.isfinite(emb).all()
        # Eq. 5 (or Eq. 4), mean over the global micro-batch; / accum: mean over the global batch.
        # PartialFC hands each rank world_size x its rows' gradient, so DDP's average is exact.
        seed_samplers(step, micro)
        loss = pfc(emb.float(), batch['labels']) / accum
        loss.backward()
        loss_sum += loss.detach()
        pos_cos += pfc.stats['pos_cos'] / accum
        neg_cos += pfc.stats['neg_cos'] / accum
    grad_norm = optim.grad_norm(raw_vision.parameters(), grad_clip)
    # Everything the step must agree on, in one tensor, all-reduced (MAX) and read once: the one
    # device sync of the step. The loss, cosines and tower gradient norm are the same on every
    # rank; the flags (non-finite values, this rank's embeddings, a signal) are 0 / 1 per rank.
    vals = torch.stack([loss_sum, grad_norm, pfc.weight.grad.norm(), pos_cos, neg_cos]).float()
    flags = torch.cat([~torch.isfinite(vals), ~emb_finite.view(1),
                       torch.full((1,), jobs.signalled is not None, device=device)]).float()
    packed = torch.cat([vals, flags])
    if ddp:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    lossf, gnorm, _, pos_cos, neg_cos, *bad, signalled = packed.tolist()
    if any(bad):  # before the optimizer step: the weights are still those of the last step
        what = [n for n, b in zip(('loss', 'gradient norm', 'centre gradient norm', 'positive '
                                   'cosine', 'negative cosine', 'embeddings'), bad) if b]
        jobs.stop_non_finite(what, step, lossf, gnorm, ckpt_path)
    optimizer.step()
    optimizer_c.step()
    optimizer.zero_grad(set_to_none=True)
    optimizer_c.zero_grad(set_to_none=True)
    step += 1
    images_seen += global_batch_size
    pbar.update(1)
    last.update(loss=lossf, pos_cos=pos_cos, neg_cos=neg_cos, grad_norm=gnorm)
    stopping = signalled and step < end  # every rank read the same flag: all stop here

    if step % log_interval == 0 or step == end or stopping:
        dt = time.time() - t_log
        ips = images_seen / dt
        mfu = ips / world * flops_per_image / peak if peak else None
        last.update(images_per_s=ips, mfu=mfu)
        rec = {'step': step, 'epoch': step / steps_per_epoch, 'loss': lossf, 'lr': lr,
               'pos_cos': pos_cos, 'neg_cos': neg_cos, 'grad_norm': gnorm, 'images_per_s': ips,
               'mfu': mfu, 'data_wait': wait / dt}
        log(rec)
        if master:
            pbar.set_postfix(loss=f'{lossf:.4f}', pos=f'{pos_cos:.3f}')
            tqdm.write(f'step {step} epoch {step / steps_per_epoch:.3f}: loss {lossf:.4f}, '
                       f'lr {lr:.2e}, pos_cos {pos_cos:.3f}, neg_cos {neg_cos:.3f}, '
                       f'grad norm {gnorm:.3f}, {ips:.1f} img/s, '
                       f'mfu {"-" if mfu is None else f"{100 * mfu:.1f}%"}, '
                       f'data wait {100 * wait / dt:.0f}%')
        t_log, wait, images_seen = time.time(), 0.0, 0
    if eval_data_dir and not stopping and (step == end or (eval_interval and step % eval_interval == 0)):
        t0 = time.time()
        acc, k, majority = knn_accuracy(raw_vision, eval_data_dir, eval_batch_size, knn_k, rank,
                                         world, device, ctx, max_open_shards)
        last['knn_acc'] = acc
        log({'step': step, 'knn_acc': acc})
        if master:
            tqdm.write(f'step {step}: kNN accuracy {acc:.4f} on {eval_data_dir} (k = {k}; the '
                       f'majority class alone: {majority:.4f})')
        t_log += time.time() - t0  # evaluation time is not training throughput
    if step % ckpt_interval == 0 or step == end or stopping:
        t0 = time.time()
        save_checkpoint()
        saved = step
        t_log += time.time() - t0
    if stopping:
        jobs.stop_signalled(step, max_steps, ckpt_path, master)
pbar.close()
if batches is not None:
    batches.close()
if saved != step:  # e.g. a resume with nothing left to do: rewrites the checkpoint for this many ranks
    save_checkpoint()

result = {'step': step, 'epoch': step / steps_per_epoch, 'max_steps': max_steps, 'world_size': world,
          'global_batch_size': global_batch_size, 'num_classes': num_classes, **last,
          'threads': threads, 'run_id': run_id, 'time_s': time.time() - t_start, 'ckpt': ckpt_path}
if master:
    files.save_json(os.path.join(out_dir, 'train.json'), result)
    print(json.dumps(result))
if ddp:
    dist.destroy_process_group()
