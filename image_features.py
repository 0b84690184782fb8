"""
LiT's precompute_features=True: the frozen image tower's embedding of every image (eval
transform) in out_dir/image_features.npy, written once by all ranks and reused by later runs (a
resume) when image_features.json names the same tower, images and resolution; lit.py then trains
the text tower from these rows, each step's gathered in a prefetch thread.
"""
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

import files
import provenance
import runtime
from data import ShardError, eval_batches


@torch.no_grad()
def embed_all(vision, vision_sha256, dataset, data_dir, data_fingerprint, out_dir, rank, world,
              device, ctx, max_open_shards):
    """float32 [N, d] (fp32 so that both modes see the same numbers), returned as a memory map,
    so it may be larger than RAM or GPU memory (LAION-400M at d = 768: 1.2 TB of disk). Each rank
    writes its contiguous slice as whole rows (files.npy_write), under a temporary name renamed
    when every rank's rows are in: the file is whole or absent."""
    path, stamp = os.path.join(out_dir, 'image_features.npy'), os.path.join(out_dir, 'image_features.json')
    key = {'vision_sha256': vision_sha256, 'data_dir': os.path.abspath(data_dir), 'count': len(dataset),
           'images': provenance.short(data_fingerprint, images_only=True),
           'image_size': vision.image_size}
    if os.path.exists(stamp) and json.load(open(stamp)) == key:
        return np.load(path, mmap_mode='r')
    master, ddp = rank == 0, world > 1
    if master:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(stamp):
            os.remove(stamp)
    files.npy_create(path + '.tmp', (len(dataset), vision.embed_dim), np.float32)  # a barrier
    n = runtime.shard_range(len(dataset), rank, world)[1]  # eval_batches' slice
    batches = eval_batches(data_dir, 256, vision.image_size, rank=rank, world_size=world,
                           device=device, max_open_shards=max_open_shards)
    for idx, images in runtime.progress(batches, disable=not master, desc='embed images',
                                        total=math.ceil(n / 256), leave=False):
        with ctx:
            rows = vision(images).float().cpu().numpy()
        files.npy_write(path + '.tmp', int(idx[0]), rows)  # idx: consecutive rows
    if ddp:
        dist.barrier()
    if master:
        files.rename(path + '.tmp', path)
        files.save_json(stamp, key)
    if ddp:
        dist.barrier()  # under its final name before any rank maps it
    return np.load(path, mmap_mode='r')


def feature_batch(features, loader, epoch, s, device, what):
    """Step s of the epoch, made in a prefetch thread (runtime.prefetched, as the loader's batches):
    this rank's indices, captions and frozen features, gathered from the memory maps into pinned
    memory on CUDA, so that the copies to the device are asynchronous and the step never waits
    for the disk; plain memory on a CPU (the same bits as a gather in the main thread). A failure
    is one line in the main thread; `what` names the features' file in it."""
    idx, pin = loader.indices(epoch, s), torch.device(device).type == 'cuda'
    try:
        texts = torch.from_numpy(loader.ds.texts(idx))
        rows = torch.empty((len(idx), features.shape[1]), dtype=torch.float32, pin_memory=pin)
        np.take(features, idx, axis=0, out=rows.numpy())
        return {'index': torch.from_numpy(idx.astype(np.int64)),
                'features': rows.to(device, non_blocking=pin),
                'texts': (texts.pin_memory() if pin else texts).to(device, non_blocking=pin)}
    except ShardError:  # a caption shard: data.py's own line
        raise
    except Exception as e:  # prefetched stops the main thread with this line (no traceback)
        raise ShardError(f'precompute_features=True: the prefetch thread failed making the batch '
                         f'of step {epoch * loader.steps_per_epoch + s + 1} from {what} '
                         f'({type(e).__name__}: {e})') from e
