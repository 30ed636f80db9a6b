"""First stage (search) and second stage (aggregation), written for ONE example (vmapped).

A search sees the target's attention vector `[D]` and its `History` of L behaviours and
returns a `Retrieval`. Soft search: softmax over the top-k scores, sum of the kept
representation vectors; hard search (SIM): k behaviours by category and recency.

Behaviour vectors `[L, D]` are passed as their PARTS along D (item, category, time `[L, d]`):
scores and aggregates are sums of per-part products, so the composed `[L, D]` is never built
(the time part, the same for every example, stays unbatched). The score, selection and
aggregation functions accept leading batch dims (`[..., L]`) too.

`search_chunk` > 0 processes the history in chunks (`History.map` / `History.total`) whose
rows are recomputed in the backward pass (`jax.checkpoint`): memory linear in L.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dare_jax.models.layers import Linear, PReLU, normal_init, torch_linear_bias_init

Behaviours = jax.Array | tuple[jax.Array, ...]  # vectors `[..., L, D]`, or their parts along D
Positions = dict[str, jax.Array]  # per-position arrays of one history, each `[L, ...]`

# The official masking value; exp(PADDING_SCORE - max) underflows to exactly 0 in float32.
PADDING_SCORE = float(-(2**32) + 1)


def as_parts(values: Behaviours) -> tuple[jax.Array, ...]:
    return values if isinstance(values, tuple) else (values,)


def part_slices(parts: tuple[jax.Array, ...]):
    """(offset, part) for each part: where the part starts along the composed D."""
    offset = 0
    for part in parts:
        yield offset, part
        offset += part.shape[-1]


def scored_product(spec: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    """`jnp.einsum(spec, a, b)`; 'bfloat16' multiplies in bfloat16 and sums in float32."""
    if dtype == "float32":  # the inputs' own precision (float64 in tests that enable it)
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def weighted_sum(weights: jax.Array, values: Behaviours) -> jax.Array:
    """`sum_l weights[..., l] values[..., l, :]` `[..., D]`, concatenated over the parts."""
    sums = [jnp.einsum("...l,...ld->...d", weights, part) for part in as_parts(values)]
    return jnp.concatenate(sums, axis=-1)


def dot_product_scores(
    query: jax.Array, keys: Behaviours, split: int | None, dtype: str = "float32"
) -> jax.Array:
    """Scaled dot-product scores `[..., L]` of query `[..., D]` against keys `[..., L, D]`:
    split=None: `<q, k> / sqrt(D)` (time mode "add"); split=t: the semantic part (first D - t
    entries) and the time part (last t) scaled separately, `<q_sem, k_sem> / sqrt(D - t) +
    <q_time, k_time> / sqrt(t)` (SPEC 3); a key part that straddles D - t is sliced there."""
    width = query.shape[-1]
    d_sem = width if split is None else width - split
    semantic, time = [], []
    for offset, part in part_slices(as_parts(keys)):
        end = offset + part.shape[-1]
        for lo, hi in ((offset, min(end, d_sem)), (max(offset, d_sem), end)):
            if lo < hi:
                piece = part if hi - lo == part.shape[-1] else part[..., lo - offset : hi - offset]
                product = scored_product("...d,...ld->...l", query[..., lo:hi], piece, dtype)
                (semantic if hi <= d_sem else time).append(product)
    scores = sum(semantic) / math.sqrt(d_sem)
    return scores if split is None else scores + sum(time) / math.sqrt(split)


class DinAttentionScores(nn.Module):
    """DIN's learnable scores `[..., L]`: MLP([q, k, q - k, q * k]) / D; Linear(4D, 36), PReLU,
    Linear(36, 1). query `[..., D]`, keys `[..., L, D]` (or parts)."""

    init_std: float = 0.01
    hidden: int = 36
    dtype: str = "float32"

    @nn.compact
    def __call__(self, query: jax.Array, keys: Behaviours) -> jax.Array:
        x = _DinFirstLayer(self.hidden, self.init_std, self.dtype, name="dense_0")(query, keys)
        x = PReLU(self.init_std, name="prelu_0")(x)
        x = Linear(1, init_std=self.init_std, name="dense_1")(x)
        return x[..., 0] / query.shape[-1]


class _DinFirstLayer(nn.Module):
    """Linear(4D, H) on [q, k, q - k, q * k] (params `kernel [4D, H]`, `bias [H]`) -> `[..., L, H]`,
    regrouped: q (W_q + W_d) + b + k (W_k - W_d + diag(q) W_p) is the same function at a
    quarter of the FLOPs (which dominate DIN's step), without the [L, 4D] concatenation."""

    features: int
    init_std: float = 0.01
    dtype: str = "float32"

    @nn.compact
    def __call__(self, query: jax.Array, keys: Behaviours) -> jax.Array:
        d = query.shape[-1]
        kernel = self.param("kernel", normal_init(self.init_std), (4 * d, self.features))
        bias = self.param("bias", torch_linear_bias_init(4 * d), (self.features,))
        w_q, w_k, w_d, w_p = (kernel[i * d : (i + 1) * d] for i in range(4))
        per_query = w_k - w_d + query[..., :, None] * w_p  # [..., D, H]
        per_position = sum(
            scored_product(
                "...ld,...dh->...lh", p, per_query[..., o : o + p.shape[-1], :], self.dtype
            )
            for o, p in part_slices(as_parts(keys))
        )
        return per_position + (jnp.dot(query, w_q + w_d) + bias)[..., None, :]


def mask_scores(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Scores with PADDING_SCORE where `mask` (same shape) is False."""
    return jnp.where(mask, scores, jnp.asarray(PADDING_SCORE, scores.dtype))


def full_attention(masked_scores: jax.Array, values: Behaviours) -> jax.Array:
    """Softmax over all masked scores `[..., L]`, weighted sum of values -> `[..., D]`."""
    return weighted_sum(jax.nn.softmax(masked_scores, axis=-1), values)


def aggregate_selected(
    masked_scores: jax.Array, values: Behaviours, indices: jax.Array
) -> jax.Array:
    """Softmax over the scores at `indices [..., k]` only, weighted sum of those values."""
    weights = jax.nn.softmax(jnp.take_along_axis(masked_scores, indices, axis=-1), axis=-1)
    taken = tuple(jnp.take_along_axis(p, indices[..., None], axis=-2) for p in as_parts(values))
    return weighted_sum(weights, taken)


def soft_search_indices(masked_scores: jax.Array, k: int) -> jax.Array:
    """Indices `[..., k]` of the k best masked scores `[..., L]` (gradient-free)."""
    return jax.lax.top_k(jax.lax.stop_gradient(masked_scores), k)[1]


def hard_search_indices(
    valid: jax.Array, same_category: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """SIM-style selection of exactly k positions (valid, same_category: bool `[..., L]`): the
    most recent same-category behaviours (at most k), then the most recent other valid ones,
    then padding positions (masked, so zero weight); position j is more recent than i < j.
    Returns (indices `[..., k]`, selected `[..., L]`: selected AND valid)."""
    length = valid.shape[-1]
    position = jnp.arange(length, dtype=jnp.int32)
    same = valid & same_category
    # Priority tiers: same category above other valid above padding; recency inside a tier.
    priority = jnp.where(
        same, 2 * length + position, jnp.where(valid, length + position, position - length)
    )
    _, indices = jax.lax.top_k(priority, k)
    chosen = jnp.any(indices[..., :, None] == position, axis=-2)
    return indices, chosen & valid


class Retrieval(NamedTuple):
    """What a search returns for one example."""

    retrieved: jax.Array  # `[D_repr]` the second-stage aggregate (a main-MLP feature)
    full: jax.Array | None  # `[D_repr]` softmax attention over all (aux head input); SDIM: None
    counted: jax.Array  # `[L]` bool: the behaviours the history average counts
    outputs: dict[str, jax.Array]  # extra model outputs (`attention_scores`, ...)


@dataclasses.dataclass(frozen=True)
class History:
    """One example's history, looked up lazily, in chunks of `chunk` positions (0: at once)."""

    # `[L, ...]` ids `item`, `category`, `time`, `valid` (bool), the lookups' row perturbations
    # and any arrays a search adds; chunks are left-padded with id 0 and valid False.
    positions: Positions
    vectors: Callable[[Positions, str], Behaviours]  # (positions, role) -> vectors (parts)
    score: Callable[[jax.Array, Behaviours], jax.Array]  # (query, keys `[P, D]`) -> `[P]`
    chunk: int

    @property
    def length(self) -> int:
        return self.positions["valid"].shape[0]

    def keys(self, positions: Positions) -> Behaviours:
        return self.vectors(positions, "attention_behavior")

    def values(self, positions: Positions) -> Behaviours:
        return self.vectors(positions, "representation_behavior")

    def masked_scores(self, query: jax.Array, positions: Positions) -> jax.Array:
        return mask_scores(self.score(query, self.keys(positions)), positions["valid"])

    def scores(self, query: jax.Array) -> jax.Array:
        """Masked scores `[L]` of the whole history."""
        return self.map(lambda positions: self.masked_scores(query, positions))

    def with_arrays(self, **arrays: jax.Array) -> History:
        """The same history with more per-position arrays `[L, ...]` (chunked alongside)."""
        return dataclasses.replace(self, positions={**self.positions, **arrays})

    def _split(self) -> tuple[Positions, int]:
        """Every array left-padded to a multiple of `chunk` and reshaped to `[n, C, ...]`."""
        pad = (-self.length) % self.chunk
        out = {}
        for key, value in self.positions.items():
            value = jnp.pad(value, [(pad, 0)] + [(0, 0)] * (value.ndim - 1))
            out[key] = value.reshape((-1, self.chunk) + value.shape[1:])
        return out, pad

    def map(self, fn: Callable[[Positions], Any]) -> Any:
        """fn (positions `[P]` -> a pytree of `[P, ...]`) over the history -> `[L, ...]`."""
        if not 0 < self.chunk < self.length:
            return fn(self.positions)
        chunks, pad = self._split()
        stacked = jax.lax.map(jax.checkpoint(fn), chunks)  # [n, C, ...]
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[pad:], stacked)

    def total(self, fn: Callable[[Positions], Any]) -> Any:
        """The sum over chunks of fn (positions -> a pytree of sums over those positions);
        fn must give 0 for padding positions (weights 0, or `valid`-masked)."""
        if not 0 < self.chunk < self.length:
            return fn(self.positions)
        chunks, _ = self._split()

        @jax.checkpoint
        def body(total: Any, chunk: Positions) -> tuple[Any, None]:
            return jax.tree.map(jnp.add, total, fn(chunk)), None

        shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], chunks))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(body, zeros, chunks)[0]

    def weighted_sum(self, weights: jax.Array) -> jax.Array:
        """`sum_l weights[l, ...] values[l]`: weights `[L]` -> `[D]`, `[L, G]` -> `[G, D]`."""

        def partial(positions: Positions) -> jax.Array:
            values = as_parts(self.values(positions))
            w = jnp.moveaxis(positions["_weights"].astype(values[0].dtype), 0, -1)
            return jnp.concatenate([w @ part for part in values], axis=-1)

        return self.with_arrays(_weights=weights).total(partial)

    def attend(self, query: jax.Array, indices: jax.Array) -> jax.Array:
        """Softmax over the masked scores at `indices [k]` only, weighted sum of their
        representation vectors -> `[D]` (only the k rows are looked up)."""
        kept = {key: value[indices] for key, value in self.positions.items()}
        weights = jax.nn.softmax(self.masked_scores(query, kept), axis=-1)
        return weighted_sum(weights, self.values(kept))


def attention_over(
    query: jax.Array, history: History, masked: jax.Array, indices: jax.Array, want_full: bool
) -> Retrieval:
    """Target attention over the behaviours at `indices [k]`; with `want_full`, the aux
    head's softmax over all masked scores `masked [L]` too."""
    full = history.weighted_sum(jax.nn.softmax(masked, axis=-1)) if want_full else None
    outputs = {"attention_scores": masked, "topk_indices": indices}
    return Retrieval(history.attend(query, indices), full, history.positions["valid"], outputs)


def soft_search(query: jax.Array, target, history: History, cfg, want_full: bool) -> Retrieval:
    """TWIN / DARE / DIN: the top-k of the scores over the whole history."""
    masked = history.scores(query)
    indices = soft_search_indices(masked, int(cfg.top_k))
    return attention_over(query, history, masked, indices, want_full)


def hard_search(query: jax.Array, target, history: History, cfg, want_full: bool) -> Retrieval:
    """TWIN (hard), SIM-style: k behaviours by category and recency; the others' scores are
    masked, so the aux head's full attention is over the k too."""
    same_category = history.positions["category"] == target["category"]
    valid = history.positions["valid"]
    indices, selected = hard_search_indices(valid, same_category, int(cfg.top_k))
    history = history.with_arrays(valid=selected)
    return attention_over(query, history, history.scores(query), indices, want_full)
