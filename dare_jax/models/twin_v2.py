"""TWIN-V2 (Si et al. 2024): hierarchical clustering of the history, cluster-aware attention.

The clustering runs inside the model, jit-compiled, on the (stop_gradient-ed) behaviour
attention vectors: the paper clusters offline on item features; this needs no offline pass.
Clustering of one user's L behaviours (static shapes):
  1. Sketch: the vectors' coordinates on an estimate of their top SKETCH_DIM principal
     directions (subspace iteration on the valid behaviours' covariance).
  2. Balanced bisection, levels = ceil(log2(L / max_cluster_size)) times. The positions,
     padded to S * b (S = 2**levels clusters of b = ceil(L / S) <= max size slots), are kept
     in an order where every cluster is a contiguous block of static size. A level splits
     every block in two halves of slots: the lower (m + 1) // 2 of its m valid members by
     their projection on the block's 2-means direction (start: the earliest member and the
     member farthest from it; `iterations` Lloyd steps) go to the first half, the rest to
     the second (a block of at most max_cluster_size members stays whole if it fits);
     padding fills the free slots. The cut is a radix select, not a sort.
  Cluster c is block c (at most b members); padding positions get the label S.
Virtual behaviour of a cluster: the mean of its members' vectors; the cluster-aware logit
adds ln(cluster size) to the scaled dot-product score (in search and aggregation).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dare_jax.models.search import (
    History,
    Retrieval,
    aggregate_selected,
    as_parts,
    full_attention,
    mask_scores,
    part_slices,
    soft_search_indices,
)

SKETCH_DIM = 8  # principal directions the clustering works on
SUBSPACE_STEPS = 2  # subspace-iteration steps estimating them


def cluster_levels(length: int, max_cluster_size: int) -> int:
    """Number of bisection levels for a history of `length`: S = 2**levels clusters."""
    return max(0, math.ceil(math.log2(max(length, 1) / max_cluster_size)))


def principal_sketch(history: History, rank: int = SKETCH_DIM) -> jax.Array:
    """`[L, min(rank, D)]` coordinates of the history's attention vectors (gradient-free) on an
    estimate of their top principal directions (the vectors themselves if D <= rank)."""

    def keys(positions):
        return tuple(jax.lax.stop_gradient(p) for p in as_parts(history.keys(positions)))

    def statistics(positions):
        # One `[D, D]` product of the composed vectors (per-part products are 9 small ones).
        x = jnp.concatenate(jnp.broadcast_arrays(*keys(positions)), axis=-1)
        weights = positions["valid"].astype(jnp.float32)
        return weights @ x, (x * weights[:, None]).T @ x, jnp.sum(weights)

    def project(directions):
        return history.map(
            lambda at: sum(p @ directions[o : o + p.shape[-1]] for o, p in part_slices(keys(at)))
        )

    total, gram, count = history.total(statistics)
    width = total.shape[0]
    if width <= rank:
        return project(jnp.eye(width))
    mean = total / jnp.maximum(count, 1.0)
    covariance = gram - count * jnp.outer(mean, mean)
    directions = jax.random.normal(jax.random.PRNGKey(0), (width, rank))
    for _ in range(SUBSPACE_STEPS):
        directions, _ = jnp.linalg.qr(covariance @ directions)
    return project(directions)


def smallest(values: jax.Array, counts: jax.Array) -> jax.Array:
    """bool `[n, s]`: the `counts[i]` smallest entries of each row of `values [n, s]` (ties:
    the earlier). Radix select: the counts[i]-th smallest key is built bit by bit, each bit by
    counting the row's keys that match the prefix so far (32 passes, no sort)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # ordered as values

    def next_bit(step, carry):  # a loop, not 32 unrolled passes: compiles much faster
        prefix, wanted = carry
        bit = (31 - step).astype(jnp.uint32)
        high = jnp.where(bit == 31, jnp.uint32(0), jnp.uint32(0xFFFFFFFF) << (bit + 1))
        below = ((keys & high) == prefix[:, None]) & ((keys >> bit) & 1 == 0)
        count = jnp.sum(below, axis=1, dtype=jnp.int32)
        larger = count < wanted  # the wanted key has this bit set
        prefix = jnp.where(larger, prefix | (jnp.uint32(1) << bit), prefix)
        return prefix, jnp.where(larger, wanted - count, wanted)

    start = (jnp.zeros(values.shape[:1], jnp.uint32), counts.astype(jnp.int32))
    prefix, wanted = jax.lax.fori_loop(0, 32, next_bit, start)
    ties = keys == prefix[:, None]
    return (keys < prefix[:, None]) | (ties & (jnp.cumsum(ties, axis=1) <= wanted[:, None]))


def balanced_bisection(
    sketch: jax.Array, valid: jax.Array, max_cluster_size: int, iterations: int = 3
) -> jax.Array:
    """Cluster labels int32 `[L]` in [0, S) of one user (module docstring; padding: S) from
    sketch `[L, r]` and valid `[L]`."""
    length = valid.shape[0]
    levels = cluster_levels(length, max_cluster_size)
    clusters = 2**levels
    slots = -(-length // clusters)
    padded = clusters * slots
    x = jnp.pad(sketch.astype(jnp.float32), ((0, padded - length), (0, 0)))
    squares = jnp.sum(x * x, axis=1)
    is_valid = jnp.pad(valid, (0, padded - length))
    order = jnp.arange(padded, dtype=jnp.int32)  # cluster blocks are contiguous in it
    for level in range(levels):
        blocks = order.reshape(2**level, -1)
        xb, vb = x[blocks], is_valid[blocks]  # [n, s, r], [n, s]
        weights = vb.astype(jnp.float32)
        rows = jnp.arange(blocks.shape[0])

        def dot(direction: jax.Array) -> jax.Array:  # [n, r] -> [n, s]
            # Distances as products, |x - c|^2 = |x|^2 - 2 x.c + |c|^2: much faster on XLA:CPU.
            return jnp.einsum("nsr,nr->ns", xb, direction)

        c0 = xb[rows, jnp.argmin(jnp.where(vb, blocks, padded), axis=1)]  # the earliest
        far = jnp.where(vb, squares[blocks] - 2.0 * dot(c0), -jnp.inf)
        c1 = xb[rows, jnp.argmax(far, axis=1)]  # the member farthest from it

        def lloyd(_, centres):
            c0, c1 = centres
            half_gap = 0.5 * (jnp.sum(c1 * c1, axis=1) - jnp.sum(c0 * c0, axis=1))
            to_c1 = dot(c1 - c0) > half_gap[:, None]  # nearer to c1
            means = []
            for centre, side in ((c0, weights * ~to_c1), (c1, weights * to_c1)):
                size = jnp.sum(side, axis=1)[:, None]
                mean = jnp.einsum("ns,nsr->nr", side, xb) / jnp.maximum(size, 1.0)
                means.append(jnp.where(size > 0, mean, centre))
            return tuple(means)

        c0, c1 = jax.lax.fori_loop(0, iterations, lloyd, (c0, c1))
        # The first child: the lower (m + 1) // 2 of the block's m valid members by their
        # projection (all m while m <= max_cluster_size, as long as they fit), then padding
        # up to half the block's slots.
        half = blocks.shape[1] // 2
        members = jnp.sum(vb, axis=1)
        whole = (members <= max_cluster_size) & (members <= half)
        count = jnp.where(whole, members, (members + 1) // 2)
        first = smallest(jnp.where(vb, dot(c1 - c0), jnp.inf), count)
        first |= ~vb & (jnp.cumsum(~vb, axis=1) <= (half - count)[:, None])
        slot = jnp.where(first, jnp.cumsum(first, axis=1), half + jnp.cumsum(~first, axis=1)) - 1
        order = jnp.zeros_like(blocks).at[rows[:, None], slot].set(blocks).reshape(-1)
    cluster = jnp.zeros(padded, jnp.int32).at[order].set(jnp.arange(padded) // slots)
    return jnp.where(is_valid, cluster, clusters)[:length]


def cluster_means(history: History, labels: jax.Array, clusters: int):
    """(sizes `[S]`, key means, value means: parts `[S, d]`): the clusters' virtual behaviours
    (differentiable in the vectors; empty clusters 0)."""

    def sums(positions):
        label = jnp.where(positions["valid"], positions["_cluster"], clusters)  # chunk padding
        return tuple(
            tuple(jax.ops.segment_sum(p, label, clusters) for p in as_parts(vectors))
            for vectors in (history.keys(positions), history.values(positions))
        )

    sizes = jax.ops.segment_sum(jnp.ones(labels.shape), labels, clusters)
    key_sums, value_sums = history.with_arrays(_cluster=labels).total(sums)
    count = jnp.maximum(sizes, 1.0)[:, None]
    return sizes, tuple(s / count for s in key_sums), tuple(s / count for s in value_sums)


def search(query: jax.Array, target, history: History, cfg, want_full: bool) -> Retrieval:
    """TWIN-V2 for one example: cluster, then soft search over the S virtual behaviours with
    ln(size) added to their scores."""
    valid = history.positions["valid"]
    max_size = int(cfg.cluster_max_size)
    sketch = principal_sketch(history)
    labels = balanced_bisection(sketch, valid, max_size, int(cfg.cluster_iterations))
    clusters = 2 ** cluster_levels(history.length, max_size)
    sizes, keys, values = cluster_means(history, labels, clusters)
    masked = mask_scores(history.score(query, keys) + jnp.log(jnp.maximum(sizes, 1.0)), sizes > 0)
    indices = soft_search_indices(masked, min(int(cfg.top_k), clusters))
    outputs = {"attention_scores": masked, "topk_indices": indices, "cluster_ids": labels}
    outputs["cluster_sizes"] = sizes
    full = full_attention(masked, values) if want_full else None
    return Retrieval(aggregate_selected(masked, values, indices), full, valid, outputs)
