"""data.py: shard writer on real file formats, tokenizer against an independent implementation,
loader coverage / determinism / augmentation geometry, real CIFAR-10 folders."""
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import prepare
import synthetic
import tokenizer
import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar.gz')
S = 16


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(im, **kw):
    f = io.BytesIO()
    im.save(f, 'PNG', **kw)
    return f.getvalue()


def jpeg_bytes(im, **kw):
    f = io.BytesIO()
    im.save(f, 'JPEG', quality=95, **kw)
    return f.getvalue()


def put(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def stored(out):
    """All images / texts of a built dataset, concatenated from the shards (independent of Dataset)."""
    meta = json.load(open(os.path.join(out, 'meta.json')))
    ims = np.concatenate([np.load(os.path.join(out, s['images'])) for s in meta['shards']])
    txt = np.concatenate([np.load(os.path.join(out, s['texts'])) for s in meta['shards']]) if meta['has_text'] else None
    return meta, ims, txt

# ----------------------------------------------------------------------------- tokenizer


def tokenizer_corpus():
    rng = np.random.default_rng(0)
    fixed = [
        'a photo of a cat', 'A Photo Of A CAT.', "don't stop, it's what we'll do; they've I'm you'd",
        'café naïve façade Ångström über straße Øre crème brûlée', 'Ελληνικά γράμματα', 'русский текст, Ёжик',
        'العربية نص', 'עברית', 'हिन्दी पाठ', 'ภาษาไทย', '中文字符测试，你好！', '日本語のテキスト、カタカナ', '한국어 텍스트',
        'emoji 😀😃🎉👍🏽 👨‍👩‍👧 🇫🇷 ❤️', 'numbers 0 12 345 6789 3.14159 1,000,000 ٣٤ ½ ²', '!!!??? ... --- *** ((()))',
        '@user #hashtag https://example.com/a?b=c&d=e', 'tabs\tand\nnewlines\r\n  and   spaces ', '',
        ' '.join(['very long text'] * 60), 'x' * 300, 'supercalifragilisticexpialidocious antidisestablishmentarianism',
        "l'été c'est l'heure", 'ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ', 'ﬁ ligature', 'math ∑∫√∞≈≠ ≤ ≥', '©®™ §¶ €£¥ ₹',
    ]
    pools = ['abcdefghijklmnopqrstuvwxyz     ', 'ABCXYZ0123456789', ".,;:!?'\"-()[]{}<>/@#$%^&*_+=~`|\\",
             'éèêëàâäîïôöùûüçñåøæœß', 'αβγδεζηθλμπσωΑΒΓ', 'абвгдежзийклмн', '的一是不了人我在有他这中大来上个',
             'あいうえおかきくけこアイウエオ', '가나다라마바사', '😀🎉🐱🚀🌍🍕👍🏽', '٠١٢٣٤٥٦٧٨٩०१२३', ' \t\n']
    texts = list(fixed)
    while len(texts) < 300:
        k = rng.integers(1, 4)
        chosen = [pools[j] for j in rng.choice(len(pools), k, replace=False)]
        alphabet = ''.join(chosen)
        texts.append(''.join(alphabet[j] for j in rng.integers(0, len(alphabet), rng.integers(1, 120))))
    return texts


def test_tokenizer_matches_instant_clip_tokenizer():
    import instant_clip_tokenizer
    ref = instant_clip_tokenizer.Tokenizer()
    texts = tokenizer_corpus()
    ours = tokenizer.tokenize(texts)
    assert ours.dtype == np.int64 and ours.shape == (len(texts), 77)
    # instant_clip_tokenizer only lowercases, so it is given the text after CLIP's cleaning step
    theirs = ref.tokenize_batch([tokenizer.clean_text(t) for t in texts], 77).astype(np.int64)
    bad = [t for t, a, b in zip(texts, ours, theirs) if not np.array_equal(a, b)]
    assert not bad, f'{len(bad)} strings differ, e.g. {bad[:3]!r}'
    assert sum(r[76] == tokenizer.EOT for r in ours) >= 3  # truncated rows exist, and end with <end_of_text>


def test_tokenizer_specials_truncation_cleaning():
    t = tokenizer.tokenize(['a photo of a cat', ' '.join(['dog'] * 200)])
    assert t[0, 0] == 49406 and t[0, 6] == 49407 and (t[0, 7:] == 0).all()
    assert t[1, 0] == 49406 and t[1, 76] == 49407 and (t[1, 1:76] == t[1, 1]).all()
    assert tokenizer.tokenize(['x'], context_length=5).shape == (1, 5)
    # html unescape (twice), whitespace collapsed, lowercased: as CLIP's basic_clean/whitespace_clean
    assert np.array_equal(tokenizer.tokenize(['Salt &amp;amp; PEPPER\n\t  on  toast']), tokenizer.tokenize(['salt & pepper on toast']))
    max_id = max(int(tokenizer.tokenize(tokenizer_corpus()).max()), 0)
    assert max_id < 49408


def test_tokenizer_character_classes_match_regex_module():
    # CLIP splits words with the `regex` package's \p{L} / \p{N}; ours are built from unicodedata.
    # Compare the split on every code point both Unicode versions know (transformers needs `regex`).
    import regex
    ref = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
    pat = tokenizer._tokenizer()[3]
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ('Cn', 'Cs', 'Co')
             and not chr(c).isspace()]
    for sep in ('a', '1', '.', "'", ' '):
        s = sep.join(chars) + "'S'll 'ſ 'D"
        assert pat.findall(s) == ref.findall(s), sep


def test_vocabulary_is_the_one_open_clip_ships():
    # the reference copy: the file inside the open_clip_torch wheel (a dev requirement), found
    # without importing open_clip (its dependencies are not installed)
    import hashlib
    import importlib.util
    spec = importlib.util.find_spec('open_clip')
    assert spec is not None, 'tests need open_clip_torch: pip install --no-deps open_clip_torch==3.3.0'
    ref = os.path.join(list(spec.submodule_search_locations)[0], 'bpe_simple_vocab_16e6.txt.gz')
    digest = lambda p: hashlib.sha256(open(p, 'rb').read()).hexdigest()  # noqa: E731
    assert digest(tokenizer.BPE_PATH) == digest(ref)


def test_tokenizer_missing_vocabulary_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(tokenizer, 'BPE_PATH', str(tmp_path / 'nope.txt.gz'))
    tokenizer._tokenizer.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match='nope.txt.gz: the CLIP BPE vocabulary is missing'):
            tokenizer.tokenize(['hello'])
    finally:
        monkeypatch.undo()
        tokenizer._tokenizer.cache_clear()

# ----------------------------------------------------------------------------- shard writer: folder


def make_folder(root):
    """Class folders with one file per case; returns {key: expected uint8 [S,S,3] or (skip reason, tolerance)}."""
    exp = {}
    # exact pixels, no resampling needed
    a = noise(S, S, 1)
    put(f'{root}/cat/a.png', png_bytes(Image.fromarray(a)))
    exp['cat/a.png'] = (a, 0)
    # wider than tall: red margins are cropped away, the centre survives exactly
    b = noise(S, S, 2)
    wide = np.concatenate([np.full((S, 4, 3), (255, 0, 0), np.uint8), b, np.full((S, 4, 3), (255, 0, 0), np.uint8)], 1)
    put(f'{root}/cat/b.png', png_bytes(Image.fromarray(wide)))
    exp['cat/b.png'] = (b, 0)
    # larger: shorter side 48 -> 16 (bicubic, antialiased); reference = torch's antialiased bicubic of the centre crop
    yy, xx = np.mgrid[0:48, 0:64]
    big = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
    put(f'{root}/cat/big.png', png_bytes(Image.fromarray(big)))
    ref = F.interpolate(torch.tensor(big[:, 8:56]).permute(2, 0, 1)[None].float(), size=(S, S), mode='bicubic',
                        antialias=True, align_corners=False)[0].permute(1, 2, 0).clamp(0, 255).round().numpy().astype(np.uint8)
    exp['cat/big.png'] = (ref, 2)
    put(f'{root}/cat/huge.png', png_bytes(Image.fromarray(noise(80, 80, 3))))  # over max_pixels
    exp['cat/huge.png'] = 'too large'
    # grey 'L' and bilevel '1'
    put(f'{root}/bird/l.png', png_bytes(Image.new('L', (S, S), 77)))
    exp['bird/l.png'] = (np.full((S, S, 3), 77, np.uint8), 0)
    put(f'{root}/bird/one.png', png_bytes(Image.new('1', (S, S), 1)))
    exp['bird/one.png'] = (np.full((S, S, 3), 255, np.uint8), 0)
    # CMYK JPEG of pure red
    put(f'{root}/dog/cmyk.jpg', jpeg_bytes(Image.new('CMYK', (S, S), (0, 255, 255, 0))))
    exp['dog/cmyk.jpg'] = (np.full((S, S, 3), (255, 0, 0), np.uint8), 8)
    # palette with a transparent index: left half transparent (-> white), right half opaque blue
    p = Image.new('P', (S, S), 0)
    p.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (S // 2, 0, S, S))
    put(f'{root}/dog/palette.png', png_bytes(p, transparency=0))
    e = np.full((S, S, 3), 255, np.uint8)
    e[:, S // 2:] = (0, 0, 255)
    exp['dog/palette.png'] = (e, 0)
    # RGBA: invisible green (-> white), half-transparent red over white, opaque blue
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[:, :5] = (0, 255, 0, 0)
    rgba[:, 5:10] = (255, 0, 0, 128)
    rgba[:, 10:] = (0, 0, 255, 255)
    put(f'{root}/dog/rgba.png', png_bytes(Image.fromarray(rgba, 'RGBA')))
    e = np.zeros((S, S, 3), np.uint8)
    e[:, :5] = 255
    e[:, 5:10] = (255, 127, 127)
    e[:, 10:] = (0, 0, 255)
    exp['dog/rgba.png'] = (e, 1)
    # 16-bit grey: 0..65535 scaled to 0..255 (257 * k -> k), not clipped
    g16 = (np.arange(S * S).reshape(S, S) * 257).astype(np.uint16)
    put(f'{root}/dog/gray16.png', png_bytes(Image.fromarray(g16)))
    exp['dog/gray16.png'] = (np.repeat(np.arange(S * S).reshape(S, S, 1), 3, 2).astype(np.uint8), 0)
    # EXIF orientation 6 (display rotated 90 degrees clockwise): stored left red | right blue, 16 wide 32 tall.
    # Upright it is 32 wide 16 tall with red on top and blue below.
    st = np.zeros((2 * S, S, 3), np.uint8)
    st[:, :S // 2] = (255, 0, 0)
    st[:, S // 2:] = (0, 0, 255)
    ex = Image.Exif()
    ex[0x0112] = 6
    put(f'{root}/dog/exif.jpg', jpeg_bytes(Image.fromarray(st), exif=ex.tobytes()))
    e = np.zeros((S, S, 3), np.uint8)
    e[:S // 2] = (255, 0, 0)
    e[S // 2:] = (0, 0, 255)
    exp['dog/exif.jpg'] = (e, 'rows')
    # broken files
    put(f'{root}/dog/corrupt.jpg', bytes(np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8)))
    exp['dog/corrupt.jpg'] = 'unreadable'
    good = jpeg_bytes(Image.fromarray(noise(64, 64, 6)))
    put(f'{root}/dog/truncated.jpg', good[:len(good) // 2])
    exp['dog/truncated.jpg'] = 'unreadable'
    put(f'{root}/dog/empty.jpg', b'')
    exp['dog/empty.jpg'] = 'empty file'
    put(f'{root}/dog/notes.txt', b'not an image, not listed')
    return exp


def check_pixels(key, got, want, tol):
    if tol == 'rows':  # JPEG: judge away from the red/blue edge
        assert (np.abs(got[:S // 2 - 2].astype(int) - (255, 0, 0)) < 40).all(), key
        assert (np.abs(got[S // 2 + 2:].astype(int) - (0, 0, 255)) < 40).all(), key
    else:
        assert np.abs(got.astype(int) - want.astype(int)).max() <= tol, key


def test_folder_source_round_trip_and_bad_files(tmp_path):
    exp = make_folder(tmp_path / 'src')
    out = str(tmp_path / 'out')
    meta = prepare.build(str(tmp_path / 'src'), out, image_size=S, shard_size=4, workers=2, max_pixels=5000, progress=False)
    keys = sorted(exp)  # the folder order: sorted classes, sorted files
    kept = [k for k in keys if isinstance(exp[k], tuple)]
    meta2, ims, txt = stored(out)
    assert meta == meta2 and txt is None and meta['has_text'] is False
    assert meta['classnames'] == ['bird', 'cat', 'dog'] and meta['count'] == len(kept) == len(ims)
    assert meta['image_size'] == S and ims.dtype == np.uint8 and ims.shape[1:] == (S, S, 3)
    assert sum(s['count'] for s in meta['shards']) == len(kept)
    skipped = {k: r for k, r in meta['skipped']['items']}
    assert {k: r.split(':')[0] for k, r in skipped.items()} == {k: v for k, v in exp.items() if isinstance(v, str)}
    assert meta['skipped']['count'] == 4 and meta['skipped']['reasons']['unreadable'] == 2
    classes = np.load(os.path.join(out, 'classes.npy'))
    assert classes.dtype == np.int32
    assert classes.tolist() == [meta['classnames'].index(k.split('/')[0]) for k in kept]  # aligned despite skips
    for k, got in zip(kept, ims):
        check_pixels(k, got, *exp[k])
    # the reader gives the same rows in any order
    ds = data.Dataset(out)
    idx = [5, 0, 3, 3, len(ds) - 1]
    assert np.array_equal(ds.images(idx), ims[idx]) and np.array_equal(ds.classes, classes)
    with pytest.raises(ValueError, match='no texts'):
        ds.texts([0])
    with pytest.raises(ValueError, match='out of range'):
        ds.images([len(ds)])

# ----------------------------------------------------------------------------- tar and list sources


def tar_bytes(members):
    f = io.BytesIO()
    with tarfile.open(fileobj=f, mode='w') as tf:
        for name, payload in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    return f.getvalue()


def test_tar_source_webdataset_layout(tmp_path):
    ims = {k: noise(S, S, 10 + i) for i, k in enumerate(['k0', 'k1', 'k3', 'k4', 'k6', 'evil'])}
    webp = io.BytesIO()
    Image.fromarray(ims['k4']).save(webp, 'WEBP', lossless=True)
    a = [('000/k0.png', png_bytes(Image.fromarray(ims['k0']))), ('000/k0.txt', b'A red CAR'), ('000/k0.json', b'{"url": "x"}'),
         ('000/k1.png', png_bytes(Image.fromarray(ims['k1']))), ('000/k1.txt', b'  \n'),   # empty caption
         ('000/k2.txt', b'caption without image'),                                         # no image
         ('000/k3.png', png_bytes(Image.fromarray(ims['k3']))),                             # no caption
         ('000/k4.webp', webp.getvalue()), ('000/k4.txt', 'ünïcode ✓ caption'.encode())]
    b = [('k5.jpg', b''), ('k5.txt', b'zero-byte image'),
         ('k6.png', png_bytes(Image.fromarray(ims['k6']))), ('k6.txt', b'fish &amp; chips'),
         ('../../evil.png', png_bytes(Image.fromarray(ims['evil']))), ('../../evil.txt', b'never written to disk')]
    put(f'{tmp_path}/tars/00000.tar', tar_bytes(a))
    put(f'{tmp_path}/tars/00001.tar', tar_bytes(b))
    out = str(tmp_path / 'out')
    meta = prepare.build(f'{tmp_path}/tars/*.tar', out, image_size=S, shard_size=3, workers=2, progress=False)
    _, got, txt = stored(out)
    keep = [('k0', 'A red CAR'), ('k4', 'ünïcode ✓ caption'), ('k6', 'fish &amp; chips'), ('evil', 'never written to disk')]
    assert meta['count'] == 4 and meta['has_text'] and meta['classnames'] is None and meta['source_type'] == 'tar'
    for (k, cap), im, t in zip(keep, got, txt):
        assert np.array_equal(im, ims[k]), k
        assert t.dtype == np.uint16 and np.array_equal(t.astype(np.int64), tokenizer.tokenize([cap])[0]), k
    sk = {k.split(':')[-1]: r for k, r in meta['skipped']['items']}
    assert sk == {'000/k1': 'empty caption', '000/k2': 'missing', '000/k3': 'empty caption', 'k5': 'empty file'}
    assert all(k.startswith(f'{tmp_path}/tars/0000') for k, _ in meta['skipped']['items'])
    assert not os.path.exists(tmp_path.parent / 'evil.png') and not os.path.exists(tmp_path / 'evil.png')
    assert np.array_equal(data.Dataset(out).texts([2, 0]), tokenizer.tokenize(['fish & chips', 'a red car']))


def test_list_source(tmp_path):
    a, b = noise(S, S, 20), noise(S, S, 21)
    put(f'{tmp_path}/imgs/a.png', png_bytes(Image.fromarray(a)))
    put(f'{tmp_path}/imgs/b.jpg', jpeg_bytes(Image.fromarray(np.full((S, S, 3), 200, np.uint8))))
    put(f'{tmp_path}/imgs/c.png', png_bytes(Image.fromarray(b)))
    lines = ['imgs/missing.png\ta file that is not there', '', 'imgs/b.jpg\t', 'imgs/a.png\tfirst caption',
             'imgs/c.png\tthird', f'{tmp_path}/imgs/a.png\tabsolute path, again']
    put(f'{tmp_path}/list.tsv', '\n'.join(lines).encode())
    meta = prepare.build(f'{tmp_path}/list.tsv', str(tmp_path / 'out'), image_size=S, shard_size=2, workers=1, progress=False)
    _, got, txt = stored(str(tmp_path / 'out'))
    assert meta['count'] == 3 and meta['source_type'] == 'list'
    # the first shard held only bad items: it is left out, and the reader still lines up
    assert [s['images'] for s in meta['shards']] == ['images_00001.npy', 'images_00002.npy']
    assert not os.path.exists(tmp_path / 'out' / 'images_00000.npy')
    assert np.array_equal(data.Dataset(str(tmp_path / 'out')).images([2, 0]), np.stack([a, a]))
    assert np.array_equal(got, np.stack([a, b, a]))
    assert np.array_equal(txt.astype(np.int64), tokenizer.tokenize(['first caption', 'third', 'absolute path, again']))
    assert meta['skipped']['items'] == [['imgs/missing.png', 'missing'], ['imgs/b.jpg', 'empty caption']]

# ----------------------------------------------------------------------------- overwrite, resume, CLI


def test_refuse_overwrite_and_resume_after_interruption(tmp_path, monkeypatch):
    kw = dict(image_size=S, count=50, seed=3, shard_size=16, workers=1, progress=False)
    full = str(tmp_path / 'full')
    prepare.build('synthetic', full, **kw)
    with pytest.raises(ValueError, match='overwrite'):
        prepare.build('synthetic', full, **kw)
    # interrupt a build in the middle of its third shard
    part = str(tmp_path / 'part')
    real = prepare._process

    def crash(item):
        if item[0] == 37:
            raise KeyboardInterrupt
        return real(item)
    monkeypatch.setattr(prepare, '_process', crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.build('synthetic', part, **kw)
    monkeypatch.setattr(prepare, '_process', real)
    assert not os.path.exists(os.path.join(part, 'meta.json'))
    assert os.path.exists(os.path.join(part, 'images_00001.npy')) and not os.path.exists(os.path.join(part, 'images_00002.npy'))
    first = os.stat(os.path.join(part, 'images_00000.npy'))
    with pytest.raises(ValueError, match='other settings'):
        prepare.build('synthetic', part, **dict(kw, seed=4))
    prepare.build('synthetic', part, **kw)  # resumes
    again = os.stat(os.path.join(part, 'images_00000.npy'))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # finished shards kept
    (m1, i1, t1), (m2, i2, t2) = stored(full), stored(part)
    assert np.array_equal(i1, i2) and np.array_equal(t1, t2)
    assert np.array_equal(np.load(f'{full}/classes.npy'), np.load(f'{part}/classes.npy'))
    assert {k: v for k, v in m1.items() if k != 'build'} == {k: v for k, v in m2.items() if k != 'build'}
    assert sorted(os.listdir(part)) == sorted(os.listdir(full))  # no leftover temporary files
    prepare.build('synthetic', full, **dict(kw, count=20, overwrite=True))
    assert stored(full)[0]['count'] == 20 and not os.path.exists(f'{full}/images_00002.npy')


def test_cli(tmp_path):
    out = str(tmp_path / 'syn')
    cmd = [sys.executable, os.path.join(ROOT, 'prepare.py'), '--src=synthetic', f'--out={out}', '--count=40',
           '--image_size=16', '--workers=2']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['count'] == 40 and res == json.load(open(os.path.join(out, 'data.json')))
    want = synthetic.synthetic(40, 16, 0)['images']
    assert np.array_equal(data.Dataset(out).images(range(40)), want)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode != 0 and 'overwrite' in r.stderr and 'Traceback' not in r.stderr
    r = subprocess.run(cmd[:2] + ['--src=/nonexistent/dir', f'--out={tmp_path}/x'], capture_output=True, text=True)
    assert r.returncode != 0 and '/nonexistent/dir' in r.stderr and 'Traceback' not in r.stderr


def test_worker_error_ends_the_build(tmp_path):
    # an unexpected error in a worker (not a skipped input) must stop the build with one line
    # naming the item, also with more items queued than the pool takes (it used to hang)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import prepare\n"
            "real = prepare.synthetic_one\n"
            "def boom(i, *a):\n"
            "    if i == 5:\n"
            "        raise ZeroDivisionError('boom')\n"
            "    return real(i, *a)\n"
            "prepare.synthetic_one = boom\n"
            "try:\n"
            f"    prepare.build('synthetic', {str(tmp_path / 'out')!r}, image_size=8, count=3000,\n"
            "                  workers=2, progress=False)\n"
            "except prepare.WorkerError as e:\n"
            "    sys.exit(str(e))\n")
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.communicate()
        pytest.fail('the build hung after a worker error')
    assert p.returncode == 1 and err.strip() == '5: ZeroDivisionError: boom', err
    assert not os.path.exists(tmp_path / 'out' / 'meta.json')

# ----------------------------------------------------------------------------- synthetic


def test_synthetic():
    d = synthetic.synthetic(60, 64, seed=3)
    assert d['images'].shape == (60, 64, 64, 3) and d['images'].dtype == np.uint8
    assert np.array_equal(d['images'], synthetic.synthetic(60, 64, seed=3)['images'])
    assert not np.array_equal(d['images'], synthetic.synthetic(60, 64, seed=4)['images'])
    tail = synthetic.synthetic(10, 64, seed=3, start=50)
    assert np.array_equal(tail['images'], d['images'][50:]) and tail['captions'] == d['captions'][50:]
    obj = r'an? (\w+) (\w+)'
    counts = set()
    for im, cap, c in zip(d['images'], d['captions'], d['classes']):
        m = re.fullmatch(rf'{obj}(?:, {obj})?(?: and {obj})? on an? (\w+) background', cap)
        assert m, cap
        objects = re.findall(obj, cap.rsplit(' on ', 1)[0])
        counts.add(len(objects))
        colour, shape = objects[0]
        assert shape in synthetic.SHAPES and colour in synthetic.COLOURS
        assert m.group(7) in synthetic.BACKGROUNDS
        assert d['classnames'][c] == shape  # the class is the largest (first named) shape
        near = (np.abs(im.astype(int) - synthetic.COLOURS[colour]).max(-1) <= 20).sum()
        assert near >= 20, cap  # it is drawn on top, in its colour
    assert counts == {1, 2, 3} and len(set(d['classes'].tolist())) == len(synthetic.SHAPES)
    assert synthetic.synthetic(2, 7, 0)['images'].shape == (2, 7, 7, 3)

# ----------------------------------------------------------------------------- loader


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('syn') / 'd')
    prepare.build('synthetic', out, image_size=S, count=100, seed=0, shard_size=30, workers=1, progress=False)
    return out


def test_loader_two_ranks_cover_each_index_once(syn):
    N, B = 100, 8
    labels = (np.arange(N)[:, None] * np.array([[1, 7]]) % 97).astype(np.int32)
    ds = data.Dataset(syn)
    seen = []
    for epoch in (0, 1):
        loaders = [data.Loader(syn, B, S, labels=labels, with_text=True, rank=r, world_size=2, seed=5, augment=False)
                   for r in range(2)]
        assert loaders[0].steps_per_epoch == N // (2 * B)
        idx = []
        for ld in loaders:
            for b in ld.iterate(epoch):
                i = b['index'].numpy()
                assert b['images'].shape == (B, 3, S, S) and b['images'].dtype == torch.float32
                raw = torch.tensor(ds.images(i)).permute(0, 3, 1, 2).float() / 255
                want = (raw - torch.tensor(transforms.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(transforms.CLIP_STD).view(1, 3, 1, 1)
                assert torch.allclose(b['images'], want, atol=1e-5)
                assert b['labels'].dtype == torch.int64 and np.array_equal(b['labels'].numpy(), labels[i])
                assert np.array_equal(b['texts'].numpy(), ds.texts(i))
                idx += i.tolist()
        assert len(idx) == len(set(idx)) == 96 and set(idx) <= set(range(N))  # last incomplete batch dropped
        seen.append(idx)
    assert seen[0] != seen[1]


def test_loader_batch_is_a_pure_function_of_seed_epoch_step_rank(syn):
    mk = lambda seed=9: data.Loader(syn, 8, 24, with_text=True, rank=1, world_size=2, seed=seed)
    a, b = mk(), mk()
    for name in ('images', 'texts', 'index'):
        assert torch.equal(a.batch(3, 2)[name], b.batch(3, 2)[name])
    assert a.batch(3, 2)['images'].shape == (8, 3, 24, 24)
    resumed = list(b.iterate(3, start_step=4))
    assert len(resumed) == a.steps_per_epoch - 4
    for s, r in zip(range(4, a.steps_per_epoch), resumed):
        assert torch.equal(a.batch(3, s)['images'], r['images']) and torch.equal(a.batch(3, s)['index'], r['index'])
    assert not torch.equal(a.batch(3, 2)['images'], a.batch(4, 2)['images'])
    assert not torch.equal(a.batch(3, 2)['images'], mk(seed=10).batch(3, 2)['images'])
    with pytest.raises(ValueError):
        a.batch(0, a.steps_per_epoch)


def test_crop_and_flip_geometry():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 1, 16).expand(1, 3, 16, 16).clone()  # horizontal gradient
    ident = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    crop = transforms.resized_crop
    assert torch.allclose(crop(x, ident, torch.tensor([False]), 16), x, atol=1e-5)
    assert torch.allclose(crop(x, ident, torch.tensor([True]), 16), x.flip(-1), atol=1e-5)
    # crop: output pixel j samples input position p = cx*W + (j + 0.5 - size/2) * w*W/size - 0.5 (pixel
    # centres), clamped to the box's outer pixel centres [x0, x0 + w*W - 1], as resizing the cut-out box does
    for cx, w, size, flip in [(0.25, 0.5, 16, False), (0.6, 0.3, 8, False), (0.5, 0.8, 20, True), (0.5, 1.0, 7, False)]:
        y = crop(x, torch.tensor([[cx, 0.5, w, 1.0]]), torch.tensor([flip]), size)
        j = torch.arange(size, dtype=torch.float32)
        p = cx * 16 + (j + 0.5 - size / 2) * w * 16 / size - 0.5
        x0 = (cx - w / 2) * 16
        want = p.clamp(x0, x0 + w * 16 - 1)
        want = want.flip(0) if flip else want
        assert torch.allclose(y[0, 0, 0], want, atol=1e-4), (cx, w, size, flip)
    # whole-pixel boxes: exactly torchvision's crop-then-resize (bilinear, align_corners=False)
    g = torch.Generator().manual_seed(3)
    img = torch.rand(6, 3, 20, 20, generator=g) * 255
    boxes, flip = transforms.crop_params(6, g, size=20)
    y = transforms.resized_crop(img, boxes, flip, 12)
    for k, (x0, y0, w, h) in enumerate(transforms._pixel_boxes(boxes, 20, 20).tolist()):
        ref = F.interpolate(img[k:k + 1, :, y0:y0 + h, x0:x0 + w], size=(12, 12), mode='bilinear', align_corners=False)[0]
        assert torch.allclose(y[k], ref.flip(-1) if flip[k] else ref, atol=1e-3), k
    # away from the box edges the sampling grid is F.affine_grid's for
    # theta = [[w*(1-2*flip), 0, 2cx-1], [0, h, 2cy-1]] (the clamp only touches the outer half pixel)
    boxes, flip = transforms.crop_params(6, g)
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = boxes[:, 2] * (1 - 2 * flip.float()), 2 * boxes[:, 0] - 1
    theta[:, 1, 1], theta[:, 1, 2] = boxes[:, 3], 2 * boxes[:, 1] - 1
    ref = F.grid_sample(img, F.affine_grid(theta, [6, 3, 12, 12], align_corners=False), mode='bilinear',
                        padding_mode='border', align_corners=False)
    assert torch.allclose(transforms.resized_crop(img, boxes, flip, 12)[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-3)
    # vertical geometry the same way
    xv = x.transpose(-1, -2)
    y = transforms.resized_crop(xv, torch.tensor([[0.5, 0.25, 1.0, 0.5]]), torch.tensor([True]), 16)
    j = torch.arange(16, dtype=torch.float32)
    assert torch.allclose(y[0, 0, :, 0], (0.25 * 16 + (j + 0.5 - 8) * 0.5 - 0.5).clamp(0, 7), atol=1e-4)
    # a box leaving the image (pad_crop) reads numpy's 'reflect' padding
    shifted = torch.tensor([[0.5 - 3 / 16, 0.5 + 2 / 16, 1.0, 1.0]])
    y = transforms.resized_crop(x, shifted, torch.tensor([False]), 16)
    assert torch.allclose(y[0, 0, 0], torch.tensor(np.pad(np.arange(16.0), 3, 'reflect')[:16], dtype=torch.float32), atol=1e-4)


def test_crop_params_distribution():
    g = torch.Generator().manual_seed(0)
    boxes, flip = transforms.crop_params(4000, g, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3))
    cx, cy, w, h = boxes.unbind(1)
    area, aspect = w * h, w / h
    assert (area >= 0.4 - 1e-6).all() and (area <= 1 + 1e-6).all()
    assert (aspect >= 3 / 4 - 1e-5).all() and (aspect <= 4 / 3 + 1e-5).all()
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all() and (cy - h / 2 >= -1e-6).all()
    # torchvision's recipe (first of 10 draws that fits, else the whole image), simulated in numpy:
    # the rejection near scale 1 pulls the mean area below the mean of U(0.4, 1)
    rng = np.random.default_rng(1)
    s, r = rng.uniform(0.4, 1, (100000, 10)), np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), (100000, 10)))
    ok = (np.sqrt(s * r) <= 1) & (np.sqrt(s / r) <= 1)
    ref = np.where(ok.any(1), s[np.arange(100000), ok.argmax(1)], 1.0)
    assert abs(area.mean().item() - ref.mean()) < 0.01 and abs(flip.float().mean() - 0.5) < 0.05
    b2, f2 = transforms.crop_params(4000, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, b2) and torch.equal(flip, f2)


def test_loader_augmentation_is_crop_and_flip(syn):
    # with scale = ratio = 1 every crop is the whole image: each sample is the image or its mirror
    ld = data.Loader(syn, 16, S, seed=1, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = data.Loader(syn, 16, S, seed=1, augment=False)
    b, p = ld.batch(0, 1), plain.batch(0, 1)
    assert torch.equal(b['index'], p['index'])
    same = [torch.allclose(x, y, atol=1e-4) for x, y in zip(b['images'], p['images'])]
    mirror = [torch.allclose(x, y.flip(-1), atol=1e-4) for x, y in zip(b['images'], p['images'])]
    assert all(s or m for s, m in zip(same, mirror)) and any(mirror) and not all(mirror)


def tv_get_params(n, S, rng, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision's RandomResizedCrop.get_params on an S x S image (whole image if no draw fits),
    in numpy: [n, 4] whole-pixel boxes (x0, y0, w, h)."""
    t = S * S * rng.uniform(*scale, (n, attempts))
    a = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    w, h = np.round(np.sqrt(t * a)), np.round(np.sqrt(t / a))
    ok = (w > 0) & (w <= S) & (h > 0) & (h <= S)
    k = ok.argmax(1)
    w = np.where(ok.any(1), w[np.arange(n), k], S).astype(int)
    h = np.where(ok.any(1), h[np.arange(n), k], S).astype(int)
    return np.stack([rng.integers(0, S - w + 1), rng.integers(0, S - h + 1), w, h], 1)


def test_crop_params_on_whole_pixels_match_torchvision_statistics():
    # the loader's boxes lie on whole pixels (what the uint8 path can cut): compare their
    # distribution with torchvision's get_params at 32 px (the CIFAR case, where rounding matters most)
    S, n = 32, 20000
    boxes, flip = transforms.crop_params(n, torch.Generator().manual_seed(0), size=S)
    px = transforms._pixel_boxes(boxes, S, S).numpy()
    assert np.allclose(px[:, 2:] / S, boxes[:, 2:].numpy(), atol=1e-6)  # exactly whole pixels
    assert np.allclose(px[:, :2] + px[:, 2:] / 2, boxes[:, :2].numpy() * S, atol=1e-4)
    assert (px[:, :2] >= 0).all() and (px[:, :2] + px[:, 2:] <= S).all()
    ref = tv_get_params(n, S, np.random.default_rng(1))
    q = np.linspace(0.05, 0.95, 19)
    for f in (lambda b: b[:, 2] * b[:, 3] / S ** 2, lambda b: np.log(b[:, 2] / b[:, 3]),
              lambda b: (b[:, 0] + b[:, 2] / 2) / S, lambda b: (b[:, 1] + b[:, 3] / 2) / S):
        assert np.abs(np.quantile(f(px), q) - np.quantile(f(ref), q)).max() < 0.03
    for k in (2, 3):  # the same whole-pixel sizes, equally often (total variation distance)
        a, b = np.bincount(px[:, k], minlength=S + 1) / n, np.bincount(ref[:, k], minlength=S + 1) / n
        assert 0.5 * np.abs(a - b).sum() < 0.03
    assert abs(flip.float().mean().item() - 0.5) < 0.015  # 4 sigma at n = 20000


def unnorm(x):
    """CLIP-normalised float -> 0..255 (channel axis -3)."""
    std, mean = torch.tensor(transforms.CLIP_STD).view(3, 1, 1), torch.tensor(transforms.CLIP_MEAN).view(3, 1, 1)
    return (x * std + mean) * 255


def reference_view(img, a, size):
    """One view rebuilt from its parameters with numpy indexing and PIL: the box (cx, cy, w, h) cut out
    of the stored image (np.pad 'reflect' where it leaves it), PIL's bilinear resize (torchvision's
    RandomResizedCrop on PIL images), mirrored if a[4]; float64 [H, W, 3] 0..255, before colour."""
    S = img.shape[0]
    cx, cy, w, h, f = a[:5].tolist()
    wp, hp = round(w * S), round(h * S)
    x0, y0 = round(cx * S - wp / 2), round(cy * S - hp / 2)
    P = max(0, -x0, -y0, x0 + wp - S, y0 + hp - S)
    crop = np.pad(img, ((P, P), (P, P), (0, 0)), 'reflect')[y0 + P:y0 + P + hp, x0 + P:x0 + P + wp]
    if (hp, wp) != (size, size):
        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
    return (crop[:, ::-1] if f > 0.5 else crop).astype(np.float64)


def loader_pair(syn, size, **kw):
    """The same loader twice: the CPU (uint8) path and the device (grid_sample) path, both run here."""
    cpu, dev = data.Loader(syn, 16, size, **kw), data.Loader(syn, 16, size, **kw)
    dev._grid = True
    return cpu, dev


@pytest.mark.parametrize('augment,size', [('rrc', S), ('rrc', 8), ('rrc', 24), ('pad_crop', S), ('pad_crop', 24),
                                          ('flip', S)])
def test_augment_geometry_against_numpy_reference(syn, augment, size, capsys):
    cpu, dev = loader_pair(syn, size, seed=4, augment=augment, pad=3)
    ds = data.Dataset(syn)
    for step in (0, 2):
        b, d = cpu.batch(1, step), dev.batch(1, step)
        assert torch.equal(b['aug'], d['aug']) and torch.equal(b['index'], d['index'])  # same draws on both paths
        assert b['images'].shape == (16, 3, size, size) and b['aug'].shape == (1, 16, 5)
        ims = ds.images(b['index'].numpy())
        for k in range(16):
            a = b['aug'][0, k]
            ref = torch.tensor(reference_view(ims[k], a, size)).permute(2, 0, 1).float()
            got, dgot = unnorm(b['images'][k]), unnorm(d['images'][k])
            # uint8 path vs PIL: both round to integer levels with fixed-point weights: <= 1 level apart
            assert (got - ref).abs().max() <= 1.01, (augment, size, k, a)
            box = transforms._pixel_boxes(a[None, :4], S, S)[0, 2:]
            if (box <= size).all():  # enlarging or none: both paths are bilinear on the same grid
                assert (dgot - ref).abs().max() <= 1.01, (augment, size, k)
            else:  # shrinking: grid_sample is plain bilinear, the uint8 path (and PIL) antialiased
                x0, y0 = (transforms._pixel_boxes(a[None, :4], S, S)[0, :2]).tolist()
                crop = torch.tensor(ims[k]).permute(2, 0, 1)[None, :, y0:y0 + box[1], x0:x0 + box[0]].float()
                plain = F.interpolate(crop, size=(size, size), mode='bilinear', align_corners=False)[0]
                assert (dgot - (plain.flip(-1) if a[4] > 0.5 else plain)).abs().max() < 1e-2
    if augment == 'pad_crop':  # every whole-pixel shift in [-pad, pad] occurs, and nothing else
        aug = torch.cat([cpu.batch(0, s)['aug'][0] for s in range(cpu.steps_per_epoch)])
        shifts = torch.round((aug[:, :2] - 0.5) * S)
        assert set(shifts.flatten().tolist()) == set(range(-3, 4)) and (aug[:, 2:4] == 1).all()
    capsys.readouterr()


@pytest.mark.parametrize('augment', ['rrc', 'pad_crop', 'flip', 'none'])
@pytest.mark.parametrize('grid', [False, True])
def test_augment_choices_are_seeded(syn, augment, grid):
    mk = lambda seed=9: data.Loader(syn, 8, S, seed=seed, augment=augment, rank=1, world_size=2)
    a, b = mk(), mk()
    a._grid = b._grid = grid
    x, y = a.batch(2, 3), b.batch(2, 3)
    assert torch.equal(x['images'], y['images']) and torch.equal(x['aug'], y['aug'])
    r = list(b.iterate(2, start_step=3))[0]  # the prefetching thread gives the same batch
    assert torch.equal(x['images'], r['images'])
    flips = torch.cat([a.batch(2, s)['aug'][0, :, 4] for s in range(a.steps_per_epoch)])
    if augment == 'none':
        assert torch.equal(x['images'], data.Loader(syn, 8, S, seed=9, augment=False, rank=1, world_size=2).batch(2, 3)['images'])
        assert (flips == 0).all() and (x['aug'][0, :, :4] == torch.tensor([0.5, 0.5, 1, 1])).all()
    else:
        assert not torch.equal(x['images'], a.batch(2, 4)['images'])
        assert not torch.equal(x['images'], mk(seed=10).batch(2, 3)['images'])
        assert 0 < flips.mean() < 1


def test_augment_true_false_and_bad_values(syn):
    for old, new in ((True, 'rrc'), (False, 'none')):
        x, y = data.Loader(syn, 8, S, seed=2, augment=old).batch(0, 1), data.Loader(syn, 8, S, seed=2, augment=new).batch(0, 1)
        assert torch.equal(x['images'], y['images'])
    with pytest.raises(ValueError, match='augment'):
        data.Loader(syn, 8, S, augment='randaugment')
    with pytest.raises(ValueError, match='pad'):
        data.Loader(syn, 8, S, augment='pad_crop', pad=S)

# ----------------------------------------------------------------------------- views and colour


def colour_reference(x, p):
    """float64 [H, W, 3] 0..255 through torchvision's ColorJitter formulas (brightness, contrast,
    saturation, then hue via the standard library's colorsys) and grayscale, with params p."""
    import colorsys
    b, c, s, hue, gray = p.tolist()
    lum = lambda y: y @ np.array([0.2989, 0.587, 0.114])
    x = np.clip(x * b, 0, 255)
    x = np.clip(c * x + (1 - c) * lum(x).mean(), 0, 255)
    x = np.clip(s * x + (1 - s) * lum(x)[..., None], 0, 255)
    if hue:
        hsv = [colorsys.rgb_to_hsv(*px) for px in x.reshape(-1, 3) / 255]
        x = np.array([colorsys.hsv_to_rgb((h + hue) % 1.0, sv, v) for h, sv, v in hsv]).reshape(x.shape) * 255
    return np.repeat(lum(x)[..., None], 3, -1) if gray > 0.5 else x


def test_color_jitter_against_reference():
    g = torch.Generator().manual_seed(0)
    p = transforms.color_params(20000, g, 0.5)
    on = (p[:, :4] != torch.tensor([1.0, 1, 1, 0])).any(1)
    assert abs(on.float().mean() - 0.8) < 0.012 and abs(p[:, 4].mean() - 0.2) < 0.012  # SimCLR's p = 0.8, 0.2
    assert (p[on, :3] >= 0.6).all() and (p[on, :3] <= 1.4).all() and (p[:, 3].abs() <= 0.1).all()
    assert abs(p[on, 0].mean() - 1.0) < 0.01 and p[on, 3].abs().max() > 0.099  # U(0.6, 1.4), U(-0.1, 0.1)
    x = torch.rand(12, 3, 6, 7, generator=g) * 255
    x[0] = x[0, :1]  # a grey image: hue leaves it alone
    x[1, :, :2] = 0  # black pixels
    params = torch.cat([transforms.color_params(8, g, 1.0), torch.tensor([[1.3, 0.6, 1.7, 0.4, 0], [1, 1, 1, -0.45, 0],
                                                                    [0.5, 2.0, 0.0, 0.0, 0], [1, 1, 1, 0, 1]])])
    y = transforms.color_jitter(x, params)
    for k in range(12):
        ref = colour_reference(x[k].permute(1, 2, 0).double().numpy(), params[k])
        assert np.abs(y[k].permute(1, 2, 0).numpy() - ref).max() < 2e-3 * 255, k
    ident = torch.tensor([[1.0, 1, 1, 0, 0]]).repeat(12, 1)
    assert torch.allclose(transforms.color_jitter(x, ident), x, atol=1e-3)


def test_views_are_independent_augmentations_with_their_parameters(syn):
    ds = data.Dataset(syn)
    for augment in ('pad_crop', 'rrc'):
        for grid in (False, True):
            ld = data.Loader(syn, 8, S, seed=3, augment=augment, views=3, color_jitter=0.5)
            ld._grid = grid
            b = ld.batch(0, 1)
            assert b['images'].shape == (3, 8, 3, S, S) and b['aug'].shape == (3, 8, 10)
            ims = ds.images(b['index'].numpy())
            for v in range(3):
                for k in range(8):
                    a = b['aug'][v, k]
                    got = unnorm(b['images'][v, k]).permute(1, 2, 0).double().numpy()
                    ref = colour_reference(reference_view(ims[k], a, S), a[5:])
                    if augment == 'pad_crop':  # no resampling: exact up to float32 colour maths
                        assert np.abs(got - ref).max() < 0.05, (grid, v, k, a)
                        continue
                    # rrc: PIL rounds to levels (mean error 1/4, at most 1 from either path), which the
                    # colour gains (up to 1.4 each, 2.7 together) enlarge; a wrong box, flip or factor
                    # would be tens of levels off on average
                    assert np.abs(got - ref).mean() < 1 and np.abs(got - ref).max() < 6, (grid, v, k, a)
                    # the colour part exactly: the reference colour on this path's own resampling
                    u8 = torch.tensor(ims[k:k + 1])
                    geo = (transforms.resized_crop(transforms.to_float(u8, 'cpu', norm=False), a[None, :4], a[None, 4] > 0.5, S)[0]
                           if grid else transforms.crop_resize_cpu(u8, a[None, :4], a[None, 4] > 0.5, S, norm=False)[0])
                    ref = colour_reference(geo.permute(1, 2, 0).double().numpy(), a[5:])
                    assert np.abs(got - ref).max() < 0.05, (grid, v, k, a)
            for v, w in ((0, 1), (0, 2), (1, 2)):  # independent draws: every pair of views differs
                assert not torch.equal(b['aug'][v], b['aug'][w])
                assert (b['images'][v] - b['images'][w]).flatten(1).abs().max(1).values.min() > 0.1
            again = data.Loader(syn, 8, S, seed=3, augment=augment, views=3, color_jitter=0.5)
            again._grid = grid
            assert torch.equal(again.batch(0, 1)['images'], b['images'])
    # view 0 of a multi-view batch is the single-view batch (one generator, view after view)
    one = data.Loader(syn, 8, S, seed=3, views=1).batch(0, 1)
    two = data.Loader(syn, 8, S, seed=3, views=2).batch(0, 1)
    assert torch.equal(one['images'], two['images'][0]) and torch.equal(one['aug'][0], two['aug'][0])
    assert one['aug'].shape == (1, 8, 5)


def test_eval_batches_contiguous_slices_and_resize(syn):
    ds = data.Dataset(syn)
    got = []
    for r in range(3):
        idx = torch.cat([i for i, _ in data.eval_batches(syn, 16, S, rank=r, world_size=3)]).tolist()
        n = 100 // 3 + (r < 100 % 3)
        assert idx == list(range(r * 33 + min(r, 1), r * 33 + min(r, 1) + n))
        got += idx
    assert got == list(range(100))
    # another size: antialiased bicubic, compared with PIL's
    i, x = next(iter(data.eval_batches(syn, 4, 8)))
    mean, std = torch.tensor(transforms.CLIP_MEAN).view(3, 1, 1), torch.tensor(transforms.CLIP_STD).view(3, 1, 1)
    for k, im in zip(i.tolist(), x):
        ref = np.asarray(Image.fromarray(ds.images([k])[0]).resize((8, 8), Image.BICUBIC)).astype(np.float32)
        pix = (im * std + mean) * 255
        assert (pix.permute(1, 2, 0) - torch.tensor(ref)).abs().max() < 2.5

# ----------------------------------------------------------------------------- bad input


def test_tokenizer_long_words_are_fast_and_exact():
    import time
    import instant_clip_tokenizer
    ref = instant_clip_tokenizer.Tokenizer()
    rng = np.random.default_rng(0)
    # the cut keeps twice what 75 tokens can span: the longest vocabulary token is 32 bytes
    longest = max(len(t.replace('</w>', '')) for t in tokenizer._tokenizer()[0])
    assert longest == 32 and tokenizer.CHARS_PER_TOKEN >= 2 * (longest + 1)
    # words of thousands of characters (BPE was quadratic in them) still match the reference
    words = [''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), 3000)), 'ab' * 1500, '😀🎉' * 400]
    ours = tokenizer.tokenize(words)
    assert np.array_equal(ours, ref.tokenize_batch(words, 77).astype(np.int64))
    # a 1 MB one-word caption: cut first, so milliseconds rather than hours (a hang is the failure;
    # the bound is loose because the machine may be shared)
    big = ''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), 1_000_000))
    t = time.perf_counter()
    ids = tokenizer.tokenize([big])
    assert time.perf_counter() - t < 5
    assert np.array_equal(ids, tokenizer.tokenize([big[:75 * tokenizer.CHARS_PER_TOKEN]])) and ids[0, 76] == tokenizer.EOT
    assert np.array_equal(ids, ref.tokenize_batch([big[:20000]], 77).astype(np.int64))


def corrupt_cases(d):
    """(what, edit the built dataset at d in place, the file the message must name)"""
    meta_path = os.path.join(d, 'meta.json')

    def edit_meta(f):
        def run():
            m = json.load(open(meta_path))
            f(m)
            json.dump(m, open(meta_path, 'w'))
        return run

    def truncate(name, size):
        def run():
            p = os.path.join(d, name)
            size_ = size if size >= 0 else os.path.getsize(p) + size
            with open(p, 'r+b') as fh:
                fh.truncate(size_)
        return run

    return [('truncated shard', truncate('images_00001.npy', -100), 'images_00001.npy'),
            ('zero-byte shard', truncate('images_00000.npy', 0), 'images_00000.npy'),
            ('truncated texts', truncate('texts_00002.npy', -10), 'texts_00002.npy'),
            ('shard count too large', edit_meta(lambda m: m['shards'][1].update(count=m['shards'][1]['count'] + 1)), 'images_00001.npy'),
            ('total count too large', edit_meta(lambda m: m.update(count=m['count'] + 5)), 'meta.json'),
            ('edited image_size', edit_meta(lambda m: m.update(image_size=32)), 'images_00000.npy'),
            ('missing shards', edit_meta(lambda m: m.pop('shards')), 'meta.json'),
            ('missing shard file', edit_meta(lambda m: m['shards'][0].update(images='images_00009.npy')), 'images_00009.npy'),
            ('invalid JSON', lambda: open(meta_path, 'a').write(',}'), 'meta.json')]


# shards are checked when first mapped: these defects stop the first read that touches them
AT_FIRST_READ = {'truncated shard', 'zero-byte shard', 'truncated texts', 'edited image_size',
                 'missing shard file'}


def read_everything(d):
    ds = data.Dataset(d)
    ds.images(np.arange(len(ds)))
    ds.texts(np.arange(len(ds)))


def test_bad_shards_and_meta_stop_with_one_line_naming_the_file(tmp_path):
    good = str(tmp_path / 'good')
    prepare.build('synthetic', good, image_size=S, count=60, seed=0, shard_size=20, workers=1, progress=False)
    for k, (what, _, name) in enumerate(corrupt_cases(good)):
        d = str(tmp_path / what.replace(' ', '_'))
        shutil.copytree(good, d)
        corrupt_cases(d)[k][1]()  # one defect per copy
        readers = [lambda: data.Dataset(d), lambda: data.Loader(d, 4, S), lambda: data.eval_batches(d, 4, S)]
        error = ValueError
        if what in AT_FIRST_READ:  # the open succeeds; reading (main thread or prefetch) stops
            data.Dataset(d), data.Loader(d, 4, S)
            readers = [lambda: read_everything(d), lambda: list(data.Loader(d, 4, S, with_text=True).iterate(0))]
            readers += [] if what == 'truncated texts' else [lambda: list(data.eval_batches(d, 4, S))]
            error = SystemExit
        for fn in readers:
            with pytest.raises(error) as e:
                fn()
            msg = str(e.value)
            # an edited image_size makes every shard wrong: the first one read is named
            names = [f'images_0000{i}.npy' for i in range(3)] if what == 'edited image_size' else [name]
            assert '\n' not in msg and any(os.path.join(d, n) in msg for n in names), (what, msg)
    data.Dataset(good)  # untouched copy still opens
    ld = data.Loader(good, 4, S)
    assert len(ld.ds._mm) == 0  # validated from meta.json: no shard was mapped
    ld.batch(0, 0)


def test_truncated_tar_is_named_and_skipped(tmp_path, capsys):
    members = []
    for k in range(4):
        members += [(f'k{k}.png', png_bytes(Image.fromarray(noise(S, S, 40 + k)))), (f'k{k}.txt', f'caption {k}'.encode())]
    whole = tar_bytes(members)
    # cut inside k2.png's data: k0 and k1 are complete (k1 ends where k2 begins), k2 and k3 are lost
    offset = whole.index(b'k2.png') + 512 + 100
    put(f'{tmp_path}/tars/00000.tar', whole[:offset])
    put(f'{tmp_path}/tars/00001.tar', whole)
    meta = prepare.build(f'{tmp_path}/tars/*.tar', str(tmp_path / 'out'), image_size=S, workers=1, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{tmp_path}/tars/00000.tar' in err[0] and 'truncated' in err[0]
    assert meta['count'] == 2 + 4 and meta['skipped']['reasons'] == {'truncated or corrupt tar': 1}
    assert meta['skipped']['items'][0][0] == f'{tmp_path}/tars/00000.tar'
    _, ims, txt = stored(str(tmp_path / 'out'))
    assert np.array_equal(ims, np.stack([noise(S, S, 40 + k) for k in (0, 1, 0, 1, 2, 3)]))
    assert np.array_equal(txt.astype(np.int64), tokenizer.tokenize([f'caption {k}' for k in (0, 1, 0, 1, 2, 3)]))


def test_list_with_non_utf8_bytes_is_decoded_and_the_line_named(tmp_path, capsys):
    a = noise(S, S, 50)
    put(f'{tmp_path}/imgs/a.png', png_bytes(Image.fromarray(a)))
    put(f'{tmp_path}/imgs/\xe9t\xe9.png'.encode('latin-1'), png_bytes(Image.fromarray(a)))  # a Latin-1 file name
    lines = [b'imgs/a.png\tfine', b'imgs/a.png\tcaf\xe9 au lait', b'', b'imgs/\xe9t\xe9.png\tsummer']
    put(f'{tmp_path}/list.tsv', b'\n'.join(lines))
    meta = prepare.build(f'{tmp_path}/list.tsv', str(tmp_path / 'out'), image_size=S, workers=1, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'list.tsv' in err[0] and 'line 2 and 1 more' in err[0]
    assert meta['count'] == 3 and meta['skipped']['count'] == 0
    _, _, txt = stored(str(tmp_path / 'out'))
    assert np.array_equal(txt.astype(np.int64), tokenizer.tokenize(['fine', 'caf\ufffd au lait', 'summer']))


def test_upsampling_warns_once(syn, capsys):
    data._warned.clear()
    capsys.readouterr()
    data.Loader(syn, 8, S)
    list(data.eval_batches(syn, 50, S // 2))
    assert capsys.readouterr().err == ''
    data.Loader(syn, 8, 2 * S)
    data.Loader(syn, 8, 2 * S, augment=False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and syn in err[0] and f'{S}x{S}' in err[0] and f'image_size={2 * S}' in err[0]
    list(data.eval_batches(syn, 50, 3 * S))
    list(data.eval_batches(syn, 50, 3 * S))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f'image_size={3 * S}' in err[0]


# ----------------------------------------------------------------------------- real images


@pytest.mark.skipif(not os.path.exists(CIFAR), reason=f'{CIFAR} is absent (a fresh clone has no ../shared)')
def test_cifar10_folders_build(tmp_path):
    with tarfile.open(CIFAR) as tf:
        members = [m for m in tf if m.name.startswith('cifar10/test/')]
        tf.extractall(tmp_path, members=members, filter='data')
    src = str(tmp_path / 'cifar10' / 'test')
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    meta = prepare.build(src, str(tmp_path / 'out'), image_size=32, workers=2, progress=False)
    ds = data.Dataset(str(tmp_path / 'out'))
    assert meta['count'] == len(ds) == 10000 and ds.classnames == names and meta['skipped']['count'] == 0
    assert np.bincount(ds.classes).tolist() == [1000] * 10
    assert ds.images([0]).shape == (1, 32, 32, 3)
    files = sorted(os.listdir(os.path.join(src, 'truck')))
    k = 9000 + 123
    with Image.open(os.path.join(src, 'truck', files[123])) as im:
        assert np.array_equal(ds.images([k])[0], np.asarray(im.convert('RGB')))
    assert ds.classes[k] == names.index('truck')


def test_unfinished_loader_exits_cleanly():
    # training that stops mid-epoch leaves loader.iterate() unfinished with its worker busy in
    # torch ops; the interpreter must still exit with status 0 (it used to abort, status 134)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import torch, runtime\n"
            "def slow(a):\n"
            "    x = torch.randn(300, 300)\n"
            "    for _ in range(40):\n"
            "        x = x @ x.T / 300\n"
            "    return x\n"
            "g = runtime.prefetched(slow, range(1000), 4)\n"
            "next(g)\n")
    for _ in range(2):
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
