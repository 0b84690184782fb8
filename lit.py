"""
Stage 3: the contrastive stage. By default locked-image text tuning (LiT): the image tower of a
train.py checkpoint (or of anything checkpoints.from_pretrained reads) is frozen and a CLIP text
tower is trained from scratch against it with the symmetric contrastive loss and a learnable
temperature capped at 100 (paper Table 10), with train.py's optimiser, schedule, DDP, logging,
checkpoint and exact-resume rules. The same loop trains the instance discrimination baselines
that MLCD is compared with (docs/baselines.md, "Instance discrimination baselines (CLIP, UniCLIP, SimCLR)"):
  loss='clip', lock_image=False: CLIP from scratch, both towers trained with the same loss;
  loss='uniclip': UniCLIP (Lee et al., NeurIPS 2022) as we read it: MP-NCE over `views` augmented
      views and the caption of each image, domain dependent similarity, augmentation-aware image
      embedding, each a switch; on a dataset without captions, the image-image part only;
  loss='simclr': SimCLR's NT-Xent over 2 augmented views of each image (captions unused).
The image tower is then trained: from a model.py preset (model=...) or from vision_checkpoint.

One CPU process:   python lit.py config/lit_tiny.py
One 8-GPU node:    torchrun --standalone --nproc_per_node=8 lit.py config/lit_vitl14.py  (the 32K
                   batch in micro-batches of what fits a GPU, micro_batch_size='auto': the
                   gradient cache; about 1024 expected on an 80 GB GPU)
CLIP from scratch: python lit.py config/clip_tiny.py    (lock_image=False, model='ViT-T/4')
UniCLIP / SimCLR:  python lit.py config/uniclip_tiny.py;  python lit.py config/simclr_cifar10.py
Continue a run:    python lit.py config/lit_tiny.py --init_from=resume   (the same number of ranks)

precompute_features=True (LiT only) embeds every image once (eval transform, no augmentation)
and trains the text tower from those features: the frozen tower then costs one forward pass per
image in total instead of one per image per epoch. Full mode with augment='none' sees exactly the
same inputs. The features live in out_dir/image_features.npy (a memory map; reused on resume),
each step's rows gathered ahead of it in a prefetch thread.
The result, out_dir/ckpt.pt, holds the towers: checkpoints.from_pretrained returns (vision, text or
None); with the augmentation-aware embedding, 'vision' is the plain tower of the unaugmented
embedding (AugAwareVision.folded()) and 'aug_vision' what a resume needs.
It stops with one line as train.py does (bad input, a non-finite value, a rank that stops
answering, SIGTERM / SIGINT after a checkpoint), never writing a checkpoint from a bad state.
"""
import json
import math
import os
import time

import runtime  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import from_pretrained
from contrastive import (DomainSimilarity, check_settings, clip_loss, mp_nce_loss, multiview_rows,
                         simclr_loss)
import data
from data import Loader
import image_features
import files
from files import rng_state, set_rng_state
import jobs
from model import PRESETS, AugAwareVision, TextTransformer, Towers, VisionTransformer, text_config
import optim
import provenance
from runtime import prefetched, stop

# -----------------------------------------------------------------------------
# default config values: the paper's LiT recipe (Tables 9, 10); config/*.py override them
# I/O
out_dir = 'out/lit'
data_dir = 'data/laion400m'  # a data.py dataset; clip needs captions (texts_*.npy), uniclip may use them
vision_checkpoint = 'out/train/ckpt.pt'  # train.py's ckpt.pt or anything from_pretrained reads
vision_act = ''  # '' (the checkpoint's; OpenAI: quick_gelu) or 'gelu' for open_clip GELU weights
init_from = 'scratch'  # 'scratch' (new text tower) | 'resume' (out_dir/ckpt.pt)
overwrite = False  # start a new run in an out_dir that holds a checkpoint (replacing it)
log_interval = 10
ckpt_interval = 1000  # steps between checkpoints (one is always written at the end)
# what is trained (docs/baselines.md, "Instance discrimination baselines (CLIP, UniCLIP, SimCLR)")
loss = 'clip'  # 'clip' (image-text InfoNCE), 'uniclip' (MP-NCE over views and captions),
               # 'simclr' (NT-Xent over 2 views; images only)
lock_image = True  # clip: True is LiT (frozen image tower), False is CLIP from scratch (both towers
                   # trained); uniclip and simclr always train the image tower
model = ''  # a trained image tower from this model.py preset (random init); '': vision_checkpoint
image_size = 0  # 0: the preset's (or the checkpoint's) resolution
views = 0  # augmented views per image; 0: the loss's own (clip 1, uniclip 2, simclr 2)
domain_similarity = True  # uniclip: a learnable scale per domain pair (image-image, image-text,
                          # text-text); False: one shared scale (plain MP-NCE)
domain_offsets = True  # uniclip, with domain_similarity: and a learnable offset per domain pair
aug_embed = True  # uniclip: the augmentation-aware image embedding (model.AugAwareVision)
aug_hidden = 0  # its MLP's hidden width; 0: the image tower's width
# text tower: the preset whose embedding width equals the image tower's output (ViT-B: 512,
# ViT-L: 768, ViT-T/4: 128), else ViT-B's text tower with embed_dim set to it
text_preset = ''  # '' picks as above; or a model.py preset name
text_width = 0  # 0: the preset's; else overrides (heads must divide it)
text_layers = 0
text_heads = 0
# optimisation
global_batch_size = 32768  # images (pairs) per step over all ranks (the nearest multiple of the
                           # ranks x micro-batches is used)
micro_batch_size = 0  # most images per rank per forward with gradients (0: the rank's whole share):
                      # the rank's share is embedded without, then each micro-batch re-run with them;
                      # 'auto': the largest that fits on this device (tried at start-up, halving)
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
grad_clip = 1.0  # max global grad norm of the trained towers; 0: off
logit_scale_init = math.log(1 / 0.07)  # CLIP's initial temperature 0.07 (uniclip: every scale)
logit_scale_max = math.log(100.0)  # Table 10: the temperature is capped at 100
# data
precompute_features = False  # LiT: embed the frozen images once (un-augmented), train from those
augment = 'rrc'  # as train.py: 'rrc' (random resized crop + flip), 'pad_crop' (reflect-pad, crop
#                   back, flip), 'flip' or 'none' (precompute_features never augments)
crop_scale = (0.4, 1.0)  # rrc: range of the crop's area fraction
pad = 4  # pad_crop: pixels of reflect padding
color_jitter = 0.0  # with augment: SimCLR's colour distortion strength (0: off; SimCLR: 0.5 / 1.0)
# system
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'  # autocast dtype on CUDA ('float32' turns it off; 'float16' is refused); CPU runs fp32
compile = False  # torch.compile the trained towers
grad_checkpointing = False  # recompute each block in the backward: activations ~30x smaller, ~1.3x the step
threads = 0  # CPU threads per process; 0: $OMP_NUM_THREADS, else the usable CPUs / ranks per node
timeout_minutes = 30.0  # a rank waiting this long for another (dead, stopped, OOM-killed) exits
max_open_shards = 128  # shard files mapped at once per reader (LRU; data.MAX_OPEN_SHARDS)
_TAKES_AUTO = ('micro_batch_size',)  # int settings that configurator.py also lets be 'auto'
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
runtime.check_device(device)  # before anything is made: one line, no out_dir
# -----------------------------------------------------------------------------

try:  # every setting of the losses checked once, before any work
    locked, views = check_settings(loss, lock_image, views, precompute_features)
except ValueError as e:
    raise SystemExit(f'config error: {e}')
if augment not in data.AUGMENTS:  # the loader's own list, checked before any work
    raise SystemExit(f"config error: augment must be one of {', '.join(map(repr, data.AUGMENTS))}, got {augment!r}")
threads = runtime.set_threads(threads)
ddp, rank, world, device = jobs.init_distributed(device, timeout_minutes)
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ctx = runtime.autocast(device, dtype)
# images per rank per step: micro x accum, the global batch nearest to the one asked (batch_plan;
# 'auto': planned once the towers exist and a step has been tried, below)
auto_micro = micro_batch_size == 'auto'
if not auto_micro:
    global_batch_size, micro, accum, batch_note = optim.batch_plan(global_batch_size, world,
                                                                   micro_batch_size)
jobs.check_out_dir(out_dir, init_from, overwrite)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
log_path = os.path.join(out_dir, 'log.jsonl')
torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# the image tower (frozen or trained) and the text tower
dataset = data.open_dataset('data_dir', data_dir, max_open_shards)
has_text = bool(dataset.meta.get('has_text'))
if loss == 'clip' and not has_text:
    stop(f"data_dir={data_dir}: has no captions (texts_*.npy); {'LiT' if locked else 'CLIP'} needs "
         "image-text pairs (loss='uniclip' or 'simclr' train on images alone)")
use_text = loss == 'clip' or (loss == 'uniclip' and has_text)
if loss == 'uniclip' and not use_text and views < 2:
    stop(f'config error: data_dir={data_dir} has no captions, so uniclip needs views >= 2 (a '
         'positive needs two rows per image)')
# the loader's augmentation parameters of an unaugmented view: box, flip, then colour factors
aug_dim = 5 + 5 * bool(augment != 'none' and color_jitter) if loss == 'uniclip' and aug_embed else 0
aug_identity = [0.5, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0][:aug_dim]
# what the checkpoint's tensors mean: a resume must ask for the same
setup = dict(loss=loss, lock_image=locked, text=use_text, aug_dim=aug_dim,
             aug_hidden=aug_hidden if aug_dim else 0,
             domain_similarity=loss == 'uniclip' and domain_similarity,
             domain_offsets=loss == 'uniclip' and domain_similarity and domain_offsets)
# and the towers and loss settings that a resume must ask for as well (the rest may change)
run_setup = dict(model=model, vision_checkpoint='' if model else vision_checkpoint,
                 vision_act=vision_act, image_size=image_size, text_preset=text_preset,
                 text_width=text_width, text_layers=text_layers, text_heads=text_heads,
                 views=views)
jobs.claim_out_dir(out_dir, ddp, rank, world, timeout_minutes)  # the lock; one folder for all
ckpt = None
if init_from == 'resume':
    ckpt = files.load_checkpoint(ckpt_path, 'init_from=resume', (
        'vision_config', 'vision', 'optimizer', 'step', 'world_size', 'rng', 'vision_source'))
    was = ckpt.get('setup', dict(setup, loss='clip', lock_image=True, text=True, aug_dim=0,
                                 aug_hidden=0, domain_similarity=False, domain_offsets=False))
    files.check_same_run(ckpt_path, {**ckpt.get('run_setup', {}), **was}, {**run_setup, **setup})
    vision = VisionTransformer(**ckpt['vision_config'])
    vision.load_state_dict(ckpt['vision'])
    tcfg = ckpt.get('text_config')
    vision_source = ckpt['vision_source']
elif init_from == 'scratch':
    if model:
        if model not in PRESETS:
            stop(f"config error: model {model!r} is not one of {', '.join(PRESETS)}")
        vcfg = dict(PRESETS[model]['vision'])
        vcfg['image_size'] = image_size or vcfg['image_size']
        vision, vision_source = VisionTransformer(**vcfg), f'preset {model} (random init)'
    else:
        if not os.path.exists(vision_checkpoint):
            stop(f'vision_checkpoint={vision_checkpoint}: not found')
        try:  # its text tower, if any, is unused
            vision, _ = from_pretrained(vision_checkpoint, image_size=image_size or None,
                                        act=vision_act or None)
        except (ValueError, OSError, RuntimeError) as e:
            stop(f"vision_checkpoint={vision_checkpoint}: "
                 f"{str(e).splitlines()[0].removeprefix(vision_checkpoint + ': ')}")
        vision_source = vision_checkpoint
    try:
        tcfg = text_config(vision.embed_dim, text_preset, text_width, text_layers, text_heads) if use_text else None
    except ValueError as e:
        stop(f'config error: {e}')
else:
    stop(f"config error: init_from must be 'scratch' or 'resume', got {init_from!r}")
# a caption token the text tower has no embedding for would fail deep in a step; a resume must
# read the data (captions included) its checkpoint was trained on
data_fingerprint = provenance.fingerprint_and_tokens(data_dir, rank, world,
                                                     tcfg['vocab_size'] if tcfg else 0)
if ckpt is not None:
    provenance.check_resume(ckpt, data_fingerprint, ckpt_path, data_dir)
vision.to(device)
vision_sha256 = None
if locked:
    vision.eval().requires_grad_(False)  # locked: eval mode, no gradients, no optimizer
    vision_sha256 = files.module_sha256(vision)
    if ckpt is not None and ckpt['vision_sha256'] != vision_sha256:
        stop(f'{ckpt_path}: its image tower does not match the hash recorded when the run started')
    trained_vision = None
else:  # trained: with aug_dim = 0 AugAwareVision is the plain tower (same parameters)
    trained_vision = AugAwareVision(vision, aug_dim, identity=aug_identity or None,
                                    hidden=aug_hidden).to(device)
    if ckpt is not None and aug_dim:
        trained_vision.load_state_dict(ckpt['aug_vision'])
text = TextTransformer(**tcfg).to(device) if tcfg else None
for tower in (vision, text):  # only a trained tower keeps activations for a backward
    if tower is not None:
        tower.grad_checkpointing = grad_checkpointing
towers = Towers(trained_vision, text)
# the learnable similarity: CLIP's one logit scale, or UniCLIP's per-domain scales and offsets
if loss == 'uniclip':
    sim = DomainSimilarity(math.exp(logit_scale_init), math.exp(logit_scale_max),
                           per_domain=setup['domain_similarity'],
                           offsets=setup['domain_offsets']).to(device)
    temps = list(sim.parameters())
else:
    sim = None
    logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale_init), device=device))
    temps = [logit_scale]
run_id = ckpt['run_id'] if ckpt is not None and 'run_id' in ckpt else runtime.run_id(ddp)

# -----------------------------------------------------------------------------
# one step: the embeddings of a batch, the loss over the global batch and its gradients (the
# loop below runs step_backward once per step; micro_batch_size='auto' tries it first)
plain_towers = towers  # without the DDP wrapper (set again when it is wrapped, below)


def image_embeddings(batch, rows):
    """The frozen tower's embeddings of the batch's rows (a slice)."""
    if 'features' in batch:  # precomputed: the rows the prefetch thread gathered (feature_batch)
        return batch['features'][rows]
    with torch.no_grad(), ctx:  # frozen: no graph through the image tower
        return vision(batch['images'][rows]).float()


def crop_texts(batch, rows):
    """The batch's captions of those rows cut after their last end token: the text tower attends
    causally and pools at the end token, so the padding behind it changes nothing but rounding,
    and short captions (the synthetic set's: ~20 of 77 tokens) cost a quarter. The length is read
    from the memory-mapped ids on the host: no device read. index None (the 'auto' try's batch):
    uncut, every caption as long as the context (the most memory a step can take)."""
    texts, index = batch['texts'][rows], batch['index']
    if index is None:
        return texts
    return texts[:, :int(loader.ds.texts(index[rows].numpy()).argmax(1).max()) + 1]


def embed(batch, rows, again=False):
    """This rank's embeddings of the batch's rows (a slice): [image, text] (text only with
    captions), image [V, m, d] when the tower is trained (the views of those images, view-major,
    through the tower at once). Without gradients (grad_cache's first pass) the DDP wrapper is
    skipped; again (its second pass): None for the frozen tower's, which gets no gradient."""
    net = towers if torch.is_grad_enabled() else plain_towers
    texts = crop_texts(batch, rows) if use_text else None
    if locked:
        img = None if again else image_embeddings(batch, rows)
        with ctx:
            txt = net(None, None, texts)[1]
    else:
        x = batch['images'] if views > 1 else batch['images'][None]
        with ctx:
            img, txt = net(x[:, rows].flatten(0, 1), batch['aug'][:, rows].flatten(0, 1), texts)
        img = img.float().view(views, -1, img.shape[-1])
    return [img] + ([] if txt is None else [txt.float()])


def contrastive_loss(img, txt=None):
    """The loss over the global batch from this rank's embeddings (embed's)."""
    if loss == 'clip':  # symmetric InfoNCE, temperature exp(logit_scale) <= 100 (Table 10)
        return clip_loss(img if locked else img[0], txt, logit_scale.exp())
    if loss == 'simclr':  # NT-Xent: each view's positive is the other view of its image
        return simclr_loss(img, logit_scale.exp())
    # MP-NCE over every view and caption, s_ij = t_{D(i)D(j)} cos + b_{D(i)D(j)}
    return mp_nce_loss(*multiview_rows(img, txt), *sim())


def step_backward(batch, rows, micro, ddp_model=None):
    """This step's loss over the global batch (this rank: `rows` of it), back-propagated into
    every trained parameter, and its embeddings (for the checks): at once, or `micro` rows at a
    time through the gradient cache (optim.grad_cache: the same gradients up to rounding, one
    micro-batch's activations held at a time)."""
    if micro >= rows:
        embs = embed(batch, slice(None))
        value = contrastive_loss(*embs)
        value.backward()
        return value, embs
    return optim.grad_cache(lambda sl, again: embed(batch, sl, again), contrastive_loss,
                            rows, micro, ddp_model)


# -----------------------------------------------------------------------------
# micro_batch_size='auto': the largest micro-batch (from global / ranks down, halving) with which
# a whole step of the rank's share runs on this device, as train.py finds its own: tried on the
# raw towers before compile and DDP, all ranks together (the loss all-gathers), and leaving
# nothing behind: no gradient, the RNG as before, no optimizer state (there is none yet)
PREFETCH = 4  # batches a prefetch thread makes ahead of the step (the loader's, feature_batch's)


def try_batch(rows):
    """A batch of `rows` of the run's shapes, zeros: the images (or their frozen features) and
    captions of full context length, the longest a step can meet."""
    batch = {'index': None}
    if use_text:
        batch['texts'] = torch.zeros(rows, text.context_length, dtype=torch.long, device=device)
    if precompute_features:
        batch['features'] = torch.zeros(rows, vision.embed_dim, device=device)
    else:
        S = vision.image_size
        batch['images'] = torch.zeros(*[views] * (views > 1), rows, 3, S, S, device=device)
        batch['aug'] = torch.zeros(views, rows, aug_dim or 5, device=device)
    return batch


def try_step(m):
    """One step of the rank's share in micro-batches of at most m (batch_plan's split of it), with
    room kept for what the run holds beside it."""
    _, m_used, n, _ = optim.batch_plan(global_batch_size, world, m)
    rng, trained = rng_state(device), [p for p in [*towers.parameters(), *temps] if p.requires_grad]
    held = []
    try:
        batch = try_batch(m_used * n)
        # held as empty tensors, so that what fits now still fits then: AdamW's two moments of
        # every trained parameter (made at the first step, or by a resume below) and the batches
        # the prefetch thread makes ahead (4,096 images of 224 px a rank: 2.5 GB each)
        held += [torch.empty_like(p) for p in trained for _ in range(2)]
        held += [torch.empty_like(t) for t in batch.values() if t is not None
                 for _ in range(PREFETCH + 1)]
        step_backward(batch, m_used * n, m_used)
    finally:
        held.clear()
        for p in trained:
            p.grad = None
        set_rng_state(rng, device)


if auto_micro:
    global_batch_size, micro, accum, batch_note = optim.auto_batch_plan(
        try_step, global_batch_size, world, ddp, device, 'no gradient cache needed')
batch_size = micro * accum

# -----------------------------------------------------------------------------
# data: the loader fixes which images form each step's batch (a pure function of seed, epoch,
# step, rank), in both modes; precomputed mode replaces its images by their frozen features
augmenting = augment != 'none' and not precompute_features
try:
    loader = Loader(data_dir, batch_size, vision.image_size, with_text=use_text, rank=rank,
                    world_size=world, seed=seed, augment=augment if augmenting else 'none',
                    device=device, scale=tuple(crop_scale), pad=pad, views=views,
                    color_jitter=color_jitter if augmenting else 0.0,
                    max_open_shards=max_open_shards, prefetch=PREFETCH)
except ValueError as e:
    if len(dataset) < global_batch_size:
        stop(f'data_dir={data_dir}: {len(dataset)} images are fewer than one global batch of '
             f'{global_batch_size}')
    stop(f'config error: {e}')
steps_per_epoch = loader.steps_per_epoch
max_steps = max_steps or epochs * steps_per_epoch
if master:  # the first line of the run
    print(f'global batch {global_batch_size} = {world} rank(s) x {batch_size} images'
          + (f' in {accum} micro-batches of {micro}' if accum > 1 else '')
          + (f' ({batch_note})' if batch_note else ''))


t_pre = time.time()
features = (image_features.embed_all(vision, vision_sha256, dataset, data_dir, data_fingerprint,
                                     out_dir, rank, world, device, ctx, max_open_shards)
            if precompute_features else None)  # [N, d], memory-mapped
precompute_s = time.time() - t_pre


# -----------------------------------------------------------------------------
# optimizer: AdamW as in train.py, decay on matrices only (optim.param_groups); the token and
# position embeddings (lookup tables / additive inputs) and the temperatures get none
groups = optim.param_groups(towers, weight_decay, skip=('pos_embed', 'token_embed'))
groups[1]['params'] += temps
optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), eps=adam_eps)

step = 0
if ckpt is not None:
    if text is not None:
        text.load_state_dict(ckpt['text'])
    if sim is None:
        with torch.no_grad():
            logit_scale.copy_(ckpt['logit_scale'])
    else:
        sim.load_state_dict(ckpt['similarity'])
    optim.load_optimizer(optimizer, ckpt['optimizer'], weight_decay)
    step = ckpt['step']
    if ckpt['world_size'] != world:
        stop(f"{ckpt_path}: written by {ckpt['world_size']} ranks; resume with the same number")
    set_rng_state(ckpt['rng'][rank], device)
    del ckpt

raw_towers = towers
if compile:
    towers = torch.compile(towers)
if ddp:  # the temperatures live outside DDP: their gradients are averaged by hand below
    towers = DDP(towers, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None,
               gradient_as_bucket_view=True)  # grads live in the buckets: no second copy
plain_towers = towers.module if ddp else towers  # compiled, if so, but never DDP-wrapped


def save_checkpoint():
    """Rank 0 writes ckpt.pt (the towers + everything resume needs) with every rank's RNG state;
    never from non-finite weights or optimizer state. The other ranks wait for the write in a
    barrier: it must take less than timeout_minutes (seconds for two ViT-L-sized towers).
    'vision' is always a plain VisionTransformer (what from_pretrained and probe.py read): with
    the augmentation-aware embedding the tower of the unaugmented view, folded."""
    tensors = [*raw_towers.parameters(), *temps]
    tensors += [s[k] for s in optimizer.state.values() for k in ('exp_avg', 'exp_avg_sq')]
    if not files.all_finite(tensors):  # the same on every rank (everything is replicated)
        jobs.stop_unsaved(step, ckpt_path)
    rngs = [rng_state(device)]
    if ddp:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if master:
        os.makedirs(out_dir, exist_ok=True)
        plain = trained_vision.folded() if aug_dim else vision
        ck = {'vision_config': plain.config, 'vision': plain.state_dict(),
              'optimizer': optimizer.state_dict(), 'step': step, 'epoch': step / steps_per_epoch,
              'world_size': world, 'rng': rngs, 'run_id': run_id,
              'global_batch_size': global_batch_size, 'setup': setup, 'run_setup': run_setup,
              'vision_sha256': vision_sha256, 'vision_source': vision_source,
              'data': data_fingerprint, 'config': config}
        if aug_dim:  # the tower and its augmentation MLP as trained, for a resume
            ck['aug_vision'] = trained_vision.state_dict()
        if text is not None:
            ck.update(text_config=text.config, text=text.state_dict())
        if sim is None:
            ck['logit_scale'] = logit_scale.detach().cpu()
        else:
            ck['similarity'] = sim.state_dict()
        files.save(ck, ckpt_path)
    if ddp:
        dist.barrier()


def similarity_values(t):
    """The log record's view of the learnable similarity parameters, flattened in `temps` order:
    CLIP / SimCLR the logit scale exp(t); UniCLIP its scales per domain pair (image-image,
    image-text, text-text, or one shared) and offsets."""
    if sim is None:
        return {'logit_scale': math.exp(t[0])}
    n = sim.log_scale.numel()
    return {'scales': [math.exp(v) for v in t[:n]], 'offsets': t[n:] or None}


# -----------------------------------------------------------------------------
# training loop
if master:
    if locked:
        tower = f'frozen image tower from {vision_source} ({vision.num_params() / 1e6:.1f}M)'
    else:
        n = sum(p.numel() for p in trained_vision.parameters())
        tower = (f'image tower from {vision_source} ({n / 1e6:.1f}M'
                 + (f', augmentation-aware, {aug_dim} parameters)' if aug_dim else ')'))
    print(f'{loss}, {world} rank(s), {batch_size} images per rank per step'
          + (f' ({accum} micro-batches of {micro})' if accum > 1 else '') + f', {views} view(s), '
          f'{steps_per_epoch} steps per epoch, {max_steps} steps; {tower}, '
          + (f'text tower {text.num_params() / 1e6:.1f}M, ' if text is not None else 'no text tower, ')
          + f'embed {vision.embed_dim}, '
          + ('precomputed features' if precompute_features else 'full image forward')
          + f', device {device}, {threads} thread(s), run {run_id}')
    files.start_log(log_path, step)
last = {'loss': None, 'grad_norm': None, 'images_per_s': None}
first_loss = None
pbar = runtime.progress(total=max_steps, initial=step, disable=not master, dynamic_ncols=True,
                        desc=loss)
batches, batches_epoch = None, -1
t_log, t_loop, pairs, steps_run, ckpt_s = time.time(), time.time(), 0, 0, 0.0
saved = None
end = min(max_steps, stop_at) if stop_at else max_steps
n_t = sum(p.numel() for p in temps)
jobs.catch_signals(master)  # SIGTERM / SIGINT / SIGHUP: finish the step, checkpoint, exit
while step < end:
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    if epoch != batches_epoch:
        if batches is not None:
            batches.close()
        if precompute_features:  # features, indices and texts: no image decoding at all
            what = os.path.join(out_dir, 'image_features.npy')
            batches = prefetched(lambda s, e=epoch: image_features.feature_batch(
                features, loader, e, s, device, what), range(step_in_epoch, steps_per_epoch), PREFETCH)
        else:
            batches = loader.iterate(epoch, start_step=step_in_epoch)
        batches_epoch = epoch
    lr = optim.get_lr(step, learning_rate, min_lr, warmup_steps, max_steps)
    for group in optimizer.param_groups:
        group['lr'] = lr
    value, embs = step_backward(next(batches), batch_size, micro, towers if ddp else None)
    emb_bad = ~torch.stack([torch.isfinite(e).all() for e in embs]).all()
    signal_flag = torch.full((), jobs.signalled is not None, device=device)
    t_grad = torch.cat([p.grad.view(-1) for p in temps])
    if ddp:  # the losses give each rank the temperatures' gradient of its share (times the ranks
        # for mp_nce_loss): the average is the global one; the flags ride along (summed: > 0 if
        # any rank raised them)
        red = torch.cat([t_grad, emb_bad.float().view(1), signal_flag.float().view(1)])
        dist.all_reduce(red)
        t_grad = red[:n_t] / world
        for p, g in zip(temps, t_grad.split([p.numel() for p in temps])):
            p.grad.copy_(g.view_as(p))
        emb_bad, signal_flag = red[n_t] > 0, red[n_t + 1] > 0
    grad_norm = optim.grad_norm(raw_towers.parameters(), grad_clip)
    # the step's one device read: the values to log and every reason to stop, the same on all ranks
    t_val = torch.cat([p.detach().view(-1) for p in temps])
    vals = torch.cat([torch.stack([value.detach(), grad_norm]), t_grad, t_val]).float()
    flags = torch.cat([~torch.isfinite(vals), emb_bad.view(1), signal_flag.view(1)]).float()
    host = torch.cat([vals, flags]).tolist()
    lossf, gnorm, t_used = host[0], host[1], host[2 + n_t:2 + 2 * n_t]
    bad = host[2 + 2 * n_t:-1]
    bad = [bad[0], bad[1], any(bad[2:2 + n_t]), any(bad[2 + n_t:2 + 2 * n_t]), bad[-1]]
    if any(bad):  # before the optimizer step: the weights are still those of the last step
        what = [n for n, b in zip(('loss', 'gradient norm', 'temperature gradient', 'temperature',
                                   'embeddings'), bad) if b]
        jobs.stop_non_finite(what, step, lossf, gnorm, ckpt_path)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP clamps the parameter itself after each step
        if sim is None:
            logit_scale.clamp_(0, logit_scale_max)
        else:
            sim.clamp_()
    step += 1
    steps_run += 1
    pairs += global_batch_size
    first_loss = lossf if first_loss is None else first_loss
    # the temperatures this step's loss used (the clamped values of the step before)
    last.update(loss=lossf, **similarity_values(t_used), grad_norm=gnorm)
    pbar.update(1)
    stopping = host[-1] and step < end  # every rank read the same flag: all stop here
    if step % log_interval == 0 or step == end or stopping:
        dt = time.time() - t_log
        last['images_per_s'] = pairs / dt
        rec = {'step': step, 'epoch': step / steps_per_epoch, 'loss': lossf, 'lr': lr,
               **similarity_values(t_used), 'grad_norm': gnorm, 'images_per_s': pairs / dt}
        if master:
            files.log_line(log_path, rec)
            shown = ', '.join(f'{k} ' + (f'{v:.2f}' if isinstance(v, float) else
                                        '/'.join(f'{x:.2f}' for x in v))
                              for k, v in similarity_values(t_used).items() if v is not None)
            pbar.set_postfix(loss=f'{lossf:.4f}')
            tqdm.write(f'step {step}: loss {lossf:.4f}, lr {lr:.2e}, {shown}, '
                       f'grad norm {gnorm:.3f}, {pairs / dt:.1f} images/s')
        t_log, pairs = time.time(), 0
    if step % ckpt_interval == 0 or step == end or stopping:
        t0 = time.time()
        save_checkpoint()
        saved = step
        t_log += time.time() - t0
        ckpt_s += time.time() - t0
    if stopping:
        jobs.stop_signalled(step, max_steps, ckpt_path, master)
loop_s = time.time() - t_loop - ckpt_s  # training steps only: no checkpoint writing
pbar.close()
if batches is not None:
    batches.close()
if saved != step:
    save_checkpoint()

# LiT: the frozen tower, bit for bit, after all the training (None: the tower was trained)
vision_unchanged = files.module_sha256(vision) == vision_sha256 if locked else None
result = {'step': step, 'epoch': step / steps_per_epoch, 'max_steps': max_steps, 'world_size': world,
          'global_batch_size': global_batch_size, 'micro_batches': accum, 'first_loss': first_loss,
          **last,
          **similarity_values([v for p in temps for v in p.detach().view(-1).tolist()]),  # final
          'setup': setup, 'views': views, 'precompute_features': precompute_features,
          'precompute_s': precompute_s, 'steps_per_s': steps_run / loop_s if steps_run else None,
          'threads': threads, 'run_id': run_id, 'vision_unchanged': vision_unchanged,
          'vision_sha256': vision_sha256, 'ckpt': ckpt_path}
if master:
    files.save_json(os.path.join(out_dir, 'lit.json'), result)
    print(json.dumps(result))
if ddp:
    dist.destroy_process_group()
if locked and not vision_unchanged:
    raise SystemExit('the frozen image tower changed during training: this is a bug')
