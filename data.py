"""
Data: image sources -> uint8 .npy shards, the CLIP BPE tokenizer, and a memory-mapped loader
with augmentation (uint8 on a CPU, one grid_sample on a GPU), several views and colour jitter.

    python data.py --src=path/to/imagefolder --out=data/mine --image_size=224
    python data.py --src='laion/{00000..00099}.tar' ...   (a glob: --src='laion/*.tar')
    python data.py --src=captions.tsv --out=data/cc      (lines of path<TAB>caption)
    python data.py --src=synthetic --count=10000 --image_size=32 --out=data/synthetic

A dataset is a directory: meta.json, images_00000.npy uint8 [n,S,S,3], texts_00000.npy
uint16 [n,77] (CLIP BPE ids) and, for class folders, classes.npy int32 [N].
Every image is stored once, resized so that its shorter side is S (bicubic, antialiased) and
centre-cropped, so training reads raw pixels with no decoding at all.
"""
import atexit
import functools
import glob
import gzip
import heapq
import html
import io
import json
import math
import multiprocessing
import os
import posixpath
import queue
import re
import sys
import tarfile
import threading
import time
import unicodedata
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')

# -----------------------------------------------------------------------------
# CLIP tokenizer: byte-level BPE, vocabulary 49408 = 256 bytes + 256 bytes</w> + 48894 merges + 2
# special tokens. The merges file is the one OpenAI released with CLIP (MIT licence), kept in assets/.

SOT, EOT = 49406, 49407  # <start_of_text>, <end_of_text>
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'bpe_simple_vocab_16e6.txt.gz')


def _bytes_to_unicode():
    # every byte gets a printable unicode stand-in so that BPE never sees whitespace/control bytes
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _char_class(codepoints):
    """Code points -> the inside of a regex character class, as ranges."""
    c = np.unique(np.asarray(codepoints, np.int64))
    cut = np.nonzero(np.diff(c) != 1)[0]
    lo, hi = c[np.r_[0, cut + 1]], c[np.r_[cut, len(c) - 1]]
    return ''.join('\\U%08x' % a if a == b else '\\U%08x-\\U%08x' % (a, b) for a, b in zip(lo.tolist(), hi.tolist()))


@functools.lru_cache(maxsize=None)
def _tokenizer():
    path = BPE_PATH
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: the CLIP BPE vocabulary is missing (it is part of this '
                                'repository: restore it with git checkout assets/)')
    merges = gzip.open(path).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_enc = _bytes_to_unicode()
    vocab = list(byte_enc.values())
    vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m) for m in merges]
    vocab += ['<start_of_text>', '<end_of_text>']
    encoder = {t: i for i, t in enumerate(vocab)}
    assert len(encoder) == 49408 and encoder['<end_of_text>'] == EOT
    ranks = {m: i for i, m in enumerate(merges)}
    # CLIP splits words with the `regex` pattern [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ (IGNORECASE).
    # The stdlib `re` has no \p{..}, so the same classes are built from unicodedata. Under
    # IGNORECASE `regex` drops characters that are not letters/digits but case-fold to one
    # (U+0345): they are left out of the 'other' class too, so they match nothing, as there.
    cats = np.array(list(map(unicodedata.category, map(chr, range(0x110000)))))
    major = cats.view('U1')[::2]
    L, N = np.nonzero(major == 'L')[0], np.nonzero(major == 'N')[0]
    LN = set(L.tolist()) | set(N.tolist())
    other = np.nonzero(np.isin(major, list('MPSC')) & ~np.isin(cats, ['Cn', 'Co', 'Cs']))[0]
    folds = [c for c in other.tolist() if any(len(v) == 1 and ord(v) in LN for v in
                                               (chr(c).lower(), chr(c).upper(), chr(c).casefold()))]
    pat = re.compile(r"<start_of_text>|<end_of_text>|'[sSſ]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]"
                     rf"|[{_char_class(L)}]+|[{_char_class(N)}]|[^\s{_char_class(np.concatenate([L, N, folds]))}]+")
    return encoder, ranks, byte_enc, pat, {}


def _bpe(word, ranks, cache):
    """BPE: merge the lowest-ranked adjacent pair everywhere it occurs (left to right, not
    overlapping), until no pair has a rank. Done with a heap of (rank, position) over a linked list
    of parts, O(n log n): one sweep merges every valid entry of the lowest rank, and the pairs that
    sweep creates join the heap only after it, as in the pass-by-pass definition."""
    if word in cache:
        return cache[word]
    parts = list(word[:-1]) + [word[-1] + '</w>']
    n = len(parts)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = [(ranks[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in ranks]
    heapq.heapify(heap)
    while heap:
        r, merged = heap[0][0], []
        while heap and heap[0][0] == r:  # positions come out in increasing order
            i = heapq.heappop(heap)[1]
            j = nxt[i]
            if parts[i] is None or j >= n or ranks.get((parts[i], parts[j])) != r:
                continue  # stale: a neighbour changed since this entry was pushed
            parts[i], parts[j] = parts[i] + parts[j], None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            merged.append(i)
        for i in {k for i in merged for k in (prv[i], i) if k >= 0 and nxt[k] < n}:
            p = (parts[i], parts[nxt[i]])
            if p in ranks:
                heapq.heappush(heap, (ranks[p], i))
    parts = [p for p in parts if p is not None]
    if len(cache) < 1_000_000:
        cache[word] = parts
    return parts


def clean_text(text):
    """CLIP's text cleaning: ftfy (only if installed), HTML unescape twice, collapse whitespace, lowercase."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return ' '.join(text.split()).lower()


# The longest vocabulary token is 32 bytes, so n tokens come from at most 32 n characters of words
# plus n single spaces between them (cleaned text): 33 n. Twice that is kept, so the word the cut
# splits (whose last tokens change) lies past token n; the rest of a longer caption cannot reach
# the context, and cutting it first keeps any caption (a 1 MB word) to milliseconds.
CHARS_PER_TOKEN = 66


def encode(text, max_tokens=None):
    """BPE ids of one string, without the start/end tokens; with max_tokens, the first max_tokens
    ids, from the cleaned text cut to CHARS_PER_TOKEN * max_tokens characters."""
    encoder, ranks, byte_enc, pat, cache = _tokenizer()
    text = clean_text(text)
    if max_tokens is not None:
        text = text[:CHARS_PER_TOKEN * max_tokens]
    ids = []
    for tok in pat.findall(text):
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        if tok in ('<start_of_text>', '<end_of_text>'):
            ids.append(encoder[tok])
            continue
        word = ''.join(byte_enc[b] for b in tok.encode('utf-8'))
        ids.extend(encoder[p] for p in _bpe(word, ranks, cache))
    return ids if max_tokens is None else ids[:max_tokens]


def tokenize(texts, context_length=77):
    """CLIP tokenization: int64 [n, context_length], <start_of_text> ids <end_of_text> then zeros;
    too long texts are cut and still end with <end_of_text> (as OpenAI CLIP / open_clip)."""
    if isinstance(texts, str):
        texts = [texts]
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    for i, t in enumerate(texts):
        ids = [SOT] + encode(t, context_length - 2) + [EOT]
        out[i, :len(ids)] = ids
    return out

# -----------------------------------------------------------------------------
# decoding one image: any PIL mode -> upright RGB, shorter side -> S, centre crop


class Skip(Exception):
    """An input that cannot become a sample; the message is the reason recorded in meta.json."""


def to_rgb(im):
    """Any PIL mode to RGB. Transparent pixels are composited on WHITE (web images with alpha are
    mostly logos and cut-outs drawn for a white page; dropping alpha would expose whatever colour
    the invisible pixels happen to hold). 16-bit grey is scaled (v / 257), not clipped."""
    if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
        a = np.asarray(im).astype(np.float64) / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
    if 'transparency' in im.info or im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        im = im.convert('RGBA')
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        white.alpha_composite(im)
        im = white
    return im if im.mode == 'RGB' else im.convert('RGB')


def decode(data, image_size, max_pixels=Image.MAX_IMAGE_PIXELS):
    """Encoded image bytes -> uint8 [S, S, 3]. Raises Skip(reason)."""
    if not data:
        raise Skip('empty file')
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:  # checked from the header, before anything is decoded
            raise Skip(f'too large: {w}x{h} pixels (max_pixels={max_pixels})')
        im.draft('RGB', (image_size, image_size))  # JPEG: decode at 1/2..1/8 scale, sides stay >= S
        try:
            im = ImageOps.exif_transpose(im)  # camera orientation tag -> upright pixels
        except Exception:
            pass  # a broken EXIF block does not make the pixels unusable
        im = to_rgb(im)
        w, h = im.size
        m = min(w, h)
        box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)  # centre square, in source pixels
        # one bicubic resampling of the centre square to S x S (PIL's resize is antialiased when shrinking)
        im = im.resize((image_size, image_size), Image.BICUBIC, box=box)
        return np.asarray(im, dtype=np.uint8)
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip(f'too large: {e}')
    except Exception as e:  # corrupt, truncated, unknown format
        raise Skip(f'unreadable: {type(e).__name__}: {e}')

# -----------------------------------------------------------------------------
# synthetic data: coloured shapes on varied backgrounds, captioned, labelled by the largest shape

SHAPES = ('circle', 'square', 'triangle', 'semicircle', 'cross', 'ring')
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (240, 215, 40),
           'purple': (140, 60, 180), 'orange': (245, 135, 30), 'white': (245, 245, 245), 'black': (25, 25, 25)}
BACKGROUNDS = {'gray': (128, 128, 128), 'white': (235, 235, 235), 'black': (30, 30, 30), 'green': (70, 130, 70),
               'blue': (60, 90, 160), 'brown': (120, 85, 50), 'pink': (235, 170, 190), 'teal': (40, 140, 140)}


def _shape_sdf(shape, px, py):
    # signed distance (roughly, in units of the shape's radius), negative inside
    if shape == 'circle':
        return np.hypot(px, py) - 1.0
    if shape == 'square':
        return np.maximum(np.abs(px), np.abs(py)) - 0.8
    if shape == 'semicircle':
        return np.maximum(np.hypot(px, py + 0.4) - 1.0, -(py + 0.4))
    if shape == 'triangle':  # equilateral: three half-planes
        return np.max([np.cos(a) * px + np.sin(a) * py for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)], 0) - 0.5
    if shape == 'cross':
        bar = lambda a, b: np.maximum(np.abs(a) - 1.0, np.abs(b) - 0.33)
        return np.minimum(bar(px, py), bar(py, px))
    if shape == 'ring':
        return np.abs(np.hypot(px, py) - 0.72) - 0.28
    raise ValueError(shape)


def synthetic_one(index, image_size, seed):
    """Image `index` of the synthetic set: (uint8 [S,S,3], caption, class id). Deterministic."""
    rng = np.random.default_rng([seed, index])
    S = image_size
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    u = (np.arange(S, dtype=np.float32) + 0.5) / S
    gx, gy = np.meshgrid(u, u)
    a = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(a) * (gx - 0.5) + np.sin(a) * (gy - 0.5))[..., None] * rng.uniform(20, 60)
    img = np.array(BACKGROUNDS[bg_name], np.float32) + grad + rng.normal(0, 5, (S, S, 3)).astype(np.float32)
    k = int(rng.integers(1, 4))
    radii = np.sort(rng.uniform(0.1, 0.3, k))[::-1]  # largest first: it names the class
    names = [c for c in COLOURS if c != bg_name]
    objects = [(r, SHAPES[rng.integers(len(SHAPES))], names[rng.integers(len(names))], rng.uniform(r, 1 - r, 2),
                rng.uniform(0, 2 * math.pi), rng.uniform(-15, 15, 3)) for r in radii]
    for r, shape, colour, (cx, cy), t, jitter in objects[::-1]:  # largest drawn last: never hidden
        dx, dy = (gx - cx) / r, (gy - cy) / r
        px, py = np.cos(t) * dx + np.sin(t) * dy, -np.sin(t) * dx + np.cos(t) * dy
        cover = np.clip(0.5 - _shape_sdf(shape, px, py) * r * S, 0, 1)[..., None]  # antialiased edge
        img = img * (1 - cover) + (np.array(COLOURS[colour]) + jitter).astype(np.float32) * cover
    objects = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for _, s, c, _, _, _ in objects]
    desc = objects[0] if k == 1 else ', '.join(objects[:-1]) + ' and ' + objects[-1]
    caption = f'{desc} on a {bg_name} background'
    cls = SHAPES.index(objects[0].split()[-1])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), caption, cls


def synthetic(count, image_size=32, seed=0, start=0):
    """The built-in synthetic dataset: images [start, start+count) as a dict of
    images uint8 [n,S,S,3], captions list[str], classes int32 [n], classnames list[str]."""
    items = [synthetic_one(i, image_size, seed) for i in range(start, start + count)]
    images = np.stack([x[0] for x in items]) if items else np.zeros((0, image_size, image_size, 3), np.uint8)
    return dict(images=images, captions=[x[1] for x in items],
                classes=np.array([x[2] for x in items], np.int32), classnames=list(SHAPES))

# -----------------------------------------------------------------------------
# sources: each yields (i, key, kind, payload, caption, class) in a fixed order, so that shard
# s always holds source items [s * shard_size, (s+1) * shard_size): that is what makes resume exact


def _is_image(name):
    return name.rsplit('.', 1)[-1].lower() in IMAGE_EXTS and not posixpath.basename(name).startswith('.')


def _folder_source(root):
    classnames = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
    dirs = [(os.path.join(root, d), c) for c, d in enumerate(classnames)] or [(root, None)]
    files = []
    for d, c in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            files += [(os.path.join(dirpath, f), c) for f in sorted(filenames) if _is_image(f)]
    items = [(os.path.relpath(p, root).replace(os.sep, '/'), 'path', p, None, c) for p, c in files]
    return items, (classnames or None)


def _list_source(path):
    base, items, bad = os.path.dirname(os.path.abspath(path)), [], []
    with open(path, 'rb') as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip(b'\r\n')
            if not line.strip():
                continue
            try:
                line.decode('utf-8')
            except UnicodeDecodeError:
                bad.append(n)
            p, _, caption = line.partition(b'\t')
            p = os.fsdecode(p)  # a path is file-system bytes: non-UTF-8 names still open
            items.append((p, 'path', os.path.join(base, p), caption.decode('utf-8', 'replace'), None))
    if bad:  # decoded as tar captions are, with U+FFFD for the bad bytes
        print(f'warning: {path}: line {bad[0]}' + (f' and {len(bad) - 1} more' if len(bad) > 1 else '') +
              ' not valid UTF-8; undecodable bytes in captions replaced by U+FFFD', file=sys.stderr)
    return items


def _tar_source(paths, skip):
    """Groups consecutive members by key (webdataset: dir/key.ext), reads them in memory only.
    A truncated or corrupt tar keeps the samples read before the damage; the rest of it becomes
    one skipped item named by the tar's path, and the build goes on."""
    i = 0
    for path in paths:
        try:
            with tarfile.open(path) as tf:
                groups, key = [], None
                for m in tf:
                    if not m.isfile():
                        continue
                    d, base = posixpath.split(m.name)
                    stem, _, ext = base.partition('.')
                    k = posixpath.join(d, stem)
                    if k != key:
                        groups.append((k, {}))
                        key = k
                    groups[-1][1][ext.lower()] = m
                    if len(groups) > 1:  # a group is complete once the next key starts
                        item = _tar_item(tf, path, i, *groups.pop(0), skip(i))
                        yield item
                        i += 1
                for g in groups:
                    item = _tar_item(tf, path, i, *g, skip(i))
                    yield item
                    i += 1
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            print(f'warning: {path}: truncated or corrupt tar ({type(e).__name__}: {e}); '
                  'the rest of it is skipped', file=sys.stderr)
            reason = f'truncated or corrupt tar: {type(e).__name__}: {e}'
            yield (i, path, 'none' if skip(i) else 'bad', reason, None, None)
            i += 1


def _tar_item(tf, path, i, key, members, skipped):
    key = f'{path}:{key}'
    img = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if skipped:
        return (i, key, 'none', None, None, None)
    data = tf.extractfile(img).read() if img is not None else None
    caption = tf.extractfile(members['txt']).read().decode('utf-8', 'replace') if 'txt' in members else None
    return (i, key, 'bytes' if img is not None else 'missing', data, caption, None)


def _open_source(src):
    """-> (type, items (list or None), tar paths (or None), classnames, has_text)"""
    if src == 'synthetic':
        return 'synthetic', None, None, list(SHAPES), True
    if os.path.isdir(src):
        items, classnames = _folder_source(src)
        return 'folder', items, None, classnames, False
    if src.endswith('.tar') or any(ch in src for ch in '*?['):
        paths = sorted(glob.glob(src))
        if not paths:
            raise ValueError(f'--src={src}: no tar file matches')
        return 'tar', None, paths, None, True
    if os.path.isfile(src):
        return 'list', _list_source(src), None, None, True
    raise ValueError(f'--src={src}: not an image folder, a tar file or glob, a path<TAB>caption list, or "synthetic"')

# -----------------------------------------------------------------------------
# worker: one source item -> (i, key, image or None, tokens or None, class, skip reason or None)

_worker = {}


def _init_worker(image_size, max_pixels, seed, has_text, pool=True):
    _worker.update(image_size=image_size, max_pixels=max_pixels, seed=seed, has_text=has_text)
    Image.MAX_IMAGE_PIXELS = max_pixels
    if pool:
        torch.set_num_threads(1)  # parallelism comes from the processes


def _process(item):
    i, key, kind, payload, caption, cls = item
    S = _worker['image_size']
    try:
        if kind == 'synthetic':
            img, caption, cls = synthetic_one(payload, S, _worker['seed'])
        else:
            if kind in ('missing', 'bad'):
                raise Skip(payload if kind == 'bad' else 'missing')
            if kind == 'path':
                try:
                    with open(payload, 'rb') as f:
                        payload = f.read()
                except OSError as e:
                    raise Skip('missing' if isinstance(e, FileNotFoundError) else f'unreadable: {e}')
            if _worker['has_text'] and not (caption or '').strip():
                raise Skip('empty caption')
            img = decode(payload, S, _worker['max_pixels'])
        tokens = tokenize([caption])[0].astype(np.uint16) if _worker['has_text'] else None
        return i, key, img, tokens, cls, None
    except Skip as e:
        return i, key, None, None, cls, str(e)

# -----------------------------------------------------------------------------
# shard writer


def _atomic_json(path, obj):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f)
    os.replace(path + '.tmp', path)


def _atomic_npy(path, arr):
    with open(path + '.tmp', 'wb') as f:
        np.save(f, arr)
    os.replace(path + '.tmp', path)


class _ImageShard:
    """Streams rows into images_XXXXX.npy.tmp (memory stays at one row); the .npy header is
    rewritten with the final row count (numpy pads it for this) and the file renamed into place."""

    def __init__(self, path, image_size):
        self.path, self.n, self.S = path, 0, image_size
        self.f = open(path + '.tmp', 'wb')
        self.header_len = self._header()

    def _header(self):
        self.f.seek(0)
        np.lib.format.write_array_header_1_0(self.f, {'descr': '|u1', 'fortran_order': False, 'shape': (self.n, self.S, self.S, 3)})
        return self.f.tell()

    def write(self, img):
        self.f.write(img.tobytes())
        self.n += 1

    def close(self):
        assert self._header() == self.header_len  # same length, so the rows are untouched
        self.f.close()
        os.replace(self.path + '.tmp', self.path)


def _clear(out):
    for p in glob.glob(os.path.join(out, '*')):
        base = os.path.basename(p)
        if re.fullmatch(r'(images|texts|shard)_\d+\.(npy|json)(\.tmp)?|(classes\.npy|meta\.json|build\.json|data\.json)(\.tmp)?', base):
            os.remove(p)


def build(src, out, image_size=224, count=10000, seed=0, shard_size=10000, workers=None, overwrite=False,
          max_pixels=Image.MAX_IMAGE_PIXELS, progress=True):
    """Write the shards of `src` into `out` and return meta. Resumes an interrupted build of the
    same settings; refuses to touch a finished one unless overwrite=True."""
    from tqdm import tqdm
    workers = workers or len(os.sched_getaffinity(0))
    kind, items, tars, classnames, has_text = _open_source(src)
    params = dict(src=src, image_size=image_size, shard_size=shard_size, max_pixels=max_pixels,
                  **(dict(count=count, seed=seed) if kind == 'synthetic' else {}))
    os.makedirs(out, exist_ok=True)
    state_path, meta_path = os.path.join(out, 'build.json'), os.path.join(out, 'meta.json')
    if os.path.exists(meta_path) or os.path.exists(state_path):
        if overwrite:
            _clear(out)
        elif os.path.exists(meta_path):
            raise ValueError(f'{meta_path} exists: {out} holds a finished dataset; pass --overwrite=True to rebuild it')
        elif json.load(open(state_path)) != params:
            raise ValueError(f'{out} holds an unfinished build with other settings ({state_path}: '
                             f'{json.load(open(state_path))}); pass --overwrite=True to start over')
    _atomic_json(state_path, params)

    # shards that an interrupted run finished are kept (their record is written last)
    done = {}
    for p in glob.glob(os.path.join(out, 'shard_*.json')):
        done[int(os.path.basename(p)[6:-5])] = json.load(open(p))
    skip = lambda i: i // shard_size in done
    if kind == 'synthetic':
        total = count
        stream = ((i, str(i), 'synthetic', i, None, None) for i in range(count) if not skip(i))
    elif kind == 'tar':
        total = None
        stream = (it for it in _tar_source(tars, skip) if it[2] != 'none')
    else:
        total = len(items)
        stream = ((i,) + it for i, it in enumerate(items) if not skip(i))
    if total == 0:
        raise ValueError(f'--src={src}: no images found')
    if has_text:
        _tokenizer()  # load once here, so forked workers inherit it

    def finish(s, shard, texts, classes, skipped, n_items):
        shard.close()
        if has_text:
            _atomic_npy(os.path.join(out, f'texts_{s:05d}.npy'), np.array(texts, np.uint16).reshape(-1, 77))
        done[s] = dict(count=shard.n, items=n_items, skipped=skipped,
                       classes=classes if classnames is not None else None)
        _atomic_json(os.path.join(out, f'shard_{s:05d}.json'), done[s])

    # ordered results, with at most `bound` items in flight, so that memory stays bounded even
    # when the source streams bytes out of tar files faster than the workers decode them
    bound = threading.BoundedSemaphore(workers * 64)

    def bounded(it):
        for x in it:
            bound.acquire()
            yield x

    t0, n_new = time.time(), 0
    init = (image_size, max_pixels, seed, has_text)
    pool = multiprocessing.Pool(workers, _init_worker, init) if workers > 1 else None
    try:
        if pool:
            results = pool.imap(_process, bounded(stream), chunksize=16)
        else:
            _init_worker(*init, pool=False)
            results = map(_process, stream)
        cur = None
        bar = tqdm(total=total, initial=sum(d['items'] for d in done.values()), disable=not progress,
                   desc=f'data {os.path.basename(out.rstrip("/"))}', unit='img')
        for i, key, img, tokens, cls, reason in results:
            if pool:
                bound.release()
            s = i // shard_size
            if cur is None or s != cur[0]:
                if cur is not None:
                    finish(*cur)
                cur = (s, _ImageShard(os.path.join(out, f'images_{s:05d}.npy'), image_size), [], [], [], 0)
            s, shard, texts, classes, skipped, n_items = cur
            if reason is None:
                shard.write(img)
                if has_text:
                    texts.append(tokens)
                classes.append(cls)
                n_new += 1
            else:
                skipped.append([key, reason])
            cur = (s, shard, texts, classes, skipped, n_items + 1)
            bar.update(1)
        if cur is not None:
            finish(*cur)
        bar.close()
    finally:
        if pool:
            pool.terminate()
            pool.join()

    # every shard is on disk: classes.npy, then meta.json last (its presence means "finished")
    order = sorted(done)
    assert order == list(range(len(order))), f'missing shard records in {out}'
    count_all = sum(done[s]['count'] for s in order)
    if count_all == 0:
        raise ValueError(f'--src={src}: none of the {sum(done[s]["items"] for s in order)} items could be read '
                         f'(first: {next((d["skipped"][0] for d in done.values() if d["skipped"]), None)})')
    if classnames is not None:
        _atomic_npy(os.path.join(out, 'classes.npy'), np.concatenate([np.array(done[s]['classes'], np.int32) for s in order]))
    skipped = [x for s in order for x in done[s]['skipped']]
    reasons = {}
    for _, r in skipped:
        reasons[r.split(':')[0]] = reasons.get(r.split(':')[0], 0) + 1
    meta = dict(count=count_all, image_size=image_size, has_text=has_text, classnames=classnames,
                source=src, source_type=kind, context_length=77 if has_text else None,
                shards=[dict(images=f'images_{s:05d}.npy', texts=f'texts_{s:05d}.npy' if has_text else None,
                             count=done[s]['count']) for s in order if done[s]['count']],  # all-skipped shards left out
                skipped=dict(count=len(skipped), reasons=reasons, items=skipped),
                build=dict(params, seconds=round(time.time() - t0, 3), images_per_s=round(n_new / max(time.time() - t0, 1e-9), 1)))
    _atomic_json(meta_path, meta)
    for s in order:
        for f in [f'shard_{s:05d}.json'] + ([f'images_{s:05d}.npy', f'texts_{s:05d}.npy'] if not done[s]['count'] else []):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    os.remove(state_path)
    return meta

# -----------------------------------------------------------------------------
# reading


def _npy_header(path):
    """(shape, dtype) from a .npy file's header, checked against the file's size; ValueError naming
    the file if it is missing, not a .npy file or shorter than its header says."""
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran, dtype = read[version](f)
            offset = f.tell()
    except FileNotFoundError:
        raise ValueError(f'{path}: missing')
    except Exception as e:
        raise ValueError(f'{path}: not a readable .npy file ({os.path.getsize(path)} bytes: '
                         f'{type(e).__name__}: {e})'.replace('\n', ' '))
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if size < need:
        raise ValueError(f'{path}: truncated: {size} bytes, its header says {dtype} {list(shape)} '
                         f'({need} bytes)')
    if fortran:
        raise ValueError(f'{path}: Fortran-ordered array, expected C order')
    return tuple(shape), dtype


class Dataset:
    """A built dataset directory; images are read straight from memory-mapped shards. Opening it
    checks meta.json and every shard's .npy header (shape, dtype, file size) once."""

    def __init__(self, data_dir):
        path = os.path.join(data_dir, 'meta.json')
        if not os.path.exists(path):
            raise ValueError(f'{data_dir}: no meta.json (build it with: python data.py --src=... --out={data_dir})')
        self.dir = data_dir
        try:
            with open(path, encoding='utf-8') as f:
                self.meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f'{path}: invalid JSON ({e})')
        self._check(path)
        self.image_size = self.meta['image_size']
        self.classnames = self.meta.get('classnames')
        cp = os.path.join(data_dir, 'classes.npy')
        self.classes = None
        if os.path.exists(cp):
            shape, dtype = _npy_header(cp)
            if shape != (self.meta['count'],) or dtype.kind not in 'iu':
                raise ValueError(f'{cp}: {dtype} {list(shape)}, but {path} says {self.meta["count"]} images '
                                 f'(expected int32 [{self.meta["count"]}])')
            self.classes = np.load(cp)
        self.offsets = np.cumsum([0] + [s['count'] for s in self.meta['shards']])
        self._mm = {}  # opened on first use: a process only maps the shards it reads

    def _check(self, path):
        m = self.meta
        if not isinstance(m, dict):
            raise ValueError(f'{path}: expected a JSON object')
        for k in ('count', 'image_size', 'shards'):
            if k not in m:
                raise ValueError(f'{path}: missing key {k!r}')
        S, ctx = m['image_size'], m.get('context_length') or 77
        if not isinstance(S, int) or S < 1 or not isinstance(m['shards'], list):
            raise ValueError(f'{path}: image_size must be a positive integer and shards a list')
        total = 0
        for k, s in enumerate(m['shards']):
            if not isinstance(s, dict) or not isinstance(s.get('count'), int) or not s.get('images'):
                raise ValueError(f'{path}: shards[{k}] needs "images" and an integer "count"')
            kinds = [('images', np.uint8, (s['count'], S, S, 3))]
            if m.get('has_text'):
                kinds.append(('texts', np.uint16, (s['count'], ctx)))
            for kind, dtype, want in kinds:
                f = os.path.join(self.dir, str(s.get(kind)))
                shape, got = _npy_header(f)
                if shape != want or got != dtype:
                    raise ValueError(f'{f}: {got} {list(shape)}, but {path} says '
                                     f'{np.dtype(dtype)} {list(want)}')
            total += s['count']
        if total != m['count']:
            raise ValueError(f'{path}: count is {m["count"]} but its shards hold {total} images')

    def __len__(self):
        return int(self.offsets[-1])

    def _shard(self, kind, s):
        if (kind, s) not in self._mm:
            self._mm[kind, s] = np.load(os.path.join(self.dir, self.meta['shards'][s][kind]), mmap_mode='r')
        return self._mm[kind, s]

    def _gather(self, kind, idx, out):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f'{self.dir}: index out of range [0, {len(self)})')
        order = np.argsort(idx, kind='stable')  # read in file order, place in the order asked
        sidx = idx[order]
        shard = np.searchsorted(self.offsets, sidx, side='right') - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[order[sel]] = self._shard(kind, s)[sidx[sel] - self.offsets[s]]
        return out

    def images(self, idx, out=None):
        """uint8 [n, S, S, 3] for indices in any order; `out` may be a (pinned) buffer to fill."""
        n = np.asarray(idx).size
        out = np.empty((n, self.image_size, self.image_size, 3), np.uint8) if out is None else out
        return self._gather('images', idx, out)

    def texts(self, idx):
        """int64 [n, 77] CLIP token ids."""
        if not self.meta.get('has_text'):
            raise ValueError(f'{self.dir}: this dataset has no texts')
        out = np.empty((np.asarray(idx).size, self.meta.get('context_length') or 77), np.uint16)
        return self._gather('texts', idx, out).astype(np.int64)

# -----------------------------------------------------------------------------
# augmentation. Per-sample parameters are drawn on the host from a seeded generator: a crop box
# (cx, cy, w, h as fractions of the stored image, on whole pixels), a flip and optionally colour
# factors. The same parameters are applied in one of two ways that give the same image up to
# rounding: on a CPU in uint8 (crop, antialiased resize, flip by index reversal, then conversion
# to normalised float), elsewhere as one batched grid_sample on the device.

AUGMENTS = ('rrc', 'pad_crop', 'flip', 'none')


def crop_params(n, generator, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), attempts=10, size=None):
    """RandomResizedCrop boxes as fractions of the image: [n, 4] (cx, cy, w, h), and flips [n] bool.
    Area fraction ~ U(scale), log aspect ~ U(log ratio); the first of `attempts` draws that fits
    is used, else the whole image (the torchvision recipe). With `size`, w and h are rounded to
    whole pixels of a size x size image and the box is placed at a uniform whole-pixel offset, as
    torchvision's get_params does; without, the box is continuous."""
    s = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w, h = torch.sqrt(s * torch.exp(logr)), torch.sqrt(s / torch.exp(logr))
    if size:
        w, h = torch.round(w * size) / size, torch.round(h * size) / size
    ok = (w <= 1) & (h <= 1) & (w > 0) & (h > 0)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)
    w = torch.where(ok.any(1), w.gather(1, first)[:, 0], torch.ones(n))
    h = torch.where(ok.any(1), h.gather(1, first)[:, 0], torch.ones(n))
    u = torch.rand(n, 3, generator=generator)
    if size:  # offsets uniform over {0, ..., size - w}, in pixels
        wp, hp = torch.round(w * size), torch.round(h * size)
        x0 = torch.minimum(torch.floor(u[:, 0] * (size - wp + 1)), size - wp)
        y0 = torch.minimum(torch.floor(u[:, 1] * (size - hp + 1)), size - hp)
        cx, cy = (x0 + wp / 2) / size, (y0 + hp / 2) / size
    else:
        cx, cy = w / 2 + (1 - w) * u[:, 0], h / 2 + (1 - h) * u[:, 1]
    return torch.stack([cx, cy, w, h], 1), u[:, 2] < 0.5


def pad_params(n, generator, size, pad):
    """Reflect-pad by `pad` pixels, crop size x size at a uniform offset, flip (the CIFAR recipe):
    boxes [n, 4] of the whole image shifted by whole pixels in [-pad, pad], and flips [n] bool."""
    o = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).float() - pad
    flip = torch.rand(n, generator=generator) < 0.5
    one = torch.ones(n)
    return torch.stack([0.5 + o[:, 0] / size, 0.5 + o[:, 1] / size, one, one], 1), flip


def color_params(n, generator, strength):
    """SimCLR's colour distortion at strength s: with probability 0.8 brightness, contrast and
    saturation factors ~ U(max(0, 1 - 0.8s), 1 + 0.8s) and a hue shift ~ U(-0.2s, 0.2s) (else the
    identity 1, 1, 1, 0), and grayscale with probability 0.2: [n, 5] (b, c, s, hue, gray 0/1)."""
    u = torch.rand(n, 6, generator=generator)
    lo, hi = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    on = (u[:, 0] < 0.8)[:, None]
    bcs = torch.where(on, lo + (hi - lo) * u[:, 1:4], torch.ones(n, 3))
    hue = torch.where(on[:, 0], (2 * u[:, 4] - 1) * min(0.2 * strength, 0.5), torch.zeros(n))
    return torch.cat([bcs, hue[:, None], (u[:, 5] < 0.2).float()[:, None]], 1)


def _gray(x):
    # ITU-R 601 luma, torchvision's rgb_to_grayscale weights; [B,3,H,W] -> [B,1,H,W]
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_shift(x, hue):
    """Rotate the hue of x [B,3,H,W] (any scale >= 0) by hue [B] turns, through HSV."""
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    s = c / torch.where(v > 0, v, torch.ones_like(v))
    r, g, b = ((v[:, None] - x) / torch.where(c > 0, c, torch.ones_like(c))[:, None]).unbind(1)
    h = torch.where(x[:, 0] == v, b - g, torch.where(x[:, 1] == v, 2 + r - b, 4 + g - r))
    h = torch.remainder(h / 6 + hue.view(-1, 1, 1), 1.0) * 6  # sector position in [0, 6)
    # HSV -> RGB: channel n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h[:, None], 6)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x, params):
    """x float [B,3,H,W] in 0..255, params [B,5] from color_params -> distorted x. torchvision's
    ColorJitter operations (brightness, contrast, saturation, hue) in this fixed order, then
    RandomGrayscale; each op with its factor 1 (hue 0) leaves the image unchanged."""
    f = params.to(x.device, x.dtype)
    b, c, s = (f[:, k].view(-1, 1, 1, 1) for k in range(3))
    x = (x * b).clamp_(0, 255)
    x = (c * x + (1 - c) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp_(0, 255)
    x = (s * x + (1 - s) * _gray(x)).clamp_(0, 255)
    if (f[:, 3] != 0).any():
        x = _hue_shift(x, f[:, 3])
    return torch.where(f[:, 4].view(-1, 1, 1, 1) > 0.5, _gray(x).expand_as(x), x)


def _pixel_boxes(boxes, H, W):
    """Fractions -> whole pixels: int64 [n, 4] (x0, y0, w, h)."""
    w, h = torch.round(boxes[:, 2] * W), torch.round(boxes[:, 3] * H)
    x0, y0 = torch.round(boxes[:, 0] * W - w / 2), torch.round(boxes[:, 1] * H - h / 2)
    return torch.stack([x0, y0, w, h], 1).long()


def _reflect(i, n):
    # numpy's 'reflect' padding as an index map: -1 -> 1, n -> n - 2 (for pads < n)
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def crop_resize_cpu(u8, boxes, flip, size, norm=True):
    """The CPU path: uint8 [B,H,W,3] -> float [B,3,size,size], CLIP-normalised (0..255 with
    norm=False). Each box is cut out on whole pixels (reflected where it leaves the image), resized
    with PyTorch's antialiased bilinear uint8 kernel (plain bilinear when enlarging, a triangle
    filter over the box when shrinking), mirrored by reversing its columns, and converted to float
    while it is in cache. Image by image: the boxes differ in size, and uint8 is what is fast here."""
    u8 = torch.as_tensor(u8)
    B, H, W, _ = u8.shape
    out = torch.empty((B, 3, size, size), dtype=torch.float32)
    scale, bias = (c[0] for c in _norm_consts('cpu'))
    for i, ((x0, y0, w, h), f) in enumerate(zip(_pixel_boxes(boxes, H, W).tolist(), flip.tolist())):
        if x0 >= 0 and y0 >= 0 and x0 + w <= W and y0 + h <= H:
            crop = u8[i, y0:y0 + h, x0:x0 + w]
        else:
            rows, cols = _reflect(torch.arange(y0, y0 + h), H), _reflect(torch.arange(x0, x0 + w), W)
            crop = u8[i][rows[:, None], cols[None, :]]
        crop = crop.permute(2, 0, 1)  # [3, h, w] view, channels-last strides (the fast kernel's layout)
        if (h, w) != (size, size):
            crop = F.interpolate(crop[None], size=(size, size), mode='bilinear', antialias=True,
                                 align_corners=False)[0]
        out[i].copy_(crop.flip(2) if f else crop)
        if norm:
            out[i].mul_(scale).add_(bias)
    return out


def resized_crop(x, boxes, flip, size):
    """The device path: x float [B,C,H,W]; boxes [B,4] (cx, cy, w, h) fractions; flip [B] bool ->
    [B,C,size,size], crop-then-resize (bilinear, align_corners=False) of the whole batch as one
    grid_sample. Output pixel j samples source position x0 + (j + 1/2) w / size - 1/2 (pixel units,
    mirrored when flipped), clamped to the box's outer pixel centres as a resize of the cut-out box
    is; positions outside the image are reflected about its edge pixels (numpy's 'reflect' pad).
    The transform is axis-aligned, so the grid is built from two [B, size] vectors."""
    B, _, H, W = x.shape
    j = torch.arange(size, dtype=torch.float64) + 0.5

    def axis(c, w, n):  # [B] centres and widths (fractions) -> [B, size] normalised positions
        lo, width = (c.double() - w.double() / 2) * n, w.double() * n
        p = lo[:, None] + j * (width / size)[:, None] - 0.5
        p = torch.minimum(torch.maximum(p, lo[:, None]), (lo + width - 1)[:, None])
        return p * (2 / max(n - 1, 1)) - 1  # align_corners=True: -1 and 1 are the edge pixel centres

    gx = axis(boxes[:, 0], boxes[:, 2], W)
    gx = torch.where(flip[:, None], gx.flip(1), gx)
    gy = axis(boxes[:, 1], boxes[:, 3], H)
    gx, gy = gx.to(x.device, x.dtype), gy.to(x.device, x.dtype)
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=True)


def _norm_consts(device):
    # x / 255 normalised by CLIP mean/std  ==  x * scale + bias
    mean, std = torch.tensor(CLIP_MEAN, dtype=torch.float64), torch.tensor(CLIP_STD, dtype=torch.float64)
    return (1 / (255 * std)).float().view(1, 3, 1, 1).to(device), (-mean / std).float().view(1, 3, 1, 1).to(device)


def normalize(x):
    """float [B,3,H,W] in 0..255 -> CLIP-normalised."""
    scale, bias = _norm_consts(x.device)
    return x.mul(scale).add_(bias)


def resize(x, size):
    """float [B,3,H,W] 0..255 -> [B,3,size,size], bicubic antialiased (no-op at the stored size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode='bicubic', antialias=True, align_corners=False).clamp_(0, 255)


def to_float(u8, device, norm=True):
    """uint8 numpy/tensor [B,H,W,3] -> float [B,3,H,W] on device (non-blocking from pinned memory),
    CLIP-normalised unless norm=False. In-place ops on one contiguous buffer: on a CPU this is
    several times faster than the out-of-place broadcasting expression."""
    x = torch.as_tensor(u8)
    x = x.to(device, non_blocking=x.is_pinned())
    B, H, W, _ = x.shape
    out = torch.empty((B, 3, H, W), dtype=torch.float32, device=x.device).copy_(x.permute(0, 3, 1, 2))
    if norm:
        scale, bias = _norm_consts(x.device)
        out.mul_(scale).add_(bias)
    return out


def _plain(u8, device, size, norm=True):
    """The evaluation transform: normalised (unless norm=False), resized only if the stored size differs."""
    if u8.shape[1] == size and u8.shape[2] == size:
        return to_float(u8, device, norm)
    x = resize(to_float(u8, device, norm=False), size)
    return normalize(x) if norm else x


def _seed(*xs):
    return int(np.random.SeedSequence(list(xs)).generate_state(1, np.uint64)[0] >> 1)


_running = set()  # (stop event, thread) of every live prefetcher


@atexit.register
def _stop_prefetchers():
    # A generator left unfinished (training ends mid-epoch) is only closed when the interpreter
    # tears down, and a worker thread still inside a torch op at that point aborts the process
    # ("terminate called without an active exception"): stop and join the workers first.
    for stop, thread in list(_running):
        stop.set()
        thread.join()


def _prefetch(fn, args, depth):
    """Yields fn(a) for a in args, computed `depth` ahead in a background thread."""
    q, stop = queue.Queue(depth), threading.Event()

    def put(x):
        while not stop.is_set():
            try:
                return q.put(x, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            for a in args:
                if stop.is_set():
                    return
                put((0, fn(a)))
            put((1, None))
        except BaseException as e:  # re-raised in the consumer
            put((2, e))

    thread = threading.Thread(target=work, daemon=True)
    _running.add((stop, thread))
    thread.start()
    try:
        while True:
            kind, x = q.get()
            if kind == 1:
                return
            if kind == 2:
                raise x
            yield x
    finally:
        stop.set()
        thread.join()
        _running.discard((stop, thread))


class Loader:
    """Training batches. Step `step` of epoch `epoch` takes global batch `step` of a permutation
    seeded by (seed, epoch); rank r gets its slice [r*B, (r+1)*B). Augmentation randomness is
    seeded by (seed, epoch, step, rank), so batch(epoch, step) is a pure function: resuming at a
    step gives exactly the batches an uninterrupted run would have seen.

    augment: 'rrc' (random resized crop, area ~ U(scale), aspect ~ U(ratio), + flip), 'pad_crop'
    (reflect-pad by `pad` pixels, random crop back to the stored size, + flip), 'flip', 'none';
    True / False mean 'rrc' / 'none'. views: V independently augmented views of each image.
    color_jitter: SimCLR colour distortion strength (0 = off), applied after the crop.
    A batch is dict(images, aug, labels, texts, index): images float [B,3,S,S] (views=1) or
    [V,B,3,S,S] (views=V > 1, view v of image b at [v, b]), CLIP-normalised; aug float [V,B,5]
    (cx, cy, w, h of the crop box as fractions of the stored image, flip 0/1) or [V,B,10] with
    colour (+ brightness, contrast, saturation, hue, grayscale 0/1), the parameters applied."""

    def __init__(self, data_dir, batch_size, image_size, labels=None, with_text=False, rank=0, world_size=1,
                 seed=0, augment=True, device='cpu', scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), prefetch=4,
                 pad=4, views=1, color_jitter=0.0):
        self.ds = Dataset(data_dir)
        self.batch_size, self.image_size, self.labels = batch_size, image_size, labels
        self.with_text, self.rank, self.world_size, self.seed = with_text, rank, world_size, seed
        self.device, self.scale, self.ratio, self.prefetch = torch.device(device), scale, ratio, prefetch
        self.augment = ('rrc' if augment else 'none') if isinstance(augment, bool) else augment
        self.pad, self.views, self.color_jitter = pad, views, color_jitter
        if self.augment not in AUGMENTS:
            raise ValueError(f'augment={augment!r}: expected one of {", ".join(AUGMENTS)} (or True / False)')
        if self.augment == 'pad_crop' and not 0 <= pad < self.ds.image_size:
            raise ValueError(f'pad={pad}: reflect padding needs 0 <= pad < the stored size '
                             f'{self.ds.image_size}')
        if views < 1 or color_jitter < 0:
            raise ValueError(f'views={views}, color_jitter={color_jitter}: need views >= 1 and '
                             'color_jitter >= 0')
        if labels is not None and len(labels) != len(self.ds):
            raise ValueError(f'labels have {len(labels)} rows, dataset {data_dir} has {len(self.ds)} images')
        if with_text and not self.ds.meta.get('has_text'):
            raise ValueError(f'{data_dir}: with_text=True but this dataset has no texts')
        self.steps_per_epoch = len(self.ds) // (batch_size * world_size)  # drop the incomplete last global batch
        if self.steps_per_epoch == 0:
            raise ValueError(f'{data_dir}: {len(self.ds)} images < one global batch ({batch_size} x {world_size})')
        _warn_upsampling(data_dir, self.ds.image_size, image_size)
        # grid_sample on an accelerator; on a CPU the uint8 path is faster (bench/bench_loader.py)
        self._grid = self.device.type != 'cpu'
        self._perm = (None, None)

    def indices(self, epoch, step):
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f'step {step} outside [0, {self.steps_per_epoch})')
        e, perm = self._perm
        if e != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
            self._perm = (epoch, perm)
        start = (step * self.world_size + self.rank) * self.batch_size
        return perm[start:start + self.batch_size]

    def params(self, n, generator):
        """One view's augmentation parameters: float [n, 5] (cx, cy, w, h, flip) or [n, 10] with colour."""
        S = self.ds.image_size
        if self.augment == 'rrc':
            boxes, flip = crop_params(n, generator, self.scale, self.ratio, size=S)
        elif self.augment == 'pad_crop':
            boxes, flip = pad_params(n, generator, S, self.pad)
        else:
            boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(n, 1)
            flip = (torch.rand(n, generator=generator) < 0.5 if self.augment == 'flip'
                    else torch.zeros(n, dtype=torch.bool))
        out = [boxes, flip.float()[:, None]]
        if self.color_jitter:
            out.append(color_params(n, generator, self.color_jitter))
        return torch.cat(out, 1)

    def view(self, u8, x, aug):
        """One augmented view, CLIP-normalised, from the uint8 batch (CPU path) or its float copy
        on the device (x, 0..255 or normalised; grid path)."""
        jitter = aug.shape[1] > 5
        if self.augment == 'none':
            y = _plain(u8, self.device, self.image_size, norm=not jitter)
        elif self._grid:  # exact on normalised input too: the weights of each sample sum to one
            y = resized_crop(x, aug[:, :4], aug[:, 4] > 0.5, self.image_size)
        else:
            y = crop_resize_cpu(u8, aug[:, :4], aug[:, 4] > 0.5, self.image_size, norm=not jitter)
        return normalize(color_jitter(y, aug[:, 5:])) if jitter else y

    def batch(self, epoch, step):
        idx = self.indices(epoch, step)
        pin = self.device.type == 'cuda'
        buf = torch.empty((len(idx), self.ds.image_size, self.ds.image_size, 3), dtype=torch.uint8, pin_memory=pin)
        self.ds.images(idx, out=buf.numpy())
        # all views from one generator, view after view: view 0 is the batch that views=1 gives
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, step, self.rank))
        aug = torch.stack([self.params(len(idx), g) for _ in range(self.views)])  # [V, B, p]
        x = None
        if self._grid and self.augment != 'none':  # uint8 to the device once, for all views
            x = to_float(buf, self.device, norm=not self.color_jitter)
        views = [self.view(buf, x, a) for a in aug]
        images = views[0] if self.views == 1 else torch.stack(views)
        out = dict(images=images, aug=aug.to(self.device), labels=None, texts=None,
                   index=torch.from_numpy(idx.astype(np.int64)))
        if self.labels is not None:
            order = np.argsort(idx)
            rows = np.empty((len(idx),) + tuple(self.labels.shape[1:]), np.int64)
            rows[order] = self.labels[idx[order]]
            out['labels'] = torch.from_numpy(rows).to(self.device, non_blocking=pin)
        if self.with_text:
            out['texts'] = torch.from_numpy(self.ds.texts(idx)).to(self.device, non_blocking=pin)
        return out

    def iterate(self, epoch, start_step=0):
        """batch(epoch, s) for s in [start_step, steps_per_epoch), prepared in a background thread."""
        return _prefetch(lambda s: self.batch(epoch, s), range(start_step, self.steps_per_epoch), self.prefetch)


_warned = set()


def _warn_upsampling(data_dir, stored, size):
    # a model size above the stored one silently trains on blurred pixels: say so, once
    key = (os.path.abspath(data_dir), stored, size)
    if size > stored and key not in _warned:
        _warned.add(key)
        print(f'warning: {data_dir} stores {stored}x{stored} images; image_size={size} upsamples them '
              f'(rebuild the shards at image_size >= {size} for real detail)', file=sys.stderr)


def eval_batches(data_dir, batch_size, image_size, rank=0, world_size=1, device='cpu', prefetch=4):
    """Evaluation order, no augmentation: rank r reads its contiguous slice
    [start_r, start_r + n_r), n_r = N // W + (r < N % W). Yields (index int64 [b], images [b,3,S,S])."""
    ds = Dataset(data_dir)
    _warn_upsampling(data_dir, ds.image_size, image_size)
    N = len(ds)
    n, start = N // world_size + (rank < N % world_size), rank * (N // world_size) + min(rank, N % world_size)
    device = torch.device(device)

    def load(a):
        idx = np.arange(a, min(a + batch_size, start + n))
        buf = torch.empty((len(idx), ds.image_size, ds.image_size, 3), dtype=torch.uint8, pin_memory=device.type == 'cuda')
        ds.images(idx, out=buf.numpy())
        return torch.from_numpy(idx), _plain(buf, device, image_size)

    return _prefetch(load, range(start, start + n, batch_size), prefetch)

# -----------------------------------------------------------------------------


if __name__ == '__main__':
    # settings, overridden by --key=value (the module's UPPER_CASE constants are not settings)
    src = 'synthetic'       # image folder (class sub-folders), tar file/glob, path<TAB>caption list, or 'synthetic'
    out = 'data/synthetic'  # output directory
    image_size = 224        # stored side: shorter side resized to this, centre-cropped
    count = 10000           # synthetic only: number of images
    seed = 0                # synthetic only
    shard_size = 10000      # source items per shard file (bounded memory, resume granularity)
    workers = 0             # decoding processes (0: one per CPU core)
    overwrite = False       # rebuild a finished output
    max_pixels = Image.MAX_IMAGE_PIXELS  # larger images are skipped (decompression bombs)
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    try:
        meta = build(src, out, image_size=image_size, count=count, seed=seed, shard_size=shard_size,
                     workers=workers or None, overwrite=overwrite, max_pixels=max_pixels)
    except ValueError as e:
        raise SystemExit(str(e))
    result = dict(out=out, count=meta['count'], shards=len(meta['shards']), image_size=meta['image_size'],
                  has_text=meta['has_text'], classes=len(meta['classnames']) if meta['classnames'] else None,
                  skipped=meta['skipped']['count'], skipped_reasons=meta['skipped']['reasons'],
                  seconds=meta['build']['seconds'], images_per_s=meta['build']['images_per_s'])
    print(json.dumps(result))
    _atomic_json(os.path.join(out, 'data.json'), result)
