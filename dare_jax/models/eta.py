"""ETA (Chen et al. 2021): SimHash signatures and Hamming-distance top-k retrieval.

A fixed random Gaussian projection R `[m, D]` maps an attention vector e to the m-bit
signature sign(R e), packed into ceil(m / 32) uint32 words; the Hamming distance is the
population count of the XOR. Target attention runs over the k behaviours nearest the
target's signature (ties: the more recent). The hashing is gradient-free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dare_jax.models.search import (
    Behaviours,
    History,
    Retrieval,
    as_parts,
    attention_over,
    part_slices,
)

WORD_BITS = 32


def random_hyperplanes(num_bits: int, dim: int, seed: int) -> jax.Array:
    """The fixed projection R `[num_bits, dim]`, standard normal, from `seed` (a jit constant)."""
    return jax.random.normal(jax.random.PRNGKey(seed), (num_bits, dim), jnp.float32)


def signature_bits(vectors: Behaviours, planes: jax.Array) -> jax.Array:
    """bool `[..., m]`: bit i = <planes[i], v> > 0, for vectors `[..., D]` (or their parts
    along D), planes `[m, D]`. No gradient flows through the hash."""
    projected = sum(
        jnp.einsum("...d,md->...m", jax.lax.stop_gradient(part), planes[:, o : o + part.shape[-1]])
        for o, part in part_slices(as_parts(vectors))
    )
    return projected > 0


def signatures(vectors: Behaviours, planes: jax.Array) -> jax.Array:
    """Packed signatures uint32 `[..., ceil(m / 32)]` of vectors `[..., D]`: bit i goes to
    word i // 32, bit i % 32."""
    bits = signature_bits(vectors, planes)
    m = bits.shape[-1]
    words = -(-m // WORD_BITS)
    padded = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, words * WORD_BITS - m)])
    grouped = padded.reshape(bits.shape[:-1] + (words, WORD_BITS)).astype(jnp.uint32)
    return jnp.sum(grouped << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def hamming_distance(history: jax.Array, target: jax.Array) -> jax.Array:
    """int32 `[..., L]` distances of history `[..., L, W]` to target `[..., W]` signatures."""
    diff = jnp.bitwise_xor(history, target[..., None, :])
    return jnp.sum(jax.lax.population_count(diff).astype(jnp.int32), axis=-1)


def hamming_top_k(distance: jax.Array, valid: jax.Array, k: int, num_bits: int) -> jax.Array:
    """Indices `[..., k]` of the k valid positions (distance, valid `[..., L]`) with the
    smallest Hamming distance, ties to the more recent; padding ranks last (the caller masks
    it). One `top_k` over the integer priority (num_bits - distance) * L + position."""
    length = distance.shape[-1]
    position = jnp.arange(length, dtype=jnp.int32)
    priority = jnp.where(valid, (num_bits - distance) * length + position, position - length)
    return jax.lax.top_k(priority, k)[1]


def search(query: jax.Array, target, history: History, cfg, want_full: bool) -> Retrieval:
    """ETA for one example. Only the aux loss needs the full-history scores: without it ETA
    has no aux head (no official constructor to match), so `want_full` is not consulted."""
    bits = int(cfg.hash_bits)
    planes = random_hyperplanes(bits, query.shape[-1], int(cfg.hash_seed))
    target_signature = signatures(query, planes)
    history_signatures = history.map(lambda positions: signatures(history.keys(positions), planes))
    distance = hamming_distance(history_signatures, target_signature)
    valid = history.positions["valid"]
    indices = hamming_top_k(distance, valid, int(cfg.top_k), bits)
    if cfg.use_aux_loss:
        found = attention_over(query, history, history.scores(query), indices, True)
    else:
        found = Retrieval(history.attend(query, indices), None, valid, {"topk_indices": indices})
    return found._replace(outputs={**found.outputs, "hamming_distance": distance})
