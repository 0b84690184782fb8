"""End to end: scripts/quickstart.sh in its reduced mode (QUICK=1), every stage on real files."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
