"""README.md and docs/*.md: every relative link resolves (files, and #anchors as GitHub slugs
headings), README stays a guide (at most 25,000 bytes) and says how many tests there are, and CI
runs README's test command."""
import glob
import os
import re
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_BYTES = 25_000


def slug(heading):
    """GitHub's anchor for a heading: the rendered text lower-cased, every character that is not
    a letter, digit, mark, '_', '-' or space dropped, spaces turned into '-'."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading).strip().lower()
    keep = ''.join(c for c in text if c in '-_ ' or unicodedata.category(c)[0] in 'LNM')
    return keep.replace(' ', '-')


def prose_lines(text):
    """The lines outside fenced code blocks, with inline code spans removed."""
    fenced = False
    for line in text.split('\n'):
        if line.lstrip().startswith('```'):
            fenced = not fenced
            continue
        if not fenced:
            yield re.sub(r'`[^`]*`', '', line)


def anchors(path):
    """Every #anchor GitHub gives the headings of a markdown file (repeats get -1, -2, ...)."""
    seen, out = {}, set()
    for line in prose_lines(open(path, encoding='utf-8').read()):
        m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f'{s}-{seen[s]}')
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(path):
    """'file: link (why)' for each relative link of a markdown file that does not resolve."""
    bad = []
    for line in prose_lines(open(path, encoding='utf-8').read()):
        for target in re.findall(r'\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', line):
            if re.match(r'[a-z][a-z0-9+.-]*:|//', target, re.I):
                continue  # https:, mailto: ...
            file, _, anchor = target.partition('#')
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = f'{os.path.relpath(path, ROOT)}: {target}'
            if not os.path.exists(dest):
                bad.append(f'{where} (no such file)')
            elif anchor and dest.endswith('.md') and anchor not in anchors(dest):
                bad.append(f'{where} (no heading #{anchor} in {os.path.relpath(dest, ROOT)})')
    return bad


def documents():
    return [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def test_anchors_are_slugged_as_github_does():
    # GitHub's anchors for headings of this kind (punctuation and symbols dropped, each space a '-')
    assert slug('Paper → code') == 'paper--code'
    assert slug('Instance discrimination baselines (CLIP, UniCLIP, SimCLR)') == \
        'instance-discrimination-baselines-clip-uniclip-simclr'
    assert slug('One node, 8 GPUs') == 'one-node-8-gpus'
    assert slug('`max_open_shards` and the [data](x.md)') == 'max_open_shards-and-the-data'


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    text = ('# Top part\n\n## Two\n\n## Two\n\n'
            '[ok](b.md#b-heading) [ok](#two-1) [ok](https://x.org/none.md)\n'
            '[bad](missing.md) [bad](b.md#nowhere) [bad](#three)\n'
            '`[not a link](missing2.md)`\n```\n[in code](missing3.md)\n```\n')
    (tmp_path / 'a.md').write_text(text, encoding='utf-8')
    (tmp_path / 'b.md').write_text('# B heading\n', encoding='utf-8')
    bad = [b.split(': ', 1)[1].split(' ')[0] for b in broken_links(str(tmp_path / 'a.md'))]
    assert bad == ['missing.md', 'b.md#nowhere', '#three']


def test_every_relative_link_in_readme_and_docs_resolves():
    docs = documents()
    assert len(docs) > 5  # README and the pages it links to
    bad = [b for path in docs for b in broken_links(path)]
    assert not bad, '\n'.join(bad)


def test_readme_is_a_guide_of_at_most_25000_bytes():
    size = os.path.getsize(os.path.join(ROOT, 'README.md'))
    assert size <= README_MAX_BYTES, f'README.md is {size:,} bytes (at most {README_MAX_BYTES:,})'


def test_ci_runs_the_test_command_written_in_readme():
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    cmd = next(line for line in readme.split('\n') if line.rstrip().endswith('python -m pytest -q'))
    ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read()
    parts = [p.strip() for p in cmd.split('&&')]
    assert parts[-1] in ci.split('\n')  # the test run itself, exactly
    for part in parts[:-1]:  # each install, with the same packages and pins
        assert part.startswith('pip install ')
        spec = re.escape(part.removeprefix('pip install '))
        assert re.search(r'pip install (-q )?' + spec, ci), part


def test_code_comments_point_at_sections_that_exist():
    """Every `README, "X"` / `docs/y.md, "X"` pointer in the code names a heading of that file,
    or a bold lead-in (`**X.**`): a section that moved must take its pointers with it."""
    pointer = re.compile(r'(README|docs/[\w.-]+\.md)[,:]\s*(?:#\s*)?"([^"]+)"')
    checked = 0
    for path in glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, '*/*.py')):
        if os.sep + 'tests' + os.sep in path:
            continue
        src = re.sub(r'\n\s*#\s*', ' ', open(path, encoding='utf-8').read())  # comments rejoined
        for doc, title in pointer.findall(src):
            title = ' '.join(title.split())
            text = open(os.path.join(ROOT, 'README.md' if doc == 'README' else doc), encoding='utf-8').read()
            heads = {h.strip() for h in re.findall(r'^#+ (.+)$', text, re.M)}
            heads |= {b.rstrip('.') for b in re.findall(r'\*\*([^*]+)\*\*', text)}
            assert title in heads, f'{os.path.relpath(path, ROOT)}: {doc}, "{title}" is not a heading there'
            checked += 1
    assert checked >= 6


def test_readme_says_how_many_tests_there_are():
    """README's count of the tests is pytest's: a test added or removed must update it."""
    import subprocess
    import sys
    said = re.search(r'The tests \(([\d,]+);', open(os.path.join(ROOT, 'README.md')).read())
    assert said, "README.md: no 'The tests (N; ...' line"
    p = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = sum(1 for line in p.stdout.splitlines() if '::' in line)
    assert collected == int(said.group(1).replace(',', '')), (collected, said.group(1))


def test_layout_names_every_module():
    """docs/layout.md has a line for every module and script at the top level (a new file must
    say there what it holds)."""
    text = open(os.path.join(ROOT, 'docs', 'layout.md'), encoding='utf-8').read()
    named = set(re.findall(r'^(\w+\.py)\s', text, re.M))
    here = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, '*.py'))}
    assert here <= named, sorted(here - named)


def test_the_modules_import_one_another_without_a_circle():
    """The top-level modules' imports (at the top or inside functions) form no circle: each
    can be read and imported on its own, after those it builds on."""
    import ast
    mods = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py'))}
    deps = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(ROOT, m + '.py'), encoding='utf-8').read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split('.')[0])
        deps[m] = names & mods - {m}
    state = {}

    def visit(m, path):
        if state.get(m) == 'done':
            return
        assert state.get(m) != 'open', ' -> '.join(path + [m])
        state[m] = 'open'
        for d in sorted(deps[m]):
            visit(d, path + [m])
        state[m] = 'done'
    for m in sorted(mods):
        visit(m, [])
    assert deps['train'] >= {'runtime', 'loss', 'data'}  # the graph was read
