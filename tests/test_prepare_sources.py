"""prepare.py records each row's source beside its shard (sources_XXXXX.txt, Dataset.sources):
every row of a folder build, both parts of a held-out split and a tar build is traced back to
the file it was decoded from, and its pixels are that file's decode."""
import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from test_prepare_laion import laion_tar
from test_train import ROOT

sys.path.insert(0, ROOT)
from data import Dataset  # noqa: E402
from sources import decode  # noqa: E402

S = 16


def prepare(*args):
    p = subprocess.run([sys.executable, 'prepare.py', *args, f'--image_size={S}', '--workers=2'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_folder_rows_and_both_holdout_parts_name_their_files(tmp_path):
    src = tmp_path / 'photos'
    rng = np.random.default_rng(0)
    for c in ('cat', 'dog', 'owl'):
        os.makedirs(src / c)
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (S + 4, S, 3), dtype=np.uint8)).save(src / c / f'{i}.png')
    prepare(f'--src={src}', f'--out={tmp_path / "d"}', '--holdout=0.3', '--shard_size=5')
    seen = []
    for part in ('d', 'd_holdout'):
        ds = Dataset(str(tmp_path / part))
        names = ds.sources(np.arange(len(ds)))
        for i, name in enumerate(names):
            cls = ds.classnames.index(name.split('/')[0])
            assert ds.classes[i] == cls
            want = decode(open(src / name, 'rb').read(), S)
            assert np.array_equal(ds.images([i])[0], want), (part, i, name)
        seen += names
    assert sorted(seen) == sorted(f'{c}/{i}.png' for c in ('cat', 'dog', 'owl') for i in range(7))


def test_tar_rows_name_tar_and_key(tmp_path):
    for s in range(2):
        laion_tar(str(tmp_path / 'tars' / f'{s:05d}.tar'), s, 3)
    prepare(f'--src={tmp_path / "tars"}/{{00000..00001}}.tar', f'--out={tmp_path / "d"}')
    ds = Dataset(str(tmp_path / 'd'))
    names = ds.sources(np.arange(len(ds)))
    assert names == [f'{tmp_path / "tars"}/{s:05d}.tar:{s:05d}{j:04d}' for s in range(2) for j in range(3)]
    for i, name in enumerate(names):
        tar, key = name.rsplit(':', 1)
        data = tarfile.open(tar).extractfile(f'{key}.jpg').read()
        assert np.array_equal(ds.images([i])[0], decode(data, S))
