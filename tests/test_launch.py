"""Every stage launched as a cluster launches it: torchrun with 2 gloo ranks on the CPU runs
cluster, train (stopped half-way and resumed), lit and probe end to end (bench/gpu_launch.py; the
GPU check runs the same function under NCCL). The numbers themselves are checked against one
process by the stages' own tests; here the launch paths are."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
from gpu_launch import check_launch  # noqa: E402


def test_every_stage_runs_under_torchrun_on_two_ranks(tmp_path):
    r = check_launch('cpu', str(tmp_path), nproc=2)
    assert r['cluster_world'] == 2
    # the resumed run continues the stopped one: one log record per step, no step twice
    assert r['train_steps'] == [2, 4] and r['train_log_steps'] == [1, 2, 3, 4]
    ckpt_world = json.load(open(tmp_path / 'launch' / 'train' / 'train.json'))['world_size']
    assert ckpt_world == 2
    assert r['lit_steps'] == 2 and json.load(open(tmp_path / 'launch' / 'lit' / 'lit.json'))[
        'world_size'] == 2
    probe = json.load(open(tmp_path / 'launch' / 'probe' / 'probe.json'))
    assert probe['linear_probe']['n_test'] == 256  # rank 0 gathered both ranks' features
    assert r['ok']
