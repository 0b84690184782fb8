"""
One results table for a pipeline directory: every <sub>/<stage>.json the stage scripts wrote
(data.json, cluster.json, train.json, lit.json, probe.json), a few headline numbers each, in
pipeline order (data, cluster, train, lit, probe; runs of one stage in the order they finished).
    python scripts/summary.py out/quickstart
Prints the table and ends with one JSON line of the same numbers (also <dir>/summary.json).
Each accuracy of probe.py comes with its standard error on the test set (± s.e.) and its chance
level: the most frequent class's share (classification) or 1 / n (retrieval R@1).
"""
import json
import os
import sys

# stage -> [(label, path into the JSON, scale)], in pipeline order
METRICS = {
    'data': [('images', ('count',), 1), ('skipped', ('skipped',), 1),
             ('held out', ('holdout_count',), 1)],
    'cluster': [('k', ('k',), 1), ('purity %', ('purity',), 100), ('NMI', ('nmi',), 1)],
    'train': [('steps', ('step',), 1), ('loss', ('loss',), 1), ('pos cos', ('pos_cos',), 1),
              ('neg cos', ('neg_cos',), 1), ('kNN top-1 %', ('knn_acc',), 100),
              ('img/s', ('images_per_s',), 1)],
    'lit': [('steps', ('step',), 1), ('loss', ('loss',), 1)],
    'probe': [('linear probe top-1 %', ('linear_probe', 'top1'), 100),
              ('zero-shot top-1 %', ('zero_shot', 'top1'), 100),
              ('I->T R@1 %', ('retrieval', 'i2t_R@1'), 100),
              ('T->I R@1 %', ('retrieval', 't2i_R@1'), 100)],
}
# an accuracy's test-set size and chance level (probe.py's), beside it in the table
TESTED = {('linear_probe', 'top1'): 'n_test', ('zero_shot', 'top1'): 'n',
          ('retrieval', 'i2t_R@1'): 'n', ('retrieval', 't2i_R@1'): 'n'}


def get(d, path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def results(root):
    """[(stage, sub, path)] of every result file, stage by stage, each stage's in the order its
    files were written (a re-run that skips a stage leaves the files and so the order alone)."""
    found = []
    for s, stage in enumerate(METRICS):
        for sub in os.listdir(root):
            path = os.path.join(root, sub, f'{stage}.json')
            if os.path.exists(path):
                found.append((s, os.stat(path).st_mtime_ns, sub, stage, path))
    return [(stage, sub, path) for _, _, sub, stage, path in sorted(found)]


def main(root):
    rows, out = [], {}
    for stage, sub, path in results(root):
        res = json.load(open(path))
        for label, keys, scale in METRICS[stage]:
            v = get(res, keys)
            if v is None:
                continue
            n, chance = (get(res, keys[:1] + (k,)) for k in (TESTED.get(keys), 'chance'))
            # the binomial standard error of an accuracy p on n test items: sqrt(p (1 - p) / n);
            # two numbers closer than about twice it are not told apart by this test set
            se = scale * (v * (1 - v) / n) ** 0.5 if n and keys in TESTED else None
            chance = scale * chance if chance is not None and keys in TESTED else None
            rows.append((sub, stage, label, v * scale, se, chance))
            out[f'{sub}/{label}'] = v * scale
            if se is not None:
                out[f'{sub}/{label} ±'] = se
            if chance is not None:
                out[f'{sub}/{label} chance'] = chance
    if not rows:
        raise SystemExit(f'summary.py: no <stage>.json results under {root}')
    print(f"\n{'run':<18} {'stage':<8} {'metric':<22} {'value':>10} {'± s.e.':>8} {'chance':>8}")
    for sub, stage, label, v, se, chance in rows:
        print(f'{sub:<18} {stage:<8} {label:<22} {v:>10.4g} '
              + (f'{se:>8.2f}' if se is not None else ' ' * 8)
              + (f' {chance:>8.2f}' if chance is not None else ''))
    with open(os.path.join(root, 'summary.json'), 'w') as f:
        json.dump(out, f)
    print(json.dumps(out))


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'out/quickstart')
