"""
The class centres of a train.py checkpoint on disk. Each rank writes its shard of the k x d
matrix W (its rows [start, start + n), their AdamW moments and its RNG state) under a step-tagged
name; ckpt.pt, written last by rank 0, names the shards and holds their checksums, so it is the
commit point. A resume on any number of ranks reads its rows back from every old shard that
overlaps them, each checked to be of this run and unchanged since it was written.
"""
import glob
import os

import torch
import torch.distributed as dist

import files
from files import rng_state
from runtime import shard_range, stop


def shard_names(step, world):
    return [f'centres_{step:08d}_rank{r}_of_{world}.pt' for r in range(world)]


def save_shard(pfc, optimizer_c, step, run_id, out_dir, rank, world, device):
    """Write this rank's shard; returns every rank's shard checksum (gathered: also the barrier
    that puts every shard on disk before ckpt.pt names it)."""
    st = optimizer_c.state[pfc.weight]
    shard = {'start': pfc.start, 'rows': pfc.num_local, 'step': step, 'run_id': run_id,
             'weight': pfc.weight.detach().cpu(), 'exp_avg': st['exp_avg'].cpu(),
             'exp_avg_sq': st['exp_avg_sq'].cpu(), 'adam_step': st['step'].cpu(),
             'rng': rng_state(device)}
    files.save(shard, os.path.join(out_dir, shard_names(step, world)[rank]))
    sums = [files.state_sha256(shard)]  # the whole shard: centres, Adam and RNG state
    if world > 1:
        sums = [None] * world
        dist.all_gather_object(sums, files.state_sha256(shard))
    return sums


def remove_stale(out_dir, names):
    """Rank 0, once ckpt.pt is written: the shards of older checkpoints, no longer named."""
    for f in glob.glob(os.path.join(out_dir, 'centres_*_rank*_of_*.pt')):
        if os.path.basename(f) not in names:
            os.remove(f)


def load_rows(ckpt, ckpt_path, start, n, num_classes, embed_dim, out_dir, rank, world):
    """This rank's rows and their Adam state, copied from every old shard that overlaps them:
    works for any old and new number of ranks. Each shard must be of this run (run_id) and hash
    to the checksum ckpt.pt recorded for it. Returns (w, exp_avg, exp_avg_sq, adam_step, the
    rank's own old shard when the number of ranks is unchanged, else None)."""
    w, m, v = torch.empty(n, embed_dim), torch.empty(n, embed_dim), torch.empty(n, embed_dim)
    adam_step, own = None, None
    for r_old, name in enumerate(ckpt['centres']):
        s0, n0 = shard_range(num_classes, r_old, ckpt['world_size'])
        lo, hi = max(start, s0), min(start + n, s0 + n0)
        if lo >= hi:
            continue
        path = os.path.join(out_dir, name)
        sh = files.load(path, f"centre shard {r_old} of {ckpt_path}", mmap=True)
        if sh.get('run_id') != ckpt.get('run_id'):
            stop(f"{path}: belongs to run {sh.get('run_id')}, but {ckpt_path} to run "
                 f"{ckpt.get('run_id')}: files of two runs are mixed in out_dir={out_dir}")
        if (sh['start'], sh['rows'], sh['step']) != (s0, n0, ckpt['step']):
            stop(f"{path}: holds rows {sh['start']}+{sh['rows']} of step {sh['step']}, expected "
                 f"{s0}+{n0} of step {ckpt['step']}")
        key = 'shards_sha256' if 'shards_sha256' in ckpt else 'centres_sha256'  # older: centres
        got = (files.state_sha256(sh) if key == 'shards_sha256' else
               files.sha256(sh['weight'], sh['exp_avg'], sh['exp_avg_sq']))
        if key in ckpt and got != ckpt[key][r_old]:
            stop(f'{path}: its centres, Adam moments or RNG state do not match the checksum in '
                 f'{ckpt_path} (the file changed after it was written)')
        w[lo - start:hi - start] = sh['weight'][lo - s0:hi - s0]
        m[lo - start:hi - start] = sh['exp_avg'][lo - s0:hi - s0]
        v[lo - start:hi - start] = sh['exp_avg_sq'][lo - s0:hi - s0]
        adam_step = sh['adam_step']
        if ckpt['world_size'] == world and r_old == rank:
            own = sh
    return w, m, v, adam_step, own


def restore(pfc, optimizer_c, ckpt, ckpt_path, out_dir, rank, world):
    """pfc's rows and optimizer_c's state from the checkpoint's shards (load_rows); returns the
    RNG state to resume with: the rank's own, or ckpt.pt's when the number of ranks changed."""
    w, m, v, adam_step, own = load_rows(ckpt, ckpt_path, pfc.start, pfc.num_local,
                                        ckpt['num_classes'], ckpt['embed_dim'], out_dir, rank, world)
    with torch.no_grad():
        pfc.weight.copy_(w)
    state = optimizer_c.state_dict()
    state['state'] = {0: {'step': adam_step, 'exp_avg': m, 'exp_avg_sq': v}}
    optimizer_c.load_state_dict(state)
    return own['rng'] if own is not None else ckpt['rng']
