"""What a checkpoint and a setting mean on another device, tested on the CPU: a centre shard holds
no state of one device kind (PartialFC's samplers are keyed by seed, step and micro-batch), so a
run resumes on a CPU or a GPU alike; dtype='float16' (which would need a loss scaler) is refused."""
import os

import pytest
import torch

import files as file_io
from test_train import BASE, data, files, losses, one_line_error, run  # noqa: F401 (data: a fixture)


def test_a_centre_shard_holds_no_device_state_and_the_sampler_is_keyed(data, tmp_path):  # noqa: F811
    """The stored form: centres, Adam moments and the host RNGs, nothing of a generator (a CPU
    one's state is 5,056 bytes, a CUDA one's 16: before, one could not be loaded into the other).
    The sampler is a function of (seed, step, micro-batch): a run resumed from a shard with its
    CUDA RNG entry filled in (as a GPU writes it) gives the uninterrupted run's losses."""
    out, full = str(tmp_path / 'run'), str(tmp_path / 'full')
    args = data['data'] + ['--global_batch_size=16', '--micro_batch_size=8', '--sample_ratio=0.5',
                           '--num_positives=1', '--ckpt_interval=2', '--max_steps=4']
    run(args, full)
    run(args + ['--stop_at=2'], out)
    ck_path = os.path.join(out, 'ckpt.pt')
    ck = torch.load(ck_path, weights_only=True)
    shard_path = os.path.join(out, ck['centres'][0])
    shard = torch.load(shard_path, weights_only=True)
    assert set(shard) == {'start', 'rows', 'step', 'run_id', 'weight', 'exp_avg', 'exp_avg_sq',
                          'adam_step', 'rng'}, sorted(shard)
    assert shard['rng']['cuda'] is None
    shard['rng']['cuda'] = torch.zeros(16, dtype=torch.uint8)  # the form a CUDA generator's has
    torch.save(shard, shard_path)
    ck['shards_sha256'] = [file_io.state_sha256(shard)]
    torch.save(ck, ck_path)
    run(args + ['--init_from=resume'], out)
    assert losses(out) == losses(full)


@pytest.mark.parametrize('stage', ['train.py', 'lit.py'])
def test_float16_is_refused_before_any_work(stage, tmp_path):
    """dtype='float16' ran fp32 without a word; now one line, and no out_dir is made."""
    import subprocess
    import sys
    from test_train import ROOT
    p = subprocess.run([sys.executable, os.path.join(ROOT, stage), '--dtype=float16',
                        f'--out_dir={tmp_path / "o"}', '--device=cpu'], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                       timeout=300)
    one_line_error(p, 'dtype=float16', 'loss scaler')
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('tower', ['vision', 'text'])
def test_grad_checkpointing_gives_the_plain_step_bitwise(tower):
    """Both towers with grad_checkpointing: the same output and the same gradient of every
    parameter, bit for bit on the CPU, while the saved activations shrink (the tensors autograd
    keeps, counted by saved_tensors_hooks)."""
    import model
    from torch.autograd.graph import saved_tensors_hooks
    torch.manual_seed(0)
    if tower == 'vision':
        m, _ = model.create('ViT-T/4', layers=3)
        x = torch.randn(4, 3, m.image_size, m.image_size)
    else:
        m = model.TextTransformer(width=64, layers=3, heads=2, embed_dim=32)
        x = torch.randint(0, 49408, (4, 77))
    out = []
    for ck in (False, True):
        m.grad_checkpointing = ck
        m.zero_grad(set_to_none=True)
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                 lambda t: t):
            y = m(x)
        (y.square().sum() + y.sum()).backward()
        out.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, sum(saved)))
    (y0, g0, s0), (y1, g1, s1) = out
    assert torch.equal(y0, y1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert s1 < s0 / 3, (s0, s1)


def test_train_with_grad_checkpointing_repeats_the_plain_run(data, tmp_path):  # noqa: F811
    """train.py grad_checkpointing=True: the same losses as without, bitwise, 3 steps."""
    args = data['data'] + BASE[:2] + ['--max_steps=3']
    run(args, str(tmp_path / 'plain'))
    run(args + ['--grad_checkpointing=True'], str(tmp_path / 'ck'))
    assert losses(str(tmp_path / 'ck')) == losses(str(tmp_path / 'plain'))
