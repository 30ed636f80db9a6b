"""TWIN-V2 (Si et al. 2024): hierarchical clustering of the history, cluster-aware attention.

Where the clustering happens: inside the model, as a per-batch, jit-compiled step on the
(stop_gradient-ed) behaviour attention vectors, so that it needs no offline pass and no change
to the data pipeline. The paper clusters offline on item features; clustering per batch on
the current embeddings is the jit-able equivalent (documented decision).

Algorithm (per user, vmapped over the batch; static shapes):
  hierarchical bisecting k-means for `levels` levels. At each level every cluster larger than
  `max_cluster_size` is split in two: 2-means finds the split direction (init: its earliest
  member and the member farthest from it; `iterations` Lloyd steps), then the members are cut
  at the median of their projection on that direction (balanced halves); a small enough
  cluster stays whole. Cluster labels are the paths of split decisions, so they lie in
  [0, 2**levels) with levels = ceil(log2(L / max_cluster_size)) + extra_levels (default 0);
  balanced halving guarantees every cluster has at most max_cluster_size members.
  Padding positions get the label 2**levels (outside every cluster).
Virtual behaviour of a cluster: the mean of its members' vectors; the cluster-aware logit
adds ln(cluster size) to the scaled dot-product score (in search and aggregation).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def cluster_levels(length: int, max_cluster_size: int, extra_levels: int) -> int:
    """Number of bisection levels for a history of `length` (see module docstring)."""
    base = max(0, math.ceil(math.log2(max(length, 1) / max_cluster_size)))
    return base + extra_levels


def _bisect_level(
    x: jax.Array, valid: jax.Array, labels: jax.Array, parents: int, max_size: int, iterations: int
) -> jax.Array:
    """One level for one user: x `[L, D]`, valid `[L]`, labels `[L]` in [0, parents) -> child
    labels in [0, 2 * parents)."""
    length = x.shape[0]
    pos = jnp.arange(length, dtype=jnp.int32)
    seg = jnp.where(valid, labels, parents)  # padding goes to a dropped extra segment
    sizes = jax.ops.segment_sum(valid.astype(jnp.int32), seg, parents + 1)[:parents]
    first = jax.ops.segment_min(jnp.where(valid, pos, length), seg, parents + 1)[:parents]
    c0 = x[jnp.clip(first, 0, length - 1)]  # [P, D]
    d0 = jnp.sum((x - c0[jnp.clip(labels, 0, parents - 1)]) ** 2, axis=-1)
    d0 = jnp.where(valid, d0, -1.0)
    far_d = jax.ops.segment_max(d0, seg, parents + 1)[:parents]
    is_far = valid & (d0 == far_d[jnp.clip(labels, 0, parents - 1)])
    far = jax.ops.segment_min(jnp.where(is_far, pos, length), seg, parents + 1)[:parents]
    c1 = x[jnp.clip(far, 0, length - 1)]
    own = jnp.clip(labels, 0, parents - 1)

    def assign(c0: jax.Array, c1: jax.Array) -> jax.Array:
        dist0 = jnp.sum((x - c0[own]) ** 2, axis=-1)
        dist1 = jnp.sum((x - c1[own]) ** 2, axis=-1)
        return dist1 < dist0

    def lloyd(_, centres):
        c0, c1 = centres
        child = jnp.where(valid, 2 * own + assign(c0, c1), 2 * parents)
        sums = jax.ops.segment_sum(x, child, 2 * parents + 1)[: 2 * parents]
        counts = jax.ops.segment_sum(valid.astype(x.dtype), child, 2 * parents + 1)[: 2 * parents]
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        keep = counts[:, None] > 0
        return (
            jnp.where(keep[0::2], means[0::2], c0),
            jnp.where(keep[1::2], means[1::2], c1),
        )

    c0, c1 = jax.lax.fori_loop(0, iterations, lloyd, (c0, c1))
    # Balanced cut along the 2-means axis: order each cluster's members by their projection on
    # c1 - c0 and send the upper half (rounded down) to child 1. Halving guarantees that after
    # ceil(log2(L / max_size)) levels no cluster exceeds max_size, which plain 2-means does not.
    axis = c1 - c0
    proj = jnp.sum((x - 0.5 * (c0 + c1)[own]) * axis[own], axis=-1)
    proj = jnp.where(valid, proj, jnp.inf)
    order = jnp.lexsort((pos, proj, seg))  # by cluster, then projection, then position
    rank = jnp.zeros(length, jnp.int32).at[order].set(pos)
    start = jnp.cumsum(sizes) - sizes
    upper = rank - start[own] >= (sizes[own] + 1) // 2
    split = (sizes > max_size)[own]
    return 2 * own + (upper & split).astype(jnp.int32)


def hierarchical_kmeans(
    vectors: jax.Array,
    valid: jax.Array,
    max_cluster_size: int,
    extra_levels: int = 0,
    iterations: int = 3,
) -> jax.Array:
    """Cluster labels int32 `[B, L]` in [0, S) for vectors `[B, L, D]`, valid `[B, L]`.

    S = 2**levels (`cluster_levels`); padding positions get S. Gradient-free.
    """
    x = jax.lax.stop_gradient(vectors).astype(jnp.float32)
    levels = cluster_levels(x.shape[1], max_cluster_size, extra_levels)

    def one_user(xu: jax.Array, vu: jax.Array) -> jax.Array:
        labels = jnp.zeros(vu.shape, jnp.int32)
        for level in range(levels):
            labels = _bisect_level(xu, vu, labels, 2**level, max_cluster_size, iterations)
        return jnp.where(vu, labels, 2**levels)

    return jax.vmap(one_user)(x, valid)


def cluster_sizes(labels: jax.Array, num_clusters: int) -> jax.Array:
    """float32 `[B, S]` member counts of labels `[B, L]` (labels >= S are ignored)."""
    ones = jnp.ones(labels.shape, jnp.float32)
    return jax.vmap(lambda lab, w: jax.ops.segment_sum(w, lab, num_clusters))(labels, ones)


def cluster_means(labels: jax.Array, vectors: jax.Array, num_clusters: int) -> jax.Array:
    """`[B, S, D]` mean vector of each cluster (zero for an empty one); vectors `[B, L, D]`.

    Differentiable in `vectors` (the virtual behaviours train the embeddings).
    """
    sums = jax.vmap(lambda lab, v: jax.ops.segment_sum(v, lab, num_clusters))(labels, vectors)
    sizes = cluster_sizes(labels, num_clusters)
    return sums / jnp.maximum(sizes, 1.0)[:, :, None]


def size_bias(sizes: jax.Array) -> jax.Array:
    """ln(size) `[B, S]` added to a cluster's attention logit (0 for empty clusters, masked)."""
    return jnp.log(jnp.maximum(sizes, 1.0))
