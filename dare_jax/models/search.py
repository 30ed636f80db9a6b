"""First stage (search) and second stage (aggregation), batched and with static shapes.

Scores `[B, L]` between the target's attention vector and every behaviour's; padded (or
unselected) positions get PADDING_SCORE; soft search keeps the top-k scores with
`jax.lax.top_k`, gathers `[B, k, D]`, softmaxes over the k kept and sums the representation
vectors. Hard search (SIM-style) selects k behaviours by category and recency with one
batched `top_k` over an integer priority. No Python loop over the batch anywhere.

Behaviour vectors `[B, L, D]` may be passed as their PARTS along D (a tuple: item `[B, L, d]`,
category `[B, L, d]`, time `[L, d]` the same for every example): scores and aggregates are
sums of per-part products and only the `[B, D]` results are concatenated, so the composed
`[B, L, D]` (and its backward pads and slices) is never built. A plain array is one part.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dare_jax.models.layers import Linear, PReLU, normal_init, torch_linear_bias_init

# A behaviour vector `[B, L, D]`, or its parts along D (each `[B, L, d]` or unbatched `[L, d]`).
Behaviours = jax.Array | tuple[jax.Array, ...]

# The official masking value; exp(PADDING_SCORE - max) underflows to exactly 0 in float32.
PADDING_SCORE = float(-(2**32) + 1)


def as_parts(values: Behaviours) -> tuple[jax.Array, ...]:
    """The parts of `values` (a plain array is a single part)."""
    return values if isinstance(values, tuple) else (values,)


def part_slices(parts: tuple[jax.Array, ...]):
    """(offset, part) for each part: where the part starts along the composed D."""
    offset = 0
    for part in parts:
        yield offset, part
        offset += part.shape[-1]


def _matvec(vectors: jax.Array, part: jax.Array) -> jax.Array:
    """`<vectors[b], part[b, l]>` `[B, L]` for vectors `[B, d]` and a part `[B, L, d]` / `[L, d]`."""
    if part.ndim == 2:
        return vectors @ part.T
    return jnp.einsum("bd,bld->bl", vectors, part)


def weighted_sum(weights: jax.Array, values: Behaviours) -> jax.Array:
    """`sum_l weights[b, l] values[b, l]` `[B, D]` for weights `[B, L]`, concatenated per part."""
    sums = [
        weights @ part if part.ndim == 2 else jnp.einsum("bl,bld->bd", weights, part)
        for part in as_parts(values)
    ]
    return jnp.concatenate(sums, axis=-1)


def dot_product_scores(query: jax.Array, keys: Behaviours, split: int | None) -> jax.Array:
    """Scaled dot-product scores `[B, L]` of query `[B, D]` against keys `[B, L, D]` (or parts).

    split=None: `<q, k> / sqrt(D)` (time mode "add").
    split=t: the last t entries (the time part) and the first D - t (the semantic part) are
    scored separately, `<q_sem, k_sem> / sqrt(D - t) + <q_time, k_time> / sqrt(t)` (SPEC 3).
    Each is a sum of per-part products; a part that straddles D - t is sliced there.
    """
    width = query.shape[-1]
    d_sem = width if split is None else width - split
    semantic, time = [], []
    for offset, part in part_slices(as_parts(keys)):
        end = offset + part.shape[-1]
        for lo, hi in ((offset, min(end, d_sem)), (max(offset, d_sem), end)):
            if lo < hi:
                piece = part if hi - lo == part.shape[-1] else part[..., lo - offset : hi - offset]
                (semantic if hi <= d_sem else time).append(_matvec(query[:, lo:hi], piece))
    scores = sum(semantic) / math.sqrt(d_sem)
    if split is None:
        return scores
    return scores + sum(time) / math.sqrt(split)


class DinAttentionScores(nn.Module):
    """DIN's learnable scores: MLP([q, k, q - k, q * k]) / D; Linear(4D, 36), PReLU, Linear(36, 1).

    query `[B, D]`, keys `[B, L, D]` (or parts) -> `[B, L]`.
    """

    init_std: float = 0.01
    hidden: int = 36

    @nn.compact
    def __call__(self, query: jax.Array, keys: Behaviours) -> jax.Array:
        x = _DinFirstLayer(self.hidden, self.init_std, name="dense_0")(query, keys)
        x = PReLU(self.init_std, name="prelu_0")(x)
        x = Linear(1, init_std=self.init_std, name="dense_1")(x)
        return x[..., 0] / query.shape[-1]


class _DinFirstLayer(nn.Module):
    """Linear(4D, H) on [q, k, q - k, q * k] (params `kernel [4D, H]`, `bias [H]`), regrouped.

    q W_q + k W_k + (q - k) W_d + (q * k) W_p + b = q (W_q + W_d) + b + k (W_k - W_d + diag(q) W_p)
    is the same function; per position it costs one [D] x [D, H] product instead of
    [4D] x [4D, H], and the [B, L, 4D] concatenation is never built (4x fewer FLOPs, which
    dominate DIN's step). query `[B, D]`, keys `[B, L, D]` (or parts: the product over D is
    a sum of per-part products) -> `[B, L, H]`.
    """

    features: int
    init_std: float = 0.01

    @nn.compact
    def __call__(self, query: jax.Array, keys: Behaviours) -> jax.Array:
        d = query.shape[-1]
        kernel = self.param("kernel", normal_init(self.init_std), (4 * d, self.features))
        bias = self.param("bias", torch_linear_bias_init(4 * d), (self.features,))
        w_q, w_k, w_d, w_p = (kernel[i * d : (i + 1) * d] for i in range(4))
        per_example = w_k - w_d + query[:, :, None] * w_p[None]  # [B, D, H]
        per_position = sum(
            jnp.einsum(
                "ld,bdh->blh" if part.ndim == 2 else "bld,bdh->blh",
                part,
                per_example[:, offset : offset + part.shape[-1]],
            )
            for offset, part in part_slices(as_parts(keys))
        )
        return per_position + (jnp.dot(query, w_q + w_d) + bias)[:, None, :]


def mask_scores(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Scores `[B, L]` with PADDING_SCORE where mask `[B, L]` is False."""
    return jnp.where(mask, scores, jnp.asarray(PADDING_SCORE, scores.dtype))


def full_attention(masked_scores: jax.Array, values: Behaviours) -> jax.Array:
    """Softmax over all L masked scores `[B, L]`, weighted sum of values `[B, L, D]` (or parts)
    -> `[B, D]`."""
    return weighted_sum(jax.nn.softmax(masked_scores, axis=-1), values)


def gather_rows(values: jax.Array, indices: jax.Array) -> jax.Array:
    """values `[B, L, ...]`, indices `[B, k]` -> `[B, k, ...]` (one batched gather)."""
    return jnp.take_along_axis(
        values, indices.reshape(indices.shape + (1,) * (values.ndim - 2)), axis=1
    )


def aggregate_selected(
    masked_scores: jax.Array, values: Behaviours, indices: jax.Array
) -> jax.Array:
    """Softmax over the selected scores only, weighted sum of the selected values.

    masked_scores `[B, L]`, values `[B, L, D]` (or parts; an unbatched `[L, d]` part is
    indexed by `indices` directly), indices `[B, k]` -> `[B, D]`.
    """
    kept_scores = jnp.take_along_axis(masked_scores, indices, axis=1)
    weights = jax.nn.softmax(kept_scores, axis=-1)
    kept = tuple(
        part[indices] if part.ndim == 2 else gather_rows(part, indices)
        for part in as_parts(values)
    )
    return weighted_sum(weights, kept)


def soft_search_indices(masked_scores: jax.Array, k: int) -> jax.Array:
    """Indices `[B, k]` of the k best masked scores `[B, L]` (gradient-free)."""
    _, indices = jax.lax.top_k(jax.lax.stop_gradient(masked_scores), k)
    return indices


def hard_search_indices(
    valid: jax.Array, same_category: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """SIM-style selection of exactly k positions per row, batched.

    valid `[B, L]` (a real behaviour), same_category `[B, L]` (its category is the target's).
    Rule: the most recent same-category behaviours (at most k); if fewer than k, the most
    recent other valid behaviours until there are k; if the row has fewer than k valid
    behaviours in all, the remaining slots are padding positions (their scores stay masked,
    so they get zero weight). Position j is more recent than i < j.
    Returns (indices `[B, k]`, selected `[B, L]` bool: selected AND valid).
    """
    length = valid.shape[1]
    position = jnp.arange(length, dtype=jnp.int32)[None, :]
    same = valid & same_category
    # Priority tiers: same category above other valid above padding; recency inside a tier.
    priority = jnp.where(
        same, 2 * length + position, jnp.where(valid, length + position, position - length)
    )
    _, indices = jax.lax.top_k(priority, k)
    chosen = jnp.zeros(valid.shape, dtype=bool)
    chosen = chosen.at[jnp.arange(valid.shape[0])[:, None], indices].set(True)
    return indices, chosen & valid
