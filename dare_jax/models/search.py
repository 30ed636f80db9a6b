"""First stage (search) and second stage (aggregation), written for ONE example.

The model `jax.vmap`s a search over the batch: a search sees the target's attention vector
`[D]` and its history of L behaviours (a `History`) and returns a `Retrieval`. Soft search
keeps the top-k scores (`jax.lax.top_k`), softmaxes over them and sums the kept
representation vectors; hard search (SIM) selects k behaviours by category and recency with
one `top_k` over an integer priority. ETA, SDIM and TWIN-V2 have their own (`eta.py`, ...).

Behaviour vectors `[L, D]` are passed as their PARTS along D (item, category, time `[L, d]`):
scores and aggregates are sums of per-part products, so the composed `[L, D]` is never built
(under vmap the time part, the same for every example, stays unbatched). The score,
selection and aggregation functions accept leading batch dims (`[..., L]`) too.

`search_chunk` > 0 processes the history in chunks (`History.map` / `History.total`): a
chunk's rows are looked up, used and dropped, and the backward pass recomputes them
(`jax.checkpoint`), so memory grows with L only through `[L]`-sized results.
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

# Behaviour vectors `[..., L, D]`, or their parts along D.
Behaviours = jax.Array | tuple[jax.Array, ...]
Positions = dict[str, jax.Array]  # per-position arrays of one history, each `[L, ...]`

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


def scored_product(spec: str, a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    """`jnp.einsum(spec, a, b)`; dtype 'bfloat16' multiplies in bfloat16 and sums in float32
    ('float32': the inputs' own precision, float64 in tests that enable it)."""
    if dtype == "float32":
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def weighted_sum(weights: jax.Array, values: Behaviours) -> jax.Array:
    """`sum_l weights[..., l] values[..., l, :]` `[..., D]`, concatenated over the parts."""
    sums = [jnp.einsum("...l,...ld->...d", weights, part) for part in as_parts(values)]
    return jnp.concatenate(sums, axis=-1)


def dot_product_scores(
    query: jax.Array, keys: Behaviours, split: int | None, dtype: str = "float32"
) -> jax.Array:
    """Scaled dot-product scores `[..., L]` of query `[..., D]` against keys `[..., L, D]`.

    split=None: `<q, k> / sqrt(D)` (time mode "add").
    split=t: the last t entries (the time part) and the first D - t (the semantic part) are
    scored separately, `<q_sem, k_sem> / sqrt(D - t) + <q_time, k_time> / sqrt(t)` (SPEC 3).
    Each is a sum of per-part products; a part that straddles D - t is sliced there.
    dtype 'bfloat16': products in bfloat16, sums in float32.
    """
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
    if split is None:
        return scores
    return scores + sum(time) / math.sqrt(split)


class DinAttentionScores(nn.Module):
    """DIN's learnable scores: MLP([q, k, q - k, q * k]) / D; Linear(4D, 36), PReLU, Linear(36, 1).

    query `[..., D]`, keys `[..., L, D]` (or parts) -> `[..., L]`.
    """

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
    """Linear(4D, H) on [q, k, q - k, q * k] (params `kernel [4D, H]`, `bias [H]`), regrouped.

    q W_q + k W_k + (q - k) W_d + (q * k) W_p + b = q (W_q + W_d) + b + k (W_k - W_d + diag(q) W_p)
    is the same function; per position it costs one [D] x [D, H] product instead of
    [4D] x [4D, H], and the [L, 4D] concatenation is never built (4x fewer FLOPs, which
    dominate DIN's step). query `[..., D]`, keys `[..., L, D]` (or parts: the product over D
    is a sum of per-part products) -> `[..., L, H]`.
    """

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
                "...ld,...dh->...lh",
                part,
                per_query[..., offset : offset + part.shape[-1], :],
                self.dtype,
            )
            for offset, part in part_slices(as_parts(keys))
        )
        return per_position + (jnp.dot(query, w_q + w_d) + bias)[..., None, :]


def mask_scores(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Scores with PADDING_SCORE where `mask` (same shape) is False."""
    return jnp.where(mask, scores, jnp.asarray(PADDING_SCORE, scores.dtype))


def full_attention(masked_scores: jax.Array, values: Behaviours) -> jax.Array:
    """Softmax over all L masked scores `[..., L]`, weighted sum of values `[..., L, D]` (or
    parts) -> `[..., D]`."""
    return weighted_sum(jax.nn.softmax(masked_scores, axis=-1), values)


def take_positions(values: jax.Array, indices: jax.Array) -> jax.Array:
    """values `[..., L, d]`, indices `[..., k]` -> `[..., k, d]`."""
    return jnp.take_along_axis(values, indices[..., None], axis=-2)


def aggregate_selected(
    masked_scores: jax.Array, values: Behaviours, indices: jax.Array
) -> jax.Array:
    """Softmax over the selected scores only, weighted sum of the selected values.

    masked_scores `[..., L]`, values `[..., L, D]` (or parts), indices `[..., k]` -> `[..., D]`.
    """
    weights = jax.nn.softmax(jnp.take_along_axis(masked_scores, indices, axis=-1), axis=-1)
    return weighted_sum(weights, tuple(take_positions(p, indices) for p in as_parts(values)))


def soft_search_indices(masked_scores: jax.Array, k: int) -> jax.Array:
    """Indices `[..., k]` of the k best masked scores `[..., L]` (gradient-free)."""
    _, indices = jax.lax.top_k(jax.lax.stop_gradient(masked_scores), k)
    return indices


def hard_search_indices(
    valid: jax.Array, same_category: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """SIM-style selection of exactly k positions.

    valid `[..., L]` (a real behaviour), same_category `[..., L]` (its category is the
    target's). Rule: the most recent same-category behaviours (at most k); if fewer than k, the
    most recent other valid behaviours until there are k; if there are fewer than k valid
    behaviours in all, the remaining slots are padding positions (their scores stay masked,
    so they get zero weight). Position j is more recent than i < j.
    Returns (indices `[..., k]`, selected `[..., L]` bool: selected AND valid).
    """
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


# ------------------------------------------------------------------ one example's history


class Retrieval(NamedTuple):
    """What a search returns for one example.

    retrieved: `[D_repr]` the second-stage aggregate (a main-MLP feature).
    full: `[D_repr]` softmax attention over every kept behaviour (the aux head's input), or
      None for a search without attention (SDIM).
    counted: `[L]` bool, the behaviours the history average (`use_long_seq_average`) counts.
    outputs: extra model outputs (`attention_scores`, `topk_indices`, ...).
    """

    retrieved: jax.Array
    full: jax.Array | None
    counted: jax.Array
    outputs: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class History:
    """One example's history, looked up lazily, in chunks of `chunk` positions (0: at once).

    positions: per-position arrays `[L, ...]`: ids `item`, `category`, `time`, `valid` (bool),
      the lookups' row perturbations (row-sparse gradients) and any arrays a search adds
      (`with_arrays`). `vectors(positions, role)` gives the role's behaviour vectors (parts)
      of some positions (a chunk, or the kept ones). `score(query, keys)` scores keys `[P, D]`
      -> `[P]` (not masked). Chunks are left-padded with id 0 and valid False.
    """

    positions: Positions
    vectors: Callable[[Positions, str], Behaviours]
    score: Callable[[jax.Array, Behaviours], jax.Array]
    chunk: int

    @property
    def length(self) -> int:
        return self.positions["valid"].shape[0]

    @property
    def chunked(self) -> bool:
        return 0 < self.chunk < self.length

    def keys(self, positions: Positions) -> Behaviours:
        return self.vectors(positions, "attention_behavior")

    def values(self, positions: Positions) -> Behaviours:
        return self.vectors(positions, "representation_behavior")

    def masked_scores(self, query: jax.Array, positions: Positions) -> jax.Array:
        """Scores `[P]` of `positions`, PADDING_SCORE where not valid."""
        return mask_scores(self.score(query, self.keys(positions)), positions["valid"])

    def scores(self, query: jax.Array) -> jax.Array:
        """Masked scores `[L]` of the whole history (chunk by chunk)."""
        return self.map(lambda positions: self.masked_scores(query, positions))

    def with_arrays(self, **arrays: jax.Array) -> History:
        """The same history with more per-position arrays `[L, ...]` (chunked alongside)."""
        return dataclasses.replace(self, positions={**self.positions, **arrays})

    def take(self, indices: jax.Array) -> Positions:
        """The positions `indices [k]` of every per-position array."""
        return {key: value[indices] for key, value in self.positions.items()}

    def _split(self) -> tuple[Positions, int]:
        """Every array left-padded to a multiple of `chunk` and reshaped to `[n, C, ...]`."""
        pad = (-self.length) % self.chunk
        out = {}
        for key, value in self.positions.items():
            value = jnp.pad(value, [(pad, 0)] + [(0, 0)] * (value.ndim - 1))
            out[key] = value.reshape((-1, self.chunk) + value.shape[1:])
        return out, pad

    def map(self, fn: Callable[[Positions], Any]) -> Any:
        """fn (positions `[P]` -> per-position results `[P, ...]`, a pytree) over the history
        -> `[L, ...]`, chunk by chunk."""
        if not self.chunked:
            return fn(self.positions)
        chunks, pad = self._split()
        stacked = jax.lax.map(jax.checkpoint(fn), chunks)  # [n, C, ...]
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[pad:], stacked)

    def total(self, fn: Callable[[Positions], Any]) -> Any:
        """The sum over chunks of fn (positions -> a pytree of sums over those positions);
        fn must give 0 for padding positions (weights 0, or `valid`-masked)."""
        if not self.chunked:
            return fn(self.positions)
        chunks, _ = self._split()

        @jax.checkpoint
        def body(total: Any, chunk: Positions) -> tuple[Any, None]:
            return jax.tree.map(jnp.add, total, fn(chunk)), None

        shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], chunks))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, chunks)
        return total

    def weighted_sum(self, weights: jax.Array) -> jax.Array:
        """`sum_l weights[l, ...] values[l]`: weights `[L]` -> `[D]`, `[L, G]` -> `[G, D]`."""

        def partial(positions: Positions) -> jax.Array:
            values = as_parts(self.values(positions))
            w = jnp.moveaxis(positions["_weights"].astype(values[0].dtype), 0, -1)
            return jnp.concatenate([w @ part for part in values], axis=-1)

        return self.with_arrays(_weights=weights).total(partial)

    def attend(self, query: jax.Array, indices: jax.Array) -> jax.Array:
        """Softmax over the masked scores of the behaviours at `indices [k]` only, weighted sum
        of their representation vectors -> `[D]` (only the k rows are looked up)."""
        kept = self.take(indices)
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


def soft_search(
    query: jax.Array, target: dict[str, jax.Array], history: History, cfg, want_full: bool
) -> Retrieval:
    """TWIN / DARE / DIN: the top-k of the scores over the whole history."""
    masked = history.scores(query)
    indices = soft_search_indices(masked, int(cfg.top_k))
    return attention_over(query, history, masked, indices, want_full)


def hard_search(
    query: jax.Array, target: dict[str, jax.Array], history: History, cfg, want_full: bool
) -> Retrieval:
    """TWIN (hard), SIM-style: k behaviours by category and recency (`hard_search_indices`);
    the others' scores are masked, so the aux head's full attention is over the k too."""
    same_category = history.positions["category"] == target["category"]
    valid = history.positions["valid"]
    indices, selected = hard_search_indices(valid, same_category, int(cfg.top_k))
    history = history.with_arrays(valid=selected)
    return attention_over(query, history, history.scores(query), indices, want_full)
