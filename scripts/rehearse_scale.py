"""
LAION's shape on one machine: what breaks at 80,000 shard files and many ranks shows up here in a
few minutes. A synthetic captioned set in many small shards (every shard holds a handful of
images, so a random batch touches hundreds of files), then cluster -> train -> LiT with
micro-batches -> probe, each on `ranks` gloo processes under a low open-file limit (ulimit -n),
while this script watches every rank from /proc and reports its peak memory (VmHWM), most open
files and most memory maps.

    python scripts/rehearse_scale.py                  # 4 ranks, 6,000 images in 750 + 750 shards
    python scripts/rehearse_scale.py --quick=True     # CI's reduced run: 2 ranks, 600 images
                                                      # in 300 + 300 shards

A stage that fails stops the rehearsal with its last lines. Results: out_dir/rehearsal.json and a
table on stdout. Linux only (/proc).
"""
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

out_dir = 'out/rehearsal'
ranks = 4
count = 6000  # images; shards of shard_size: count / shard_size image files + as many text files
shard_size = 8
nofile = 256  # the soft open-file limit every stage runs under (common defaults: 1,024)
max_open_shards = 32  # shard maps a process keeps open (each stage's setting)
quick = False  # CI: 2 ranks, 600 images in shards of 2 (still more files than nofile), few steps
exec(open(os.path.join(ROOT, 'configurator.py')).read())
if quick:
    ranks, count, shard_size = 2, 600, 2


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def children(pid):
    """Every descendant process id of pid (torchrun's ranks and their workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f'/proc/{p}/task/{p}/children') as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def sample(pid, seen):
    """Fold one look at process pid into seen[rank]: peak RSS (kB), open fds, memory maps."""
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
        if b'RANK' not in env:
            return
        rank = int(env[b'RANK'])
        with open(f'/proc/{pid}/status') as f:
            hwm = next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM'))
        fds = len(os.listdir(f'/proc/{pid}/fd'))
        with open(f'/proc/{pid}/maps') as f:
            maps = sum(1 for _ in f)
    except (OSError, StopIteration, ValueError):
        return  # the process ended between two reads
    s = seen.setdefault(rank, dict(peak_rss_mb=0.0, open_files=0, maps=0))
    s['peak_rss_mb'] = max(s['peak_rss_mb'], hwm / 1024)
    s['open_files'], s['maps'] = max(s['open_files'], fds), max(s['maps'], maps)


def stage(script, args, distributed=True):
    """Run one stage (under torchrun with `ranks` gloo ranks unless not distributed) with the open
    file limit lowered to `nofile`; watch its ranks until it ends."""
    cmd = [sys.executable]
    if distributed:
        cmd += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}',
                f'--master_port={free_port()}']
    cmd += [script] + args
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')

    def limit():  # the child and every rank it starts inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
    print('+', ' '.join(cmd), flush=True)
    t0, seen = time.time(), {}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=limit, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    while p.poll() is None:
        for c in children(p.pid):
            sample(c, seen)
        time.sleep(0.2)
    reader.join()
    if p.returncode != 0:
        raise SystemExit(f'{script} failed (exit {p.returncode}):\n' + ''.join(lines[-15:]))
    result = next((json.loads(ln) for ln in reversed(lines) if ln.startswith('{')), {})
    return dict(seconds=round(time.time() - t0, 1), ranks=dict(sorted(seen.items())),
                result=result)


data = os.path.join(out_dir, 'data')
test = os.path.join(out_dir, 'test')
shared = [f'--max_open_shards={max_open_shards}', '--device=cpu']
steps, lit_steps = (6, 4) if quick else (40, 20)
R = dict(ranks=ranks, count=count, shard_size=shard_size, nofile=nofile,
         max_open_shards=max_open_shards, stages={})
if not os.path.exists(os.path.join(data, 'meta.json')):
    R['stages']['prepare'] = stage('prepare.py', [
        '--src=synthetic', f'--count={count}', '--image_size=16', f'--shard_size={shard_size}',
        f'--out={data}'], distributed=False)
    R['stages']['prepare_test'] = stage('prepare.py', [
        '--src=synthetic', f'--count={count // 4}', '--seed=1', '--image_size=16',
        f'--shard_size={shard_size}', f'--out={test}'], distributed=False)
files = len(json.load(open(os.path.join(data, 'meta.json')))['shards']) * 2
R['shard_files'] = files
R['stages']['cluster'] = stage('cluster.py', [
    f'--data_dir={data}', f'--out_dir={out_dir}/cluster', '--teacher=pixels',
    f'--num_classes={count // 20}', '--num_positives=8', '--force=True', *shared])
R['stages']['train'] = stage('train.py', [
    f'--data_dir={data}', f'--labels_dir={out_dir}/cluster', f'--out_dir={out_dir}/train',
    '--model=ViT-T/4', '--image_size=16', '--global_batch_size=128', '--micro_batch_size=16',
    f'--max_steps={steps}', '--warmup_steps=2', '--log_interval=5', '--overwrite=True',
    f'--eval_data_dir={test}', '--eval_interval=0', *shared])
R['stages']['lit'] = stage('lit.py', [
    f'--data_dir={data}', f'--vision_checkpoint={out_dir}/train/ckpt.pt',
    f'--out_dir={out_dir}/lit', '--global_batch_size=128', '--micro_batch_size=16',
    f'--max_steps={lit_steps}', '--warmup_steps=2', '--log_interval=5', '--overwrite=True',
    '--text_layers=2', '--text_width=64', '--text_heads=2', *shared])
R['stages']['probe'] = stage('probe.py', [
    f'--checkpoint={out_dir}/lit/ckpt.pt', f'--train_dir={data}', f'--test_dir={test}',
    f'--retrieval_dir={test}', f'--out_dir={out_dir}/probe', '--max_iter=50', *shared])
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, 'rehearsal.json'), 'w') as f:
    json.dump(R, f, indent=1)

print(f'\n{count:,} images in {files:,} shard files, {ranks} gloo ranks, ulimit -n {nofile}, '
      f'max_open_shards={max_open_shards}')
print(f"{'stage':<9} {'seconds':>8} {'peak RSS MB / rank':>28} {'open files':>12} {'maps':>8}")
for name, s in R['stages'].items():
    rk = s['ranks'].values()
    rss = '/'.join(f"{r['peak_rss_mb']:.0f}" for r in rk) or '-'
    fds = max((r['open_files'] for r in rk), default=0)
    maps = max((r['maps'] for r in rk), default=0)
    print(f'{name:<9} {s["seconds"]:>8.1f} {rss:>28} {fds or "-":>12} {maps or "-":>8}')
print(f"train loss {R['stages']['train']['result'].get('loss')}, LiT loss "
      f"{R['stages']['lit']['result'].get('loss')}, probe top-1 "
      f"{(R['stages']['probe']['result'].get('linear_probe') or {}).get('top1')}")
