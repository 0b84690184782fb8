"""
Cluster discrimination against instance discrimination at equal image-tower steps, on the
quickstart's synthetic captioned set (prepare.py --src=synthetic). The same ViT-T/4 at 16 px, from
the same seed, is trained for `steps` steps of `batch` images as
  MLCD + LiT    train.py on pixel-teacher clusters, then lit.py: a text tower on the frozen tower
  CLIP          lit.py lock_image=False: both towers from scratch, image-text InfoNCE
  UniCLIP       lit.py loss='uniclip' (our reading; docs/baselines.md): MP-NCE over 2 views + the caption,
                domain similarity, augmentation-aware embedding; with ablation=True also
                "MP-NCE only" and "MP-NCE + domain similarity"
and, as floors, a random-init tower + LiT and the raw pixels. Every tower is probed the same way
(probe.py): linear probe on the shape classes, zero-shot from the class names with CLIP's 80
templates, image <-> text retrieval R@1 on the test images. Writes <out>/results.md (the table)
and <out>/results.json; each run's CPU seconds (user + sys, all its processes) in <run>/cpu.json.

    OMP_NUM_THREADS=1 python scripts/compare_synthetic.py          # about 20 CPU-minutes
    python scripts/compare_synthetic.py --steps=400 --out=out/compare400

A stage whose result file exists is skipped (delete its folder to run it again); an interrupted
training resumes from its checkpoint.
"""
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = 'out/compare_synthetic'
n_train = 6000  # synthetic training images (captioned, 32 px; the quickstart's set)
n_test = 2000  # test images (seed 1): probe test split, zero-shot and retrieval
clusters = 300  # k of the pixel-teacher clustering MLCD trains on (l = 8 labels per image)
steps = 150  # image-tower steps of every method (and LiT text-tower steps)
batch = 128  # images per step (UniCLIP: 2 views of each, + its caption)
image_size = 16
probe_iters = 100  # float32 L-BFGS iterations per probe fit (CLIP: 1,000 in float64)
ablation = True  # also UniCLIP's rows without the augmentation embedding / domain similarity
floors = True  # also random-init tower + LiT, and raw pixels
threads = 1  # OMP_NUM_THREADS of every stage
exec(open(os.path.join(ROOT, 'configurator.py')).read())

env = dict(os.environ, OMP_NUM_THREADS=str(threads))
os.chdir(ROOT)
py = sys.executable
D, T = f'{out}/data/train', f'{out}/data/test'


def stage(name, done, *cmds):
    """Run the commands unless `done` exists, adding their CPU seconds to <out>/<name>/cpu.json."""
    if os.path.exists(done):
        print(f'skip: {done} exists', file=sys.stderr)
        return
    os.makedirs(f'{out}/{name}', exist_ok=True)
    path = f'{out}/{name}/cpu.json'
    spent = json.load(open(path)) if os.path.exists(path) else {'cpu_s': 0.0, 'wall_s': 0.0}
    for cmd in cmds:
        if '--init_from=resume' in cmd and not os.path.exists(f'{out}/{name}/ckpt.pt'):
            cmd = [c for c in cmd if c != '--init_from=resume']  # nothing to resume yet
        print('+', ' '.join(cmd), file=sys.stderr)
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        subprocess.run(cmd, env=env, check=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent['cpu_s'] += r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        spent['wall_s'] += time.time() - t0
        with open(path, 'w') as f:
            json.dump(spent, f)


def resume(name):
    return ['--init_from=resume'] if os.path.exists(f'{out}/{name}/ckpt.pt') else []


def lit(name, *args):
    """A lit.py run of `steps` steps of `batch` images in <out>/<name>."""
    return [py, 'lit.py', *args, f'--data_dir={D}', f'--out_dir={out}/{name}', f'--max_steps={steps}',
            f'--global_batch_size={batch}', f'--threads={threads}', *resume(name)]


def probe(name, checkpoint, text=True):
    stage(f'probe_{name}', f'{out}/probe_{name}/probe.json',
          [py, 'probe.py', f'--checkpoint={checkpoint}', f'--train_dir={D}', f'--test_dir={T}',
           f'--out_dir={out}/probe_{name}', f'--max_iter={probe_iters}', '--probe_dtype=float32',
           '--device=cpu'] + ([f'--retrieval_dir={T}'] if text else ['--zero_shot=False']))


# data and the clustering MLCD trains on (the quickstart's settings)
for name, d, count, seed in (('data_train', D, n_train, 0), ('data_test', T, n_test, 1)):
    stage(name, f'{d}/meta.json', [py, 'prepare.py', '--src=synthetic', f'--count={count}',
                                   f'--seed={seed}', '--image_size=32', f'--out={d}'])
stage('cluster', f'{out}/cluster/cluster.json',
      [py, 'cluster.py', f'--data_dir={D}', f'--out_dir={out}/cluster', '--teacher=pixels',
       f'--num_classes={clusters}', '--num_positives=8'])

rows = []  # (label, probe name, cpu stages, image-tower trainer)
# MLCD: every centre a negative (r = 1): with only 300 centres r = 0.1 leaves 30
stage('mlcd', f'{out}/mlcd/train.json',
      [py, 'train.py', 'config/tiny.py', f'--data_dir={D}', f'--labels_dir={out}/cluster',
       f'--out_dir={out}/mlcd', f'--max_steps={steps}', f'--global_batch_size={batch}',
       f'--micro_batch_size={batch}', f'--image_size={image_size}', f'--eval_data_dir={T}',
       '--eval_interval=0', '--sample_ratio=1.0', f'--threads={threads}', *resume('mlcd')])
stage('mlcd_lit', f'{out}/mlcd_lit/lit.json',
      lit('mlcd_lit', 'config/lit_tiny.py', f'--vision_checkpoint={out}/mlcd/ckpt.pt',
          '--precompute_features=True'))
rows.append(('MLCD + LiT', 'mlcd_lit', ['cluster', 'mlcd', 'mlcd_lit']))
stage('clip', f'{out}/clip/lit.json', lit('clip', 'config/clip_tiny.py', f'--image_size={image_size}'))
rows.append(('CLIP from scratch', 'clip', ['clip']))
uniclip = [('uniclip', 'UniCLIP: MP-NCE + domain similarity + aug. embedding', [])]
if ablation:
    uniclip += [('uniclip_mpnce', 'UniCLIP ablation: MP-NCE only',
                 ['--domain_similarity=False', '--aug_embed=False']),
                ('uniclip_domain', 'UniCLIP ablation: MP-NCE + domain similarity', ['--aug_embed=False'])]
for name, label, args in uniclip:
    stage(name, f'{out}/{name}/lit.json',
          lit(name, 'config/uniclip_tiny.py', f'--image_size={image_size}', *args))
    rows.append((label, name, [name]))
if floors:  # the same tower untrained (lit.py's preset init from the same seed), then LiT
    stage('random_lit', f'{out}/random_lit/lit.json',
          [py, '-c', 'import sys, torch, model; torch.manual_seed(1337); '
           'v = model.VisionTransformer(**dict(model.PRESETS["ViT-T/4"]["vision"], image_size=int(sys.argv[2]))); '
           'torch.save({"vision_config": v.config, "vision": v.state_dict()}, sys.argv[1])',
           f'{out}/random_lit/random.pt', str(image_size)],
          lit('random_lit', 'config/lit_tiny.py', f'--vision_checkpoint={out}/random_lit/random.pt',
              '--precompute_features=True'))
    rows.append(('random-init tower + LiT', 'random_lit', ['random_lit']))
for _, name, _ in rows:
    probe(name, f'{out}/{name}/ckpt.pt')
if floors:
    probe('pixels', 'pixels', text=False)
    rows.append(('raw pixels (32 x 32 x 3)', 'pixels', []))

# the table
results = []
for label, name, stages in rows:
    p = json.load(open(f'{out}/probe_{name}/probe.json'))
    zs, rt = p.get('zero_shot', {}), p.get('retrieval', {})
    cpu = sum(json.load(open(f'{out}/{s}/cpu.json'))['cpu_s'] for s in stages
              if os.path.exists(f'{out}/{s}/cpu.json'))
    results.append(dict(method=label, run=name, linear_probe=p['linear_probe']['top1'],
                        zero_shot=zs.get('top1'), i2t_r1=rt.get('i2t_R@1'), t2i_r1=rt.get('t2i_R@1'),
                        train_cpu_s=cpu if stages else None))
pct = lambda v: '-' if v is None else f'{100 * v:.1f}'  # noqa: E731
lines = [f'| method ({steps} image-tower steps of {batch} images) | linear probe top-1 % | '
         'zero-shot top-1 % | image→text R@1 % | text→image R@1 % | training CPU min |',
         '|---|---|---|---|---|---|']
for r in results:
    cpu = '-' if r['train_cpu_s'] is None else f"{r['train_cpu_s'] / 60:.1f}"
    lines.append(f"| {r['method']} | {pct(r['linear_probe'])} | {pct(r['zero_shot'])} | "
                 f"{pct(r['i2t_r1'])} | {pct(r['t2i_r1'])} | {cpu} |")
total = sum(json.load(open(os.path.join(out, s, 'cpu.json')))['cpu_s'] for s in os.listdir(out)
            if os.path.exists(os.path.join(out, s, 'cpu.json')))
lines.append(f'\nchance: linear probe and zero-shot 16.7% (6 shapes), R@1 {100 / n_test:.2f}%; '
             f'all stages together: {total / 60:.1f} CPU-minutes at {threads} thread(s)')
with open(f'{out}/results.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
with open(f'{out}/results.json', 'w') as f:
    json.dump(dict(settings=config, rows=results, total_cpu_s=total), f, indent=1)
print('\n'.join(lines))
