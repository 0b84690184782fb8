"""The shared helpers: optim.py's batch plan against a brute-force search, lr schedule and
weight-decay groups; files.py's log.jsonl trimming; runtime.py's thread defaults."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

import files
import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force(asked, world, micro_max):
    """The fewest accumulation steps with micro <= micro_max that can reach `asked`, then of
    every micro-batch 1..micro_max the one nearest to it (ties: the larger)."""
    accum = 1
    while micro_max * world * accum < asked:
        accum += 1
    best = min(range(1, micro_max + 1), key=lambda m: (abs(m * world * accum - asked), -m))
    return best * world * accum, best, accum


@pytest.mark.parametrize('world', [1, 3, 8, 80, 160, 1000])
@pytest.mark.parametrize('asked, micro_max', [(32768, 128), (32768, 256), (32768, 512),
                                              (32768, 97), (1000, 7), (4095, 33), (16, 16)])
def test_batch_plan_is_the_nearest_with_the_fewest_accumulation_steps(world, asked, micro_max):
    got, micro, accum, note = optim.batch_plan(asked, world, micro_max)
    assert (got, micro, accum) == brute_force(asked, world, micro_max)
    assert got == micro * world * accum and 1 <= micro <= micro_max
    if accum > 1:  # one step fewer cannot reach the asked batch even at the largest micro-batch
        assert micro_max * world * (accum - 1) < asked
    assert (note == '') == (got == asked)
    if got != asked:
        assert f'global_batch_size={asked}' in note and str(got) in note
        assert abs(got - asked) <= world * accum / 2 or micro == 1


def test_batch_plan_without_accumulation():
    # lit.py: no accumulation, global / ranks pairs per rank, nearest multiple of the ranks
    for world in (1, 3, 8, 80, 160, 1000):
        got, micro, accum, _ = optim.batch_plan(32768, world)
        assert accum == 1 and got == micro * world
        assert micro == max(1, math.floor(32768 / world + 0.5))
    assert optim.batch_plan(32768, 80)[:3] == (32800, 410, 1)


def test_the_readme_ten_node_command_runs_the_paper_batch():
    """The README's 10-node train.py command with config/vitl14.py: 80 ranks and
    micro_batch_size='auto'; where the search finds 256 (an H200), 32768 is not a multiple of
    80 x 256, so 2 accumulation steps of 205 images per GPU, 32800 images."""
    readme = open(os.path.join(ROOT, 'README.md')).read()
    cmd = next(line for line in readme.splitlines() if 'nnodes=10' in line and 'train.py' in line)
    nproc = int(re.search(r'--nproc_per_node=(\d+)', cmd).group(1))
    nnodes = int(re.search(r'--nnodes=(\d+)', cmd).group(1))
    cfg = re.search(r'train\.py (config/\S+\.py)', cmd).group(1)
    ns = {'__file__': os.path.join(ROOT, cfg)}  # as configurator.py runs a config file
    exec(open(ns['__file__']).read(), ns)
    assert (nproc * nnodes, ns['global_batch_size'], ns['micro_batch_size']) == (80, 32768, 'auto')
    got, micro, accum, note = optim.batch_plan(ns['global_batch_size'], nproc * nnodes, 256)
    assert (got, micro, accum) == (32800, 205, 2) and '+0.10%' in note


def test_get_lr_warmup_then_cosine():
    lr = [optim.get_lr(i, 1.0, 0.1, 10, 110) for i in range(120)]
    assert lr[0] == 0.1 and lr[9] == 1.0  # linear warm-up to the peak
    assert lr[10] == 1.0 and math.isclose(lr[60], 0.55) and lr[110] == lr[119] == 0.1
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_param_groups_decay_matrices_but_not_the_skipped():
    from model import create
    vision, text = create('ViT-T/4', layers=1)
    # train.py's rule: every matrix but the position embedding
    groups = optim.param_groups(vision, 0.2, skip=('pos_embed',))
    names = {id(p): n for n, p in vision.named_parameters()}
    decay = {names[id(p)] for p in groups[0]['params']}
    no_decay = {names[id(p)] for p in groups[1]['params']}
    assert groups[0]['weight_decay'] == 0.2 and groups[1]['weight_decay'] == 0.0
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert all(dict(vision.named_parameters())[n].ndim >= 2 for n in decay)
    assert not any('pos_embed' in n for n in decay) and any('pos_embed' in n for n in no_decay)
    assert any(n.endswith('bias') for n in no_decay) and any('weight' in n for n in decay)
    # lit.py's rule for the text tower: no embedding table or position embedding either
    groups = optim.param_groups(text, 0.2, skip=('embed',))
    names = {id(p): n for n, p in text.named_parameters()}
    decay = {names[id(p)] for p in groups[0]['params']}
    assert decay == {n for n, p in text.named_parameters() if p.ndim >= 2 and 'embed' not in n}
    assert any('embed' in n and p.ndim >= 2 for n, p in text.named_parameters())


def test_trim_log_keeps_steps_up_to_the_checkpoint_and_drops_torn_lines(tmp_path):
    path = str(tmp_path / 'log.jsonl')
    recs = [{'step': s, 'loss': 1.0 / s} for s in range(1, 6)]
    with open(path, 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in recs) + '{"step": 6, "lo')
    assert files.trim_log(path, 3) == 1
    assert [json.loads(x) for x in open(path)] == recs[:3]
    assert files.trim_log(path, 3) == 0 and files.trim_log(str(tmp_path / 'none'), 3) == 0


def test_threads_default_and_passive_wait_policy():
    """threads=0 follows $OMP_NUM_THREADS, else the usable CPUs; runtime sets OMP_WAIT_POLICY
    only where the user did not."""
    code = ('import os, runtime, torch; print(runtime.set_threads({}), torch.get_num_threads(), '
            'os.environ["OMP_WAIT_POLICY"])')
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY')}

    def out(threads, **extra):
        return subprocess.run([sys.executable, '-c', code.format(threads)], cwd=ROOT, check=True,
                              env=dict(env, **extra), capture_output=True, text=True).stdout.split()
    assert out(0, OMP_NUM_THREADS='1') == ['1', '1', 'PASSIVE']
    assert out(2, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='ACTIVE') == ['2', '2', 'ACTIVE']
    cpus = str(len(os.sched_getaffinity(0)))
    assert out(0) == [cpus, cpus, 'PASSIVE']
