"""lit.py with precompute_features: each step's frozen features and captions are gathered in a
prefetch thread (image_features.feature_batch through runtime.prefetched; pinned memory and non-blocking copies
on CUDA). The rows it hands the step are the right ones: a step's loss equals, bit for bit, the
loss computed here from image_features.npy, the step's indices and the checkpoint before it,
across an epoch boundary (a new thread); a failure in the thread stops the run with one line.
tests/sync_count.py's copies=True sees the host-to-device copy that the thread takes out of the
step, and only that."""
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import torch

import test_lit_microbatch as tm
from runtime import prefetched
from sync_count import count_syncs
from test_lit_microbatch import ROOT, lit

setup = tm.setup  # its fixture: the synthetic set and a frozen ViT-T/4 tower

# the loss of a step as lit.py computes it (clip, locked, one micro-batch), from the checkpoint of
# the step before: run in a process of lit.py's environment (threads, MKL_CBWR), so that the
# numbers can be compared bit for bit
REFERENCE = r'''
import json, sys
import numpy as np, torch
import runtime
import data
from data import Loader
from contrastive import clip_loss
from model import TextTransformer
out, syn, epoch, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
runtime.set_threads(0)
ck = torch.load(out + '/ckpt.pt', weights_only=False)
text = TextTransformer(**ck['text_config'])
text.load_state_dict(ck['text'])
loader = Loader(syn, 32, 32, with_text=True, seed=ck['config']['seed'], augment='none')
idx = loader.indices(epoch, step)
features = torch.from_numpy(np.load(out + '/image_features.npy')[idx])
ids = loader.ds.texts(idx)
texts = torch.from_numpy(ids)[:, :int(ids.argmax(1).max()) + 1]
loss = clip_loss(features, text(texts).float(), ck['logit_scale'].exp())
print(json.dumps(loss.item()))
'''


def reference_loss(setup, out, epoch, step):
    p = subprocess.run([sys.executable, '-c', REFERENCE, str(setup / out), str(setup / 'syn'),
                        str(epoch), str(step)], cwd=ROOT, env=tm.ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_prefetched_features_give_the_loss_computed_here_bit_for_bit(setup):
    # 5 steps per epoch (160 images, 32 a step): step 5 is the last of epoch 0, step 6 the first
    # of epoch 1, made by the thread of a new epoch
    lit(setup, 'pre', '--precompute_features=True', '--max_steps=6', '--stop_at=4')
    shutil.copytree(setup / 'pre', setup / 'pre4')
    lit(setup, 'pre', '--precompute_features=True', '--max_steps=6', '--stop_at=5',
        '--init_from=resume')
    shutil.copytree(setup / 'pre', setup / 'pre5')
    _, log, _ = lit(setup, 'pre', '--precompute_features=True', '--max_steps=6',
                    '--init_from=resume')
    assert [r['step'] for r in log] == list(range(1, 7))
    assert log[4]['loss'] == reference_loss(setup, 'pre4', 0, 4)
    assert log[5]['loss'] == reference_loss(setup, 'pre5', 1, 0)


def test_a_failure_in_the_prefetch_thread_stops_the_run_with_one_line(setup):
    # image_features.npy cut to 100 of its 160 rows (its stamp kept): the thread's gather of a
    # later row fails; the main thread stops with one line, the checkpoint unchanged
    lit(setup, 'short', '--precompute_features=True', '--max_steps=1')
    feats = setup / 'short' / 'image_features.npy'
    np.save(feats, np.load(feats)[:100])
    ckpt = open(setup / 'short' / 'ckpt.pt', 'rb').read()
    p = subprocess.run([sys.executable, 'lit.py', f'--data_dir={setup / "syn"}',
                        f'--vision_checkpoint={setup / "vision.pt"}',
                        f'--out_dir={setup / "short"}', *tm.TINY, '--precompute_features=True',
                        '--init_from=resume'], cwd=ROOT, env=tm.ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert 'terminate called' not in p.stderr, p.stderr[-3000:]  # the thread was joined
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('precompute_features=True: the prefetch thread failed making the batch '
                           f'of step 2 from {feats} (IndexError: '), last
    assert open(setup / 'short' / 'ckpt.pt', 'rb').read() == ckpt


def test_sync_counter_sees_the_host_to_device_copy_the_thread_takes_out_of_the_step():
    features, idx = np.random.default_rng(0).random((40, 8), dtype=np.float32), np.arange(0, 40, 5)
    patched = (torch.Tensor.to, torch.Tensor.cuda, torch.tensor, torch.as_tensor, torch.from_numpy)
    device = torch.device('cpu')  # the run's device: a GPU's in a GPU run
    with count_syncs(copies=True) as syncs:  # the gather of lit.py before the thread: one copy
        torch.from_numpy(features[idx]).to(device)
    assert syncs == {'Tensor.to (host to device)': 1}, syncs
    with count_syncs(copies=True) as syncs:  # made by a prefetch thread: none in this one
        batches = list(prefetched(lambda i: torch.from_numpy(features[i]).to(device), [idx, idx], 2))
    assert not syncs and len(batches) == 2, syncs
    with count_syncs(copies=True) as syncs:  # the other ways, and what is not one
        torch.tensor([1.0, 2.0], device=device)
        torch.as_tensor(idx, device=device)
        torch.zeros(8).copy_(torch.from_numpy(features[0]))
        torch.from_numpy(idx)[2:].add(1).to(device)  # computed from host data alone: on the host
        torch.from_numpy(idx).to(device, non_blocking=True)  # pinned on a GPU: no wait
        made_here = torch.zeros(3, device=device) + 1  # a device tensor in a GPU run
        made_here.to(device), made_here.to(torch.float64), made_here.tolist()
        t = threading.Thread(target=lambda: torch.tensor([1.0], device=device))
        t.start()
        t.join()
    assert syncs == {'torch.tensor (host to device)': 1, 'torch.as_tensor (host to device)': 1,
                     'aten.copy_.default (host to device)': 1, 'Tensor.to (host to device)': 1,
                     'Tensor.tolist': 1}, syncs
    with count_syncs() as syncs:  # copies=False (the default): reads only, as before
        torch.from_numpy(features[idx]).to(device), torch.tensor([1.0], device=device)
    assert not syncs, syncs
    assert (torch.Tensor.to, torch.Tensor.cuda, torch.tensor, torch.as_tensor,
            torch.from_numpy) == patched  # all put back
