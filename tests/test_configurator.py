"""configurator.py: config files and --key=value overrides, with errors that name the key."""
import os
import re
import subprocess
import sys

import pytest

from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def defaults():
    return {'lr': 5e-4, 'batch_size': 256, 'compile': False, 'out_dir': 'out/x', 'init_from': None,
            'betas': (0.9, 0.98), '_private': 1, 'TEMPLATES': ['a {}.']}


def test_overrides_parse_as_python_literals():
    g = defaults()
    configure(g, ['--lr=1', '--batch_size=32', '--compile=True', '--out_dir=out/run 1',
                  '--init_from=resume', '--betas=[0.9, 0.95]'])
    assert g['lr'] == 1.0 and isinstance(g['lr'], float)  # an int is fine where a float is expected
    assert g['batch_size'] == 32 and g['compile'] is True
    assert g['out_dir'] == 'out/run 1' and g['init_from'] == 'resume'
    assert g['betas'] == (0.9, 0.95) and isinstance(g['betas'], tuple)
    assert g['config'] == {k: g[k] for k in defaults() if k not in ('_private', 'TEMPLATES')}


def test_config_file_then_override_in_order(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text('import math\nbatch_size = 8 * 4\nlr = math.sqrt(4) * 1e-4\n_helper = 3\n')
    g = defaults()
    configure(g, [str(cfg), '--batch_size=16'])
    assert g['batch_size'] == 16 and g['lr'] == pytest.approx(2e-4)


@pytest.mark.parametrize('args, message', [
    (['--lrr=0.1'], "unknown key 'lrr'"),
    (['--batch_size=0.5'], "'batch_size' expects int"),
    (['--compile=1'], "'compile' expects bool"),
    (['--out_dir=3'], "'out_dir' expects str"),
    (['--lr'], "not of the form --key=value"),
    (['--TEMPLATES=[]'], "unknown key 'TEMPLATES'"),  # constants are not settings
    (['no/such/config.py'], 'cannot read config file no/such/config.py'),
])
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(SystemExit, match=message.replace('(', r'\(')):
        configure(defaults(), args)


def test_unknown_key_in_config_file_names_file_and_key(tmp_path):
    cfg = tmp_path / 'bad.py'
    cfg.write_text('batch_sise = 64\n')
    with pytest.raises(SystemExit, match=r"bad.py\): unknown key 'batch_sise'"):
        configure(defaults(), [str(cfg)])


def test_exec_from_a_script_edits_its_globals(tmp_path):
    # the way stage scripts use it: exec'd at top level of a script run as __main__
    script = tmp_path / 'stage.py'  # elsewhere than configurator.py, as bench/ scripts are
    script.write_text(
        "import os, json\nsteps = 10\nname = 'a'\ncompile = False  # shadows a builtin\n"
        "def tokenize(s):  # a name of the script's own, as prepare.py's tokenize\n    return s.split()\n"
        f"exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())\n"
        "assert tokenize('a b') == ['a', 'b']  # not replaced by a module the configurator uses\n"
        "print(json.dumps(config))\n")
    out = subprocess.run([sys.executable, str(script), '--steps=3', '--name=b', '--compile=True'],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == '{"steps": 3, "name": "b", "compile": true}'
    bad = subprocess.run([sys.executable, str(script), '--stpes=3'], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown key 'stpes'" in bad.stderr


def test_help_shows_the_comment_beside_each_setting(tmp_path):
    script = tmp_path / 'stage.py'
    script.write_text(
        "import os\n# I/O\nsteps = 10  # optimizer steps\nname = 'a#b'  # a name; '#' in a value is fine\n"
        "batch = 32  # images per step; when it is not\n"
        "            # a multiple of the ranks, the nearest is used\n"
        "# a section comment, not batch's\nlr = 0.1\n"
        f"exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())\n")
    out = subprocess.run([sys.executable, str(script), '--steps=3', '--help'], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    rows = {x.split('=')[0].strip(): x for x in out if x.startswith('  --')}
    assert rows['--steps'].split() == ['--steps=3', '#', 'optimizer', 'steps']
    assert rows['--name'].endswith("# a name; '#' in a value is fine")
    assert rows['--batch'].endswith('# images per step; when it is not a multiple of the ranks, '
                                    'the nearest is used')
    assert rows['--lr'].strip() == '--lr=0.1'  # no comment: none shown


def test_stage_help_explains_the_settings():
    p = subprocess.run([sys.executable, 'train.py', '--help'], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    line = next(x for x in p.stdout.splitlines() if x.startswith('  --learning_rate='))
    assert line.split('  # ')[1] == 'Table 9: 5e-4 for ViT-B, 4e-4 for ViT-L'


def settings(script, config, cwd):
    """{key: repr of value} that `python script config --help` lists, run from cwd."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), config, '--help'], cwd=cwd,
                       capture_output=True, text=True, check=True)
    return dict(x.split('  # ')[0].strip()[2:].split('=', 1) for x in p.stdout.splitlines()
                if x.startswith('  --'))


def test_config_files_that_run_a_shared_one(tmp_path):
    """vitb32 / vitb16 / vitl14 run config/paper.py, uniclip_cifar10 runs simclr_cifar10, found
    beside the config file whatever the working directory; each differs from the shared one only
    in what it sets itself."""
    got = {n: settings('train.py', os.path.join(ROOT, 'config', f'{n}.py'), tmp_path)
           for n in ('paper', 'vitb32', 'vitb16', 'vitl14')}
    for n, own in [('vitb32', {'out_dir': "'out/mlcd-vitb32'", 'model': "'ViT-B/32'"}),
                   ('vitb16', {'out_dir': "'out/mlcd-vitb16'", 'model': "'ViT-B/16'"}),
                   ('vitl14', {'out_dir': "'out/mlcd-vitl14'", 'model': "'ViT-L/14'",
                               'learning_rate': '0.0004'})]:
        assert got[n] == {**got['paper'], **own}, n
    assert got['paper']['num_classes'] == '1000000' and got['paper']['epochs'] == '32'
    assert got['paper']['micro_batch_size'] == "'auto'"  # the most that fits on the card
    simclr = settings('lit.py', os.path.join(ROOT, 'config', 'simclr_cifar10.py'), tmp_path)
    uniclip = settings('lit.py', os.path.join(ROOT, 'config', 'uniclip_cifar10.py'), tmp_path)
    assert uniclip == {**simclr, 'out_dir': "'out/uniclip_cifar10'", 'loss': "'uniclip'",
                       'views': '2', 'aug_embed': 'True'}


def test_help_reads_settings_inside_main_and_comments_continued_at_the_left_edge(tmp_path):
    # prepare.py's layout: settings in `if __name__ == '__main__':`, a function before them with
    # a local of the same name, and a comment continued by a `#   ...` line at the block's edge
    script = tmp_path / 'tool.py'
    script.write_text(
        "import os\n"
        "def build(src):\n    src = src.strip()  # a local, not the setting\n    return src\n"
        "if __name__ == '__main__':\n"
        "    # settings\n"
        "    src = 'a'  # a folder, a tar file, a list\n"
        "    #            of captions, or 'synthetic'\n"
        "    # a section comment, not src's\n"
        "    size = 3  # pixels\n"
        f"    exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())\n"
        "    print(build(src))\n")
    out = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    rows = {x.split('=')[0].strip(): x for x in out if x.startswith('  --')}
    assert rows['--src'].endswith("# a folder, a tar file, a list of captions, or 'synthetic'")
    assert rows['--size'].endswith('# pixels')


@pytest.mark.parametrize('args, message', [
    (['--lrr=0.1'], "unknown key 'lrr'; did you mean lr? (--help lists them)"),
    (['--batchsize=3'], "unknown key 'batchsize'; did you mean batch_size?"),
    (['--zzz=3'], "unknown key 'zzz'; known keys: lr, batch_size, compile, out_dir"),
])
def test_unknown_key_suggests_the_nearest(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        configure(defaults(), args)


def test_renamed_key_names_the_new_one(tmp_path):
    g = dict(defaults(), crop_scale=(0.4, 1.0), pad=4)
    with pytest.raises(SystemExit, match=r'^config error \(--aug_pad=2\): aug_pad is now pad$'):
        configure(g, ['--aug_pad=2'])
    cfg = tmp_path / 'old.py'
    cfg.write_text('aug_scale = (0.2, 1.0)\n')
    with pytest.raises(SystemExit, match=r'old.py\): aug_scale is now crop_scale$'):
        configure(g, [str(cfg)])
