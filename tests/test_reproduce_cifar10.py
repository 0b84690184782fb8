"""End to end: scripts/reproduce_cifar10.py in its quick mode on the real CIFAR-10 images (200
training and 50 test images per class, 30 steps): every variant, both sweeps, the learned-teacher
stage, the tables; a second run does nothing; `only` redoes just the runs it names, and only the
clusterings they need; an unknown name stops before anything is written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar.gz')


def reproduce(out, *args, ok=True):
    cmd = [sys.executable, 'scripts/reproduce_cifar10.py', '--quick=True', f'--out={out}', '--seeds=2',
           '--jobs=2', f'--cifar={CIFAR}', *args]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True,
                       text=True)
    assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout if ok else r.stderr


def plan(log):
    """The plan line's counts: clusterings, pre-training runs to do, of all, probes."""
    line = next(x for x in log.splitlines() if x.startswith('to do: '))
    n = [int(w) for w in line.replace('(', ' ').split() if w.isdigit()]
    return n[0], n[1], n[2], n[5]


def test_help_lists_every_run_and_an_unknown_name_stops_before_any_work(tmp_path):
    """--help names the runs; --only with an unknown name is one line listing the valid ones."""
    r = subprocess.run([sys.executable, 'scripts/reproduce_cifar10.py', '--help'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for name in ('mlcd_sS', 'unicom_sS', 'mlcd_t_sS', 'sweep_l1', 'sweep_k10x_r1.0', 'pixels',
                 '--only='):
        assert name in r.stdout, name
    err = reproduce(tmp_path / 'x', '--only=mlcd_s0,mlcd_s7', ok=False).strip().splitlines()
    assert len(err) == 1 and err[0].startswith('only=mlcd_s0,mlcd_s7: no run named mlcd_s7; the '
                                               'runs are random_s0, random_s1, pixels, mlcd_s0, ')
    assert 'mlcd_t_s1' in err[0] and 'mlcd_s2' not in err[0]  # the names of these settings
    assert not (tmp_path / 'x').exists()


@pytest.mark.skipif(not os.path.exists(CIFAR), reason=f'{CIFAR} (CIFAR-10 as image folders) is absent')
def test_quick_reproduction(tmp_path):
    out, rec = tmp_path / 'c10', tmp_path / 'records'
    log = reproduce(out, f'--record={rec}')
    # the plan: 9 clusterings (pixels, 10 k pixels, true labels, 6 of learned towers), 39 runs
    # (26 + SimCLR 2x, 4x + 9 single-change students, the 2x and 4x ones with 2 seeds), 42 probes
    assert plan(log) == (9, 39, 39, 42)
    R = json.load(open(out / 'results.json'))
    for name in ('mlcd', 'mlc', 'onevision', 'unicom', 'mlcd_r1', 'simclr', 'uniclip', 'supervised', 'mlcd_t', 'random'):
        assert R[name]['seeds'] == 2, name
        for top1 in R[name]['top1'].values():
            assert len(top1) == 2 and all(0 <= a <= 100 for a in top1)
    assert R['pixels']['seeds'] == 1 and R['mlcd']['steps'] == 30 and len(R['mlcd']['train_s']) == 2
    assert len(R['simclr']['train_s']) == 2  # lit.py's runs report their time too
    assert [v for v, _ in R['sweeps']['r']] == ['0.01', '0.1', '0.5', '1.0']
    assert [v for v, _ in R['sweeps']['l']] == ['1', '2', '4', '8', '16']
    for f in ('results.md', 'results.png'):
        assert (out / f).stat().st_size > 0
    # the runs asked for: k = 50 pixel clusters with 16 labels kept, the SimCLR tower as a teacher,
    # every probe on the 500 test images with the three features
    c = json.load(open(out / 'cluster_pixels' / 'cluster.json'))
    assert (c['N'], c['k'], c['l'], c['teacher']) == (2000, 50, 16, 'pixels')
    t = json.load(open(out / 'cluster_simclr' / 'cluster.json'))
    assert (t['k'], t['l']) == (50, 8) and t['teacher'].endswith(os.path.join('simclr_s0', 'ckpt.pt'))
    # the students: one change each; a clustering of the mean of 8 views (its purity reported), a
    # second round on the first student's tower, 2x and 4x the steps
    for name in ('student_jitter', 'student_v8', 'student_pooled', 'student_k300', 'student_k3000',
                 'student_l4', 'student_2x', 'student_4x', 'student_round2', 'simclr_2x', 'simclr_4x'):
        assert R[name]['seeds'] == (2 if name in ('student_2x', 'student_4x') else 1), name
    steps = [R[n]['steps'] for n in ('student_2x', 'student_4x', 'simclr_2x', 'simclr_4x')]
    assert steps == [60, 120, 60, 120]
    v8 = json.load(open(out / 'cluster_simclr_v8' / 'cluster.json'))
    assert v8['teacher'] == 'embeddings_path' and 0 < v8['purity'] <= 1 and v8['k'] == 50
    assert json.load(open(out / 'cluster_simclr_k300' / 'cluster.json'))['k'] == 300
    assert json.load(open(out / 'cluster_simclr_k3000' / 'cluster.json'))['k'] == 150  # 3 k
    r2 = json.load(open(out / 'cluster_student' / 'cluster.json'))
    assert r2['teacher'].endswith(os.path.join('mlcd_t_s0', 'ckpt.pt'))
    cfg = torch.load(out / 'student_jitter_s0' / 'ckpt.pt', weights_only=True)['config']
    assert (cfg['augment'], cfg['color_jitter']) == ('pad_crop', 0.5)
    p = json.load(open(out / 'sweep_l2' / 'probe.json'))
    assert set(p['linear_probes']) == {'pooled:standardize', 'cls:standardize', 'embed:standardize'}
    assert p['linear_probe']['n_test'] == 500
    assert json.load(open(out / 'sweep_l2' / 'train.json'))['step'] == 30
    # a console log is lines, not one line of progress-bar redraws
    text = open(out / 'sweep_l2' / 'stdout.log', 'rb').read()
    assert b'\r' not in text and b'\nstep 30 epoch 0.9' in text  # train.py's line, whole

    # a second run finds everything done: it runs no stage and changes no result
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.suffix in ('.pt', '.json', '.npy')
              and p.name != 'results.json'}
    log = reproduce(out, f'--record={rec}')
    assert not [line for line in log.splitlines() if line.startswith('+ ')]  # only the table is redrawn
    assert plan(log) == (0, 0, 39, 0)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # `only` redoes what it names and nothing else
    os.remove(out / 'mlc_s1' / 'probe.json')
    log = reproduce(out, '--only=mlc_s1')
    assert [line.split()[1] for line in log.splitlines() if line.startswith('+ ')] == ['probe.py']
    assert plan(log) == (0, 0, 39, 1)
    assert (out / 'mlc_s1' / 'probe.json').exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if 'mlc_s1' not in str(p))

    # only the clusterings the named runs read: sweep_l2 retrained needs the k = 50 pixel clusters,
    # not the 10 k ones nor the true labels (both removed here, and not made again)
    for d in ('sweep_l2', 'cluster_pixels_k10x', 'true_labels', 'cluster_pixels'):
        shutil.rmtree(out / d)
    log = reproduce(out, '--only=sweep_l2')
    assert plan(log) == (1, 1, 39, 1)
    assert [line.split()[1] for line in log.splitlines() if line.startswith('+ ')] == [
        'cluster.py', 'train.py', 'probe.py']
    assert not (out / 'cluster_pixels_k10x').exists() and not (out / 'true_labels').exists()

    # every finished run is recorded (a few KB: its results, no checkpoint); a run whose folder is
    # gone but whose record is there (another machine) is not run again and gives the same table
    assert len(os.listdir(rec)) == 42 and (rec / 'onevision_s1' / 'log.jsonl').exists()
    assert sum(f.stat().st_size for f in (rec / 'mlcd_s0').iterdir()) < 50_000
    assert sorted(os.listdir(rec / 'simclr_s0')) == ['lit.json', 'log.jsonl', 'probe.json']
    table = (out / 'results.md').read_text()
    shutil.rmtree(out / 'mlcd_s1')
    log = reproduce(out, f'--record={rec}')
    assert not [line for line in log.splitlines() if line.startswith('+ ') and 'mlcd_s1' in line]
    assert (out / 'mlcd_s1' / 'probe.json').read_bytes() == (rec / 'mlcd_s1' / 'probe.json').read_bytes()
    assert (out / 'results.md').read_text() == table
