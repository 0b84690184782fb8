"""
The launch check: every stage as a cluster runs it, through torchrun, on a tiny synthetic set.
prepare (one process) -> cluster -> train (stopped half-way, then resumed) -> lit -> probe, each
`torchrun --standalone --nproc_per_node=N`: NCCL on CUDA (the GPU check runs it with N = 1),
gloo on a CPU (CI runs it with N = 2, tests/test_launch.py). It proves the launch paths (the
rendezvous, the process group, every rank's share, the files each rank writes, a resume under
torchrun), not the numbers: those are checked against one process by the tests.

    python bench/gpu_launch.py --device=cpu --nproc=2 --out_dir=/tmp/launch
"""
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ViT-T/4 at 16 px: a launch costs seconds, the stages' own start-up dominates
TRAIN = ['--model=ViT-T/4', '--image_size=16', '--num_positives=4', '--global_batch_size=32',
         '--micro_batch_size=8', '--max_steps=4', '--log_interval=1', '--ckpt_interval=1000',
         '--warmup_steps=1', '--eval_interval=0']
LIT = ['--global_batch_size=32', '--max_steps=2', '--log_interval=1', '--warmup_steps=1',
       '--text_layers=2', '--text_width=64', '--text_heads=2']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(script, args, nproc, timeout, env):
    """One stage under torchrun (nproc >= 1); its last JSON line (every stage ends with one)."""
    launch = [sys.executable]
    if script != 'prepare.py':
        launch += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                   f'--master_port={free_port()}']
    t0 = time.time()
    p = subprocess.run(launch + [script] + args, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f'{script} exited {p.returncode}: {(p.stdout + p.stderr)[-1500:]}')
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{')]
    return (json.loads(lines[-1]) if lines else {}), time.time() - t0


def check_launch(device, tmp, nproc, timeout=300, extra_lit=()):
    """Run every stage under torchrun with nproc ranks on `device` ('cuda' or 'cpu'); returns a
    dict: ok, and per stage its seconds and what shows that it ran on every rank."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if not device.startswith('cuda'):
        env['CUDA_VISIBLE_DEVICES'] = ''
    dev = [f'--device={device}']
    data, out = os.path.join(tmp, 'launch_data'), os.path.join(tmp, 'launch')
    R = {'device': device, 'nproc': nproc}
    if not os.path.exists(os.path.join(data, 'meta.json')):
        run('prepare.py', ['--src=synthetic', '--count=256', '--seed=0', '--image_size=16',
                           f'--out={data}'], 1, timeout, env)
    res, R['cluster_s'] = run('cluster.py', [f'--data_dir={data}', f'--out_dir={out}/cluster',
                                             '--teacher=pixels', '--num_classes=16',
                                             '--num_positives=4', '--search=torch', '--force=True',
                                             *dev], nproc, timeout, env)
    R['cluster_world'] = res.get('world_size')
    common = [f'--data_dir={data}', f'--labels_dir={out}/cluster', f'--out_dir={out}/train',
              *TRAIN, *dev, '--overwrite=True']
    half, R['train_s'] = run('train.py', common + ['--stop_at=2'], nproc, timeout, env)
    full, R['resume_s'] = run('train.py', common + ['--init_from=resume'], nproc, timeout, env)
    steps = [json.loads(ln)['step'] for ln in open(os.path.join(out, 'train', 'log.jsonl'))]
    R['train_steps'] = [half.get('step'), full.get('step')]
    R['train_log_steps'] = steps
    R['train_loss'] = full.get('loss')
    lit, R['lit_s'] = run('lit.py', [f'--data_dir={data}', f'--out_dir={out}/lit',
                                     f'--vision_checkpoint={out}/train/ckpt.pt', *LIT, *extra_lit,
                                     *dev, '--overwrite=True'], nproc, timeout, env)
    R['lit_steps'], R['lit_loss'] = lit.get('step'), lit.get('loss')
    probe, R['probe_s'] = run('probe.py', [f'--checkpoint={out}/lit/ckpt.pt', f'--train_dir={data}',
                                           f'--test_dir={data}', f'--retrieval_dir={data}',
                                           f'--out_dir={out}/probe', '--max_iter=20', *dev],
                              nproc, timeout, env)
    R['linear_probe'] = probe.get('linear_probe')
    R['zero_shot'] = probe.get('zero_shot')
    R['ok'] = bool(R['cluster_world'] == nproc and R['train_steps'] == [2, 4]
                   and steps == [1, 2, 3, 4] and R['train_loss'] is not None
                   and R['lit_steps'] == 2 and R['linear_probe'] is not None)
    return R


if __name__ == '__main__':
    device = 'cpu'
    nproc = 2
    out_dir = 'out/launch'
    exec(open(os.path.join(ROOT, 'configurator.py')).read())
    os.makedirs(out_dir, exist_ok=True)
    print(json.dumps(check_launch(device, out_dir, nproc)))
