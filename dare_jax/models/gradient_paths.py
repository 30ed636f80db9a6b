"""Gradient observation hooks (official `observe_attn_repr_grad` and `avoid_domination`).

With either switch, a single-table variant (TWIN, ...) keeps its shared tables as two
synchronised copies, `embed/attention/<field>` (read only by the search) and
`embed/representation/<field>` (read only by the aggregation and the target representation).
The loss is the same function of the same values as plain TWIN, so the gradient of the
shared table is the SUM of the two copies' gradients (the attention-path and the
representation-path gradients). `combine_path_gradients` runs between `jax.grad` and the
optimizer: it gives both copies that sum (so they stay equal under any optimizer that treats
equal parameters with equal gradients equally, e.g. Adam) and returns the two path gradients.
`combine_path_rows` does the same for gradients given as looked-up rows (the row-sparse Adam
of dare_jax.optim): both copies receive both paths' rows.

avoid_domination (official semantics, train_pytorch.py): per TABLE, not per row - the whole
attention-path gradient of a field's table is multiplied by
||g_repr||_F / ||g_attn||_F (Frobenius norms over the whole table) before the sum. We keep
the official per-table choice so results are comparable with the paper; a zero attention
gradient is left at zero instead of producing NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dare_jax.models.embeddings import TableKey
from dare_jax.models.spec import ModelSpec

ATTENTION, REPRESENTATION = "attention", "representation"
Rows = dict[TableKey, list[tuple[jax.Array, jax.Array]]]


def rescale_to_norm(gradient: jax.Array, reference: jax.Array) -> jax.Array:
    """`gradient * ||reference|| / ||gradient||` (Frobenius); zero stays zero."""
    norm = jnp.sqrt(jnp.sum(jnp.square(gradient)))
    ref_norm = jnp.sqrt(jnp.sum(jnp.square(reference)))
    factor = jnp.where(norm > 0, ref_norm / jnp.where(norm > 0, norm, 1.0), 0.0)
    return gradient * factor


# The official code records the category and time tables' path gradients (the item tables
# are millions of rows; returning them every step would copy hundreds of MB).
DEFAULT_OBSERVED_FIELDS: tuple[str, ...] = ("category", "time")


def combine_path_gradients(
    grads: Any,
    model: ModelSpec,
    observed_fields: tuple[str, ...] | None = DEFAULT_OBSERVED_FIELDS,
) -> tuple[Any, dict[str, jax.Array]]:
    """(grads for the optimizer, observed path gradients).

    grads: the `params` gradient pytree (as from jax.grad of the loss w.r.t. params).
    Without the hooks: returned unchanged, observed = {}.
    With them: for every field f in `observed_fields` (None: all fields),
    observed['attention/f'] and observed['representation/f'] are the raw path gradients
    `[rows, d]` (before any rescaling); for every field both copies receive
    g_attn' + g_repr, with g_attn' = g_attn (observe) or rescaled to ||g_repr|| (avoid
    domination).
    """
    if not model.variant.observes_gradients:
        return grads, {}
    embed = grads["embed"]
    if ATTENTION not in embed or REPRESENTATION not in embed:
        raise ValueError(
            "combine_path_gradients: grads['embed'] needs 'attention' and 'representation' "
            f"copies when observe_attn_repr_grad/avoid_domination is on; got {sorted(embed)}"
        )
    observed: dict[str, jax.Array] = {}
    new_attention, new_representation = {}, {}
    for field, g_attn in embed[ATTENTION].items():
        g_repr = embed[REPRESENTATION][field]
        if observed_fields is None or field in observed_fields:
            observed[f"{ATTENTION}/{field}"] = g_attn
            observed[f"{REPRESENTATION}/{field}"] = g_repr
        if model.avoid_domination:
            g_attn = rescale_to_norm(g_attn, g_repr)
        total = g_attn + g_repr
        new_attention[field] = total
        new_representation[field] = total
    new_embed = dict(embed)
    new_embed[ATTENTION] = new_attention
    new_embed[REPRESENTATION] = new_representation
    new_grads = dict(grads)
    new_grads["embed"] = new_embed
    return new_grads, observed


def dense_rows_norm(pairs: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """Frobenius norm of the table gradient that `pairs` [(ids `[n]`, rows `[n, d]`), ...]
    scatter-add to, without the table: rows of equal ids are summed after a sort."""
    ids = jnp.concatenate([i for i, _ in pairs])
    rows = jnp.concatenate([r for _, r in pairs])
    order = jnp.argsort(ids)
    ids, rows = ids[order], rows[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    summed = jax.ops.segment_sum(rows, jnp.cumsum(first) - 1, ids.shape[0], True)
    return jnp.sqrt(jnp.sum(jnp.square(summed)))


def combine_path_rows(
    rows: Rows,
    model: ModelSpec,
    table_shapes: dict[TableKey, tuple[int, ...]],
    observed_fields: tuple[str, ...] | None = DEFAULT_OBSERVED_FIELDS,
) -> tuple[Rows, dict[str, jax.Array]]:
    """`combine_path_gradients` for row gradients: (rows for the optimizer, observed).

    rows: {table: [(ids, rows), ...]} (`dare_jax.optim.table_gradient_rows`); table_shapes:
    {table: shape}. Both copies of every field get the attention rows (rescaled to the
    representation path's norm with avoid_domination) and the representation rows;
    observed['attention/f'], observed['representation/f'] are the raw dense path gradients of
    the observed fields.
    """
    if not model.variant.observes_gradients:
        return rows, {}
    combined, observed = dict(rows), {}
    fields = {key.field for key in rows if key.group == ATTENTION}
    for field in sorted(fields):
        keys = {path: TableKey(path, field) for path in (ATTENTION, REPRESENTATION)}
        paths = {path: rows.get(key, []) for path, key in keys.items()}
        if observed_fields is None or field in observed_fields:
            for path, pairs in paths.items():
                dense = jnp.zeros(table_shapes[keys[path]])
                for ids, values in pairs:
                    dense = dense.at[ids].add(values)
                observed[f"{path}/{field}"] = dense
        if model.avoid_domination and paths[ATTENTION] and paths[REPRESENTATION]:
            norm, reference = (dense_rows_norm(paths[p]) for p in (ATTENTION, REPRESENTATION))
            factor = jnp.where(norm > 0, reference / jnp.where(norm > 0, norm, 1.0), 0.0)
            paths[ATTENTION] = [(ids, values * factor) for ids, values in paths[ATTENTION]]
        both = paths[ATTENTION] + paths[REPRESENTATION]
        combined[keys[ATTENTION]] = combined[keys[REPRESENTATION]] = both
    return combined, observed
