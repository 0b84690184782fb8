"""The command line of every stage: a bad device is one line before any folder exists, --help
shows whole comments, unknown and renamed keys point to the right one, every documented command
parses, and progress goes to a log as plain lines (one k-means bar)."""
import ast
import fcntl
import json
import os
import pty
import re
import shlex
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
import torch

import runtime
from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# script -> the setting that names its output (nothing may exist there after a refused device)
DEVICE_SCRIPTS = {'train.py': 'out_dir', 'lit.py': 'out_dir', 'cluster.py': 'out_dir',
                  'probe.py': 'out_dir', 'scripts/reproduce_cifar10.py': 'out',
                  'scripts/visualize.py': 'out'}


def run(*cmd, stderr_to=None, env=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=stderr_to is None,
                          stdout=subprocess.PIPE if stderr_to else None, stderr=stderr_to,
                          text=True, env=env, timeout=timeout)


# -----------------------------------------------------------------------------
# device

BAD_DEVICES = ['gpu', 'cuda' if not torch.cuda.is_available() else 'cuda:99']


@pytest.mark.parametrize('script', DEVICE_SCRIPTS)
def test_a_bad_device_is_one_line_before_any_folder(script, tmp_path):
    for device in BAD_DEVICES:
        out = tmp_path / 'out' / 'run'
        p = run(script, f'--device={device}', f'--{DEVICE_SCRIPTS[script]}={out}')
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (device, p.stdout + p.stderr)
        assert lines[0].startswith(f'device={device}: ') and 'available here: cpu' in lines[0]
        assert not (tmp_path / 'out').exists(), (script, device)


def test_check_device_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    with pytest.raises(SystemExit, match=r"^device=cuda: no CUDA GPU is visible "
                                         r"\(CUDA_VISIBLE_DEVICES=''\); available here: cpu$"):
        runtime.check_device('cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    runtime.check_device('cuda:1')  # these pass
    runtime.check_device('cpu')
    with pytest.raises(SystemExit, match=r'^device=cuda:2: cuda:2 needs 3 GPUs, 2 visible; '
                                         r'available here: cpu, cuda \(cuda:0..cuda:1\)$'):
        runtime.check_device('cuda:2')
    monkeypatch.setenv('LOCAL_RANK', '3')  # torchrun --nproc_per_node=4 on 2 GPUs
    with pytest.raises(SystemExit, match=r'^device=cuda: torchrun local rank 3 needs 4 GPUs'):
        runtime.check_device('cuda')
    with pytest.raises(SystemExit, match=r'^device=cuda0: unknown device \(cpu, cuda or cuda:<i>\); '
                                         r'available here: cpu, cuda \(cuda:0..cuda:1\)$'):
        runtime.check_device('cuda0')


# -----------------------------------------------------------------------------
# --help, unknown and renamed keys

_help = {}


def help_lines(script):
    """The setting rows of `python script --help` (run once per script)."""
    if script not in _help:
        p = run(script, '--help')
        assert p.returncode == 0, p.stderr
        _help[script] = [x.strip()[2:] for x in p.stdout.splitlines() if x.startswith('  --')]
    return _help[script]


def help_rows(script):
    """{key: comment} as --help prints them."""
    return {r.split('=', 1)[0]: r.partition('  # ')[2] for r in help_lines(script)}


def source_comments(script):
    """{key: [comment lines]} read line by line: `key = ...  # text` at the indentation of the
    configurator's exec line, then the comment-only lines right below it that are indented or
    whose text is (a `# heading` at the left edge starts a new section)."""
    lines = open(os.path.join(ROOT, script)).read().splitlines()
    at = next(i for i, x in enumerate(lines) if 'configurator.py' in x and 'exec(' in x)
    indent = len(lines[at]) - len(lines[at].lstrip())
    found, key = {}, None
    for x in lines[:at]:
        m = re.match(r' {%d}([a-z]\w*) = .*?  # (.*)$' % indent, x)
        c = re.match(r'( *)#( *)(.*)$', x)
        if m:
            key = m.group(1)
            found[key] = [m.group(2).strip()]
        elif c and key and (len(c.group(1)) > indent or len(c.group(2)) > 1):
            found[key].append(c.group(3).strip())
        else:
            key = None
    return found


HELP_SCRIPTS = ['train.py', 'lit.py', 'cluster.py', 'probe.py', 'prepare.py',
                'scripts/reproduce_cifar10.py', 'scripts/visualize.py',
                'scripts/compare_synthetic.py']


@pytest.mark.parametrize('script', HELP_SCRIPTS)
def test_help_prints_every_setting_s_whole_comment(script):
    rows, src = help_rows(script), source_comments(script)
    assert rows and src
    for key, parts in src.items():
        if key in rows:  # a name assigned with a comment before the settings (none today)
            assert rows[key] == ' '.join(parts), key


def test_help_of_multi_line_settings_ends_where_the_comment_ends():
    assert help_rows('cluster.py')['search'].endswith('or when faiss is not installed')
    assert help_rows('lit.py')['augment'].endswith('(precompute_features never augments)')
    assert "or 'synthetic'" in help_rows('prepare.py')['src']  # its settings are indented


@pytest.mark.parametrize('arg, message', [
    ('--learnig_rate=1e-3', "unknown key 'learnig_rate'; did you mean learning_rate?"),
    ('--batch_size=64', "unknown key 'batch_size'; did you mean "),
    ('--aug_scale=(0.2, 1.0)', 'aug_scale is now crop_scale'),
    ('--aug_pad=2', 'aug_pad is now pad'),
])
def test_unknown_and_renamed_keys_point_to_the_right_one(arg, message):
    g = defaults('train.py')
    with pytest.raises(SystemExit, match=re.escape(message)) as e:
        configure(g, [arg])
    assert '\n' not in str(e.value)
    if 'did you mean' in message:
        near = str(e.value).split('did you mean ')[1].split('?')[0].split(' or ')
        assert 0 < len(near) <= 3 and all(k in g for k in near)


def test_train_and_lit_share_the_crop_settings():
    train, lit = help_rows('train.py'), help_rows('lit.py')
    assert {'augment', 'crop_scale', 'pad'} <= train.keys() & lit.keys()
    assert not {'aug_scale', 'aug_pad'} & (train.keys() | lit.keys())


# -----------------------------------------------------------------------------
# every documented command parses

def defaults(script):
    """{key: default} of the script's settings, from its own --help (what configurator.py sees)."""
    g = {}
    for row in help_lines(script):
        key, _, value = row.partition('  # ')[0].partition('=')
        try:
            g[key] = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            g[key] = value
    m = re.search(r'^_TAKES_AUTO = (\(.*?\))', open(os.path.join(ROOT, script)).read(), re.M)
    if m:  # int settings that may also be 'auto' (configurator.py reads them from the script)
        g['_TAKES_AUTO'] = ast.literal_eval(m.group(1))
    return g


def commands_in(text, where, first, line_start):
    """(file:line, command) for each `python x.py ...` / `torchrun ... x.py ...` in text, whose
    first line is line `first` of the file; with line_start, only lines that begin with one
    (README code blocks), else anywhere in a line (docstrings: `One CPU process:   python ...`).
    Backslash continuations are joined."""
    pat = (r'^\s*(?:\$ )?(?:[A-Z_]+=\S+ )*((?:python3?|torchrun) .*)$' if line_start else
           r'(?:^|[\s(`])((?:python3?|torchrun) .*)$')
    lines, n = text.split('\n'), 0
    while n < len(lines):
        start, line = n, lines[n]
        while line.rstrip().endswith('\\') and n + 1 < len(lines):
            n += 1
            line = line.rstrip()[:-1] + ' ' + lines[n].strip().lstrip('#')
        n += 1
        m = re.search(pat, line)
        if m:
            for cmd in re.split(r'\s(?:&&|;)\s|;\s', m.group(1)):
                yield f'{where}:{first + start}', cmd.split('`')[0].strip()


def documented_commands():
    found = []
    readme = open(os.path.join(ROOT, 'README.md')).read()
    for m in re.finditer(r'^```[^\n]*\n(.*?)^```', readme, re.S | re.M):
        first = readme.count('\n', 0, m.start(1)) + 1
        found += commands_in(m.group(1), 'README.md', first, line_start=True)
    files = (['train.py', 'lit.py', 'cluster.py', 'probe.py', 'prepare.py', 'configurator.py']
             + sorted(f'scripts/{f}' for f in os.listdir(os.path.join(ROOT, 'scripts'))
                      if f.endswith('.py')))
    for f in files:
        node = ast.parse(open(os.path.join(ROOT, f)).read()).body[0]
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            doc = node.value.value  # raw, so that line numbers hold
            found += commands_in(doc, f, node.lineno, line_start=False)
    for f in sorted(os.listdir(os.path.join(ROOT, 'config'))):
        lines = open(os.path.join(ROOT, 'config', f)).read().split('\n')
        comments = [x.lstrip()[1:] if x.lstrip().startswith('#') else '' for x in lines]
        found += commands_in('\n'.join(comments), f'config/{f}', 1, line_start=False)
    return [(w, c) for w, c in found if re.search(r'\S+\.py\b', c)]


def placeholder(value):
    """A value the reader fills in: $VAR, <name>, ..., path/to/x."""
    return any(s in value for s in ('$', '<', '...', 'path/to'))


@pytest.mark.parametrize('where, cmd', documented_commands())
def test_documented_command_parses(where, cmd, monkeypatch):
    """Each --key exists in that script, each value has its type, each config file exists and
    holds only known keys: configurator.configure run on the command's arguments."""
    try:
        tokens = shlex.split(cmd, comments=True)
    except ValueError:
        tokens = cmd.split()
    tokens = [t.strip('[]') for t in tokens if t != '...']
    tokens = tokens[next(i for i, t in enumerate(tokens) if t.endswith('.py')):]
    for i, t in enumerate(tokens[1:], 1):  # prose after the command: `(the same ...)`
        if t.startswith('(') or not (t.startswith('--') or t.endswith('.py')):
            tokens = tokens[:i]
            break
    script, args = tokens[0], tokens[1:]
    assert os.path.exists(os.path.join(ROOT, script)), f'{where}: no {script}'
    if 'configurator.py' not in open(os.path.join(ROOT, script)).read():
        return  # a script without settings
    g = defaults(script)
    keys = list(g)
    monkeypatch.chdir(ROOT)  # commands are run from the repository root
    for a in args:
        if a.startswith('--') and placeholder(a.partition('=')[2]):
            assert a[2:].partition('=')[0] in keys, f'{where}: {script} has no {a}'
        elif not a.startswith('--') and placeholder(a):  # config/<yours>.py: the reader's own
            continue
        elif not a.startswith('--'):
            assert os.path.exists(a), f'{where}: no config file {a}'
            configure(g, [a])
        elif a not in ('-h', '--help'):
            configure(g, [a])


def test_documented_commands_are_found():
    where = {w.split(':')[0] for w, _ in documented_commands()}
    assert {'train.py', 'lit.py', 'cluster.py', 'probe.py', 'prepare.py', 'configurator.py',
            'scripts/reproduce_cifar10.py', 'config/cifar10.py'} <= where


# -----------------------------------------------------------------------------
# progress on a terminal and in a log

BAR = ("import sys, time; sys.path.insert(0, {root!r}); import runtime; "
       "runtime.PROGRESS_SECONDS = 0.25\n"
       "bar = runtime.progress(range(40), desc='work')\n"
       "for i in bar:\n    time.sleep(0.025); bar.set_postfix(i=i)\n")


def test_a_log_gets_plain_lines_at_most_one_per_interval(tmp_path):
    log = tmp_path / 'log'
    with open(log, 'w') as f:
        t0 = time.time()
        p = run('-c', BAR.format(root=ROOT), stderr_to=f)
        seconds = time.time() - t0
    assert p.returncode == 0
    text = log.read_text()
    lines = text.splitlines()
    assert '\r' not in text and '\x1b' not in text
    assert all(x.startswith('work: ') for x in lines)
    assert 2 <= len(lines) <= seconds / 0.25 + 2  # first, one per interval, last
    assert '40/40' in lines[-1] and 'i=39' in lines[-1]


def test_a_terminal_gets_a_redrawn_bar(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # 0 columns: no bar
    p = subprocess.Popen([sys.executable, '-c', BAR.format(root=ROOT)], stderr=slave, cwd=ROOT)
    os.close(slave)
    out = b''
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(60) == 0
    assert out.count(b'\r') > 5 and out.count(b'\n') <= 2  # redrawn in place


def test_cluster_draws_one_kmeans_bar_and_a_plain_log(tmp_path):
    data = tmp_path / 'syn'
    p = run('prepare.py', '--src=synthetic', f'--out={data}', '--count=400', '--image_size=16',
            '--workers=1')
    assert p.returncode == 0, p.stderr
    log = tmp_path / 'stderr.log'
    with open(log, 'w') as f:
        p = run('cluster.py', f'--data_dir={data}', f'--out_dir={tmp_path / "c"}', '--device=cpu',
                '--num_classes=8', '--num_positives=2', '--pixels_size=8', '--pca_dim=16',
                '--niter=20', '--assign_batch=64', stderr_to=f, env={'CUDA_VISIBLE_DEVICES': ''})
    assert p.returncode == 0, log.read_text()
    text = log.read_text()
    lines = text.splitlines()
    kmeans = [x for x in lines if x.startswith('kmeans 400x16 -> 8: ')]
    assert '\r' not in text and not any('iteration' in x for x in lines)
    assert 1 <= len(kmeans) <= 3 and '20/20' in kmeans[-1], text  # 20 iterations, one bar
    assert json.load(open(tmp_path / 'c' / 'cluster.json'))['k'] == 8


def test_prepare_names_the_first_skipped_inputs(tmp_path):
    from PIL import Image
    for c in 'ab':
        os.makedirs(tmp_path / 'src' / c)
        for i in range(2):
            image = Image.fromarray((np.arange(192).reshape(8, 8, 3) + 40 * i).astype(np.uint8))  # not flat
            image.save(tmp_path / 'src' / c / f'{i}.png')
    for i in range(7):
        (tmp_path / 'src' / 'a' / f'broken{i}.jpg').write_bytes(b'not an image')
    p = run('prepare.py', f'--src={tmp_path / "src"}', f'--out={tmp_path / "d"}', '--image_size=8',
            '--workers=1')
    assert p.returncode == 0, p.stderr
    meta = json.load(open(tmp_path / 'd' / 'meta.json'))
    names = [k for k, _ in meta['skipped']['items']]
    line = p.stderr.strip().splitlines()[-1]
    assert len(names) == 7 and line.startswith('skipped 7 input(s): ')
    assert all(f'{k} (unreadable)' in line for k in names[:5]) and names[5] not in line
    assert ', and 2 more (all in ' in line
