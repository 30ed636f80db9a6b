"""SDIM (Cao et al. 2022): hash-bucket pooling of the behaviours that collide with the target.

m random hyperplanes (fixed, Gaussian) are split into G = m / tau groups of tau bits; in each
group a vector's tau sign bits form a bucket code in [0, 2**tau). For each group, the
representation vectors of the valid behaviours whose code equals the target's are summed and
the sum is l2-normalised (an empty bucket gives the zero vector); the G pooled vectors are
averaged. No top-k, no attention weights; no gradient through the hash.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dare_jax.models.eta import random_hyperplanes, signature_bits
from dare_jax.models.search import Behaviours, History, Retrieval

NORM_EPS = 1e-12  # keeps the normalisation of an empty bucket (zero sum) finite


def bucket_codes(vectors: Behaviours, planes: jax.Array, group_bits: int) -> jax.Array:
    """int32 `[..., m / tau]` bucket codes of vectors `[..., D]` (or parts); planes `[m, D]`,
    tau = group_bits. Code of group g = sum_i bit[g * tau + i] * 2**i."""
    bits = signature_bits(vectors, planes)
    m = bits.shape[-1]
    if m % group_bits:
        raise ValueError(f"SDIM: {m} hash bits cannot be split into groups of {group_bits}")
    grouped = bits.reshape(bits.shape[:-1] + (m // group_bits, group_bits)).astype(jnp.int32)
    return jnp.sum(grouped << jnp.arange(group_bits, dtype=jnp.int32), axis=-1)


def bucket_matches(history_codes: jax.Array, target_codes: jax.Array, valid: jax.Array):
    """bool `[..., L, G]`: behaviour j is valid and shares the target's bucket in group g;
    history_codes `[..., L, G]`, target_codes `[..., G]`, valid `[..., L]`."""
    return (history_codes == target_codes[..., None, :]) & valid[..., None]


def normalised_group_average(bucket_sums: jax.Array) -> jax.Array:
    """Per-group bucket sums `[..., G, D]` -> `[..., D]`: l2-normalised, averaged over G."""
    norms = jnp.sqrt(jnp.sum(bucket_sums * bucket_sums, axis=-1, keepdims=True) + NORM_EPS)
    return jnp.mean(bucket_sums / norms, axis=-2)


def search(query: jax.Array, target, history: History, cfg, want_full: bool) -> Retrieval:
    """SDIM for one example: per hash group, the representation sum of the behaviours in the
    target's bucket, l2-normalised, averaged over the groups (no attention: `full` is None)."""
    tau = int(cfg.sdim_group_bits)
    planes = random_hyperplanes(int(cfg.sdim_hash_bits), query.shape[-1], int(cfg.hash_seed))
    target_codes = bucket_codes(query, planes, tau)

    def matches(positions):
        codes = bucket_codes(history.keys(positions), planes, tau)
        return bucket_matches(codes, target_codes, positions["valid"])

    in_bucket = history.map(matches)  # [L, G]
    retrieved = normalised_group_average(history.weighted_sum(in_bucket))
    bucket_sizes = jnp.sum(in_bucket, axis=0, dtype=jnp.int32)
    return Retrieval(retrieved, None, history.positions["valid"], {"bucket_sizes": bucket_sizes})
