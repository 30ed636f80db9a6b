"""Search over long histories in chunks: memory and time linear in the history length L.

The plain two-stage model gathers whole `[B, L, D]` behaviour vectors per table and keeps them
(and their concatenations) alive for the backward pass. Here the history is cut into chunks of
C positions; each chunk's vectors are looked up, used (scores, hash signatures, weighted
sums) and dropped. The chunk body is wrapped in `jax.checkpoint`, so the backward pass
recomputes a chunk's lookups instead of storing them: what stays alive is `[B, L]` per-position
results (scores, codes) plus one `[B, C, D]` chunk at a time.

A chunk function receives `ids`, a dict of `[B, C]` int arrays (`item`, `category`, `time`)
plus `valid [B, C]` bool, and returns per-position results (`chunked_map`) or a reduction
(`chunked_weighted_sum`). chunk <= 0 or chunk >= L runs the function once on the whole history.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

HistoryIds = dict[str, jax.Array]  # {'item', 'category', 'time': int [B, L], 'valid': bool [B, L]}

SCORE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _split(history: HistoryIds, chunk: int) -> tuple[HistoryIds, int]:
    """Left-pad every `[B, L, ...]` array to a multiple of `chunk` (ids 0, valid False) and
    reshape to `[n, B, C, ...]`. Returns (chunked dict, padding count)."""
    length = next(iter(history.values())).shape[1]
    pad = (-length) % chunk
    out = {}
    for key, value in history.items():
        # Zeros: id 0 (padding), valid False, weight 0. Trailing dims (weights [B, L, G]) kept.
        value = jnp.pad(value, [(0, 0), (pad, 0)] + [(0, 0)] * (value.ndim - 2))
        batch, rest = value.shape[0], value.shape[2:]
        out[key] = jnp.moveaxis(value.reshape((batch, -1, chunk) + rest), 1, 0)
    return out, pad


def chunked_map(
    fn: Callable[[HistoryIds], jax.Array], history: HistoryIds, chunk: int
) -> jax.Array:
    """Apply fn (`[B, C]` ids -> `[B, C, ...]`) chunk by chunk -> `[B, L, ...]`."""
    length = history["valid"].shape[1]
    if chunk <= 0 or chunk >= length:
        return fn(history)
    chunks, pad = _split(history, chunk)
    stacked = jax.lax.map(jax.checkpoint(fn), chunks)  # [n, B, C, ...]
    n, batch = stacked.shape[:2]
    out = jnp.moveaxis(stacked, 0, 1).reshape((batch, n * chunk) + stacked.shape[3:])
    return out[:, pad:]


def chunked_weighted_sum(
    fn: Callable[[HistoryIds], jax.Array], weights: jax.Array, history: HistoryIds, chunk: int
) -> jax.Array:
    """sum_j weights[b, j, ...] * fn(ids)[b, j, :] accumulated chunk by chunk.

    fn: `[B, C]` ids -> vectors `[B, C, D]`; weights `[B, L]` or `[B, L, G]` (float or bool).
    Returns `[B, D]` (weights `[B, L]`) or `[B, G, D]` (weights `[B, L, G]`).
    """
    spec = "bc,bcd->bd" if weights.ndim == 2 else "bcg,bcd->bgd"
    length = history["valid"].shape[1]

    def weighted(w: jax.Array, vectors: jax.Array) -> jax.Array:
        # Boolean weights (SDIM's bucket matches) stay 1 byte per entry until used here.
        return jnp.einsum(spec, w.astype(vectors.dtype), vectors)

    if chunk <= 0 or chunk >= length:
        return weighted(weights, fn(history))
    chunks, _ = _split(dict(history, _weights=weights), chunk)
    chunk_weights = chunks.pop("_weights")

    @jax.checkpoint
    def body(total: jax.Array, inputs: tuple[jax.Array, HistoryIds]) -> tuple[jax.Array, None]:
        w, ids = inputs
        return total + weighted(w, fn(ids)), None

    # The accumulator's width comes from one evaluation on an empty-shape probe.
    probe = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], chunks))
    lead = (weights.shape[0],) if weights.ndim == 2 else (weights.shape[0], weights.shape[2])
    total0 = jnp.zeros(lead + probe.shape[-1:], probe.dtype)
    total, _ = jax.lax.scan(body, total0, (chunk_weights, chunks))
    return total


def scaled_dot_scores(
    query: jax.Array, keys: jax.Array, split: int | None, score_dtype: str = "float32"
) -> jax.Array:
    """Scores `[B, C]` of query `[B, D]` against keys `[B, C, D]` (SPEC 3 scaled dot product).

    split=None: `<q, k> / sqrt(D)`; split=t: semantic part (first D - t) and time part (last t)
    scaled separately. score_dtype 'bfloat16' multiplies in bfloat16 and accumulates in
    float32 (half the key traffic; top-k and softmax stay float32).
    """
    dtype = SCORE_DTYPES[score_dtype]
    q, k = query.astype(dtype), keys.astype(dtype)

    def dot(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum("bd,bcd->bc", a, b, preferred_element_type=jnp.float32)

    if split is None:
        return dot(q, k) / jnp.sqrt(jnp.float32(query.shape[-1]))
    d_sem = query.shape[-1] - split
    semantic = dot(q[:, :d_sem], k[..., :d_sem]) / jnp.sqrt(jnp.float32(d_sem))
    time = dot(q[:, d_sem:], k[..., d_sem:]) / jnp.sqrt(jnp.float32(split))
    return semantic + time


def gather_history(history: HistoryIds, indices: jax.Array) -> HistoryIds:
    """The `[B, k]` ids (and valid flags) at positions `indices [B, k]` of every `[B, L]` array."""
    return {key: jnp.take_along_axis(value, indices, axis=1) for key, value in history.items()}
