"""
Stage 3: locked-image text tuning (LiT). The image tower of a train.py checkpoint
(or of anything model.from_pretrained reads) is frozen; a CLIP text tower is trained from scratch
against it with the symmetric contrastive loss and a learnable temperature capped at 100 (paper
Table 10), with train.py's optimiser, schedule, DDP, logging, checkpoint and exact-resume rules.

One CPU process:   python lit.py config/lit_tiny.py
One 8-GPU node:    torchrun --standalone --nproc_per_node=8 lit.py --vision_checkpoint=out/train/ckpt.pt
Continue a run:    python lit.py config/x.py --init_from=resume   (the same number of ranks)

precompute_features=True embeds every image once (eval transform, no augmentation) and trains the
text tower from those features: the frozen tower then costs one forward pass per image in total
instead of one per image per epoch. Full mode with augment=False sees exactly the same inputs.
The features live in out_dir/image_features.npy (a memory map; reused on resume).
The result, out_dir/ckpt.pt, holds both towers: model.from_pretrained returns (vision, text).
It stops with one line as train.py does (bad input, a non-finite value, a rank that stops
answering, SIGTERM / SIGINT after a checkpoint), never writing a checkpoint from a bad state.
"""
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext

import common  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import stop
from data import Loader, eval_batches
from loss import clip_loss, shard_range
from model import PRESETS, TextTransformer, VisionTransformer, from_pretrained, rng_state, set_rng_state

# -----------------------------------------------------------------------------
# default config values: the paper's LiT recipe (Tables 9, 10); config/*.py override them
# I/O
out_dir = 'out/lit'
data_dir = 'data/laion400m'  # a data.py dataset with captions (texts_*.npy)
vision_checkpoint = 'out/train/ckpt.pt'  # train.py's ckpt.pt or anything from_pretrained reads
vision_act = ''  # '' (the checkpoint's; OpenAI: quick_gelu) or 'gelu' for open_clip GELU weights
init_from = 'scratch'  # 'scratch' (new text tower) | 'resume' (out_dir/ckpt.pt)
overwrite = False  # start a new run in an out_dir that holds a checkpoint (replacing it)
log_interval = 10
ckpt_interval = 1000  # steps between checkpoints (one is always written at the end)
# text tower: the preset whose embedding width equals the image tower's output (ViT-B: 512,
# ViT-L: 768, ViT-T/4: 128), else ViT-B's text tower with embed_dim set to it
text_preset = ''  # '' picks as above; or a model.py preset name
text_width = 0  # 0: the preset's; else overrides (heads must divide it)
text_layers = 0
text_heads = 0
# optimisation
global_batch_size = 32768  # captions per step over all ranks; the contrastive loss couples the
                           # whole batch, so there is no gradient accumulation: each rank holds
                           # global_batch_size / ranks pairs (the nearest multiple of the ranks)
epochs = 32
max_steps = 0  # 0: epochs * steps per epoch
stop_at = 0  # end this invocation (with a checkpoint) after this step, schedule unchanged
learning_rate = 5e-4  # Table 9: 5e-4 (ViT-B), 4e-4 (ViT-L)
min_lr = 0.0
warmup_steps = 2000
weight_decay = 0.2
beta1 = 0.9
beta2 = 0.98
adam_eps = 1e-6
grad_clip = 1.0  # max global grad norm of the text tower; 0: off
logit_scale_init = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
logit_scale_max = math.log(100.0)  # Table 10: the temperature is capped at 100
# system
precompute_features = False  # embed the frozen images once (un-augmented) and train from those
augment = True  # random resized crop + flip in full mode (precomputed features are never augmented)
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'  # autocast dtype on CUDA ('float32' turns it off); CPU always runs fp32
compile = False  # torch.compile the text tower
threads = 0  # CPU threads per process; 0: $OMP_NUM_THREADS, else the usable CPUs / ranks per node
timeout_minutes = 30.0  # a rank waiting this long for another (dead, stopped, OOM-killed) exits
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

threads = common.set_threads(threads)
ddp, rank, world, device = common.init_distributed(device, timeout_minutes)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ctx = (torch.autocast(device_type, dtype=torch.bfloat16)
       if device_type == 'cuda' and dtype == 'bfloat16' else nullcontext())
# pairs per rank: the nearest global batch that is a multiple of the ranks (no accumulation)
global_batch_size, batch_size, _, batch_note = common.batch_plan(global_batch_size, world)
common.check_out_dir(out_dir, init_from, overwrite)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
log_path = os.path.join(out_dir, 'log.jsonl')
torch.manual_seed(seed)


def state_hash(module):
    """SHA-256 of every parameter and buffer, bit for bit: proves the image tower never changed."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# the frozen image tower and the text tower
dataset = common.open_dataset('data_dir', data_dir)
if not dataset.meta.get('has_text'):
    stop(f'data_dir={data_dir}: has no captions (texts_*.npy); LiT needs image-text pairs')
ckpt = None
if init_from == 'resume':
    ckpt = common.load(ckpt_path, 'init_from=resume')
    vision = VisionTransformer(**ckpt['vision_config'])
    vision.load_state_dict(ckpt['vision'])
    tcfg = ckpt['text_config']
    vision_source = ckpt['vision_source']
elif init_from == 'scratch':
    if not os.path.exists(vision_checkpoint):
        stop(f'vision_checkpoint={vision_checkpoint}: not found')
    try:  # its text tower, if any, is unused
        vision, _ = from_pretrained(vision_checkpoint, act=vision_act or None)
    except (ValueError, OSError, RuntimeError) as e:
        stop(f"vision_checkpoint={vision_checkpoint}: "
             f"{str(e).splitlines()[0].removeprefix(vision_checkpoint + ': ')}")
    vision_source = vision_checkpoint
    embed_dim = vision.embed_dim
    name = text_preset or next((k for k, v in PRESETS.items() if v['text']['embed_dim'] == embed_dim), 'ViT-B/16')
    if name not in PRESETS:
        stop(f"config error: text_preset {name!r} is not one of {', '.join(PRESETS)}")
    tcfg = dict(PRESETS[name]['text'], embed_dim=embed_dim)
    tcfg.update({k: v for k, v in (('width', text_width), ('layers', text_layers), ('heads', text_heads)) if v})
else:
    stop(f"config error: init_from must be 'scratch' or 'resume', got {init_from!r}")
vision.to(device).eval().requires_grad_(False)  # locked: eval mode, no gradients, no optimizer
vision_sha256 = state_hash(vision)
if ckpt is not None and ckpt['vision_sha256'] != vision_sha256:
    stop(f'{ckpt_path}: its image tower does not match the hash recorded when the run started')
text = TextTransformer(**tcfg).to(device)
logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale_init), device=device))
run_id = ckpt['run_id'] if ckpt is not None and 'run_id' in ckpt else common.run_id(ddp)

# -----------------------------------------------------------------------------
# data: the loader fixes which pairs form each step's batch (a pure function of seed, epoch, step,
# rank), in both modes; precomputed mode replaces its images by their frozen features
try:
    loader = Loader(data_dir, batch_size, vision.image_size, with_text=True, rank=rank,
                    world_size=world, seed=seed, augment=augment and not precompute_features,
                    device=device)
except ValueError:  # fewer pairs than one global batch
    stop(f'data_dir={data_dir}: {len(dataset)} pairs are fewer than one global batch of '
         f'{global_batch_size}')
steps_per_epoch = loader.steps_per_epoch
max_steps = max_steps or epochs * steps_per_epoch
if master:  # the first line of the run
    print(f'global batch {global_batch_size} = {world} rank(s) x {batch_size} pairs'
          + (f' ({batch_note})' if batch_note else ''))


@torch.no_grad()
def embed_all():
    """Frozen-tower embeddings of every image, eval transform, in out_dir/image_features.npy:
    float32 [N, d] (fp32 so that both modes see the same numbers), a memory map, so it may be
    larger than RAM or GPU memory (LAION-400M at d = 768: 1.2 TB of disk). Each rank fills its
    contiguous slice. Reused by later runs (a resume) when image_features.json names the same
    tower, data and resolution."""
    path, stamp = os.path.join(out_dir, 'image_features.npy'), os.path.join(out_dir, 'image_features.json')
    key = {'vision_sha256': vision_sha256, 'data_dir': os.path.abspath(data_dir), 'count': len(dataset),
           'image_size': vision.image_size}
    if os.path.exists(stamp) and json.load(open(stamp)) == key:
        return np.load(path, mmap_mode='r')
    if master:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(stamp):
            os.remove(stamp)
        np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=(len(dataset), vision.embed_dim))
    if ddp:
        dist.barrier()
    feats = np.load(path, mmap_mode='r+')
    n = shard_range(len(dataset), rank, world)[1]  # eval_batches' slice
    for idx, images in tqdm(eval_batches(data_dir, 256, vision.image_size, rank=rank, world_size=world,
                                         device=device), disable=not master, desc='embed images',
                            total=math.ceil(n / 256), leave=False):
        with ctx:
            feats[idx.numpy()] = vision(images).float().cpu().numpy()
    feats.flush()
    del feats
    if ddp:
        dist.barrier()
    if master:
        common.save_json(stamp, key)
    return np.load(path, mmap_mode='r')


t_pre = time.time()
features = embed_all() if precompute_features else None
precompute_s = time.time() - t_pre


def image_embeddings(batch):
    if features is not None:  # rows in the batch's order (a gather from the memory map)
        return torch.from_numpy(features[batch['index'].numpy()]).to(device)
    with torch.no_grad(), ctx:  # frozen: no graph through the image tower
        return vision(batch['images']).float()


# -----------------------------------------------------------------------------
# optimizer: AdamW as in train.py, decay on matrices only (common.param_groups); the token and
# position embeddings (lookup tables / additive inputs) and the temperature get none
groups = common.param_groups(text, weight_decay, skip=('embed',))
groups[1]['params'].append(logit_scale)
optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), eps=adam_eps)

step = 0
if ckpt is not None:
    text.load_state_dict(ckpt['text'])
    with torch.no_grad():
        logit_scale.copy_(ckpt['logit_scale'])
    optimizer.load_state_dict(ckpt['optimizer'])
    for group, wd in zip(optimizer.param_groups, (weight_decay, 0.0)):
        group['weight_decay'] = wd  # the current config wins over the saved hyperparameters
    step = ckpt['step']
    if ckpt['world_size'] != world:
        stop(f"{ckpt_path}: written by {ckpt['world_size']} ranks; resume with the same number")
    set_rng_state(ckpt['rng'][rank], device)
    del ckpt

raw_text = text
if compile:
    text = torch.compile(text)
if ddp:  # the temperature lives outside DDP: its gradient is averaged by hand below
    text = DDP(text, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)


def save_checkpoint():
    """Rank 0 writes ckpt.pt (both towers + everything resume needs) with every rank's RNG state;
    never from non-finite weights or optimizer state. The other ranks wait for the write in a
    barrier: it must take less than timeout_minutes (seconds for two ViT-L-sized towers)."""
    tensors = [*raw_text.parameters(), logit_scale]
    tensors += [s[k] for s in optimizer.state.values() for k in ('exp_avg', 'exp_avg_sq')]
    if not common.all_finite(tensors):  # the same on every rank (the text tower is replicated)
        stop(f'non-finite weights or optimizer state after step {step}: not saved; the last good '
             f'checkpoint is {ckpt_path}' + ('' if os.path.exists(ckpt_path) else ' (none yet)'))
    rngs = [rng_state(device)]
    if ddp:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if master:
        os.makedirs(out_dir, exist_ok=True)
        common.save({'vision_config': vision.config, 'vision': vision.state_dict(),
                     'text_config': raw_text.config, 'text': raw_text.state_dict(),
                     'logit_scale': logit_scale.detach().cpu(), 'optimizer': optimizer.state_dict(),
                     'step': step, 'epoch': step / steps_per_epoch, 'world_size': world, 'rng': rngs,
                     'run_id': run_id, 'global_batch_size': global_batch_size,
                     'vision_sha256': vision_sha256, 'vision_source': vision_source,
                     'config': config}, ckpt_path)
    if ddp:
        dist.barrier()


# -----------------------------------------------------------------------------
# training loop
if master:
    print(f'{world} rank(s), {batch_size} pairs per rank per step, {steps_per_epoch} steps per epoch, '
          f'{max_steps} steps; frozen image tower from {vision_source} ({vision.num_params() / 1e6:.1f}M), '
          f'text tower {raw_text.num_params() / 1e6:.1f}M, embed {vision.embed_dim}, '
          f"{'precomputed features' if precompute_features else 'full image forward'}, device {device}, "
          f'{threads} thread(s), run {run_id}')
    if step > 0 and common.trim_log(log_path, step):  # resume: drop records past the checkpoint
        print(f'{log_path}: dropped unreadable line(s), e.g. one cut short by a full disk')
    elif step == 0 and os.path.exists(log_path):  # a new run (--overwrite=True, or none saved yet)
        os.remove(log_path)
last = {'loss': None, 'logit_scale': None, 'grad_norm': None, 'pairs_per_s': None}
first_loss = None
pbar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True, desc='lit')
batches, batches_epoch = None, -1
t_log, t_loop, pairs, steps_run, ckpt_s = time.time(), time.time(), 0, 0, 0.0
saved = None
end = min(max_steps, stop_at) if stop_at else max_steps
common.catch_signals()  # SIGTERM / SIGINT: finish the step, checkpoint, exit
while step < end:
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    if epoch != batches_epoch:
        if batches is not None:
            batches.close()
        if precompute_features:  # only indices and texts: no image decoding at all
            batches = ({'index': torch.from_numpy(loader.indices(epoch, s).astype(np.int64)),
                        'texts': torch.from_numpy(loader.ds.texts(loader.indices(epoch, s))).to(device)}
                       for s in range(step_in_epoch, steps_per_epoch))
        else:
            batches = loader.iterate(epoch, start_step=step_in_epoch)
        batches_epoch = epoch
    lr = common.get_lr(step, learning_rate, min_lr, warmup_steps, max_steps)
    for group in optimizer.param_groups:
        group['lr'] = lr
    batch = next(batches)
    img = image_embeddings(batch)
    with ctx:
        txt = text(batch['texts'])
    # symmetric InfoNCE over the global batch, temperature exp(logit_scale) <= 100 (Table 10)
    loss = clip_loss(img, txt.float(), logit_scale.exp())
    loss.backward()
    emb_bad = ~(torch.isfinite(img).all() & torch.isfinite(txt).all())
    signal_flag = torch.full((), common.signalled is not None, device=device)
    if ddp:  # clip_loss gives each rank the gradient of its share: the average is the global one;
        # the flags ride along (summed: > 0 if any rank raised them)
        red = torch.stack([logit_scale.grad, emb_bad.float(), signal_flag.float()])
        dist.all_reduce(red)
        logit_scale.grad.copy_(red[0] / world)
        emb_bad, signal_flag = red[1] > 0, red[2] > 0
    params = list(raw_text.parameters())
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0
                 else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    # the step's one device read: the values to log and every reason to stop, the same on all ranks
    vals = torch.stack([loss.detach(), grad_norm, logit_scale.grad, logit_scale.detach()]).float()
    flags = torch.cat([~torch.isfinite(vals), emb_bad.view(1), signal_flag.view(1)]).float()
    lossf, gnorm, _, scale_used, *bad, signalled = torch.cat([vals, flags]).tolist()
    if any(bad):  # before the optimizer step: the weights are still those of the last step
        what = [n for n, b in zip(('loss', 'gradient norm', 'temperature gradient', 'temperature',
                                   'embeddings'), bad) if b]
        stop(f"non-finite {', '.join(what)} at step {step + 1} (loss {lossf}, gradient norm "
             f'{gnorm}); nothing was updated or saved, the last good checkpoint is {ckpt_path}'
             + ('' if os.path.exists(ckpt_path) else ' (none yet)')
             + '; a lower learning_rate or grad_clip may help')
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        logit_scale.clamp_(0, logit_scale_max)  # CLIP clamps the parameter itself after each step
    step += 1
    steps_run += 1
    pairs += global_batch_size
    first_loss = lossf if first_loss is None else first_loss
    # the temperature this step's loss used (the clamped value of the step before)
    last.update(loss=lossf, logit_scale=math.exp(scale_used), grad_norm=gnorm)
    pbar.update(1)
    stopping = signalled and step < end  # every rank read the same flag: all stop here
    if step % log_interval == 0 or step == end or stopping:
        dt = time.time() - t_log
        last['pairs_per_s'] = pairs / dt
        rec = {'step': step, 'epoch': step / steps_per_epoch, 'loss': lossf, 'lr': lr,
               'logit_scale': last['logit_scale'], 'grad_norm': gnorm, 'pairs_per_s': pairs / dt}
        if master:
            common.log_line(log_path, rec)
            pbar.set_postfix(loss=f'{lossf:.4f}', scale=f"{last['logit_scale']:.1f}")
            tqdm.write(f"step {step}: loss {lossf:.4f}, lr {lr:.2e}, logit scale {last['logit_scale']:.2f}, "
                       f'grad norm {gnorm:.3f}, {pairs / dt:.1f} pairs/s')
        t_log, pairs = time.time(), 0
    if step % ckpt_interval == 0 or step == end or stopping:
        t0 = time.time()
        save_checkpoint()
        saved = step
        t_log += time.time() - t0
        ckpt_s += time.time() - t0
    if stopping:
        stop(f'stopped by {common.signalled or "a signal to another rank"} after step {step} of '
             f'{max_steps}; checkpoint {ckpt_path} written: continue with the same command and '
             '--init_from=resume')
loop_s = time.time() - t_loop - ckpt_s  # training steps only: no checkpoint writing
pbar.close()
if batches is not None:
    batches.close()
if saved != step:
    save_checkpoint()

vision_unchanged = state_hash(vision) == vision_sha256  # bit for bit, after all the training
result = {'step': step, 'epoch': step / steps_per_epoch, 'max_steps': max_steps, 'world_size': world,
          'global_batch_size': global_batch_size, 'first_loss': first_loss, **last,
          'logit_scale': float(logit_scale.detach().exp()),  # the final temperature
          'precompute_features': precompute_features, 'precompute_s': precompute_s,
          'steps_per_s': steps_run / loop_s if steps_run else None, 'threads': threads,
          'run_id': run_id, 'vision_unchanged': vision_unchanged, 'vision_sha256': vision_sha256,
          'ckpt': ckpt_path}
if master:
    common.save_json(os.path.join(out_dir, 'lit.json'), result)
    print(json.dumps(result))
if ddp:
    dist.destroy_process_group()
if not vision_unchanged:
    raise SystemExit('the frozen image tower changed during training: this is a bug')
