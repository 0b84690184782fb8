"""
prepare.py on img2dataset-shaped tars, in images per second per core: `n_tars` tars of `per_tar`
samples (key.jpg, key.txt, key.json, as img2dataset writes them), each JPEG `source_size` px
square (img2dataset's usual --image_size 256), built to `image_size` shards with 1 and with 2
worker processes, runs interleaved so that a change in machine load hits both alike; medians.
Per core is measured two ways: images per wall second / workers, and images per CPU second (the
CPU time of the build's process and its workers): on a shared machine the first counts the time
the processes waited for a core, the second does not, and is the one to extrapolate from.
The images are the synthetic scenes plus pixel noise (sigma 12), so that a JPEG is about as big as
a photo's at that size (a flat synthetic scene compresses 5x smaller and decodes faster).
Also one process's time per sample split into tar reading, decoding and tokenizing.

    OMP_NUM_THREADS=1 python bench/bench_prepare.py [--n_tars=40 --per_tar=250 --runs=3]

Prints one JSON line (also written to out/bench_prepare/bench_prepare.json). The tars are made
once under tar_dir and kept (delete it to remake them).
"""
import io
import json
import os
import resource
import sys
import tarfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare
import sources  # noqa: E402
from synthetic import synthetic_one  # noqa: E402
from tokenizer import tokenize  # noqa: E402

n_tars = 40
per_tar = 250
source_size = 256
image_size = 224
runs = 3
worker_counts = (1, 2)
jpeg_quality = 90
tar_dir = '/tmp/prep/bench_prepare_tars'
out_dir = 'out/bench_prepare'
exec(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'configurator.py')).read())


def make_tars():
    """img2dataset's layout: key = shard (5 digits) + index (4 digits)."""
    stamp = os.path.join(tar_dir, f'{n_tars}x{per_tar}x{source_size}.done')
    if os.path.exists(stamp):
        return
    os.makedirs(tar_dir, exist_ok=True)
    for s in range(n_tars):
        with tarfile.open(os.path.join(tar_dir, f'{s:05d}.tar'), 'w') as tf:
            for j in range(per_tar):
                key = f'{s:05d}{j:04d}'
                im, caption, _ = synthetic_one(s * per_tar + j, source_size, seed=0)
                noise = np.random.default_rng(s * per_tar + j).normal(0, 12, im.shape)
                im = np.clip(im + noise, 0, 255).astype(np.uint8)
                f = io.BytesIO()
                Image.fromarray(im).save(f, 'JPEG', quality=jpeg_quality)
                meta = dict(url=f'https://example.com/{key}.jpg', key=key, caption=caption,
                            status='success', width=source_size, height=source_size)
                for ext, data in (('jpg', f.getvalue()), ('txt', caption.encode()),
                                  ('json', json.dumps(meta).encode())):
                    ti = tarfile.TarInfo(f'{key}.{ext}')
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    open(stamp, 'w').close()


def cpu_seconds():
    """CPU time of this process and of its finished children (the pool is joined in build)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def stages():
    """One process, one tar: seconds per sample in each stage of a tar shard."""
    path = os.path.join(tar_dir, '00000.tar')
    t = time.perf_counter()
    items = list(sources._tar_items(path, 2 ** 30))
    read = time.perf_counter() - t
    t = time.perf_counter()
    for _, _, data, _, _ in items:
        sources.decode(data, image_size)
    dec = time.perf_counter() - t
    t = time.perf_counter()
    for _, _, _, caption, _ in items:
        tokenize([caption])
    tok = time.perf_counter() - t
    return {k: round(v / len(items) * 1e3, 3) for k, v in
            (('read_ms', read), ('decode_ms', dec), ('tokenize_ms', tok))}


if __name__ == '__main__':
    make_tars()
    n = n_tars * per_tar
    jpeg_kb = np.mean([len(d) for _, _, d, _, _ in sources._tar_items(
        os.path.join(tar_dir, '00000.tar'), 2 ** 30)]) / 1024
    src = os.path.join(tar_dir, '*.tar')
    out = os.path.join(os.path.dirname(tar_dir), 'bench_prepare_out')
    prepare.build(src, out, image_size=image_size, workers=1, overwrite=True, progress=False)
    rates, cpu_rates = {w: [] for w in worker_counts}, {w: [] for w in worker_counts}
    for r in range(runs):
        for w in worker_counts:
            t, c = time.perf_counter(), cpu_seconds()
            meta = prepare.build(src, out, image_size=image_size, workers=w, overwrite=True,
                                 progress=False)
            rates[w].append(meta['count'] / (time.perf_counter() - t))
            cpu_rates[w].append(meta['count'] / (cpu_seconds() - c))
            print(f'run {r}, {w} worker(s): {rates[w][-1]:.0f} images/s, '
                  f'{cpu_rates[w][-1]:.0f} images per CPU second', file=sys.stderr)
    assert meta['count'] == n
    med = {w: float(np.median(v)) for w, v in rates.items()}
    cpu_med = {w: float(np.median(v)) for w, v in cpu_rates.items()}
    per_core = cpu_med[1]
    result = dict(
        machine=f'{os.cpu_count()} CPU cores, shared (load average {os.getloadavg()[0]:.1f} '
                'at the end)',
        n_tars=n_tars, per_tar=per_tar, images=n, source_size=source_size,
        jpeg_kb=round(jpeg_kb, 1),
        image_size=image_size, runs=runs,
        images_per_s={w: round(v, 1) for w, v in med.items()},
        images_per_s_per_core={w: round(v / w, 1) for w, v in med.items()},
        images_per_cpu_s={w: round(v, 1) for w, v in cpu_med.items()},
        all_runs={w: [round(x, 1) for x in v] for w, v in rates.items()},
        all_runs_cpu={w: [round(x, 1) for x in v] for w, v in cpu_rates.items()},
        stage_ms_per_sample=stages(),
        laion400m_core_hours=round(400e6 / per_core / 3600),
    )
    print(json.dumps(result))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'bench_prepare.json'), 'w') as f:
        json.dump(result, f, indent=1)
