"""Losses as the official code computes them, and the path-selected L2 penalty.

ctr = mean over examples of -log(p_true), p = softmax(logits) + 1e-8 (column 0 = click);
aux likewise on the auxiliary head; l2 = sum of squares of every parameter that is neither
a bias nor an embedding table; total = ctr + aux + weight_decay * l2.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

EMBEDDING_ROOT = "embed"


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    keys = ("key", "name", "idx")  # of the path entries, tried in order
    return tuple(str(next((getattr(e, a) for a in keys if hasattr(e, a)), e)) for e in path)


def is_l2_penalised(path: tuple[str, ...]) -> bool:
    """True for leaves counted in the L2 penalty: not under `embed/` and not named `bias` (the
    official rule: the name contains neither 'bias' nor 'embedding')."""
    return EMBEDDING_ROOT not in path[:1] and path[-1] != "bias"


def l2_penalty(params: Any) -> jax.Array:
    """Sum of squares of every penalised leaf of `params`: a float32 scalar (float64 for
    float64 params, as `dare_jax.interop.check_trajectory --float64`)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [leaf for path, leaf in flat if is_l2_penalised(_path_names(path))]
    dtype = jnp.result_type(jnp.float32, *leaves)
    total = jnp.zeros((), dtype)
    for leaf in leaves:
        total = total + jnp.sum(jnp.square(leaf.astype(dtype)))
    return total


def cross_entropy(
    prob: jax.Array, label: jax.Array, example_weight: jax.Array | None = None
) -> jax.Array:
    """Mean of -log(prob of the true class). prob `[B, 2]` (column 0 = click), label `[B]`
    (1 = click). example_weight `[B]` (e.g. 0 for padded evaluation rows): weighted mean."""
    true_column = jnp.where(jnp.asarray(label) == 1, 0, 1)
    nll = -jnp.log(jnp.take_along_axis(prob, true_column[:, None], axis=1)[:, 0])
    if example_weight is None:
        return jnp.mean(nll)
    w = jnp.asarray(example_weight, nll.dtype)
    return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)


def loss_terms(
    outputs: dict[str, jax.Array],
    label: jax.Array,
    params: Any,
    weight_decay: float,
    example_weight: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """{'total', 'ctr', 'aux', 'l2'}: aux is 0 without an auxiliary head in `outputs`."""
    ctr = cross_entropy(outputs["prob"], label, example_weight)
    aux = jnp.zeros((), ctr.dtype)
    if "aux_prob" in outputs:
        aux = cross_entropy(outputs["aux_prob"], label, example_weight)
    l2 = l2_penalty(params)
    return {"total": ctr + aux + weight_decay * l2, "ctr": ctr, "aux": aux, "l2": l2}
