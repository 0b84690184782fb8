"""End to end: scripts/quickstart.sh in its reduced mode (QUICK=1), every stage on real files."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_every_stage(tmp_path):
    out = tmp_path / 'qs'
    env = dict(os.environ, QUICK='1', OUT=str(out), OMP_NUM_THREADS='2')
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
