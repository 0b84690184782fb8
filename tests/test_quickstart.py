"""End to end: scripts/quickstart.sh in its reduced mode (QUICK=1), every stage on real files."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import Dataset  # noqa: E402


def test_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / 'qs'
    env = dict(os.environ, QUICK='1', OUT=str(out), THREADS='2')  # the script's documented knob
    r = subprocess.run(['bash', 'scripts/quickstart.sh'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.load(open(out / 'summary.json'))

    # stage 1: the clustering the script asked for, labels of the documented shape
    cluster = json.load(open(out / 'cluster' / 'cluster.json'))
    assert (cluster['N'], cluster['k'], cluster['l']) == (1200, 60, 8)
    # stage 2: MLCD training ran its steps and lowered the loss
    log = [r for r in map(json.loads, open(out / 'train_mlcd' / 'log.jsonl')) if 'loss' in r]
    assert log[-1]['step'] == 12 and log[-1]['loss'] < log[0]['loss']
    # stage 3: LiT lowered the contrastive loss and left the image tower bit-identical
    lit = json.load(open(out / 'lit' / 'lit.json'))
    assert lit['loss'] < lit['first_loss'] and lit['vision_unchanged'] is True
    # stage 4: all three evaluations produced numbers in range; the LiT tower has a text tower
    probe = json.load(open(out / 'probe' / 'probe.json'))
    assert 0 <= probe['linear_probe']['top1'] <= 1 and probe['linear_probe']['n_test'] == 400
    assert 0 <= probe['zero_shot']['top1'] <= 1 and probe['zero_shot']['classes'] == 6
    assert 0 <= probe['retrieval']['i2t_R@1'] <= probe['retrieval']['i2t_R@10'] <= 1
    y = np.asarray(Dataset(str(out / 'test')).classes)  # chance: the most frequent class's share
    assert probe['linear_probe']['chance'] == probe['zero_shot']['chance'] == np.bincount(y).max() / len(y)
    assert summary['probe/linear probe top-1 % chance'] == pytest.approx(100 * np.bincount(y).max() / len(y))
    pixels = json.load(open(out / 'probe_pixels' / 'probe.json'))['linear_probe']
    assert 0 <= pixels['top1'] <= 1 and pixels['dim'] == 32 * 32 * 3
    for key in ('train_mlcd/loss', 'probe/linear probe top-1 %', 'probe/zero-shot top-1 %'):
        assert key in summary
    assert json.load(open(out / 'train_mlcd' / 'train.json'))['threads'] == 2 and lit['threads'] == 2

    # run again: every finished stage is skipped, and says so; nothing is retrained or replaced
    stamps = {p: os.stat(p).st_mtime_ns for p in out.rglob('*') if p.suffix in ('.pt', '.json')}
    r = subprocess.run(['bash', 'scripts/quickstart.sh'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ('cluster/cluster.json', 'train_mlcd/train.json', 'lit/lit.json', 'probe/probe.json',
                  'probe_pixels/probe.json'):
        assert f'skip: {out / stage} exists' in r.stderr
    assert '+ python' not in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == summary
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items() if p.name != 'summary.json')


def test_summary_gives_each_accuracy_its_standard_error_and_chance(tmp_path):
    """± is the binomial standard error sqrt(p (1 - p) / n) of the test set, in points; chance is
    probe.py's; numbers without a test size (the loss) get neither."""
    for sub, res in {'probe': {'linear_probe': {'top1': 0.313, 'n_test': 300, 'chance': 0.1},
                               'retrieval': {'i2t_R@1': 0.05, 't2i_R@1': 0.04, 'n': 200,
                                             'chance': 1 / 200}},
                     'train': {'step': 10, 'loss': 2.5}}.items():
        (tmp_path / sub).mkdir()
        json.dump(res, open(tmp_path / sub / f'{sub}.json', 'w'))
    r = subprocess.run([sys.executable, 'scripts/summary.py', str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s['probe/linear probe top-1 % ±'] == pytest.approx(100 * math.sqrt(0.313 * 0.687 / 300))
    assert s['probe/I->T R@1 % ±'] == pytest.approx(100 * math.sqrt(0.05 * 0.95 / 200))
    assert s['probe/linear probe top-1 % chance'] == pytest.approx(10.0)
    assert s['probe/T->I R@1 % chance'] == pytest.approx(0.5)
    assert 'train/loss ±' not in s and 'train/loss chance' not in s
    line = next(x for x in r.stdout.splitlines() if 'linear probe' in x).split()
    assert line[-2:] == ['2.68', '10.00']


# -----------------------------------------------------------------------------
# SRC=<your images>: the settings come from the data, and the pipeline adapts to what it holds

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import quickstart_plan  # noqa: E402


def shapes(root, per_class, classes=(0, 1, 2), size=32):
    """Class folders of the synthetic set's shapes as PNG files: [(path, caption, class)]."""
    from PIL import Image
    from synthetic import SHAPES, synthetic_one
    made, counts, i = [], {c: 0 for c in classes}, 0
    while min(counts.values()) < per_class:
        img, caption, c = synthetic_one(i, size, 7)
        i += 1
        if c not in counts or counts[c] == per_class:
            continue
        os.makedirs(root / SHAPES[c], exist_ok=True)
        path = root / SHAPES[c] / f'{i:04d}.png'
        Image.fromarray(img).save(path)
        made.append((path, caption, c))
        counts[c] += 1
    return made


def quickstart(src, out, **env):
    env = dict(os.environ, SRC=str(src), OUT=str(out), QUICK='1', THREADS='1', **env)
    r = subprocess.run(['bash', 'scripts/quickstart.sh'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_plan_fits_the_settings_to_the_data(monkeypatch):
    """k < N, a batch <= N that drops < 10% of an epoch, steps from the image budget; asked
    values win and are checked."""
    for n in (8, 13, 96, 999, 5000, 400_000):
        p = quickstart_plan.data_plan({'count': n, 'image_size': 24, 'classnames': None})
        assert 2 <= p['K'] < n and 2 <= p['BATCH'] <= n and p['IMAGE_SIZE'] == 24
        assert n % p['BATCH'] <= max(0.1 * n, 1) or n < 20  # >= 10 batches per epoch
        seen = min(quickstart_plan.EPOCHS * n, quickstart_plan.MAX_IMAGES)
        assert p['STEPS'] == max(2, -(-seen // p['BATCH']))
        assert 1 <= p['L'] <= 8 and p['L'] < p['K'] and p['WARMUP'] < p['STEPS']
    p = quickstart_plan.data_plan({'count': 5000, 'image_size': 32, 'classnames': ['a', 'b']})
    assert (p['K'], p['BATCH'], p['STEPS'], p['L'], p['CLASSES']) == (250, 128, 391, 8, 1)
    assert quickstart_plan.data_plan({'count': 96, 'image_size': 32}, quick=True)['STEPS'] == 12
    monkeypatch.setenv('K', '40')
    monkeypatch.setenv('BATCH', '64')
    assert quickstart_plan.data_plan({'count': 96, 'image_size': 32})[
        'K'] == 40 and quickstart_plan.data_plan({'count': 96, 'image_size': 32})['BATCH'] == 64
    for key, value, words in (('K', '96', 'K=96: must be fewer clusters than the 96'),
                              ('BATCH', '97', 'BATCH=97: must be at most the 96'),
                              ('K', 'ten', 'K=ten: must be an integer >= 2')):
        monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit, match=words):
            quickstart_plan.data_plan({'count': 96, 'image_size': 32})
        monkeypatch.delenv(key)
    with pytest.raises(SystemExit, match='7 training images: the quickstart needs at least 8'):
        quickstart_plan.data_plan({'count': 7, 'image_size': 32})


def test_plan_keeps_the_sources_resolution_up_to_the_towers(tmp_path, monkeypatch):
    """Images of 20 px stay at 20; of 40 px are stored at the tower's 32; IMAGE_SIZE wins."""
    from PIL import Image
    for side, want in ((20, 20), (40, 32), (6, 8)):
        d = tmp_path / f'side{side}' / 'a'
        d.mkdir(parents=True)
        for i in range(3):
            Image.new('RGB', (side + 4 * i, side)).save(d / f'{i}.png')  # shorter side: `side`
        plan, note = quickstart_plan.source_plan(str(d.parent))
        assert plan == dict(IMAGE_SIZE=want, HOLDOUT=0.2, CLASSES=1, TEXT=0)
        assert note.startswith(f'images of about {side} px: stored and trained at {want} px')
        assert ('IMAGE_SIZE=64 asks for more' in note) == (side > 32)
    flat = tmp_path / 'side20' / 'a'  # no class folders and no captions: nothing to test on
    assert quickstart_plan.source_plan(str(flat))[0]['HOLDOUT'] == 0
    monkeypatch.setenv('IMAGE_SIZE', '48')
    assert quickstart_plan.source_plan(str(flat))[0]['IMAGE_SIZE'] == 48
    monkeypatch.setenv('IMAGE_SIZE', '30')
    with pytest.raises(SystemExit, match='IMAGE_SIZE=30: must be a multiple of 4'):
        quickstart_plan.source_plan(str(flat))



def test_plan_reads_a_tars_images_and_captions(tmp_path):
    """A webdataset tar (key.jpg + key.txt): the first images' size, captions to evaluate on."""
    import io
    import tarfile
    from PIL import Image
    with tarfile.open(tmp_path / 'shard.tar', 'w') as tf:
        for i in range(4):
            jpg, txt = io.BytesIO(), f'a caption {i}'.encode()
            Image.new('RGB', (24 + i, 24)).save(jpg, 'JPEG')
            for name, data in ((f'{i:04d}.jpg', jpg.getvalue()), (f'{i:04d}.txt', txt)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    plan, note = quickstart_plan.source_plan(str(tmp_path / 'shard.tar'))
    assert plan == dict(IMAGE_SIZE=24, HOLDOUT=0.2, CLASSES=0, TEXT=1)
    assert note.startswith('images of about 24 px')

def test_own_class_folders_run_end_to_end_and_probe_on_held_out_images(tmp_path):
    """3 classes x 40 images: 8 of each held out; pre-training, kNN and the probe at the data's
    32 px; LiT skipped with a line; the summary in pipeline order; a re-run skips every stage."""
    shapes(tmp_path / 'shapes', 40)
    out = tmp_path / 'qs'
    r = quickstart(tmp_path / 'shapes', out)
    assert 'skip: LiT, zero-shot and retrieval: ' in r.stderr and 'has no captions' in r.stderr
    assert 'images of about 32 px: stored and trained at 32 px' in r.stderr

    # the held-out part: 8 of every class, none of its images in the training part
    train, held = Dataset(str(out / 'data')), Dataset(str(out / 'data_holdout'))
    assert np.bincount(train.classes).tolist() == [32] * 3
    assert np.bincount(held.classes).tolist() == [8] * 3
    seen = {x.tobytes() for x in train.images(np.arange(len(train)))}
    assert not seen & {x.tobytes() for x in held.images(np.arange(len(held)))}
    # the plan's settings reached the stages
    plan = quickstart_plan.data_plan(train.meta, quick=True)
    assert json.load(open(out / 'cluster' / 'cluster.json'))['k'] == plan['K'] < 96
    result = json.load(open(out / 'train_mlcd' / 'train.json'))
    assert (result['step'], result['global_batch_size']) == (plan['STEPS'], plan['BATCH'])
    assert torch.load(out / 'train_mlcd' / 'ckpt.pt', weights_only=True)[
        'vision_config']['image_size'] == 32
    assert '(k = 3; the majority class alone: 0.3333)' in r.stdout  # 8 per class held out
    # the probes: fitted on the 96 training images, tested on the 24 held out
    for probe in ('probe', 'probe_pixels'):
        lp = json.load(open(out / probe / 'probe.json'))['linear_probe']
        assert (lp['n_train'] + lp['n_val'], lp['n_test']) == (96, 24) and 0 <= lp['top1'] <= 1
    assert not (out / 'lit').exists()
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    subs = list(dict.fromkeys(k.split('/')[0] for k in summary))
    assert subs == ['data', 'cluster', 'train_mlcd', 'probe', 'probe_pixels']

    stamps = {p: os.stat(p).st_mtime_ns for p in out.rglob('*') if p.suffix in ('.pt', '.json')}
    r = quickstart(tmp_path / 'shapes', out)
    for stage in ('data/meta.json', 'cluster/cluster.json', 'train_mlcd/train.json',
                  'probe/probe.json', 'probe_pixels/probe.json'):
        assert f'skip: {out / stage} exists' in r.stderr
    assert '+ python' not in r.stderr and json.loads(r.stdout.strip().splitlines()[-1]) == summary
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items() if p.name != 'summary.json')


def test_own_captioned_images_in_class_folders_get_every_evaluation(tmp_path):
    """A path<TAB>caption list of images in class folders: LiT on the MLCD tower, and on the 20%
    held out the linear probe and zero-shot (the folders are the classes) and retrieval, in one
    command; each accuracy with its chance level in the summary."""
    made = shapes(tmp_path / 'img', 16)
    with open(tmp_path / 'captions.tsv', 'w') as f:
        f.writelines(f'{os.path.relpath(p, tmp_path)}\t{caption}\n' for p, caption, _ in made)
    out = tmp_path / 'qs'
    r = quickstart(tmp_path / 'captions.tsv', out)
    assert 'skip: linear probe' not in r.stderr and 'skip: LiT' not in r.stderr
    train, held = Dataset(str(out / 'data')), Dataset(str(out / 'data_holdout'))
    assert (len(train), len(held)) == (39, 9)  # 20% of each class's 16: 3
    assert train.classnames == ['circle', 'square', 'triangle'] and train.classnames == held.classnames
    for ds in (train, held):  # each image's class is its folder
        for name, c in zip(ds.sources(np.arange(len(ds))), ds.classes):
            assert name.split('/')[-2] == ds.classnames[c]
    assert json.load(open(out / 'lit' / 'lit.json'))['vision_unchanged'] is True
    probe = json.load(open(out / 'probe' / 'probe.json'))
    y = np.asarray(held.classes)
    assert probe['linear_probe']['n_test'] == probe['zero_shot']['n'] == probe['retrieval']['n'] == 9
    assert probe['linear_probe']['chance'] == probe['zero_shot']['chance'] == np.bincount(y).max() / 9
    assert 0 <= probe['retrieval']['i2t_R@1'] <= probe['retrieval']['i2t_R@10'] <= 1
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary['probe/zero-shot top-1 % chance'] == pytest.approx(100 * np.bincount(y).max() / 9)
    assert 'probe/linear probe top-1 % ±' in summary and 'probe/I->T R@1 % chance' in summary


def test_a_caption_list_without_class_folders_has_no_classes(tmp_path):
    """Images in one folder, or in numbered shard folders (00000/, 00001/): no classes."""
    import prepare
    made = shapes(tmp_path / 'img', 3)
    for layout in ('flat', 'numbered'):
        lines = []
        for k, (p, caption, _) in enumerate(made):
            d = tmp_path / layout / ('' if layout == 'flat' else f'{k % 2:05d}')
            os.makedirs(d, exist_ok=True)
            os.link(p, d / f'{k}.png')
            lines.append(f'{os.path.relpath(d / f"{k}.png", tmp_path)}\t{caption}\n')
        open(tmp_path / f'{layout}.tsv', 'w').writelines(lines)
        meta = prepare.build(str(tmp_path / f'{layout}.tsv'), str(tmp_path / f'd_{layout}'),
                             image_size=16, workers=1, progress=False)
        assert meta['classnames'] is None and meta['count'] == len(made)
        assert not (tmp_path / f'd_{layout}' / 'classes.npy').exists()


def test_dropping_over_a_tenth_of_an_epoch_is_warned_once(tmp_path, capsys):
    """60 images in global batches of 32 leave 28 out of every epoch: one warning, from rank 0;
    batches of 8 leave 4 (7%): none."""
    import data
    import prepare
    d = str(tmp_path / 'd')
    prepare.build('synthetic', d, image_size=16, count=60, workers=1, progress=False)
    data._warned.clear()
    capsys.readouterr()
    data.Loader(d, 8, 16)
    data.Loader(d, 16, 16, rank=1, world_size=2)
    assert capsys.readouterr().err == ''
    data.Loader(d, 16, 16, rank=0, world_size=2)
    data.Loader(d, 32, 16)  # the same global batch: said once
    err = capsys.readouterr().err.splitlines()
    assert err == [f'warning: {d}: 60 images make 1 batch(es) of 32 per epoch; each epoch leaves '
                   'out 28 (47%, other images each epoch): a batch that divides 60, or one of at '
                   'most 6, loses less']


def test_holdout_is_stratified_seeded_and_never_takes_a_whole_class():
    """round(f * n_c) rows of every class, the same for the same seed, other rows for another;
    a class of one stays whole in the training part; without classes, a share of all rows."""
    from prepare import holdout_rows
    classes = np.repeat([0, 1, 2, 3], [40, 11, 2, 1])
    held = holdout_rows(classes, len(classes), 0.2, seed=0)
    assert np.bincount(classes[held], minlength=4).tolist() == [8, 2, 1, 0]
    assert np.array_equal(held, holdout_rows(classes, len(classes), 0.2, seed=0))
    assert not np.array_equal(held, holdout_rows(classes, len(classes), 0.2, seed=1))
    assert len(holdout_rows(None, 48, 0.2, seed=0)) == 10 and len(np.unique(held)) == len(held)
