"""
Small-scale reproduction of the paper's ablations on real images: CIFAR-10 at 32 px on a CPU.
The 50K training images are clustered with the pixels teacher (their classes are never used
before the probe), the same tiny ViT is pre-trained from the same seeds as every variant below,
and each tower is linear-probed on the 10K test images with CLIP's protocol.

    python scripts/reproduce_cifar10.py                 # the table in README (hours on 2 cores)
    python scripts/reproduce_cifar10.py --jobs=2        # two runs at a time, one thread each
    python scripts/reproduce_cifar10.py --split=val     # train on 40K training images, probe on
                                                        # the other 10K: how the settings were chosen
    python scripts/reproduce_cifar10.py --quick=True    # every stage on 2K images in minutes (CI)

Input: `cifar` is a .tar.gz of CIFAR-10 as image folders, cifar10/{train,test}/<class>/*.jpg
(any image format prepare.py reads; see README for making one from the standard download).
Output in `out`: data/, clusters, one folder per run (train.py / lit.py / probe.py outputs and
their console logs), results.json, results.md and results.png. Finished runs are skipped and an
interrupted training resumes, so the script can be stopped and started again at any time. Each
finished run's results (its probe.json, train.json or lit.json and log.jsonl, a few KB) are also
copied to `record` (results/cifar10/<split>/<run>/, committed): a run recorded there is not run
again, on this machine or another, and the tables are drawn from the records.

The runs (folder names, for --only; _sS is the seed, S < seeds) and the table row each makes:
  mlcd_sS                 MLCD (Eq. 5), l = 8, r = 0.1 (seed 0 is also r = 0.1 and l = 8 of
                          the sweeps)
  mlc_sS                  MLC (Eq. 4), l = 8, r = 0.1
  onevision_sS            OneVision-Encoder's loss: per image 3 labels drawn from its 10 nearest
                          centres, each a CosFace softmax over its own sample (r = 0.1)
  unicom_sS               single label, l = 1 (UNICOM's loss: Eq. 4 with one positive)
  mlcd_r1_sS              MLCD, l = 8, r = 1.0 (seed 0 also: r = 1.0 of the k = 1,000 sweep)
  simclr_sS, uniclip_sS   SimCLR; UniCLIP's image-image part (2 views, instance discrimination)
  mlcd_t_sS               MLCD on clusters of the SimCLR tower (seed 0), with teacher=True
  simclr_2x_s0, simclr_4x_s0   with teacher=True: SimCLR for 2, 4 x the steps (the teacher given
                          a student's extra steps)
  student_<v>_s0          with teacher=True: does the student pass its teacher? MLCD on the SimCLR
                          tower's clusters with one change (v): k300, k3000 (k = 300, 3,000), l4
                          (l = 4), pooled (clusters of the feature before the projection), v8 (of
                          the mean feature of 8 views), jitter (colour jitter 0.5 in training),
                          2x, 4x (2, 4 x the steps; also seeds 1, 2), round2 (clusters of
                          mlcd_t_s0's tower)
  supervised_sS           the true labels, 10-way softmax without margin (reference)
  random_sS, pixels       random-init ViT-T/8; raw pixels (3,072-d)
  sweep_r0.01, sweep_r0.5             r sweep, k = 1,000 (with mlcd_s0 and mlcd_r1_s0)
  sweep_k10x_r0.1, sweep_k10x_r1.0    r sweep, k = 10,000
  sweep_l1, sweep_l2, sweep_l4, sweep_l16   l sweep, MLCD (Eq. 5), r = 0.1 (with mlcd_s0 for l = 8)
  ov_d<D>_p<P>_sigma<S> split=val only: the OneVision settings tried (D draws of the P nearest,
                          scale S), seed 0; onevision_sS takes the best
"""
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import runtime  # noqa: E402

# -----------------------------------------------------------------------------
# settings (override with --key=value)
cifar = os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar.gz')  # the image folders
out = 'out/cifar10'
split = 'test'  # 'test': the table; 'val': a held-out 10K of the training images (for tuning)
quick = False  # 200 + 50 images per class, a few steps: checks every stage end to end
seeds = 3  # seeds of every variant in the main table (the sweeps use seed 0)
sweeps = True  # Table 5b / 5c at one seed: r in 0.01 0.1 0.5 1.0, l in 1 2 4 8 16; r in 0.1 1.0 at 10 k
teacher = True  # also MLCD on clusters of the SimCLR tower (seed 0): a learned teacher, as the paper's
only = ''  # comma-separated run names (e.g. 'mlcd_s2,pixels'): do just these; '' does all.
            # The names are listed at the top of this script (python scripts/reproduce_cifar10.py -h)
steps = 1400  # optimizer steps of every pre-training run (same images seen by every variant)
batch = 256
model = 'ViT-T/8'  # 32 px, 17 tokens, 0.8M parameters
k = 1000  # clusters of the pixels teacher
jobs = 1  # runs at a time (2 on a 2-core machine; several share one GPU well: the tower is tiny)
threads = 1  # CPU threads per run
device = 'cpu'  # 'cuda': every stage on the GPU (bf16 autocast in training). One seed gives
                # another number on each (MLCD l = 8, seed 0: 45.29 on the CPU, 46.22 on the GPU)
probe_iters = 1000  # L-BFGS iterations per probe fit (CLIP's 1,000)
record = None  # folder of the finished runs' records; None: results/cifar10/<split> (quick: none);
               # '': none
onevision_draws = 3  # OneVision's settings for onevision_sS, chosen on split=val (the ov_* runs)
onevision_pool = 10
onevision_scale = 32.0
if {'-h', '--help'} & set(sys.argv[1:]):
    print(__doc__.strip() + '\n')  # the run names, then the settings
exec(open(os.path.join(ROOT, 'configurator.py')).read())
runtime.check_device(device)  # here, not in the first stage's log
# -----------------------------------------------------------------------------

if split not in ('test', 'val'):
    raise SystemExit(f"config error: split must be 'test' or 'val', got {split!r}")
if quick:
    steps, batch, k, probe_iters = 30, 64, 50, 100
if record is None:
    record = '' if quick else os.path.join(ROOT, 'results', 'cifar10', split)
D, T = os.path.join(out, 'data', 'train'), os.path.join(out, 'data', split)
LABELS, TRUE = os.path.join(out, 'cluster_pixels'), os.path.join(out, 'true_labels')
LABELS_10K = os.path.join(out, 'cluster_pixels_k10x')  # 10 k clusters: the r sweep's second row
# pre-training recipe shared by every MLCD variant (chosen on the val split, see README)
COMMON = [f'--model={model}', f'--max_steps={steps}', f'--global_batch_size={batch}',
          f'--threads={threads}', f'--device={device}']
TRAIN = ['config/cifar10.py', f'--micro_batch_size={batch}'] + COMMON
# instance discrimination at the same budget (steps x batch images, two views of each): lit.py
# with the image tower unlocked and no captions
INSTANCE = [('simclr', ['config/simclr_cifar10.py', '--image_size=32'] + COMMON),
            ('uniclip', ['config/uniclip_cifar10.py', '--image_size=32'] + COMMON)]
FEATURES = 'pooled:standardize,cls:standardize,embed:standardize'


def run(cmd, log=None):
    """Run a command from the repository root on `threads` threads; its output to `log` (or ours).
    In a log, a progress bar's carriage returns become line ends (tqdm redraws a bar with '\r':
    a 1,400-step run made one line of its whole log) and the bars redraw every 30 s at most."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, TQDM_MININTERVAL='30')
    print('+ ' + ' '.join(cmd), flush=True)
    if log:
        with open(log, 'ab') as f, subprocess.Popen(
                [sys.executable] + cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT) as p:
            for chunk in iter(lambda: p.stdout.read1(1 << 16), b''):
                f.write(chunk.replace(b'\r\n', b'\n').replace(b'\r', b'\n'))
                f.flush()
    else:
        p = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env)
    if p.returncode:
        raise SystemExit(f'reproduce_cifar10.py: failed (exit {p.returncode}): {" ".join(cmd)}'
                         + (f'; see {log}' if log else ''))


# -----------------------------------------------------------------------------
# the runs: (name, stage script, arguments, seed); the tower each leaves is probed


def variants():
    main = [  # name, labels, extra train.py arguments
        ('mlcd', LABELS, ['--loss_type=mlcd', '--num_positives=8', '--sample_ratio=0.1']),
        ('mlc', LABELS, ['--loss_type=mlc', '--num_positives=8', '--sample_ratio=0.1']),
        ('onevision', LABELS, onevision(onevision_draws, onevision_pool, onevision_scale)),
        ('unicom', LABELS, ['--loss_type=mlc', '--num_positives=1', '--sample_ratio=0.1']),
        ('mlcd_r1', LABELS, ['--loss_type=mlcd', '--num_positives=8', '--sample_ratio=1.0']),
        # the true labels as a 10-way normalised softmax, without the margin (10 classes)
        ('supervised', TRUE, ['--loss_type=mlc', '--num_positives=1', '--sample_ratio=1.0',
                              '--num_classes=10', '--margin=0.0']),
    ]
    runs = [(f'{n}_s{s}', 'train.py', [f'--labels_dir={lab}', f'--seed={s}'] + a, s)
            for n, lab, a in main for s in range(seeds)]
    runs += [(f'{n}_s{s}', 'lit.py', a + [f'--seed={s}'], s) for n, a in INSTANCE for s in range(seeds)]
    if teacher:  # the teacher given a student's extra steps: SimCLR for 2 and 4 times as long
        runs += [(f'simclr_{m}x_s0', 'lit.py', INSTANCE[0][1] + [f'--max_steps={m * steps}', '--seed=0'], 0)
                 for m in (2, 4)]
    if sweeps:
        for r in (0.01, 0.5):
            runs.append((f'sweep_r{r}', 'train.py', [f'--labels_dir={LABELS}', '--seed=0',
                         '--loss_type=mlcd', '--num_positives=8', f'--sample_ratio={r}'], 0))
        for l in (1, 2, 4, 16):
            runs.append((f'sweep_l{l}', 'train.py', [f'--labels_dir={LABELS}', '--seed=0',
                         '--loss_type=mlcd', f'--num_positives={l}', '--sample_ratio=0.1'], 0))
        for r in (0.1, 1.0):  # r with 10 k clusters: many near-duplicate centres, as at 1M
            runs.append((f'sweep_k10x_r{r}', 'train.py', [f'--labels_dir={LABELS_10K}', '--seed=0',
                         '--loss_type=mlcd', '--num_positives=8', f'--sample_ratio={r}'], 0))
    if split == 'val':  # OneVision's settings: its authors' 3 of 10 at sigma 64 and ours
        for d, p, sc in ((3, 10, 32.0), (3, 10, 64.0), (1, 10, 32.0), (3, 16, 32.0)):
            runs.append((f'ov_d{d}_p{p}_sigma{sc:g}', 'train.py', [f'--labels_dir={LABELS}', '--seed=0']
                         + onevision(d, p, sc), 0))
    return runs


def onevision(draws, pool, sigma):
    """train.py arguments of OneVision-Encoder's loss: `draws` of the `pool` nearest labels, each
    a CosFace softmax (margin 0.3) over its own sample of r = 0.1 of the centres, scale sigma."""
    return ['--loss_type=onevision', f'--num_positives={pool}', '--sample_ratio=0.1',
            f'--onevision_draws={draws}', f'--onevision_pool={pool}', f'--scale={sigma}']



def train(name, script, args, seed):
    d = os.path.join(out, name)
    result = os.path.join(d, 'train.json' if script == 'train.py' else 'lit.json')
    if os.path.exists(result):
        return
    os.makedirs(d, exist_ok=True)
    resume = ['--init_from=resume'] if os.path.exists(os.path.join(d, 'ckpt.pt')) else []
    cfg = TRAIN if script == 'train.py' else []  # lit.py runs name their config in args
    t0 = time.time()
    run([script] + cfg + args + [f'--data_dir={D}', f'--out_dir={d}'] + resume,
        os.path.join(d, 'stdout.log'))
    print(f'done {name} in {time.time() - t0:.0f} s', flush=True)


KEEP = ('probe.json', 'train.json', 'lit.json', 'log.jsonl')  # a run's record: its results


def keep(name):
    """A finished run's results copied to its record (written whole, then renamed)."""
    if record:
        d = os.path.join(record, name)
        os.makedirs(d, exist_ok=True)
        for f in KEEP:
            if os.path.exists(os.path.join(out, name, f)):
                shutil.copyfile(os.path.join(out, name, f), os.path.join(d, f + '.tmp'))
                os.replace(os.path.join(d, f + '.tmp'), os.path.join(d, f))


def restore(name):
    """A recorded run's results into its folder of `out`, where it then counts as done."""
    d = os.path.join(record, name) if record else ''
    if d and os.path.exists(os.path.join(d, 'probe.json')) and not probed(name):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for f in KEEP:
            if os.path.exists(os.path.join(d, f)):
                shutil.copyfile(os.path.join(d, f), os.path.join(out, name, f))


def probe(name, checkpoint):
    # raw pixels have one feature: the three names would fit the same 3,072-d features three times
    features = FEATURES.split(',')[0] if checkpoint == 'pixels' else FEATURES
    d = os.path.join(out, name)
    if os.path.exists(os.path.join(d, 'probe.json')):
        return
    os.makedirs(d, exist_ok=True)
    run(['probe.py', f'--checkpoint={checkpoint}', f'--train_dir={D}', f'--test_dir={T}',
         f'--out_dir={d}', '--zero_shot=False', f'--max_iter={probe_iters}', f'--features={features}',
         f'--device={device}'],
        os.path.join(d, 'stdout.log'))
    keep(name)


def pool(tasks):
    """fn(*args) for every (fn, args) task, `jobs` at a time. A failure is reported and the others
    go on (their results are kept: a rerun does only what is missing); returns the failures."""
    failed = []
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        for (fn, args), f in [(t, ex.submit(t[0], *t[1])) for t in tasks]:
            try:
                f.result()
            except (Exception, SystemExit) as e:
                print(f'FAILED {args[0]}: {e}', flush=True)
                failed.append(args[0])
    return failed


# -----------------------------------------------------------------------------
# the plan: every run's name checked, and only what the selected runs lack is done
# the learned teachers' clusterings (step 4), name -> (the run whose tower embeds, k, feature, views
# averaged), and the runs on them: does MLCD on a trained tower's clusters pass that tower?
LEARNED = {'cluster_simclr': ('simclr_s0', k, 'embed', 1),  # the paper's recipe (cluster.py's pass)
           'cluster_simclr_k300': ('simclr_s0', 300, 'embed', 1),
           'cluster_simclr_k3000': ('simclr_s0', 3 * k, 'embed', 1),
           'cluster_simclr_pooled': ('simclr_s0', k, 'pooled', 1),  # before the projection
           'cluster_simclr_v8': ('simclr_s0', k, 'embed', 8),  # mean of the plain + 7 augmented views
           'cluster_student': ('mlcd_t_s0', k, 'embed', 1)}  # a second round: the student's clusters
STUDENTS = [  # name, clustering, train.py arguments after the shared MLCD ones, seeds
    ('mlcd_t', 'cluster_simclr', [], seeds),
    ('student_jitter', 'cluster_simclr', ['--color_jitter=0.5'], 1),  # SimCLR's colour distortion
    ('student_v8', 'cluster_simclr_v8', [], 1),
    ('student_pooled', 'cluster_simclr_pooled', [], 1),
    ('student_k300', 'cluster_simclr_k300', [], 1),
    ('student_k3000', 'cluster_simclr_k3000', [], 1),
    ('student_l4', 'cluster_simclr', ['--num_positives=4'], 1),
    ('student_2x', 'cluster_simclr', [f'--max_steps={2 * steps}'], seeds),  # both passed it on val
    ('student_4x', 'cluster_simclr', [f'--max_steps={4 * steps}'], seeds),
    ('student_round2', 'cluster_student', [], 1),
]
TEACHER_RUNS = [(f'{n}_s{s}', 'train.py', [f'--labels_dir={os.path.join(out, c)}', f'--seed={s}',
                 '--loss_type=mlcd', '--num_positives=8', '--sample_ratio=0.1'] + a, s)
                for n, c, a, ns in STUDENTS for s in range(ns)] if teacher else []
BASELINES = [f'random_s{s}' for s in range(seeds)] + ['pixels']
NAMES = BASELINES + [r[0] for r in variants() + TEACHER_RUNS]
selected = [n.strip() for n in only.split(',') if n.strip()]
unknown = [n for n in selected if n not in NAMES]
if unknown:
    raise SystemExit(f'only={only}: no run named {", ".join(unknown)}; the runs are '
                     f'{", ".join(NAMES)}')
probed = lambda name: os.path.exists(os.path.join(out, name, 'probe.json'))  # noqa: E731
for name in NAMES:  # what another machine finished (its record) counts as done here
    restore(name)
trained = lambda r: any(os.path.exists(os.path.join(out, r[0], f))  # noqa: E731
                        for f in ('train.json', 'lit.json'))
wanted = lambda name: not selected or name in selected  # noqa: E731
todo = [r for r in variants() + TEACHER_RUNS if wanted(r[0]) and not trained(r)]
labels_of = lambda r: next((a.split('=', 1)[1] for a in r[2]  # noqa: E731
                            if a.startswith('--labels_dir=')), None)
need_labels = {labels_of(r) for r in todo} - {None}  # the clusterings the training runs read
clusterings = [c for c in [LABELS, LABELS_10K, TRUE] + [os.path.join(out, c) for c in LEARNED]
               if c in need_labels
               and not os.path.exists(os.path.join(c, 'labels.npy'))]
n_probes = sum(wanted(n) and not probed(n) for n in NAMES)
steps_of = lambda r: int(next((a.split('=', 1)[1] for a in reversed(r[2])  # noqa: E731
                                if a.startswith('--max_steps=')), steps))
print(f'to do: {"the data, " if not os.path.exists(os.path.join(T, "meta.json")) else ""}'
      f'{len(clusterings)} clustering(s), {len(todo)} of {len(NAMES) - len(BASELINES)} '
      f'pre-training runs ({sum(map(steps_of, todo))} steps x {batch} images in all), {n_probes} '
      f'probe(s); {jobs} at a time. At ~500 images/s per job (one core of an idle machine) that is '
      f'about {sum(map(steps_of, todo)) * batch / 500 / 3600 / max(1, jobs):.1f} h of training on a CPU.',
      flush=True)

# 1. data: unpack (members checked: no absolute paths or '..'), split, build uint8 shards
if (todo or n_probes) and not os.path.exists(os.path.join(T, 'meta.json')):
    if not os.path.exists(cifar):
        raise SystemExit(f'reproduce_cifar10.py: cifar={cifar} not found (a .tar.gz of '
                         'cifar10/{train,test}/<class>/ images; see README)')
    src = os.path.join(out, 'src')
    with tarfile.open(cifar) as tf:
        tf.extractall(src, filter='data')
    # the images each set is built from, as folders of links: quick keeps the first images of
    # every class; val splits the training images 40K / 10K with a fixed seed
    pick = os.path.join(out, 'pick')
    for part in ('train', 'test'):
        for c in sorted(os.listdir(os.path.join(src, 'cifar10', part))):
            files = sorted(os.listdir(os.path.join(src, 'cifar10', part, c)))
            if quick:
                files = files[:200 if part == 'train' else 50]
            sets = {part: files}
            if split == 'val' and part == 'train':
                order = np.random.default_rng(0).permutation(len(files))
                n_val = len(files) // 5
                sets = {'val': [files[i] for i in sorted(order[:n_val])],
                        'train': [files[i] for i in sorted(order[n_val:])]}
            for s, fs in sets.items():
                os.makedirs(os.path.join(pick, s, c), exist_ok=True)
                for f in fs:
                    os.symlink(os.path.abspath(os.path.join(src, 'cifar10', part, c, f)),
                               os.path.join(pick, s, c, f))
    for s in ('train', split):
        run(['prepare.py', f'--src={os.path.join(pick, s)}', f'--out={os.path.join(out, "data", s)}',
             '--image_size=32', '--overwrite=True'])
    subprocess.run(['rm', '-rf', src, pick], check=True)

# 2. labels: the pixels teacher's k clusters (l = 16 kept: the l sweep reads the first l), 10 k
#    clusters for the r sweep's second row, and the true classes as a 'clustering' for the
#    supervised reference; each only if a run still to be trained reads it
if LABELS in clusterings:
    run(['cluster.py', f'--data_dir={D}', f'--out_dir={LABELS}', '--teacher=pixels',
         f'--num_classes={k}', '--num_positives=16', f'--device={device}'])
if LABELS_10K in clusterings:
    run(['cluster.py', f'--data_dir={D}', f'--out_dir={LABELS_10K}', '--teacher=pixels',
         f'--num_classes={10 * k}', '--num_positives=8', f'--device={device}'])
if TRUE in clusterings:
    os.makedirs(TRUE, exist_ok=True)
    classes = np.load(os.path.join(D, 'classes.npy'))
    np.save(os.path.join(TRUE, 'labels.npy'), classes[:, None].astype(np.int32))


# 3. each run is pre-trained, then probed (so that a run cut short leaves whole results); what is
#    nearest to done first: the untrained baselines, probes of trained runs, then training, seed 0
#    of every variant before the other seeds
def train_and_probe(name, script, args, seed):
    train(name, script, args, seed)
    probe(name, os.path.join(out, name, 'ckpt.pt'))


def random_init(name, seed):
    """The architecture of every run with no training (its seed's initial weights), probed."""
    ck = os.path.join(out, name, 'ckpt.pt')
    if not os.path.exists(ck):
        os.makedirs(os.path.dirname(ck), exist_ok=True)
        run(['-c', 'import sys, torch, model; torch.manual_seed(int(sys.argv[2])); '
             'v, _ = model.create(sys.argv[3]); '
             "torch.save({'vision_config': v.config, 'vision': v.state_dict()}, sys.argv[1])",
             ck, str(seed), model])
    probe(name, ck)


RUNS = sorted(variants(), key=lambda r: (not trained(r), r[3]))
tasks = [(random_init, (f'random_s{s}', s)) for s in range(seeds)] + [(probe, ('pixels', 'pixels'))]
tasks += [(train_and_probe, r) for r in RUNS]
failed = pool([t for t in tasks if wanted(t[1][0])])

# 4. learned teachers: the paper clusters with a CLIP tower and its MLCD tower surpasses that
#    teacher. Here the teachers are the SimCLR tower of seed 0 (the other clusterings of LEARNED),
#    then the first student itself (a second round); each clustering once its tower is trained
def learned_clusters(name):
    run_name, kk, feature, views = LEARNED[name]
    ck, c = os.path.join(out, run_name, 'ckpt.pt'), os.path.join(out, name)
    src = [f'--teacher={ck}']
    if (feature, views) != ('embed', 1):  # the tower's other feature, or a mean over views
        src = [f'--embeddings_path={c}.npy', f'--classes_path={os.path.join(D, "classes.npy")}']
        if not os.path.exists(c + '.npy'):
            run(['scripts/teacher_features.py', f'--checkpoint={ck}', f'--data_dir={D}',
                 f'--out={c}.npy', f'--feature={feature}', f'--views={views}', f'--device={device}'])
    run(['cluster.py', f'--data_dir={D}', f'--out_dir={c}', f'--num_classes={kk}', '--num_positives=8',
         f'--device={device}'] + src, c + '.log')


students = {r[0] for r in TEACHER_RUNS}
tower_of = lambda r: LEARNED[os.path.basename(labels_of(r))][0]  # noqa: E731
for second in (False, True):  # runs on the SimCLR tower's clusters, then those on a student's
    runs = [r for r in TEACHER_RUNS if wanted(r[0]) and (tower_of(r) in students) == second]
    for c in sorted({labels_of(r) for r in runs} & set(clusterings)):
        tower = LEARNED[os.path.basename(c)][0]
        if trained((tower,)) and not os.path.exists(os.path.join(out, tower, 'ckpt.pt')):
            failed.append(f'{os.path.basename(c)} ({tower} is recorded but its checkpoint is not '
                          f'here: remove {os.path.join(record, tower)} to train it again)')
        elif trained((tower,)):
            learned_clusters(os.path.basename(c))
        else:
            failed.append(f'{os.path.basename(c)} ({tower} is not trained)')
    failed += pool([(train_and_probe, r) for r in runs
                    if os.path.exists(os.path.join(labels_of(r), 'labels.npy'))])

# 5. the tables
subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'plot_cifar10.py'), out], check=True)
if failed:
    raise SystemExit(f'reproduce_cifar10.py: {len(failed)} run(s) failed: {" ".join(failed)} '
                     '(their logs: <out>/<run>/stdout.log); run the script again to retry them')
