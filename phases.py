"""
cluster.py's phases on disk. Each phase (embed, kmeans, assign) writes one output (embeddings.npy,
centroids.npy, labels.npy) and, once it is whole, phase_<name>.json beside it: the settings the
output was made with, its shape and the data it is of. A phase runs again when it is forced, has
no finished record, or anything before it runs; a finished phase made with other settings or other
data is refused rather than silently reused or silently redone.
"""
import json
import os

import numpy as np

import files
import provenance

PHASES = ('embed', 'kmeans', 'assign')


def state_path(out_dir, p):
    return os.path.join(out_dir, f'phase_{p}.json')


def _record(out_dir, p):
    try:  # a phase file that is not ours (unreadable, foreign) means the phase is not done
        st = json.load(open(state_path(out_dir, p)))
        return st if isinstance(st, dict) and isinstance(st.get('config'), dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def plan(out_dir, keys, outputs, force, data_fp, data_dir, fail):
    """{phase: whether it runs}. keys[p]: the settings phase p is made with; outputs[p]: its file;
    data_fp: the fingerprint of the data (provenance.py) or None. fail(msg) refuses the run."""
    todo, upstream, embed = {}, False, {}
    for p in PHASES:
        st, path = _record(out_dir, p), state_path(out_dir, p)
        if p == 'embed':
            embed = st or {}
        if force or upstream or st is None or not os.path.exists(outputs[p]):
            todo[p] = upstream = True
            continue
        diff = [f'{k}={st["config"].get(k)!r} (now {v!r})' for k, v in keys[p].items() if st['config'].get(k) != v]
        if set(st['config']) != set(keys[p]):
            diff.append(f'settings {sorted(st["config"])} (now {sorted(keys[p])})')
        if diff:
            fail(f'{path}: the finished {p} phase in {out_dir} was made with {", ".join(diff)}; '
                 f'pass force=True to redo it here, or use a new out_dir'
                 + (f' (embeddings_path={outputs["embed"]} reuses the embeddings)' if p != 'embed' else ''))
        shape = list(np.load(outputs[p], mmap_mode='r').shape)
        if shape != st['shape']:
            fail(f'{outputs[p]} is {shape} but {path} recorded {st["shape"]}: the file changed; force=True redoes it')
        todo[p] = False
    if not todo['embed'] and data_fp is not None and embed.get('data'):
        line = provenance.same_data(f'{state_path(out_dir, "embed")} (the embeddings)', embed['data'],
                                    data_fp, data_dir)
        if line:
            fail(f'{line}; pass force=True to redo every phase here, or use a new out_dir')
    return todo


def clear_from(p, out_dir, outputs, also=()):
    """Before phase p rewrites its file: its record and output and those of every later phase go
    (with the files in `also`), so that no consumer ever reads a mix of old and new. A process
    that maps an output keeps its open file."""
    for q in PHASES[PHASES.index(p):]:
        for f in (state_path(out_dir, q), outputs[q], outputs[q] + '.tmp'):
            if os.path.exists(f):
                os.remove(f)
    for f in also:
        if os.path.exists(f):
            os.remove(f)


def finish(p, out_dir, outputs, config, shape, data_fp, seconds, **extra):
    """Phase p's output is whole: under its final name, then its record (the record is last)."""
    if os.path.exists(outputs[p] + '.tmp'):
        files.rename(outputs[p] + '.tmp', outputs[p])
    files.save_json(state_path(out_dir, p), dict(config=config, shape=list(shape), data=data_fp,
                                                 seconds=round(seconds, 2), **extra))
