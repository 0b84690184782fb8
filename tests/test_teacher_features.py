"""scripts/teacher_features.py: one view is the tower's own output for the plain image (checked
against evaluation.extract, the probe's code path); the mean over views is a mean of unit vectors,
which for mirror-symmetric images and no padding (every view is then the plain image) is the
one-view feature, and with padding is not."""
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from evaluation import extract  # noqa: E402
from model import VisionTransformer  # noqa: E402


def features(tmp_path, name, *args):
    out = tmp_path / f'{name}.npy'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, 'scripts/teacher_features.py', f'--checkpoint={tmp_path}/t.pt',
                        f'--data_dir={tmp_path}/data', f'--out={out}', '--batch_size=5', *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return np.load(out)


def test_views_feature_and_the_probe_path(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):  # left-right symmetric images: a flip leaves them as they are
        half = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
        os.makedirs(tmp_path / 'src' / f'c{i % 2}', exist_ok=True)
        image = Image.fromarray(np.concatenate([half, half[:, ::-1]], 1))
        image.save(tmp_path / 'src' / f'c{i % 2}' / f'{i}.png')
    p = subprocess.run([sys.executable, 'prepare.py', f'--src={tmp_path}/src', f'--out={tmp_path}/data',
                        '--image_size=16'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    torch.manual_seed(0)
    v = VisionTransformer(image_size=16, patch_size=4, width=16, layers=1, heads=2, embed_dim=6)
    torch.save({'vision_config': v.config, 'vision': v.state_dict()}, tmp_path / 't.pt')

    ref = extract(v.eval(), str(tmp_path / 'data'), 5, 16, 'cpu')
    one = features(tmp_path, 'one')
    assert one.shape == (12, 6)
    np.testing.assert_allclose(one, F.normalize(torch.from_numpy(ref['embed']), dim=-1).numpy(), atol=1e-5)
    pooled = features(tmp_path, 'pooled', '--feature=pooled')
    np.testing.assert_allclose(pooled, F.normalize(torch.from_numpy(ref['pooled']), dim=-1).numpy(),
                               atol=1e-5)

    same = features(tmp_path, 'same', '--views=4', '--pad=0')  # every view: the image or its mirror
    np.testing.assert_allclose(same, one, atol=1e-5)
    shifted = features(tmp_path, 'shifted', '--views=4', '--pad=4')
    norms = np.linalg.norm(shifted, axis=1)
    assert (norms < 1 - 1e-4).all() and (norms > 0.5).all()  # a mean of differing unit vectors
    assert np.abs(shifted - one).max() > 1e-2
