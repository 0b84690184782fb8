"""scripts/cluster_sheet.py: every image in a cluster's row is one of that cluster's members,
read back from the sheet's pixels; rows follow the size order; labels of other data are refused."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from test_cluster import ROOT, make_dataset

sys.path.insert(0, ROOT)
from data import Dataset  # noqa: E402

S, TITLE = 16, 14


def sheet(*args):
    return subprocess.run([sys.executable, 'scripts/cluster_sheet.py', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_each_row_shows_members_of_its_cluster(tmp_path):
    data = make_dataset(tmp_path / 'd', 90, image_size=S)
    ds = Dataset(data)
    # sizes 30, 25, 20, 10, 5: cluster c takes the rows below its bound; second column unused
    nearest = np.searchsorted(np.array([30, 55, 75, 85, 90]), np.arange(90), side='right')
    os.makedirs(tmp_path / 'c')
    np.save(tmp_path / 'c' / 'labels.npy', np.stack([nearest, nearest], 1).astype(np.int32))
    out = tmp_path / 's.png'
    p = sheet(f'--data_dir={data}', f'--labels_dir={tmp_path / "c"}', f'--out={out}', '--rows=3',
              '--per_row=6', f'--cell={S}')
    assert p.returncode == 0, p.stderr
    assert 'clusters [0, 2, 4]' in p.stdout  # largest, median, smallest
    img = np.asarray(Image.open(out).convert('RGB'))
    assert img.shape == (3 * (TITLE + S), 6 * S, 3)
    every = ds.images(np.arange(90))
    for r, c in enumerate([0, 2, 4]):
        shown = set()
        for i in range(6):
            cell = img[r * (TITLE + S) + TITLE:(r + 1) * (TITLE + S), i * S:(i + 1) * S]
            match = [j for j in range(90) if np.array_equal(every[j], cell)]
            if c == 4 and i >= 5:  # cluster 4 has 5 members: the rest of its row is blank
                assert (cell == 255).all()
                continue
            assert match and nearest[match[0]] == c, (r, i)
            shown.add(match[0])
        assert len(shown) == min(6, np.sum(nearest == c))  # no image twice


def test_labels_of_other_data_are_refused(tmp_path):
    data = make_dataset(tmp_path / 'd', 20, image_size=S)
    os.makedirs(tmp_path / 'c')
    np.save(tmp_path / 'c' / 'labels.npy', np.zeros((21, 2), np.int32))
    p = sheet(f'--data_dir={data}', f'--labels_dir={tmp_path / "c"}', f'--out={tmp_path / "s.png"}')
    assert p.returncode == 1 and 'has shape [21, 2], but' in p.stderr and 'labels of other data' in p.stderr
    assert not (tmp_path / 's.png').exists()
