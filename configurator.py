"""
Settings as Python, nanoGPT style. Every stage script defines its defaults as plain globals and
then runs

    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

so that

    python train.py config/vitb16.py --learning_rate=3e-4 --out_dir=out/run1

first executes the config file(s) and then applies --key=value overrides, in order. Values are
parsed as Python literals (strings may be given bare). A key the script does not define, or a value
of another type than the default's, stops the run with a message naming the key: a typo must never
silently train the wrong model; the message suggests the nearest keys, and a renamed key names
its new name. After this runs, the script has a `config` dict of all its settings.
`--help` lists every setting with its value and its whole comment in the script's source.
"""
import builtins
import difflib
import sys
import types
from ast import literal_eval

_CONFIG_TYPES = (bool, int, float, str, tuple, list, type(None))
# old name -> new name: one name for one meaning in every stage (train.py took lit.py's names:
# `aug_` there already prefixes the UniCLIP augmentation-aware embedding's settings)
_RENAMED = {'aug_scale': 'crop_scale', 'aug_pad': 'pad'}


def config_keys(g):
    """The settings of a script: its plain-valued globals, except _private names and CONSTANTS."""
    return [k for k, v in g.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, _CONFIG_TYPES)]


def setting_comments(path):
    """{key: whole comment} of a script's settings: the `key = value  # comment` lines before the
    line that execs this file, at its indentation (prepare.py keeps its settings in `if __name__ ==
    '__main__':`). A comment-only line right below continues the comment when it is indented or
    its text is (`#     more`); `# a heading` at the left edge starts a new section."""
    import tokenize  # here, not above: this file is exec'd into scripts that may have a tokenize
    found, key, stmt, last, depth = {}, None, False, -1, 0
    try:
        with open(path) as f:
            toks = list(tokenize.generate_tokens(f.readline))
    except (OSError, SyntaxError, tokenize.TokenError):
        return found
    for i, t in enumerate(toks):  # the exec line's indentation; settings stop there
        if t.string == 'exec' and any('configurator.py' in u.string for u in toks[i:i + 40]
                                      if u.start[0] == t.start[0]):
            indent, end = t.start[1], t.start[0]
            break
    else:
        indent, end = 0, float('inf')
    for i, t in enumerate(toks):
        if t.start[0] >= end:
            break
        depth += (t.string in '([{') - (t.string in ')]}') if t.type == tokenize.OP else 0
        if (t.type == tokenize.NAME and t.start[1] == indent and toks[i + 1].string == '='
                and depth == 0 and (i == 0 or toks[i - 1].type in (
                    tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                    tokenize.COMMENT))):
            key, stmt = t.string, True
            found.pop(key, None)  # the last assignment before the exec is the default
        elif t.type == tokenize.COMMENT and key:
            text = t.string.lstrip('#').strip()
            if stmt:  # on the setting's own line
                found[key], last = text, t.start[0]
            elif (key in found and t.start[0] == last + 1
                  and (t.start[1] > indent or t.string.startswith('#  '))):  # continued below
                found[key], last = f'{found[key]} {text}', last + 1
            else:
                key = None
        elif t.type == tokenize.NEWLINE:
            stmt = False
        elif t.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT) and not stmt:
            key = None
    return found


def unknown_key(key, keys, where):
    """The one-line refusal of a key the script does not define: its new name if it was renamed,
    else the nearest known keys."""
    if _RENAMED.get(key) in keys:
        return f'config error ({where}): {key} is now {_RENAMED[key]}'
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(near)}?" if near else
            f"known keys: {', '.join(keys)}")
    return f"config error ({where}): unknown key '{key}'; {hint} (--help lists them)"


def coerce(key, value, default, where, takes_auto=()):
    """Check `value` against the type of the default; ints are accepted where floats are expected.
    A setting in takes_auto is an int that may also be 'auto' (the script's _TAKES_AUTO)."""
    if default is None or value is None:
        return value
    if key in takes_auto and 'auto' in (value, default) and (value == 'auto' or type(value) is int):
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    elif type(value) is type(default):
        return value
    raise SystemExit(f"config error ({where}): '{key}' expects {type(default).__name__} "
                     f"(default {default!r}), got {type(value).__name__} {value!r}")


def _config_line(e, path):
    """The line of config file `path` where exception e was raised (the deepest frame in it)."""
    import traceback
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
    return lines[-1] if lines else '?'


def configure(g, args):
    keys = config_keys(g)
    for arg in args:
        if arg in ('-h', '--help'):
            notes = setting_comments(g['__file__']) if g.get('__file__') else {}
            rows = [(f'--{k}={g[k]!r}', notes.get(k)) for k in keys]
            width = min(40, max((len(r) for r, _ in rows), default=0))
            print('settings (override with --key=value or a config file):')
            for r, note in rows:
                print(f'  {r:<{width}}  # {note}' if note else f'  {r}')
            raise SystemExit(0)
        if not arg.startswith('--'):  # a config file: Python that assigns some of the settings
            try:
                src = open(arg).read()
            except OSError as e:
                raise SystemExit(f'config error: cannot read config file {arg}: {e.strerror}')
            ns = {k: g[k] for k in keys}
            ns['__file__'] = arg
            # builtins.compile: exec'd into a stage script, this runs in its globals, where a
            # setting may be named compile (nanoGPT's)
            try:
                exec(builtins.compile(src, arg, 'exec'), ns)
            except SyntaxError as e:  # one line, not a traceback: the file is the user's
                raise SystemExit(f'config file {e.filename or arg}: SyntaxError at line '
                                 f'{e.lineno}: {e.msg}')
            except Exception as e:
                raise SystemExit(f'config file {arg}: {type(e).__name__} at line '
                                 f'{_config_line(e, arg)}: {e}'.splitlines()[0])
            for k, v in ns.items():
                if k.startswith('_') or isinstance(v, (types.ModuleType, types.FunctionType, type)):
                    continue
                if k not in keys:
                    raise SystemExit(unknown_key(k, keys, arg))
                g[k] = coerce(k, v, g[k], arg, g.get('_TAKES_AUTO', ()))
        else:  # --key=value
            key, eq, val = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"config error: '{arg}' is not of the form --key=value")
            if key not in keys:
                raise SystemExit(unknown_key(key, keys, arg))
            try:
                val = literal_eval(val)
            except (SyntaxError, ValueError):
                pass  # a bare string such as --out_dir=out/run1
            g[key] = coerce(key, val, g[key], arg, g.get('_TAKES_AUTO', ()))
    g['config'] = {k: g[k] for k in keys}


if __name__ == '__main__':  # exec'd at the top of a stage script, whose globals these are
    configure(globals(), sys.argv[1:])
