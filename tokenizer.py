"""
CLIP's tokenizer: byte-level BPE, vocabulary 49408 = 256 bytes + 256 bytes</w> + 48894 merges + 2
special tokens. The merges file is the one OpenAI released with CLIP (MIT licence), in assets/.

    tokenize(['a photo of a cat'])  ->  int64 [1, 77]: <start_of_text> ids <end_of_text> 0 ...
"""
import functools
import gzip
import heapq
import html
import os
import re
import unicodedata

import numpy as np

SOT, EOT = 49406, 49407  # <start_of_text>, <end_of_text>
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets',
                        'bpe_simple_vocab_16e6.txt.gz')


def _bytes_to_unicode():
    # every byte gets a printable stand-in so that BPE never sees whitespace/control bytes
    bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
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
    return ''.join('\\U%08x' % a if a == b else '\\U%08x-\\U%08x' % (a, b)
                   for a, b in zip(lo.tolist(), hi.tolist()))


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
    # CLIP splits words with the `regex` pattern [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ (IGNORECASE);
    # stdlib `re` has no \p{..}, so the classes come from unicodedata. Non-letters that case-fold
    # to a letter or digit (U+0345) match nothing under `regex`: left out of 'other' too.
    cats = np.array(list(map(unicodedata.category, map(chr, range(0x110000)))))
    major = cats.view('U1')[::2]
    L, N = np.nonzero(major == 'L')[0], np.nonzero(major == 'N')[0]
    LN = set(L.tolist()) | set(N.tolist())
    other = np.nonzero(np.isin(major, list('MPSC')) & ~np.isin(cats, ['Cn', 'Co', 'Cs']))[0]
    folds = [c for c in other.tolist() if any(len(v) == 1 and ord(v) in LN for v in
                                               (chr(c).lower(), chr(c).upper(), chr(c).casefold()))]
    pat = re.compile(r"<start_of_text>|<end_of_text>|'[sSſ]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]"
                     rf"|'[lL][lL]|'[dD]|[{_char_class(L)}]+|[{_char_class(N)}]"
                     rf"|[^\s{_char_class(np.concatenate([L, N, folds]))}]+")
    return encoder, ranks, byte_enc, pat, {}


def _bpe(word, ranks, cache):
    """BPE: merge the lowest-ranked adjacent pair everywhere it occurs (left to right, not
    overlapping) until no pair has a rank. A heap of (rank, position) over a linked list of parts,
    O(n log n); pairs a sweep creates join the heap after it, as in the pass-by-pass definition."""
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
    """CLIP's cleaning: ftfy (if installed), HTML unescape twice, collapse whitespace, lowercase."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return ' '.join(text.split()).lower()


# n tokens come from at most 33 n characters of cleaned text (tokens of <= 32 bytes + a space);
# twice that keeps the word the cut splits past token n, and bounds the work on any caption
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
