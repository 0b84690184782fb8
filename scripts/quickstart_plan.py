"""
The settings scripts/quickstart.sh uses on a user's images, chosen from the data. Prints shell
assignments (for eval); a value the user set in the environment is kept, and checked.

    python scripts/quickstart_plan.py source SRC     # before prepare.py: resolution, held-out part
    python scripts/quickstart_plan.py data DIR SRC   # from DIR/meta.json: clusters, batch, steps...

Environment: IMAGE_SIZE, K, BATCH, STEPS (asked values), QUICK=1 (a few steps: CI's test).
"""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PATCH = 4  # ViT-T/4, the tower config/tiny.py trains: image sides are multiples of 4
MAX_SIZE = 32  # the tower's own resolution (65 tokens); 64 px is ~4x the compute on a CPU
HOLDOUT = 0.2  # share of every class (or of the captioned pairs) kept for evaluation
PER_CLUSTER = 20  # images per cluster (the built-in quickstart: 6,000 images, k = 300)
MAX_BATCH = 128  # config/tiny.py's batch
EPOCHS = 30  # pre-training length on small data ...
MAX_IMAGES = 50_000  # ... capped at this many images seen (~20 min at 32 px on 2 CPU cores)
SAMPLE = 64  # images whose size is read to find the source's resolution


def asked(name, low=1):
    """The environment's integer `name`, or None; one line if it is not an integer >= low."""
    v = os.environ.get(name, '')
    if not v:
        return None
    if not v.isdigit() or int(v) < low:
        raise SystemExit(f'{name}={v}: must be an integer >= {low}')
    return int(v)


def shorter_sides(src, n=SAMPLE):
    """The shorter side of up to n images spread over the source (headers only, no decoding)."""
    import io
    from PIL import Image
    import sources
    kind, items, tars, _, _, _ = sources._open_source(src)
    if kind == 'tar':  # streamed: the first n images of the first tar
        payloads = []
        for key, what, payload, caption, url in sources._tar_items(tars[0], 2 ** 28):
            if what == 'bytes':
                payloads.append(payload)
            if len(payloads) == n:
                break
        opened = (io.BytesIO(p) for p in payloads)
    else:
        step = max(1, len(items) // n)
        opened = (it[2] for it in items[::step][:n])
    sides = []
    for f in opened:
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable: prepare.py skips it and says why
            pass
    return sides


def source_plan(src):
    """IMAGE_SIZE (stored and trained), HOLDOUT (0: nothing to evaluate on), CLASSES, TEXT."""
    import sources
    try:
        kind, items, _, _, classnames, has_text = sources._open_source(src)
    except ValueError as e:
        raise SystemExit(f'SRC={src}: {str(e).removeprefix(f"--src={src}: ")}')
    if kind == 'synthetic':
        raise SystemExit(f'SRC={src}: leave SRC unset for the built-in synthetic set')
    size, note = asked('IMAGE_SIZE', PATCH), None
    if size is not None and size % PATCH:
        raise SystemExit(f'IMAGE_SIZE={size}: must be a multiple of {PATCH} (the patch size)')
    if size is None:
        sides = sorted(shorter_sides(src))
        if not sides:
            raise SystemExit(f'SRC={src}: none of the first images could be read')
        own = sides[len(sides) // 2]  # the median shorter side
        size = max(PATCH * 2, min(MAX_SIZE, own) // PATCH * PATCH)
        note = (f'images of about {own} px: stored and trained at {size} px'
                + (' (the tiny tower\'s; IMAGE_SIZE=64 asks for more)' if own > MAX_SIZE else ''))
    evaluable = bool(classnames) or has_text
    return dict(IMAGE_SIZE=size, HOLDOUT=HOLDOUT if evaluable else 0,
                CLASSES=int(bool(classnames)), TEXT=int(has_text)), note


def power_of_two_at_most(x):
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def data_plan(meta, quick=False):
    """Settings from a prepared dataset's meta.json: k, l, batch, steps and the rest."""
    N = meta['count']
    if N < 8:
        raise SystemExit(f'{N} training images: the quickstart needs at least 8')
    K = asked('K', 2) or max(2, N // PER_CLUSTER)
    if K >= N:
        raise SystemExit(f'K={K}: must be fewer clusters than the {N} training images')
    # >= 10 batches per epoch, so that dropping the last partial batch loses < 10% of it
    B = asked('BATCH', 2) or max(2, min(MAX_BATCH, power_of_two_at_most(N / 10)))
    if B > N:
        raise SystemExit(f'BATCH={B}: must be at most the {N} training images')
    images = min(N, 1_000) if quick else min(EPOCHS * N, MAX_IMAGES)  # quick: one epoch
    steps = asked('STEPS') or max(2, math.ceil(images / B))
    return dict(
        N=N, K=K, BATCH=B, STEPS=steps,
        L=min(8, max(1, K // 4)),  # the paper's l = 8 when there are 32+ centres
        # every centre a negative when there are few (r = 0.1 of 100 leaves 10)
        RATIO=1.0 if K <= 1000 else 0.1,
        WARMUP=min(20, steps // 10),
        LOG=max(1, steps // 20),
        LIT_EPOCHS=2 if quick else max(2, min(20, math.ceil(20_000 / N))),
        ITERS=100 if quick else 1000,  # L-BFGS iterations per probe fit (CLIP: 1,000)
        IMAGE_SIZE=meta['image_size'],  # the data's own: prepare.py stored it at the chosen size
        CLASSES=int(bool(meta.get('classnames'))), TEXT=int(bool(meta.get('has_text'))))


def shell(d):
    return ' '.join(f'{k}={v}' for k, v in d.items())


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == 'source':
        plan, note = source_plan(sys.argv[2])
        if note:
            print(note, file=sys.stderr)
        print(shell(plan))
    elif len(sys.argv) == 4 and sys.argv[1] == 'data':
        meta = json.load(open(os.path.join(sys.argv[2], 'meta.json')))
        if os.path.abspath(meta['source']) != os.path.abspath(sys.argv[3]):
            raise SystemExit(f'{sys.argv[2]} was prepared from {meta["source"]}, not SRC='
                             f'{sys.argv[3]}: set OUT to another folder')
        print(shell(data_plan(meta, quick=os.environ.get('QUICK') == '1')))
    else:
        raise SystemExit(__doc__.strip().split('\n\n')[1])
