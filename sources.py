"""
What prepare.py reads: a source (an image folder, a path<TAB>caption list, tar files named by a
glob, a brace range or a '::' list, the synthetic set) as items in a fixed order, and each image
decoded to upright RGB, its shorter side resized to the stored size and centre-cropped. Tar
members are read in memory by their keys, never extracted; images past max_pixels are skipped.
"""
import glob
import io
import itertools
import json
import os
import posixpath
import re
import sys
import tarfile
import zlib

import numpy as np
from PIL import Image, ImageOps

from synthetic import SHAPES

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')

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
        box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)  # centre square, source pixels
        # one bicubic resampling of it to S x S (PIL's resize is antialiased when shrinking)
        im = im.resize((image_size, image_size), Image.BICUBIC, box=box)
        return np.asarray(im, dtype=np.uint8)
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip(f'too large: {e}')
    except Exception as e:  # corrupt, truncated, unknown format
        raise Skip(f'unreadable: {type(e).__name__}: {e}')

# -----------------------------------------------------------------------------
# sources: each yields (i, key, kind, payload, caption, class) in a fixed order, so that shard
# s always holds source items [s * shard_size, (s+1) * shard_size): that is what makes resume exact


def _is_image(name):
    ext = name.rsplit('.', 1)[-1].lower()
    return ext in IMAGE_EXTS and not posixpath.basename(name).startswith('.')


def _folder_source(root):
    classnames = sorted(d for d in os.listdir(root)
                        if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
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
            caption = caption.decode('utf-8', 'replace')
            items.append((p, 'path', os.path.join(base, p), caption, None))
    if bad:  # decoded as tar captions are, with U+FFFD for the bad bytes
        more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
        print(f'warning: {path}: line {bad[0]}{more} not valid UTF-8; undecodable bytes in '
              'captions replaced by U+FFFD', file=sys.stderr)
    return items


def expand_braces(pattern):
    """Yields the names of a shell-style brace pattern, as webdataset / open_clip read shard lists
    (bash rules): 'a{1,2}b', '{00000..41455}' (zero-padded: every name as wide as the widest
    end), '{a..e}', '{0..10..2}', several and nested braces. A brace without ',' or '..' is
    literal."""
    start = pattern.find('{')
    if start < 0:
        yield pattern
        return
    depth, cuts = 0, [start]
    for j in range(start, len(pattern)):
        ch = pattern[j]
        depth += (ch == '{') - (ch == '}')
        if depth == 1 and ch == ',':
            cuts.append(j)
        if depth == 0:
            break
    else:
        raise ValueError(f'unbalanced braces in {pattern}')
    cuts.append(j)
    body = pattern[start + 1:j]
    if len(cuts) > 2:
        alternatives = [pattern[a + 1:b] for a, b in zip(cuts, cuts[1:])]
    else:
        alternatives = _sequence(body)
    if alternatives is None:  # literal '{': expand what follows it
        for rest in expand_braces(pattern[start + 1:]):
            yield pattern[:start + 1] + rest
        return
    for a in alternatives:
        for middle in expand_braces(a):
            for rest in expand_braces(pattern[j + 1:]):
                yield pattern[:start] + middle + rest


def _sequence(body):
    """'x..y[..step]' -> iterator of the terms, or None when body is not a sequence."""
    m = re.fullmatch(r'(-?\d+|[a-zA-Z])\.\.(-?\d+|[a-zA-Z])(?:\.\.(-?\d+))?', body)
    if m is None or m[1].isalpha() != m[2].isalpha():
        return None
    x, y = (ord(v) if v.isalpha() else int(v) for v in m.group(1, 2))
    step = abs(int(m[3] or 1)) or 1
    step = step if y >= x else -step
    terms = range(x, y + (1 if step > 0 else -1), step)
    if m[1].isalpha():
        return (chr(t) for t in terms)
    padded = any(len(v.lstrip('-')) > 1 and v.lstrip('-')[0] == '0' for v in m.group(1, 2))
    width = max(len(m[1]), len(m[2])) if padded else 0
    return (f'{t:0{width}d}' for t in terms)


MAX_NAMES = 10_000_000  # a pattern that expands to more names is a typo (LAION-5B: ~600,000 tars)


def tar_paths(src):
    """--src -> (existing tar paths in the order given, missing names). src is one pattern or
    several joined by '::' (open_clip's list form); each is brace-expanded, then globbed when it
    holds * ? [. Existence is read with one directory listing per directory, not one stat per
    name (41,456 stats on a network file system take minutes)."""
    names, listings, found, missing = [], {}, [], []
    for part in src.split('::'):
        try:
            names += itertools.islice(expand_braces(part), MAX_NAMES + 1 - len(names))
        except ValueError as e:
            raise ValueError(f'--src={src}: {e}')
        if len(names) > MAX_NAMES:
            raise ValueError(f'--src={src}: expands to more than {MAX_NAMES:,} names')
    for name in names:
        if any(ch in name for ch in '*?['):
            matches = sorted(glob.glob(name))
            found += matches
            missing += [] if matches else [name]
            continue
        d, base = os.path.split(name)
        if d not in listings:
            try:
                listings[d] = set(os.listdir(d or '.'))
            except OSError:
                listings[d] = set()
        (found if base in listings[d] else missing).append(name)
    if not found:
        raise ValueError(f'--src={src}: no tar file matches (none of the {len(names):,} names '
                         f'exists; first missing: {missing[0]})')
    return found, missing


def _tar_groups(tf):
    """(key, {ext: member}) for each run of consecutive members with the same key (webdataset and
    img2dataset: dir/key.ext, the key ending at the first dot of the base name)."""
    key, group = None, {}
    for m in tf:
        if not m.isfile():  # directories, links, devices: never followed
            continue
        d, base = posixpath.split(m.name)
        stem, _, ext = base.partition('.')
        k = posixpath.join(d, stem)
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[ext.lower()] = m
    if group:
        yield key, group


def _tar_items(path, max_bytes):
    """One tar -> (key, kind, payload, caption, url) per sample, read in memory only (a member's
    name never becomes a path). Caption: key.txt, else "caption" in key.json (img2dataset writes
    both; the json also holds the url, kept for skipped-item reports). A truncated or corrupt tar
    keeps the samples read before the damage; the rest becomes one item named by the path."""
    try:
        with tarfile.open(path) as tf:
            for key, members in _tar_groups(tf):
                yield _tar_item(tf, f'{path}:{key}', members, max_bytes)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        print(f'warning: {path}: truncated or corrupt tar ({type(e).__name__}: {e}); '
              'the rest of it is skipped', file=sys.stderr)
        yield path, 'bad', f'truncated or corrupt tar: {type(e).__name__}: {e}', None, None


def _tar_item(tf, key, members, max_bytes):
    def read(ext):
        if members[ext].size > max_bytes:  # from the header: a 50 GB member is never read
            raise Skip(f'too large: member {members[ext].name} of {members[ext].size:,} bytes')
        return tf.extractfile(members[ext]).read()
    img = next((e for e in IMAGE_EXTS if e in members), None)
    info, url = {}, None
    try:
        try:
            info = json.loads(read('json')) if 'json' in members else {}
        except ValueError:
            pass  # metadata only: a broken key.json costs the url, not the sample
        info = info if isinstance(info, dict) else {}
        text = lambda v: v if isinstance(v, str) else None
        url, caption = text(info.get('url')), text(info.get('caption'))
        caption = read('txt').decode('utf-8', 'replace') if 'txt' in members else caption
        return key, 'bytes' if img else 'missing', read(img) if img else None, caption, url
    except Skip as e:
        return key, 'bad', str(e), None, url


def _list_classes(items):
    """A caption list whose images sit in class folders (each image's parent folder, at least two
    of them, not all numbered like shard folders 00000/) also has classes, the folders' names, so
    that its held-out part gives a linear probe and zero-shot beside retrieval. Returns (items
    with their class ids, classnames), or (items, None)."""
    folders = [posixpath.basename(posixpath.dirname(p.replace(os.sep, '/'))) for p, *_ in items]
    names = sorted(set(folders))
    if '' in names or len(names) < 2 or all(n.isdigit() for n in names):
        return items, None
    ids = {n: c for c, n in enumerate(names)}
    return [it[:4] + (ids[f],) for it, f in zip(items, folders)], names


def _open_source(src):
    """-> (type, items (list or None), tar paths (or None), missing tar names, classnames,
    has_text)"""
    if src == 'synthetic':
        return 'synthetic', None, None, [], list(SHAPES), True
    if os.path.isdir(src):
        items, classnames = _folder_source(src)
        return 'folder', items, None, [], classnames, False
    if src.endswith(('.tar', '.tar.gz', '.tgz')) or any(c in src for c in '*?[{') or '::' in src:
        return ('tar', None) + tar_paths(src) + (None, True)
    if os.path.isfile(src):
        items, classnames = _list_classes(_list_source(src))
        return 'list', items, None, [], classnames, True
    raise ValueError(f'--src={src}: not an image folder, a tar file, glob or brace pattern, a '
                     'path<TAB>caption list, or "synthetic"')
