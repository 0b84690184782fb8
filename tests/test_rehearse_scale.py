"""LAION's shape, reduced: a dataset of more shard files than the open-file limit goes through
cluster, train, LiT with micro-batches and probe on 2 gloo ranks under that limit
(scripts/rehearse_scale.py --quick=True), and no rank ever holds more files than the limit."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_many_shards_pass_every_stage_under_a_low_open_file_limit(tmp_path):
    p = subprocess.run([sys.executable, 'scripts/rehearse_scale.py', '--quick=True',
                        f'--out_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    R = json.load(open(tmp_path / 'rehearsal.json'))
    assert R['shard_files'] > R['nofile']  # a reader holding every shard open could not pass
    for name in ('cluster', 'train', 'lit', 'probe'):
        ranks = R['stages'][name]['ranks']
        assert sorted(ranks) == ['0', '1'], (name, ranks)  # both ranks were watched
        assert all(0 < r['open_files'] < R['nofile'] for r in ranks.values()), (name, ranks)
    assert R['stages']['train']['result']['step'] == 6
    assert R['stages']['lit']['result']['step'] == 4
    assert R['stages']['probe']['result']['linear_probe']['n_test'] == 150
