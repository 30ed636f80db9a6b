"""Grain's global shuffle, computed for a whole batch of positions at once.

`grain.MapDataset.range(n).shuffle(seed)` sends position `i` of epoch `e` to
`index_shuffle(i, max_index=n - 1, seed=(seed + e) % 2**32, rounds=4)`, a pseudorandom
permutation of `[0, n)` that grain computes one position per Python call; this module
computes the same one with numpy for a whole batch (the tests check it against grain's;
should grain change its permutation, this module keeps the data order of existing runs).

The permutation, as grain defines it: a Simon-style Feistel cipher on blocks of `2w` bits
(`2w` = ceil(log2(n - 1)) rounded up to even, at least 16), `rounds` round keys drawn from
C++'s `std::seed_seq{seed}`, each pair of rounds `l ^= f(r) ^ k1; r ^= f(l) ^ k2` with
`f(x) = (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)` on `w`-bit words, and cycle walking
(encrypt again until the value is at most `n - 1`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

_MASK32 = 0xFFFFFFFF
_MIN_BLOCK_BITS = 16


def seed_seq_keys(seed: int, count: int) -> list[int]:
    """`count` 32-bit words of C++'s `std::seed_seq{seed}.generate` (the standard's
    algorithm, [rand.util.seedseq], for one seed word)."""
    words = [0x8B8B8B8B] * count
    n, s = count, 1
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p, q, m = (n - t) // 2, (n - t) // 2 + t, max(s + 1, n)

    def mix(x: int) -> int:
        return (x ^ (x >> 27)) & _MASK32

    for k in range(m):
        r1 = (1664525 * mix(words[k % n] ^ words[(k + p) % n] ^ words[(k - 1) % n])) & _MASK32
        # The standard's r2: r1 + s at k = 0, r1 + k % n + the seed word for 0 < k <= s.
        r2 = (r1 + (s if k == 0 else k % n + (seed if k <= s else 0))) & _MASK32
        words[(k + p) % n] = (words[(k + p) % n] + r1) & _MASK32
        words[(k + q) % n] = (words[(k + q) % n] + r2) & _MASK32
        words[k % n] = r2
    for k in range(m, m + n):
        total = words[k % n] + words[(k + p) % n] + words[(k - 1) % n]
        r3 = (1566083941 * mix(total & _MASK32)) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        words[(k + p) % n] ^= r3
        words[(k + q) % n] ^= r4
        words[k % n] = r4
    return words


def index_shuffle(positions: np.ndarray, max_index: int, seed: int, rounds: int = 4) -> np.ndarray:
    """Where grain's `index_shuffle` sends each of `positions` (ints in `[0, max_index]`):
    int64, same shape."""
    positions = np.asarray(positions)
    if max_index == 0:
        return np.zeros(positions.shape, np.int64)
    block, encrypt = _cipher(max_index, seed, rounds)
    if 2**block > 4 * (max_index + 1):
        # Only below 2**14 samples (the 16-bit minimum block): cycle walks are long, so
        # follow them once for the whole domain.
        return _small_domain_table(max_index, seed, rounds)[positions]
    out = encrypt(positions.astype(np.uint64))
    walking = out > np.uint64(max_index)  # cycle walking: re-encrypt until in range
    while walking.any():
        out[walking] = encrypt(out[walking])
        walking[walking] = out[walking] > np.uint64(max_index)
    return out.astype(np.int64)


def _cipher(max_index: int, seed: int, rounds: int):
    """(block bits, the vectorised encryption of uint64 values on that block)."""
    block = math.ceil(math.log2(max_index))  # max_index >= 1
    block = max(block + block % 2, _MIN_BLOCK_BITS)
    word = min(block, 64) // 2
    mask = np.uint64((1 << word) - 1)
    keys = [np.uint64(k) & mask for k in seed_seq_keys(seed, rounds)]
    shift = np.uint64(word)

    def rotl(x: np.ndarray, r: int) -> np.ndarray:
        return ((x << np.uint64(r)) | (x >> np.uint64(word - r))) & mask

    def f(x: np.ndarray) -> np.ndarray:
        return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

    def encrypt(value: np.ndarray) -> np.ndarray:
        left, right = (value >> shift) & mask, value & mask
        for k1, k2 in zip(keys[0::2], keys[1::2]):
            left = left ^ f(right) ^ k1
            right = right ^ f(left) ^ k2
        return (left << shift) | right

    return block, encrypt


@functools.lru_cache(maxsize=4)
def _small_domain_table(max_index: int, seed: int, rounds: int) -> np.ndarray:
    """index_shuffle of every position `[0, max_index]` when the cipher's domain is small:
    the first in-range value after each position along the cipher's cycles, found by
    pointer jumping (each round, a pointer still out of range jumps to its target's
    pointer; no in-range value is ever skipped)."""
    block, encrypt = _cipher(max_index, seed, rounds)
    jump = encrypt(np.arange(2**block, dtype=np.uint64)).astype(np.int64)
    while (jump[: max_index + 1] > max_index).any():
        jump = np.where(jump > max_index, jump[jump], jump)
    return jump[: max_index + 1]
