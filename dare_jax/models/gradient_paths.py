"""Gradient observation hooks (official `observe_attn_repr_grad` and `avoid_domination`).

With either switch, a single-table variant (TWIN, ...) keeps its shared tables as two
synchronised copies, `embed/attention/<field>` (read only by the search) and
`embed/representation/<field>`. The loss is the same function as plain TWIN's, so the shared
table's gradient is the SUM of the two copies' (the two paths') gradients. Between `jax.grad`
and the optimizer, `combine_path_gradients` (dense) and `combine_path_rows` (row gradients)
give both copies that sum, so they stay equal under Adam, and return the path gradients.

avoid_domination (official semantics): per TABLE, not per row, the attention-path gradient
of a field is multiplied by ||g_repr||_F / ||g_attn||_F before the sum (zero stays zero).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dare_jax.models.embeddings import TableKey
from dare_jax.models.spec import ModelSpec

ATTENTION, REPRESENTATION = "attention", "representation"
Rows = dict[TableKey, list[tuple[jax.Array, jax.Array]]]
# The official code records the category and time tables' path gradients (the item tables
# are millions of rows; returning them every step would copy hundreds of MB).
DEFAULT_OBSERVED_FIELDS: tuple[str, ...] = ("category", "time")


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def _ratio(norm: jax.Array, reference: jax.Array) -> jax.Array:
    """reference / norm, 0 where norm is 0."""
    return jnp.where(norm > 0, reference / jnp.where(norm > 0, norm, 1.0), 0.0)


def rescale_to_norm(gradient: jax.Array, reference: jax.Array) -> jax.Array:
    """`gradient * ||reference|| / ||gradient||` (Frobenius); zero stays zero."""
    return gradient * _ratio(_norm(gradient), _norm(reference))


def combine_path_gradients(
    grads: Any, model: ModelSpec, observed_fields: tuple[str, ...] | None = DEFAULT_OBSERVED_FIELDS
) -> tuple[Any, dict[str, jax.Array]]:
    """(grads for the optimizer, observed path gradients) from the `params` gradient pytree.
    Without the hooks: grads unchanged, observed = {}. With them: observed['attention/f'] and
    observed['representation/f'] are the raw path gradients `[rows, d]` of every field f in
    `observed_fields` (None: all); both copies of every field receive g_attn' + g_repr, with
    g_attn' = g_attn (observe) or rescaled to ||g_repr|| (avoid_domination)."""
    if not model.variant.observes_gradients:
        return grads, {}
    embed = grads["embed"]
    if ATTENTION not in embed or REPRESENTATION not in embed:
        raise ValueError(
            "combine_path_gradients: grads['embed'] needs 'attention' and 'representation' "
            f"copies when observe_attn_repr_grad/avoid_domination is on; got {sorted(embed)}"
        )
    observed, summed = {}, {}
    for field, g_attn in embed[ATTENTION].items():
        g_repr = embed[REPRESENTATION][field]
        if observed_fields is None or field in observed_fields:
            observed[f"{ATTENTION}/{field}"] = g_attn
            observed[f"{REPRESENTATION}/{field}"] = g_repr
        if model.avoid_domination:
            g_attn = rescale_to_norm(g_attn, g_repr)
        summed[field] = g_attn + g_repr
    embed = {**embed, ATTENTION: summed, REPRESENTATION: dict(summed)}
    return {**grads, "embed": embed}, observed


def dense_rows_norm(pairs: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """Frobenius norm of the table gradient that `pairs` [(ids `[n]`, rows `[n, d]`), ...]
    scatter-add to, without the table: rows of equal ids are summed after a sort."""
    ids = jnp.concatenate([i for i, _ in pairs])
    rows = jnp.concatenate([r for _, r in pairs])
    order = jnp.argsort(ids)
    ids, rows = ids[order], rows[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    return _norm(jax.ops.segment_sum(rows, jnp.cumsum(first) - 1, ids.shape[0], True))


def combine_path_rows(
    rows: Rows,
    model: ModelSpec,
    table_shapes: dict[TableKey, tuple[int, ...]],
    observed_fields: tuple[str, ...] | None = DEFAULT_OBSERVED_FIELDS,
) -> tuple[Rows, dict[str, jax.Array]]:
    """`combine_path_gradients` for row gradients {table: [(ids, rows), ...]}
    (`dare_jax.optim.table_gradient_rows`); table_shapes: {table: shape}. The observed path
    gradients are dense."""
    if not model.variant.observes_gradients:
        return rows, {}
    combined, observed = dict(rows), {}
    for field in sorted({key.field for key in rows if key.group == ATTENTION}):
        keys = {path: TableKey(path, field) for path in (ATTENTION, REPRESENTATION)}
        paths = {path: rows.get(key, []) for path, key in keys.items()}
        if observed_fields is None or field in observed_fields:
            for path, pairs in paths.items():
                dense = jnp.zeros(table_shapes[keys[path]])
                for ids, values in pairs:
                    dense = dense.at[ids].add(values)
                observed[f"{path}/{field}"] = dense
        if model.avoid_domination and paths[ATTENTION] and paths[REPRESENTATION]:
            factor = _ratio(*(dense_rows_norm(paths[p]) for p in (ATTENTION, REPRESENTATION)))
            paths[ATTENTION] = [(ids, values * factor) for ids, values in paths[ATTENTION]]
        both = paths[ATTENTION] + paths[REPRESENTATION]
        combined[keys[ATTENTION]] = combined[keys[REPRESENTATION]] = both
    return combined, observed
