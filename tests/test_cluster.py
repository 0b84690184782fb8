"""cluster.py end to end, run as the script it is (subprocess), checked against independent
references: the generating blobs, brute-force torch.topk, faiss.Kmeans called directly, a float64
NMI formula, one process vs two ranks, and transformers' own CLIP features."""
import os
import sys
import json
import socket
import subprocess

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, ranks=1, ok=True, kill_at=''):
    if ranks == 1:
        cmd = [sys.executable, 'cluster.py', *args]
    else:
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={ranks}',
               f'--master_port={port}', 'cluster.py', *args]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', CLUSTER_KILL_AT=kill_at)  # kill_at: SIGKILL there
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
        p.result = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith('{')][-1])
    else:
        assert p.returncode != 0, p.stdout
    return p


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blobs(n, d, b, noise, seed):
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((b, d)))
    y = rng.integers(0, b, n)
    x = unit(centres[y] + noise * rng.standard_normal((n, d))).astype(np.float32)
    return x, y.astype(np.int32), centres


def make_dataset(path, count, image_size=32, seed=0):
    cmd = [sys.executable, 'prepare.py', '--src=synthetic', f'--out={path}', f'--image_size={image_size}',
           f'--count={count}', f'--seed={seed}']
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return str(path)


def nmi_reference(u, v):
    """float64 NMI = (H(U) + H(V) - H(U,V)) / ((H(U) + H(V)) / 2), from a dense contingency table."""
    cont = np.zeros((u.max() + 1, v.max() + 1))
    np.add.at(cont, (u, v), 1.0)
    p = cont / cont.sum()
    H = lambda q: -sum(x * np.log(x) for x in q.ravel() if x > 0)
    hu, hv, huv = H(p.sum(1)), H(p.sum(0)), H(p)
    return (hu + hv - huv) / ((hu + hv) / 2)


def test_blobs_recovered_and_report(tmp_path):
    # k-means starts from random points (as faiss and the paper do), so k exceeds the number of
    # blobs to seed every blob (MLCD's regime anyway: 1M centres >> classes); each cluster is
    # matched to the generating centre nearest its centroid
    x, y, centres = blobs(4000, 32, 10, 0.08, seed=0)
    np.save(tmp_path / 'x.npy', x)
    np.save(tmp_path / 'y.npy', y)
    out = tmp_path / 'out'
    r = run(f'--embeddings_path={tmp_path}/x.npy', f'--classes_path={tmp_path}/y.npy', f'--out_dir={out}',
            '--num_classes=100', '--num_positives=4', '--niter=20').result
    top1 = np.load(out / 'labels.npy')[:, 0]
    match = (np.load(out / 'centroids.npy') @ centres.T).argmax(1)
    assert (match[top1] == y).mean() >= 0.99
    assert set(match[np.unique(top1)]) == set(range(10))  # no blob swallowed by another
    # objective (mean cosine to the nearest centre) within 1% of faiss's spherical k-means on the
    # same points with the same iterations, from faiss's own start
    import faiss
    emb = np.load(out / 'embeddings.npy').astype(np.float32)
    km = faiss.Kmeans(32, 100, niter=20, seed=0, spherical=True)
    km.train(emb)
    ours, ref = ((emb @ c.T).max(1).mean() for c in (np.load(out / 'centroids.npy'), km.centroids))
    assert abs(ours - ref) <= 0.01 * ref, (ours, ref)
    # report: sizes and purity from the labels, NMI against the float64 formula
    sizes = np.bincount(top1, minlength=100)
    assert r['sizes']['min'] == sizes.min() and r['sizes']['max'] == sizes.max()
    assert r['sizes']['empty'] == (sizes == 0).sum() and r['sizes']['median'] == np.median(sizes)
    assert sum(r['sizes']['hist'].values()) == 100
    purity = sum(np.bincount(y[top1 == c]).max() for c in np.unique(top1)) / len(y)
    assert r['purity'] == pytest.approx(purity, abs=1e-12) and purity >= 0.99
    assert r['nmi'] == pytest.approx(nmi_reference(top1, y), abs=1e-9)
    # a non-trivial table: 40% of the classes replaced by random ones (report only, phases skipped)
    rng = np.random.default_rng(1)
    y2 = np.where(rng.random(len(y)) < 0.4, rng.integers(0, 13, len(y)), y).astype(np.int32)
    np.save(tmp_path / 'y2.npy', y2)
    r2 = run(f'--embeddings_path={tmp_path}/x.npy', f'--classes_path={tmp_path}/y2.npy', f'--out_dir={out}',
             '--num_classes=100', '--num_positives=4', '--niter=20').result
    assert r2['phases'] == {'embed': 'skipped', 'kmeans': 'skipped', 'assign': 'skipped'}
    assert 0.3 < r2['nmi'] < 0.9
    assert r2['nmi'] == pytest.approx(nmi_reference(top1, y2), abs=1e-9)
    purity = sum(np.bincount(y2[top1 == c]).max() for c in np.unique(top1)) / len(y2)
    assert r2['purity'] == pytest.approx(purity, abs=1e-12)


def test_topl_is_bruteforce_topk_and_lloyd_is_faiss(tmp_path):
    import faiss
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype(np.float32) * rng.uniform(0.5, 3, (600, 1)).astype(np.float32)
    np.save(tmp_path / 'x.npy', x)
    out = tmp_path / 'out'
    # max_points_per_centroid * k >= N: k-means sees every row, in order, like faiss given them all
    run(f'--embeddings_path={tmp_path}/x.npy', f'--out_dir={out}', '--num_classes=37', '--num_positives=5',
        '--niter=7', '--max_points_per_centroid=100', '--seed=3', '--assign_batch=128')
    emb = np.load(out / 'embeddings.npy')
    assert emb.dtype == np.float16 and emb.shape == (600, 16)
    np.testing.assert_allclose(emb.astype(np.float32), unit(x), atol=1e-3)
    cen = np.load(out / 'centroids.npy')
    assert cen.dtype == np.float32 and cen.shape == (37, 16)
    # the same Lloyd iterations as faiss from the same start: the sample points at positions
    # default_rng([seed, 2]).choice(n, k) (here the sample is every row, in order)
    init = unit(emb.astype(np.float64)[np.random.default_rng([3, 2]).choice(600, 37, replace=False)])
    km = faiss.Kmeans(16, 37, niter=7, spherical=True, max_points_per_centroid=100)
    km.train(emb.astype(np.float32), init_centroids=init.astype(np.float32))
    np.testing.assert_allclose(cen, km.centroids, atol=1e-5)
    labels = np.load(out / 'labels.npy')
    assert labels.dtype == np.int32 and labels.shape == (600, 5)
    ref = torch.topk(torch.from_numpy(emb.astype(np.float32)) @ torch.from_numpy(cen).T, 5).indices
    assert (labels == ref.numpy()).all()


def test_resume_skip_force_and_changed_settings(tmp_path):
    x, y, _ = blobs(1500, 24, 6, 0.1, seed=2)
    np.save(tmp_path / 'x.npy', x)
    out = tmp_path / 'out'
    args = [f'--embeddings_path={tmp_path}/x.npy', f'--out_dir={out}', '--num_classes=30', '--num_positives=3']
    files = ['embeddings.npy', 'centroids.npy', 'labels.npy']
    first = run(*args)
    assert first.result['phases'] == {'embed': 'done', 'kmeans': 'done', 'assign': 'done'}
    stamp = {f: os.stat(out / f).st_mtime_ns for f in files}
    data = {f: (out / f).read_bytes() for f in files}
    again = run(*args)
    assert again.result['phases'] == {'embed': 'skipped', 'kmeans': 'skipped', 'assign': 'skipped'}
    for p in ('embed', 'kmeans', 'assign'):
        assert f'skip {p}' in again.stdout
    assert {f: os.stat(out / f).st_mtime_ns for f in files} == stamp
    assert again.result['sizes'] == first.result['sizes']
    # interrupted during the assignment (its state never written): only that phase is redone,
    # and the result equals the uninterrupted run
    os.remove(out / 'phase_assign.json')
    resumed = run(*args)
    assert resumed.result['phases'] == {'embed': 'skipped', 'kmeans': 'skipped', 'assign': 'done'}
    assert os.stat(out / 'centroids.npy').st_mtime_ns == stamp['centroids.npy']
    assert (out / 'labels.npy').read_bytes() == data['labels.npy']
    # force redoes everything, deterministically
    forced = run(*args, '--force=True')
    assert forced.result['phases'] == {'embed': 'done', 'kmeans': 'done', 'assign': 'done'}
    for f in files:
        assert os.stat(out / f).st_mtime_ns != stamp[f]
        assert (out / f).read_bytes() == data[f]
    # other settings for a finished phase: refused, naming the setting, files untouched
    bad = run(*args[:2], '--num_classes=30', '--num_positives=4', ok=False)
    assert 'num_positives=3 (now 4)' in bad.stderr
    bad = run(*args[:2], '--num_classes=31', '--num_positives=3', ok=False)
    assert 'num_classes=30 (now 31)' in bad.stderr and 'embeddings_path=' in bad.stderr
    assert (out / 'labels.npy').read_bytes() == data['labels.npy']


def test_bad_inputs(tmp_path):
    x, _, _ = blobs(50, 8, 3, 0.1, seed=0)
    np.save(tmp_path / 'x.npy', x)
    out = f'--out_dir={tmp_path}/out'
    e = f'--embeddings_path={tmp_path}/x.npy'
    assert 'num_classes=51' in run(e, out, '--num_classes=51', ok=False).stderr  # k > N
    assert 'num_positives=6' in run(e, out, '--num_classes=5', '--num_positives=6', ok=False).stderr  # l > k
    np.save(tmp_path / 'x3.npy', np.zeros((4, 4, 4), np.float32))
    assert 'x3.npy' in run(f'--embeddings_path={tmp_path}/x3.npy', out, ok=False).stderr
    assert 'nope.npy' in run(f'--embeddings_path={tmp_path}/nope.npy', out, ok=False).stderr
    assert 'teacher_text' in run(e, out, '--teacher_text=True', '--num_classes=5', '--num_positives=2', ok=False).stderr
    assert "search='bogus'" in run(e, out, '--search=bogus', '--num_classes=5', '--num_positives=2', ok=False).stderr
    os.makedirs(tmp_path / 'out', exist_ok=True)
    np.save(tmp_path / 'out' / 'embeddings.npy', x)  # its own output as input would be truncated
    assert 'another out_dir' in run(f'--embeddings_path={tmp_path}/out/embeddings.npy', out, ok=False).stderr
    # data_dir without meta.json, and with a shard that is gone
    assert 'meta.json' in run(f'--data_dir={tmp_path}/none', out, ok=False).stderr
    os.makedirs(tmp_path / 'ds')
    json.dump(dict(count=10, image_size=8, shards=[dict(images='images_00000.npy', texts=None, count=10)],
                   has_text=False, classnames=None, source='test', skipped={}), open(tmp_path / 'ds' / 'meta.json', 'w'))
    msg = run(f'--data_dir={tmp_path}/ds', out, ok=False).stderr
    assert 'missing shard' in msg and 'images_00000.npy' in msg
    # classes of another length than the embeddings
    np.save(tmp_path / 'y.npy', np.zeros(49, np.int32))
    assert 'y.npy has (49,)' in run(e, out, f'--classes_path={tmp_path}/y.npy', '--num_classes=5',
                            '--num_positives=2', ok=False).stderr


def test_pixels_teacher_dims_and_two_ranks_identical(tmp_path):
    ds = make_dataset(tmp_path / 'ds', count=301)
    args = [f'--data_dir={ds}', '--pixels_size=8', '--pca_dim=16', '--pca_samples=200', '--batch_size=64',
            '--num_classes=12', '--num_positives=3', '--assign_batch=50']
    one = run(*args, f'--out_dir={tmp_path}/one').result
    assert one['N'] == 301 and one['d'] == 16
    emb = np.load(tmp_path / 'one' / 'embeddings.npy').astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    two = run(*args, f'--out_dir={tmp_path}/two', ranks=2).result
    assert two['world_size'] == 2
    for f in ('embeddings.npy', 'centroids.npy', 'labels.npy'):
        assert (tmp_path / 'one' / f).read_bytes() == (tmp_path / 'two' / f).read_bytes(), f
    # the finished embeddings were made with pca_dim=16: asking for 32 is refused, naming it
    msg = run(*args, f'--out_dir={tmp_path}/one', '--pca_dim=32', ok=False).stderr
    assert 'pca_dim=16 (now 32)' in msg
    assert 'pca_dim=800' in run(*args, f'--out_dir={tmp_path}/three', '--pca_dim=800', ok=False).stderr
    assert 'nope.pt does not exist' in run(*args, f'--out_dir={tmp_path}/three', '--teacher=nope.pt', ok=False).stderr
    assert not (tmp_path / 'three').exists()  # a refused run leaves no empty out_dir


def test_hf_clip_teacher_matches_transformers(tmp_path):
    import data
    import transforms
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=2),
                     projection_dim=24)
    hf = CLIPModel(cfg).eval()
    hf.save_pretrained(tmp_path / 'clip')
    ds = make_dataset(tmp_path / 'ds', count=40, image_size=32)
    args = [f'--data_dir={ds}', f'--teacher={tmp_path}/clip', '--num_classes=4', '--num_positives=2',
            '--batch_size=16']
    r = run(*args, f'--out_dir={tmp_path}/img').result
    assert r['d'] == 24
    d = data.Dataset(ds)
    pix = torch.from_numpy(d.images(np.arange(40))).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(np.asarray(v, np.float32)).view(1, 3, 1, 1) for v in (transforms.CLIP_MEAN, transforms.CLIP_STD))
    with torch.no_grad():
        img = torch.nn.functional.normalize(hf.get_image_features(pixel_values=(pix - mean) / std).pooler_output, dim=-1)
    emb = np.load(tmp_path / 'img' / 'embeddings.npy')
    np.testing.assert_allclose(emb.astype(np.float32), img.numpy(), atol=2e-3)
    if d.meta.get('has_text'):  # the authors' (image + text) / 2 features
        r = run(*args, '--teacher_text=True', f'--out_dir={tmp_path}/both').result
        with torch.no_grad():
            ids = torch.from_numpy(d.texts(np.arange(40)))
            txt = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
        both = torch.nn.functional.normalize((img + txt) / 2, dim=-1)
        emb = np.load(tmp_path / 'both' / 'embeddings.npy')
        np.testing.assert_allclose(emb.astype(np.float32), both.numpy(), atol=2e-3)


def test_sampled_kmeans_two_ranks_and_torch_search_bitwise(tmp_path):
    # N spans 3 sampling blocks of 65536 rows and k-means sees a sample of 6000 of the 150K rows:
    # 2 ranks (each drawing and reading only its share) and the torch search give bitwise the
    # centres and labels of 1 process with faiss; the objective is within 1% of faiss.Kmeans
    # drawing its own sample of the same size
    import faiss
    x, _, _ = blobs(150_000, 8, 40, 0.3, seed=4)
    np.save(tmp_path / 'x.npy', x)
    args = [f'--embeddings_path={tmp_path}/x.npy', '--num_classes=30', '--num_positives=3', '--niter=6',
            '--max_points_per_centroid=200', '--seed=5']
    one = run(*args, f'--out_dir={tmp_path}/one')
    assert 'kmeans: 6,000 sample points over 1 rank(s)' in one.stdout
    two = run(*args, f'--out_dir={tmp_path}/two', '--assign_batch=777', ranks=2)
    assert two.result['world_size'] == 2 and len(two.result['peak_rss_gib']) == 2
    tor = run(*args, f'--out_dir={tmp_path}/torch', '--search=torch', '--assign_batch=1000')
    assert tor.result['search'] == 'torch'
    for f in ('centroids.npy', 'labels.npy'):
        ref = (tmp_path / 'one' / f).read_bytes()
        assert (tmp_path / 'two' / f).read_bytes() == ref and (tmp_path / 'torch' / f).read_bytes() == ref, f
    emb = np.load(tmp_path / 'one' / 'embeddings.npy').astype(np.float32)
    km = faiss.Kmeans(8, 30, niter=6, seed=5, spherical=True, max_points_per_centroid=200)
    km.train(emb)
    ours, ref = ((emb @ c.T).max(1).mean() for c in (np.load(tmp_path / 'one' / 'centroids.npy'), km.centroids))
    assert abs(ours - ref) <= 0.01 * ref, (ours, ref)


def test_kill9_in_each_phase_resumes_to_the_same_files(tmp_path):
    # a real SIGKILL inside the embed, k-means and assign phases; the re-run (k-means continuing
    # from kmeans_state.npz, also written by 2 ranks and resumed by 1) gives bitwise the files
    # of an uninterrupted run
    x, _, _ = blobs(3000, 16, 20, 0.2, seed=6)
    np.save(tmp_path / 'x.npy', x)
    args = [f'--embeddings_path={tmp_path}/x.npy', '--num_classes=40', '--num_positives=4', '--niter=9',
            '--kmeans_ckpt_interval=2', '--assign_batch=500']
    files = ('embeddings.npy', 'centroids.npy', 'labels.npy')
    run(*args, f'--out_dir={tmp_path}/ref')
    ref = {f: (tmp_path / 'ref' / f).read_bytes() for f in files}
    for kill_at, ranks in (('embed:3', 1), ('kmeans:5', 1), ('kmeans:7', 2), ('assign:2', 1)):
        out = tmp_path / f'{kill_at.replace(":", "")}_{ranks}'
        p = run(*args, f'--out_dir={out}', ranks=ranks, ok=False, kill_at=kill_at)
        assert ranks == 2 or p.returncode == -9, (p.returncode, p.stderr)
        phase = kill_at.split(':')[0]
        assert not os.path.exists(out / f'phase_{phase}.json')
        if phase == 'kmeans':  # killed after iteration 5 (7), the last state is from iteration 4 (6)
            assert int(np.load(out / 'kmeans_state.npz')['iteration']) == int(kill_at[-1]) - 1
        r = run(*args, f'--out_dir={out}')
        done = {'embed': ['embed', 'kmeans', 'assign'], 'kmeans': ['kmeans', 'assign'], 'assign': ['assign']}[phase]
        assert r.result['phases'] == {p: 'done' if p in done else 'skipped' for p in ('embed', 'kmeans', 'assign')}
        if phase == 'kmeans':
            assert f'at iteration {int(kill_at[-1]) - 1}/9' in r.stdout
            assert not os.path.exists(out / 'kmeans_state.npz')
        for f in files:
            assert (out / f).read_bytes() == ref[f], (kill_at, f)


def test_cluster_without_faiss(tmp_path):
    # a GPU machine without faiss: search='auto' falls back to the torch search (same labels as
    # faiss on these blobs), and search='faiss' says what is missing
    x, _, _ = blobs(2000, 16, 20, 0.1, 0)
    np.save(tmp_path / 'emb.npy', x)
    fake = tmp_path / 'nofaiss'
    fake.mkdir()
    (fake / 'faiss.py').write_text("raise ImportError('no faiss here')\n")

    def cluster(out, search, hide):
        path = [str(fake)] * hide + [ROOT]
        env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',
                   PYTHONPATH=os.pathsep.join(path))
        return subprocess.run([sys.executable, 'cluster.py', f'--embeddings_path={tmp_path / "emb.npy"}',
                               f'--out_dir={tmp_path / out}', '--num_classes=20', '--num_positives=3',
                               '--niter=5', f'--search={search}', '--device=cpu'],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    p = cluster('auto', 'auto', True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.load(open(tmp_path / 'auto' / 'cluster.json'))['search'] == 'torch'
    p = cluster('faiss', 'faiss', False)
    assert p.returncode == 0, p.stderr[-2000:]
    for f in ('labels.npy', 'centroids.npy'):
        a, b = np.load(tmp_path / 'auto' / f), np.load(tmp_path / 'faiss' / f)
        assert (a == b).all() if f == 'labels.npy' else np.abs(a - b).max() < 1e-6
    p = cluster('missing', 'faiss', True)
    assert p.returncode != 0 and 'faiss is not installed' in p.stderr
