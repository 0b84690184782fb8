"""What a checkpoint and a setting mean on another device, tested on the CPU: a centre shard whose
negative sampler was written on a CUDA device (its 16-byte Philox state) resumes on the CPU,
reseeded, with one line saying so; dtype='float16' (which would need a loss scaler) is refused."""
import os

import pytest
import torch

import common
from test_train import BASE, data, files, losses, one_line_error, run  # noqa: F401 (data: a fixture)


def test_a_sampler_state_of_the_other_device_kind_resumes_reseeded(data, tmp_path):  # noqa: F811
    """A 2-step run's centre shard given a CUDA generator's state (16 bytes where the CPU's is
    5,056) and its checksum re-recorded, as a run on a GPU writes it: the resume on the CPU
    reseeds the sampler, says so, and runs to the end (before: set_state raised)."""
    out = str(tmp_path / 'run')
    run(data['data'] + BASE, out)
    ck_path = os.path.join(out, 'ckpt.pt')
    ck = torch.load(ck_path, weights_only=True)
    shard_path = os.path.join(out, ck['centres'][0])
    shard = torch.load(shard_path, weights_only=True)
    assert shard['generator'].numel() == torch.Generator().get_state().numel()
    shard['generator'] = torch.zeros(16, dtype=torch.uint8)  # the form torch.cuda's generator has
    torch.save(shard, shard_path)
    ck['shards_sha256'] = [common.state_sha256(shard)]
    torch.save(ck, ck_path)
    p = run(data['data'] + BASE[:2] + ['--max_steps=4', '--init_from=resume'], out)
    assert 'the negative sampler was written on the other device kind, reseeded' in p.stdout
    assert [s for s, _, _ in losses(out)] == [1, 2, 3, 4]


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
