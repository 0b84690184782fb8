"""
Stage 3: locked-image text tuning (LiT; DESIGN.md §1.3). The image tower of a train.py checkpoint
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
"""
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import Dataset, Loader, eval_batches
from loss import clip_loss
from model import PRESETS, TextTransformer, VisionTransformer, atomic_save, from_pretrained, rng_state, set_rng_state

# -----------------------------------------------------------------------------
# default config values: the paper's LiT recipe (Tables 9, 10); config/*.py override them
# I/O
out_dir = 'out/lit'
data_dir = 'data/laion400m'  # a data.py dataset with captions (texts_*.npy)
vision_checkpoint = 'out/train/ckpt.pt'  # train.py's ckpt.pt or anything from_pretrained reads
vision_act = ''  # '' (the checkpoint's; OpenAI: quick_gelu) or 'gelu' for open_clip GELU weights
init_from = 'scratch'  # 'scratch' (new text tower) | 'resume' (out_dir/ckpt.pt)
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
                           # global_batch_size / ranks pairs
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
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
else:
    rank, world = 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ctx = (torch.autocast(device_type, dtype=torch.bfloat16)
       if device_type == 'cuda' and dtype == 'bfloat16' else nullcontext())
ckpt_path = os.path.join(out_dir, 'ckpt.pt')


def stop(msg):
    if ddp:
        dist.destroy_process_group()
    raise SystemExit(msg)


if global_batch_size <= 0 or global_batch_size % world:
    stop(f'config error: global_batch_size {global_batch_size} is not a multiple of {world} ranks')
batch_size = global_batch_size // world  # pairs per rank per step
if master:
    os.makedirs(out_dir, exist_ok=True)
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
dataset = Dataset(data_dir)
if not dataset.meta.get('has_text'):
    stop(f'{data_dir}: has no captions (texts_*.npy); LiT needs image-text pairs')
ckpt = None
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        stop(f'{ckpt_path}: not found, cannot resume')
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    vision = VisionTransformer(**ckpt['vision_config'])
    vision.load_state_dict(ckpt['vision'])
    tcfg = ckpt['text_config']
    vision_source = ckpt['vision_source']
elif init_from == 'scratch':
    if not os.path.exists(vision_checkpoint):
        stop(f'vision_checkpoint {vision_checkpoint}: not found')
    try:
        vision, _ = from_pretrained(vision_checkpoint, act=vision_act or None)  # its text tower, if any, is unused
    except ValueError as e:
        stop(f'vision_checkpoint: {e}')
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

# -----------------------------------------------------------------------------
# data: the loader fixes which pairs form each step's batch (a pure function of seed, epoch, step,
# rank), in both modes; precomputed mode replaces its images by their frozen features
loader = Loader(data_dir, batch_size, vision.image_size, with_text=True, rank=rank, world_size=world,
                seed=seed, augment=augment and not precompute_features, device=device)
steps_per_epoch = loader.steps_per_epoch
max_steps = max_steps or epochs * steps_per_epoch


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
        if os.path.exists(stamp):
            os.remove(stamp)
        np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=(len(dataset), vision.embed_dim))
    if ddp:
        dist.barrier()
    feats = np.load(path, mmap_mode='r+')
    n = len(dataset) // world + (rank < len(dataset) % world)
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
        with open(stamp + '.tmp', 'w') as f:
            json.dump(key, f)
        os.replace(stamp + '.tmp', stamp)
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
# optimizer: AdamW as in train.py. Decay on matrices only; biases, LayerNorm gains, the token and
# position embeddings (lookup tables / additive inputs, not weights multiplying activations) and
# the temperature get none.
decay = [p for n, p in text.named_parameters() if p.ndim >= 2 and 'embed' not in n]
no_decay = [p for n, p in text.named_parameters() if not (p.ndim >= 2 and 'embed' not in n)]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay + [logit_scale], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), eps=adam_eps)

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


def get_lr(it):
    """Linear warm-up over warmup_steps, then cosine decay to min_lr at max_steps."""
    if it < warmup_steps:
        return learning_rate * (it + 1) / warmup_steps
    progress = min(1.0, (it - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1.0 + math.cos(math.pi * progress))


def save_checkpoint():
    """Rank 0 writes ckpt.pt (both towers + everything resume needs) with every rank's RNG state."""
    rngs = [rng_state(device)]
    if ddp:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if master:
        atomic_save({'vision_config': vision.config, 'vision': vision.state_dict(),
                     'text_config': raw_text.config, 'text': raw_text.state_dict(),
                     'logit_scale': logit_scale.detach().cpu(), 'optimizer': optimizer.state_dict(),
                     'step': step, 'epoch': step / steps_per_epoch, 'world_size': world, 'rng': rngs,
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
          f"{'precomputed features' if precompute_features else 'full image forward'}, device {device}")
log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a') if master else None
last = {'loss': None, 'logit_scale': None, 'pairs_per_s': None}
first_loss = None
pbar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True, desc='lit')
batches, batches_epoch = None, -1
t_log, t_loop, pairs, steps_run, ckpt_s = time.time(), time.time(), 0, 0, 0.0
saved = None
end = min(max_steps, stop_at) if stop_at else max_steps
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
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr
    batch = next(batches)
    img = image_embeddings(batch)
    with ctx:
        txt = text(batch['texts'])
    # symmetric InfoNCE over the global batch, temperature exp(logit_scale) <= 100 (Table 10)
    loss = clip_loss(img, txt.float(), logit_scale.exp())
    loss.backward()
    lossf = float(loss.detach())
    if not math.isfinite(lossf):
        stop(f'non-finite loss ({lossf}) at step {step + 1}; nothing was updated or saved')
    if ddp:  # clip_loss gives each rank the gradient of its share: the average is the global one
        dist.all_reduce(logit_scale.grad)
        logit_scale.grad /= world
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_text.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        logit_scale.clamp_(0, logit_scale_max)  # CLIP clamps the parameter itself after each step
    step += 1
    steps_run += 1
    pairs += global_batch_size
    first_loss = lossf if first_loss is None else first_loss
    last.update(loss=lossf, logit_scale=float(logit_scale.detach().exp()))
    pbar.update(1)
    if step % log_interval == 0 or step == end:
        dt = time.time() - t_log
        last['pairs_per_s'] = pairs / dt
        rec = {'step': step, 'epoch': step / steps_per_epoch, 'loss': lossf, 'lr': lr,
               'logit_scale': last['logit_scale'], 'pairs_per_s': pairs / dt}
        if master:
            log_file.write(json.dumps(rec) + '\n')
            log_file.flush()
            pbar.set_postfix(loss=f'{lossf:.4f}', scale=f"{last['logit_scale']:.1f}")
            tqdm.write(f"step {step}: loss {lossf:.4f}, lr {lr:.2e}, logit scale {last['logit_scale']:.2f}, "
                       f'{pairs / dt:.1f} pairs/s')
        t_log, pairs = time.time(), 0
    if step % ckpt_interval == 0 or step == end:
        t0 = time.time()
        save_checkpoint()
        saved = step
        t_log += time.time() - t0
        ckpt_s += time.time() - t0
loop_s = time.time() - t_loop - ckpt_s  # training steps only: no checkpoint writing
pbar.close()
if batches is not None:
    batches.close()
if saved != step:
    save_checkpoint()

vision_unchanged = state_hash(vision) == vision_sha256  # bit for bit, after all the training
result = {'step': step, 'epoch': step / steps_per_epoch, 'max_steps': max_steps, 'world_size': world,
          'global_batch_size': global_batch_size, 'first_loss': first_loss, **last,
          'precompute_features': precompute_features, 'precompute_s': precompute_s,
          'steps_per_s': steps_run / loop_s if steps_run else None,
          'vision_unchanged': vision_unchanged, 'vision_sha256': vision_sha256, 'ckpt': ckpt_path}
if master:
    with open(os.path.join(out_dir, 'lit.json'), 'w') as f:
        json.dump(result, f)
    print(json.dumps(result))
if ddp:
    dist.destroy_process_group()
if not vision_unchanged:
    raise SystemExit('the frozen image tower changed during training: this is a bug')
