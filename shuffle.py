"""
The epoch order of the training data: which rows form each step's batch, as a pure function of
(seed, epoch, position), so that an exact resume, any number of ranks and a data set of 400M rows
need no stored permutation (epoch_order).
"""
import numpy as np


FEISTEL_ROUNDS = 6  # Luby-Rackoff: 4 rounds of random functions already give a pseudo-random one


def _mix(x):
    # splitmix64's finaliser: every input bit flips each output bit with probability ~1/2
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(positions, n, seed, epoch):
    """The rows at `positions` of epoch `epoch`'s order of range(n): a bijection of [0, n) keyed
    by (seed, epoch), computed for just these positions (memory O(len(positions)), not O(n)).

    A Feistel network on [0, 4^h) with 4^h >= n (h bits per half) is a bijection whatever its
    round function; positions it maps outside [0, n) are mapped again (cycle walking, < 4 tries
    on average) until they land inside, which keeps it a bijection of [0, n). With splitmix64 as
    the round function and 6 rounds the order is pseudo-random (Luby-Rackoff): it passes the
    uniformity checks of tests/test_scale_data.py as a uniform shuffle would. Like any seeded
    shuffle (numpy's permutation included) it reaches only a key-sized subset of the n! orders;
    a full permutation would cost 8 bytes per row per rank (3.2 GB at 400M rows)."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f'positions outside [0, {n})')
    h = max(1, -(-int(n - 1).bit_length() // 2))
    mask, half = np.uint64((1 << h) - 1), np.uint64(h)
    # the third word keeps these keys apart from other streams seeded by (seed, epoch)
    keys = np.random.SeedSequence([seed, epoch, 0xFE15]).generate_state(FEISTEL_ROUNDS, np.uint64)

    def permute(x):
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    x = permute(pos.astype(np.uint64))
    out = x >= np.uint64(n)
    while out.any():
        x[out] = permute(x[out])
        out = x >= np.uint64(n)
    return x.astype(np.int64)
