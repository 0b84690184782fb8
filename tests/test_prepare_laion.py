"""prepare.py on LAION as img2dataset writes it: brace ranges, '::' lists and globs for --src,
.jpg / .txt / .json members, gaps in a range, one shard per tar, a killed build resumed."""
import io
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import prepare
import sources
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16


def jpeg(seed, side=S):
    im = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    f = io.BytesIO()
    Image.fromarray(im).save(f, 'JPEG', quality=90)
    return f.getvalue()


def pixels(data):
    """What decode() must give for an S x S image: the plain PIL decode, nothing resampled."""
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def write_tar(path, members):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, 'w') as tf:
        for name, payload in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))


def laion_tar(path, shard, n):
    """img2dataset's layout: key = shard (5 digits) + index (4 digits); jpg, txt, json each."""
    members = []
    for j in range(n):
        key = f'{shard:05d}{j:04d}'
        meta = dict(url=f'https://example.com/{key}.jpg', key=key, caption=f'photo {shard} {j}')
        members += [(f'{key}.jpg', jpeg(1000 * shard + j)), (f'{key}.txt', f'photo {shard} {j}'.encode()),
                    (f'{key}.json', json.dumps(meta).encode())]
    write_tar(path, members)


def files(out):
    """Every file of a finished dataset: name -> bytes (meta.json without its timing)."""
    got = {}
    for f in sorted(os.listdir(out)):
        data = open(os.path.join(out, f), 'rb').read()
        if f == 'meta.json':
            meta = json.loads(data)
            del meta['build']['seconds'], meta['build']['images_per_s']
            data = json.dumps(meta, sort_keys=True).encode()
        got[f] = data
    return got

# ----------------------------------------------------------------------------- --src forms


def test_brace_expansion_equals_an_explicit_product():
    def ex(p):
        return list(sources.expand_braces(p))
    n = ['0', '1', '2']
    xyz = ['x', 'y', 'z']
    padded = ['08', '09', '10', '11']
    assert ex('a{0..2}b{x,y,z}c{08..11}.tar') == ['a' + i + 'b' + j + 'c' + k + '.tar'
                                                  for i, j, k in itertools.product(n, xyz, padded)]
    laion = ex('/data/laion/{00000..41455}.tar')
    want = ['/data/laion/' + str(i).rjust(5, '0') + '.tar' for i in range(41456)]
    assert laion == want and laion[0] == '/data/laion/00000.tar' and laion[-1] == '/data/laion/41455.tar'
    assert ex('p{2.{5..7},3.{2,3}}') == ['p2.5', 'p2.6', 'p2.7', 'p3.2', 'p3.3']  # nested, in order
    assert ex('{a..e..2}') == ['a', 'c', 'e'] and ex('{10..0..5}') == ['10', '5', '0']
    assert ex('{-1..1}') == ['-1', '0', '1'] and ex('{9..11}') == ['9', '10', '11']  # no leading 0: no padding
    assert ex('{1..3}{,.bak}') == ['1', '1.bak', '2', '2.bak', '3', '3.bak']
    assert ex('{x}/a{b}') == ['{x}/a{b}'] and ex('plain.tar') == ['plain.tar']  # no ',' or '..': literal
    with pytest.raises(ValueError, match=r'^--src=x::a\{1,2\.tar: unbalanced braces in a\{1,2\.tar$'):
        sources.tar_paths('x::a{1,2.tar')


def test_brace_glob_and_list_forms_select_the_same_tars(tmp_path):
    d = f'{tmp_path}/laion'
    for s in range(6):
        write_tar(f'{d}/{s:05d}.tar', [])
    want = [f'{d}/{s:05d}.tar' for s in range(6)]
    for src in [f'{d}/{{00000..00005}}.tar', f'{d}/*.tar', f'{d}/0000[0-5].tar',
                f'{d}/{{00000..00002}}.tar::{d}/0000[3-5].tar', '::'.join(want),
                f'{d}/{{00000,00001,00002,00003,00004,00005}}.tar']:
        assert sources.tar_paths(src) == (want, []), src
    # the order given is kept: open_clip reads '::' parts one after the other
    assert sources.tar_paths(f'{d}/00003.tar::{d}/{{00000..00001}}.tar')[0] == [want[3], want[0], want[1]]


def test_a_range_matching_no_file_names_the_pattern_and_the_count(tmp_path):
    src = f'{tmp_path}/laion/{{00000..41455}}.tar'
    with pytest.raises(ValueError) as e:
        prepare.build(src, str(tmp_path / 'out'), image_size=S, workers=1, progress=False)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'--src={src}: no tar file matches')
    assert 'none of the 41,456 names exists' in msg and f'{tmp_path}/laion/00000.tar' in msg
    with pytest.raises(ValueError, match=r'none of the 1 names exists; first missing: .*/nothing/\*\.tar'):
        prepare.build(f'{tmp_path}/nothing/*.tar', str(tmp_path / 'out'), image_size=S, workers=1, progress=False)


def test_a_range_with_gaps_builds_the_tars_that_exist_and_records_the_missing(tmp_path, capsys):
    d = f'{tmp_path}/laion'
    for s in (0, 1, 3):  # img2dataset leaves no tar for a shard whose download failed
        laion_tar(f'{d}/{s:05d}.tar', s, 3)
    gaps = str(tmp_path / 'gaps')
    meta = prepare.build(f'{d}/{{00000..00004}}.tar', gaps, image_size=S, workers=2, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '2 of 5 tar files do not exist' in err[0] and f'{d}/00002.tar' in err[0]
    assert meta['missing_tars'] == dict(count=2, names=[f'{d}/00002.tar', f'{d}/00004.tar'])
    assert meta['build']['tars']['count'] == 3 and meta['build']['tars']['missing'] == 2
    # the same tars named by a glob give the same shards
    glob_out = str(tmp_path / 'glob')
    meta2 = prepare.build(f'{d}/*.tar', glob_out, image_size=S, workers=1, progress=False)
    assert meta2['missing_tars'] is None and meta2['count'] == meta['count'] == 9
    a, b = files(gaps), files(glob_out)
    assert [f for f in a if f != 'meta.json'] == [f for f in b if f != 'meta.json']
    assert all(a[f] == b[f] for f in a if f != 'meta.json')
    assert [s['images'] for s in meta['shards']] == ['images_00000.npy', 'images_00001.npy', 'images_00002.npy']


def test_a_changed_tar_list_stops_a_resume(tmp_path, monkeypatch):
    d = f'{tmp_path}/laion'
    for s in (0, 2):
        laion_tar(f'{d}/{s:05d}.tar', s, 2)
    src, out = f'{d}/{{00000..00002}}.tar', str(tmp_path / 'out')
    real = prepare._tar_items

    def interrupted(path, max_bytes):
        if path.endswith('00002.tar'):
            raise KeyboardInterrupt
        return real(path, max_bytes)
    monkeypatch.setattr(prepare, '_tar_items', interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.build(src, out, image_size=S, workers=1, progress=False)
    monkeypatch.setattr(prepare, '_tar_items', real)
    laion_tar(f'{d}/00001.tar', 1, 2)  # the gap filled: tar 2 would now be shard 2, not shard 1
    with pytest.raises(ValueError, match='unfinished build with other settings'):
        prepare.build(src, out, image_size=S, workers=1, progress=False)
    os.remove(f'{d}/00001.tar')
    assert prepare.build(src, out, image_size=S, workers=1, progress=False)['count'] == 4

# ----------------------------------------------------------------------------- members


def test_img2dataset_members_captions_skips_and_odd_names(tmp_path):
    tar = f'{tmp_path}/laion/00000.tar'
    good = {k: jpeg(i) for i, k in enumerate(['a', 'b', 'e', 'f', 'g'])}
    url = lambda k: json.dumps(dict(url=f'https://x.org/{k}.jpg', caption=f'json caption {k}')).encode()
    members = [
        ('a.jpg', good['a']), ('a.txt', b'txt caption a'), ('a.json', url('a')),  # .txt wins over json
        ('b.json', url('b')), ('b.jpg', good['b']),                                # json caption only
        ('c.txt', b'no image'), ('c.json', url('c')),                              # image missing
        ('d.jpg', b'\xff\xd8 not a jpeg' * 20), ('d.txt', b'corrupt'), ('d.json', url('d')),
        ('e.jpeg', good['e']), ('e.txt', b'caption e'), ('e.json', b'{not json'),   # bad json ignored
        ('../f.jpg', good['f']), ('../f.txt', b'dot dot'),                         # odd member names
        (f'{tmp_path}/abs/g.jpg', good['g']), (f'{tmp_path}/abs/g.txt', b'absolute'),
        ('h.jpg', good['a']), ('h.txt', b'x' * (2 ** 20 + 5000)),                   # caption over the cap
        ('i.jpg', good['a']), ('i.json', b'{"url": "https://x.org/i.jpg"}'),       # no caption at all
    ]
    write_tar(tar, members)
    out = str(tmp_path / 'out')
    meta = prepare.build(f'{tmp_path}/laion/{{00000..00000}}.tar', out, image_size=S, workers=1,
                         max_pixels=S * S, progress=False)
    kept = [('a', 'txt caption a'), ('b', 'json caption b'), ('e', 'caption e'), ('f', 'dot dot'), ('g', 'absolute')]
    ims = np.load(f'{out}/images_00000.npy')
    txt = np.load(f'{out}/texts_00000.npy')
    assert meta['count'] == 5 and len(meta['shards']) == 1 and meta['source_type'] == 'tar'
    assert np.array_equal(ims, np.stack([pixels(good[k]) for k, _ in kept]))
    assert np.array_equal(txt.astype(np.int64), tokenizer.tokenize([c for _, c in kept]))
    sk = meta['skipped']['items']
    assert [x[0] for x in sk] == [f'{tar}:{k}' for k in 'cdhi']
    assert [x[1].split(':')[0] for x in sk] == ['missing', 'unreadable', 'too large', 'empty caption']
    assert sk[2][1] == f'too large: member h.txt of {2 ** 20 + 5000:,} bytes'
    assert [x[2:] for x in sk] == [['https://x.org/c.jpg'], ['https://x.org/d.jpg'], [], ['https://x.org/i.jpg']]
    assert meta['skipped']['reasons'] == {'missing': 1, 'unreadable': 1, 'too large': 1, 'empty caption': 1}
    # members were read in memory: nothing was written by its own name, anywhere
    assert not os.path.exists(f'{tmp_path}/f.jpg') and not os.path.exists(f'{tmp_path}/laion/f.jpg')
    assert not os.path.exists(f'{tmp_path}/abs')
    assert sorted(os.listdir(out)) == ['images_00000.npy', 'meta.json', 'sources_00000.txt', 'texts_00000.npy']

# ----------------------------------------------------------------------------- parallel, resumable


def test_a_killed_parallel_build_resumes_to_the_uninterrupted_shards(tmp_path):
    d = f'{tmp_path}/laion'
    for s in range(6):
        laion_tar(f'{d}/{s:05d}.tar', s, 4 + s)
    src = f'{d}/{{00000..00005}}.tar'
    full = str(tmp_path / 'full')
    prepare.build(src, full, image_size=S, workers=2, progress=False)
    # a build whose workers hang inside tars 3 and 4 (rows already written), killed with SIGKILL
    part, flags = str(tmp_path / 'part'), str(tmp_path / 'flags')
    os.makedirs(flags)
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import prepare\n"
            "real = prepare._tar_items\n"
            "def hang(path, max_bytes):\n"
            "    for j, item in enumerate(real(path, max_bytes)):\n"
            "        if j == 2 and int(path[-9:-4]) >= 3:\n"
            f"            open({flags!r} + '/' + path[-9:-4], 'w').close()\n"
            "            time.sleep(600)\n"
            "        yield item\n"
            "prepare._tar_items = hang\n"
            f"prepare.build({src!r}, {part!r}, image_size={S}, workers=2, progress=False)\n")
    proc = subprocess.Popen([sys.executable, '-c', code], start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        deadline = time.time() + 120
        while len(os.listdir(flags)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert sorted(os.listdir(flags)) == ['00003', '00004'], proc.poll()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = sorted(os.listdir(part))
    assert [f for f in left if f.startswith('shard_')] == ['shard_00000.json', 'shard_00001.json', 'shard_00002.json']
    assert sum(f.startswith('images_00003.npy.') and f.endswith('.tmp') for f in left) == 1
    first = os.stat(f'{part}/images_00000.npy')
    # resumed with one worker, in this process: only the unfinished tars are opened again
    opened, real = [], prepare._tar_items

    def spy(path, max_bytes):
        opened.append(os.path.basename(path))
        return real(path, max_bytes)
    prepare._tar_items = spy
    try:
        prepare.build(src, part, image_size=S, workers=1, progress=False)
    finally:
        prepare._tar_items = real
    assert opened == ['00003.tar', '00004.tar', '00005.tar']
    again = os.stat(f'{part}/images_00000.npy')
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert files(part) == files(full)  # bitwise, and no temporary file left over
    meta = json.load(open(f'{full}/meta.json'))
    assert meta['count'] == sum(4 + s for s in range(6)) and [s['count'] for s in meta['shards']] == [4 + s for s in range(6)]
    assert meta['skipped'] == dict(count=0, reasons={}, items=[]) and 'shard_size' not in meta['build']


def test_a_build_of_many_tars_keeps_few_files_open(tmp_path):
    d = f'{tmp_path}/laion'
    for s in range(120):
        write_tar(f'{d}/{s:05d}.tar', [(f'{s:05d}0000.jpg', jpeg(s)), (f'{s:05d}0000.txt', b'a photo')])
    out = str(tmp_path / 'out')
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import prepare\n"
            f"m = prepare.build({d!r} + '/{{00000..00119}}.tar', {out!r}, image_size={S}, workers=2, progress=False)\n"
            "print(m['count'], len(m['shards']))\n")
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # 120 tars, 360 files written
    r = subprocess.run([sys.executable, '-c', code], preexec_fn=limit, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ['120', '120']


def test_parts_built_at_once_by_two_processes_equal_one_build(tmp_path):
    d = f'{tmp_path}/laion'
    for s in range(5):
        laion_tar(f'{d}/{s:05d}.tar', s, 3)
    src, full, shared = f'{d}/{{00000..00004}}.tar', str(tmp_path / 'full'), str(tmp_path / 'shared')
    prepare.build(src, full, image_size=S, workers=1, progress=False)
    run = lambda part: subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'prepare.py'), f'--src={src}', f'--out={shared}', f'--image_size={S}',
         '--workers=1', f'--part={part}', '--parts=2'], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    procs = [run(0), run(1)]  # two machines sharing out, at the same time
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all('without part/parts writes meta.json' in o for o in outs)
    assert not os.path.exists(f'{shared}/meta.json')
    assert sorted(f for f in os.listdir(shared) if f.startswith('shard_')) == [f'shard_{s:05d}.json' for s in range(5)]
    opened, real = [], prepare._tar_items
    prepare._tar_items = lambda path, max_bytes: opened.append(path) or real(path, max_bytes)
    try:
        prepare.build(src, shared, image_size=S, workers=1, progress=False)  # writes meta.json only
    finally:
        prepare._tar_items = real
    assert opened == [] and files(shared) == files(full)
    with pytest.raises(ValueError, match=r'part=2, parts=2: a part in \[0, parts\)'):
        prepare.build(src, str(tmp_path / 'x'), image_size=S, part=2, parts=2, progress=False)
    with pytest.raises(ValueError, match='part=0, parts=2'):
        prepare.build('synthetic', str(tmp_path / 'x'), image_size=S, parts=2, progress=False)


def test_a_shard_that_cannot_be_written_stops_with_one_line(tmp_path):
    d = f'{tmp_path}/laion'
    for s in range(2):
        laion_tar(f'{d}/{s:05d}.tar', s, 2)
    out = str(tmp_path / 'out')
    os.makedirs(f'{out}/images_00001.npy')  # the rename onto it fails inside a worker
    with pytest.raises(ValueError) as e:
        prepare.build(f'{d}/*.tar', out, image_size=S, workers=2, progress=False)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'out={out}: cannot write a shard (IsADirectoryError')
