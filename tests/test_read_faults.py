"""Files that go bad under a reader, as the stages meet them (subprocesses): a shard truncated
while a run has it mapped stops with one line instead of SIGBUS, and a truncated or empty
checkpoint handed to probe.py, lit.py or cluster.py stops with one line naming the file."""
import os
import subprocess
import sys

import pytest
import torch

import model
import prepare
from test_faults import ENV, one_line, script
from test_train import ROOT

# -----------------------------------------------------------------------------
# 1. a shard truncated while it is mapped

READER = r'''
import os, sys, time
import data
d, mode = sys.argv[1:]
path = os.path.join(d, data.shard_file('images', 0))
if mode == 'prefetch':  # the read that meets the truncation is in the Loader's prefetch thread
    it = data.Loader(d, 16, 32, augment='none', prefetch=1).iterate(0)
    next(it)
    time.sleep(1)  # the thread has its next batches made and waits on the queue: not mid-read
    os.truncate(path, os.path.getsize(path) // 2)
    for _ in it:
        pass
else:
    ds = data.Dataset(d)
    ds.images([0, 70])  # both shards mapped
    if mode == 'deleted':  # the mapped file lives on until unmapped: nothing to stop for
        before = ds.images([63])
        os.remove(path)
        assert (ds.images([63]) == before).all()
    else:
        os.truncate(path, os.path.getsize(path) // 2)
        ds.images([63])
print('read on')
'''


@pytest.fixture
def shards(tmp_path):
    """Two shards of 64 32x32 images (192 KiB each): half of one is whole pages past its end."""
    d = tmp_path / 'syn'
    prepare.build('synthetic', str(d), image_size=32, count=128, seed=0, workers=1,
                  shard_size=64, progress=False)
    return d


@pytest.mark.parametrize('mode', ['main', 'prefetch'])
def test_a_shard_truncated_while_mapped_stops_with_one_line_not_sigbus(shards, mode):
    """The read after the truncation exits 1 with one line naming the file and both sizes; it
    killed the process with SIGBUS (exit 135, no message) before."""
    p = subprocess.run([sys.executable, '-c', READER, str(shards), mode], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    path = str(shards / 'images_00000.npy')
    size = os.path.getsize(path)
    one_line(p, f'{path}: truncated while in use ({size} bytes, its header says {2 * size}',
             'the run cannot go on: restore the file and resume')
    assert 'read on' not in p.stdout


def test_a_shard_deleted_while_mapped_reads_on(shards):
    """No false stop: a deleted path leaves the mapped file whole (the check compares inodes)."""
    p = subprocess.run([sys.executable, '-c', READER, str(shards), 'deleted'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'read on' in p.stdout, p.stderr[-2000:]

# -----------------------------------------------------------------------------
# 2. a truncated or empty checkpoint


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
    d = tmp_path_factory.mktemp('read_faults')
    prepare.build('synthetic', str(d / 'syn'), image_size=32, count=64, seed=0, workers=1,
                  progress=False)
    torch.manual_seed(0)
    vision, _ = model.create('ViT-T/4', layers=1)
    torch.save({'vision_config': vision.config, 'vision': vision.state_dict()}, d / 'good.pt')
    blob = (d / 'good.pt').read_bytes()
    (d / 'truncated.pt').write_bytes(blob[:len(blob) // 2])
    (d / 'empty.pt').write_bytes(b'')
    return d


STAGES = {
    'probe': lambda d, ck: script('probe.py', f'--checkpoint={ck}', f'--out_dir={d / "po"}',
                                  '--device=cpu'),
    'lit': lambda d, ck: script('lit.py', f'--data_dir={d / "syn"}', f'--vision_checkpoint={ck}',
                                f'--out_dir={d / "lo"}', '--device=cpu'),
    'cluster': lambda d, ck: script('cluster.py', f'--data_dir={d / "syn"}', f'--teacher={ck}',
                                    f'--out_dir={d / "co"}', '--device=cpu', '--num_classes=4',
                                    '--num_positives=1'),
}


@pytest.mark.parametrize('stage', sorted(STAGES))
def test_a_truncated_or_empty_checkpoint_stops_each_stage_with_one_line(broken, stage):
    """probe.py --checkpoint, lit.py vision_checkpoint, cluster.py teacher: `<path>: empty file
    (0 bytes)` (was "EOFError: ") and `<path>: truncated or not a checkpoint (<the zip reader's
    first sentence>)`, without torch's paragraph of advice."""
    ck = broken / 'empty.pt'
    one_line(STAGES[stage](broken, ck), f'{ck}: empty file (0 bytes)')
    ck = broken / 'truncated.pt'
    p = STAGES[stage](broken, ck)
    one_line(p, f'{ck}: truncated or not a checkpoint (RuntimeError: PytorchStreamReader failed '
                'reading zip archive: failed finding central directory)')
    assert 'miniz' not in p.stderr, p.stderr[-2000:]


def test_reader_errors_are_one_short_line_with_the_reason(tmp_path):
    """A truncated .safetensors and a pickle refused by weights_only: one line, the reason kept
    (weights_only puts it below a paragraph on PyTorch 2.6)."""
    import checkpoints
    safetensors = pytest.importorskip('safetensors.torch')
    safetensors.save_file({'w': torch.zeros(64, 64)}, tmp_path / 'w.safetensors')
    blob = (tmp_path / 'w.safetensors').read_bytes()
    (tmp_path / 'w.safetensors').write_bytes(blob[:len(blob) // 2])
    (tmp_path / 'evil.pt').write_bytes(b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.')
    for name, reason in (('w.safetensors', 'SafetensorError: '), ('evil.pt', 'os.system')):
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as err:
            checkpoints.from_pretrained(path)
        msg = str(err.value)
        assert msg.startswith(f'{path}: truncated or not a checkpoint (') and reason in msg, msg
        assert '\n' not in msg and len(msg) < len(path) + 160, msg
