"""The GPU check (bench/gpu.py) and the training step's host syncs, on a CPU: train.py's step makes
exactly one host read (the packed loss / norms / flags), the bench's copy of the step too, the
bench runs end to end at tiny sizes with every check passing."""
import contextlib
import json
import os
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from sync_count import count_syncs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
import gpu_util as gpu  # noqa: E402 (bench/gpu_util.py: the GPU check's shared pieces)


def tiny_run(tmp_path, monkeypatch, steps, made):
    """train.py in this process (ViT-T/4 at 16 px, 2 micro-batches of 16 per step) for `steps`
    steps; returns the syncs counted in this thread over the whole run."""
    data_dir, labels_dir = str(tmp_path / 'data'), str(tmp_path / 'labels')
    if not os.path.exists(labels_dir):
        gpu.make_dataset(data_dir, 128, 16)
        os.makedirs(labels_dir)
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 32, (128, 4)).astype(np.int32)
        np.save(os.path.join(labels_dir, 'labels.npy'), labels)
    monkeypatch.setattr(sys, 'argv', [
        'train.py', '--model=ViT-T/4', '--image_size=16', '--device=cpu', '--threads=1',
        f'--data_dir={data_dir}', f'--labels_dir={labels_dir}', '--num_positives=4',
        '--global_batch_size=32', '--micro_batch_size=16', f'--max_steps={steps}',
        '--log_interval=1000', '--ckpt_interval=1000', f'--out_dir={tmp_path / f"out{steps}"}'])
    # AdamW's step counters live on the host on CUDA (capturable=False): their reads wait for
    # nothing there, so they are left out (count_syncs' `host`)
    with count_syncs(host=lambda: gpu.adam_steps(*made)) as syncs:
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    return syncs


def test_train_py_step_reads_the_host_once(tmp_path, monkeypatch, capsys):
    # the whole step as train.py runs it (tower, PartialFC, backward, clip_grad_norm_, both AdamW
    # steps, zero_grad, 2 micro-batches): a run of 4 steps makes exactly 2 host syncs more than a
    # run of 2 (same setup, one log line and one checkpoint each), the packed .tolist() per step
    made, init = [], torch.optim.AdamW.__init__

    def record(self, *a, **k):
        init(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(torch.optim.AdamW, '__init__', record)
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        two = tiny_run(tmp_path, monkeypatch, 2, made)
        four = tiny_run(tmp_path, monkeypatch, 4, made)
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    per_two_steps = {k: four[k] - two[k] for k in four | two if four[k] != two[k]}
    assert per_two_steps == {'Tensor.tolist': 2}, (per_two_steps, two, four)
    log = [json.loads(x) for x in open(tmp_path / 'out4' / 'log.jsonl')]
    assert log[-1]['step'] == 4 and np.isfinite(log[-1]['loss'])
    capsys.readouterr()


def tiny_training(grad_clip, world):
    vcfg = dict(image_size=16, patch_size=8, width=32, layers=2, heads=2, embed_dim=16)
    vision, pfc, opt, opt_c = gpu.build_training(vcfg, 40, torch.device('cpu'))
    batches = gpu.synthetic_batches(4, 16, 16, world, 40 * world, torch.device('cpu'))
    params = list(vision.parameters())

    def step():
        return gpu.train_step(vision, params, pfc, opt, opt_c, batches, 2,
                              contextlib.nullcontext(), grad_clip)
    return step, vision, pfc, opt, opt_c


@pytest.mark.parametrize('grad_clip', [1.0, 0.0])
@pytest.mark.parametrize('world', [1, 4])
def test_bench_step_reads_the_host_once(grad_clip, world):
    # the bench's copy of the step (what it times and counts on a GPU) makes the same one read
    step, vision, pfc, opt, opt_c = tiny_training(grad_clip, world)
    step()  # AdamW makes its state here
    before = [p.detach().clone() for p in vision.parameters()] + [pfc.weight.detach().clone()]
    with count_syncs(host=gpu.adam_steps(opt, opt_c)) as syncs:
        out = step()
    assert syncs == {'Tensor.tolist': 1}, syncs
    assert len(out) == 12 and np.isfinite(out[:5]).all() and not any(out[5:])  # nothing flagged
    after = list(vision.parameters()) + [pfc.weight]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # every weight was updated


def test_sync_counter_sees_what_the_step_avoids():
    # the counter would catch the usual ways a step syncs: clip_grad_norm_ checking for a
    # non-finite norm, a loss logged with .item(), AdamW's host counters when not excluded
    step, vision, pfc, opt, opt_c = tiny_training(1.0, 1)
    step()
    with count_syncs() as syncs:
        step()
    assert syncs['aten._local_scalar_dense.default'] > 0  # AdamW's counters (on the host on CUDA)
    loss = pfc(torch.randn(3, 16), torch.tensor([[1], [2], [3]]))
    loss.backward()
    with count_syncs() as syncs:
        torch.nn.utils.clip_grad_norm_([pfc.weight], 1.0, error_if_nonfinite=True)
        loss.item()
    assert syncs == {'aten._local_scalar_dense.default': 2}, syncs


def test_sync_counter_ignores_other_threads():
    # a loader thread's reads block that thread, not the step: not counted
    import threading
    with count_syncs() as syncs:
        t = threading.Thread(target=lambda: (torch.ones(3).tolist(), torch.ones(()).item()))
        t.start()
        t.join()
    assert not syncs, syncs


def test_cpu_smoke_run(tmp_path):
    # the whole GPU check at tiny sizes on the CPU: it runs through, every check passes (the
    # device is the CPU here, so this shows the code paths work, not CUDA's numbers), the step
    # makes no sync but its one read, and the report has every figure
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'gpu.py'), '--device=cpu',
                        f'--out_dir={tmp_path}'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.load(open(tmp_path / 'gpu_report.json'))
    assert {'env', 'checks', 'syncs', 'step', 'assign', 'search', 'auto', 'goals', 'errors',
            'skipped', 'seconds', 'sizes'} <= set(r)
    assert r['errors'] == {} and r['skipped'] == {}, (r['errors'], r['skipped'])
    assert set(r['checks']) == {'towers', 'attention', 'partialfc', 'loader', 'pinned', 'probe',
                                'kmeans'}
    failed = {k: c for k, c in r['checks'].items() if not c['ok']}
    assert not failed, failed
    s = r['syncs']
    assert s['exact'] and s['other'] == 0 and s['counted'] == {'Tensor.tolist': 1}, s
    t = r['step']['ViT-T/4']
    assert t['micro_batch'] == 8 and t['synthetic']['images_per_s'] > 0
    assert not [k for k, v in t.items() if isinstance(v, dict) and 'error' in v], t
    share = t['breakdown']['share']
    assert abs(sum(share.values()) - 1) < 1e-9 and share['loss'] > 0 and share['optimizer'] > 0
    assert t['loader_fed']['images_per_s'] > 0 and 0 <= t['loader_fed']['data_wait_share'] < 1
    assert t['loader_alone']['images_per_s'] > 0 and t['host_over_step'] > 0
    assert t['compile']['ok'] and t['compile']['images_per_s'] > 0, t['compile']
    for name in ('fp32', 'tf32', 'bf16', 'fp16'):
        a = r['assign'][name]
        assert a['rows_done'] == r['assign']['rows'] and a['gemm_tflops'] > 0, a
        assert a['top1_agreement_with_fp32'] > 0.9
    for dtype in ('float32', 'float16', 'bfloat16'):  # cluster.py itself, each search_dtype
        v = r['search'][dtype]
        assert v['assign_s'] > 0 and v['top1_equal_fp32'] >= 0.999 and v['topk_equal_fp32'] >= 0.99, v
    assert r['auto']['ok'] and 'micro_batch_size=auto: 64 fits on cpu' in r['auto']['line'], r['auto']
    assert r['env']['gpu'] is None and r['goals']['vitl14_mfu_ge_45pct'] is None  # no GPU, no MFU
    md = open(tmp_path / 'gpu_report.md').read()
    assert '## Correctness' in md and '| kmeans | ok |' in md and '## Training step' in md
    assert not os.path.exists(tmp_path / 'tmp')  # scratch files removed

