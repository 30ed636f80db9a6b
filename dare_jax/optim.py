"""The official dense Adam, applied to embedding tables without a dense table gradient.

The official training updates every table row every step (dense embedding gradients, torch
Adam: b1 0.9, b2 0.999, eps 1e-8, bias correction; the maths of `optax.adam`). For a row no
lookup touched, the gradient is 0 and that update is m <- b1 m, v <- b2 v,
p <- p - lr m_hat / (sqrt(v_hat) + eps). So the same result is obtained by
  (a) one fused elementwise pass over every table element with g = 0, and
  (b) a fix-up of the touched rows: their summed gradient g (duplicate ids summed in a zero
      buffer carried in the state, re-zeroed at those ids afterwards), m = (1 - b1) g + m_a,
      v = (1 - b2) g^2 + v_a from the pass's m_a = b1 m, v_a = b2 v (bit-identical to the
      dense expression's b1 m, b2 v), p from the OLD p row; then scatter-set.
The table gradient comes as rows: the model (config `row_sparse_embedding_grads`) passes each
gather through a Flax perturbation, so `jax.grad` w.r.t. `perturbations` yields the
cotangents `[..., d]` of the looked-up rows, and sows their ids in `embedding_ids`.
Non-table leaves get the same Adam as one elementwise expression per leaf.

Parameters are handled as flat dicts {"a/b/c": array} (`flatten_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from dare_jax.models.embeddings import EMBEDDING_IDS
from dare_jax.models.loss import loss_terms

TABLE_ROOT = "embed"
PERTURBATIONS = "perturbations"

Flat = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class AdamHyper:
    """Adam hyper-parameters (torch / optax defaults; eps_root 0)."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


class RowSparseAdamState(NamedTuple):
    """count: int32 `[]` steps done; mu, nu: flat like the params; grad_sum: {table key:
    zero buffer `[rows, d]`} where touched rows' gradients are summed (zero between steps)."""

    count: jax.Array
    mu: Flat
    nu: Flat
    grad_sum: Flat


def flatten_params(params: Any) -> Flat:
    """{"embed/representation/item": array, ...} from a nested params dict."""
    return traverse_util.flatten_dict(params, sep="/")


def unflatten_params(flat: Flat) -> dict[str, Any]:
    return traverse_util.unflatten_dict(flat, sep="/")


def is_table(key: str) -> bool:
    """True for embedding tables (`embed/<group>/<field>`), updated from gradient rows."""
    return key.split("/", 1)[0] == TABLE_ROOT


def table_key(lookup_name: str) -> str:
    """Table key of a perturbation name `<group>:<field>:<target|history>`."""
    parts = lookup_name.split(":")
    if len(parts) != 3:
        raise ValueError(f"perturbation name {lookup_name!r}: expected group:field:role")
    return f"{TABLE_ROOT}/{parts[0]}/{parts[1]}"


def init(params_flat: Flat) -> RowSparseAdamState:
    """Zero moments for every leaf and a zero gradient buffer per table."""
    zeros = {k: jnp.zeros_like(v) for k, v in params_flat.items()}
    return RowSparseAdamState(
        count=jnp.zeros((), jnp.int32),
        mu=zeros,
        nu={k: jnp.zeros_like(v) for k, v in params_flat.items()},
        grad_sum={k: jnp.zeros_like(v) for k, v in params_flat.items() if is_table(k)},
    )


def table_gradient_rows(
    perturbation_grads: dict[str, jax.Array], embedding_ids: dict[str, Any]
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{table key: (ids `[N]`, cotangent rows `[N, d]`)}, all lookups of a table concatenated.

    perturbation_grads: {lookup name: `[..., d]`} (grad w.r.t. the `perturbations` collection);
    embedding_ids: the sown `embedding_ids` collection ({name: (ids `[...]`,)}).
    """
    rows: dict[str, list[tuple[jax.Array, jax.Array]]] = {}
    for name, cotangent in perturbation_grads.items():
        ids = embedding_ids[name]
        ids = ids[0] if isinstance(ids, tuple) else ids
        d = cotangent.shape[-1]
        flat_rows = cotangent.reshape(-1, d)
        flat_ids = jnp.broadcast_to(ids, cotangent.shape[:-1]).reshape(-1)
        rows.setdefault(table_key(name), []).append((flat_ids, flat_rows))
    return {
        k: (jnp.concatenate([i for i, _ in v]), jnp.concatenate([r for _, r in v]))
        for k, v in rows.items()
    }


def _bias_corrections(hyper: AdamHyper, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The same expressions as optax (`1 - decay**count`, float32), so the same rounding.
    return 1 - hyper.b1**count, 1 - hyper.b2**count


def _adam_leaf(p, m, v, g, hyper: AdamHyper, bc1, bc2):
    """One dense Adam step of a leaf (optax.adam's operations in its order), fused by XLA."""
    m = (1 - hyper.b1) * g + hyper.b1 * m
    v = (1 - hyper.b2) * (g * g) + hyper.b2 * v
    return _move(p, m, v, hyper, bc1, bc2), m, v


def _move(p, m, v, hyper: AdamHyper, bc1, bc2):
    step = (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype) + 0.0) + hyper.eps)
    return p + (-hyper.lr) * step


def update(
    params_flat: Flat,
    dense_grads: Flat,
    table_rows: dict[str, tuple[jax.Array, jax.Array]],
    state: RowSparseAdamState,
    hyper: AdamHyper,
) -> tuple[Flat, RowSparseAdamState]:
    """One Adam step, numerically the dense Adam on the dense gradient.

    params_flat: every leaf; dense_grads: gradient of every non-table leaf; table_rows:
    {table key: (ids `[N]`, rows `[N, d]`)} (`table_gradient_rows`); a table without rows
    gets the g = 0 update. Returns (new params, new state). Jit with params and state donated
    so that the table passes run in place.
    """
    count = state.count + 1
    bc1, bc2 = _bias_corrections(hyper, count)
    new_p, new_m, new_v, new_buf = {}, {}, {}, dict(state.grad_sum)
    for key, p in params_flat.items():
        m, v = state.mu[key], state.nu[key]
        if not is_table(key):
            if key not in dense_grads:
                raise KeyError(f"no gradient for the non-table parameter {key!r}")
            new_p[key], new_m[key], new_v[key] = _adam_leaf(
                p, m, v, dense_grads[key], hyper, bc1, bc2
            )
            continue
        if key not in table_rows:
            g = jnp.zeros((), p.dtype)
            new_p[key], new_m[key], new_v[key] = _adam_leaf(p, m, v, g, hyper, bc1, bc2)
            continue
        ids, rows = table_rows[key]
        ids = ids.astype(jnp.int32)
        # Summed gradient of each touched row (duplicates summed), read back per occurrence.
        buf = state.grad_sum[key].at[ids].add(rows.astype(p.dtype), mode="drop")
        g = buf.at[ids].get(mode="fill", fill_value=0)
        p_old = p.at[ids].get(mode="fill", fill_value=0)
        # (a) every row as if untouched: (1 - b1) * 0 + b1 * m == b1 * m exactly.
        m_a, v_a = hyper.b1 * m, hyper.b2 * v
        p_a = _move(p, m_a, v_a, hyper, bc1, bc2)
        # (b) touched rows from the summed gradient (duplicate ids write identical values).
        m_t = (1 - hyper.b1) * g + m_a.at[ids].get(mode="fill", fill_value=0)
        v_t = (1 - hyper.b2) * (g * g) + v_a.at[ids].get(mode="fill", fill_value=0)
        p_t = _move(p_old, m_t, v_t, hyper, bc1, bc2)
        new_p[key] = p_a.at[ids].set(p_t, mode="drop")
        new_m[key] = m_a.at[ids].set(m_t, mode="drop")
        new_v[key] = v_a.at[ids].set(v_t, mode="drop")
        new_buf[key] = buf.at[ids].set(0, mode="drop")
    unknown = set(table_rows) - {k for k in params_flat if is_table(k)}
    if unknown:
        raise KeyError(f"gradient rows for unknown tables {sorted(unknown)}")
    return new_p, RowSparseAdamState(count, new_m, new_v, new_buf)


def perturbation_shapes(model: Any, variables: dict[str, Any], batch: Any, **kwargs) -> Any:
    """Shapes of the `perturbations` collection a training apply creates for `batch`
    (model config `row_sparse_embedding_grads` on); trace-time only (jax.eval_shape)."""

    def run():
        _, state = model.apply(
            variables, batch, mutable=[PERTURBATIONS, "batch_stats", EMBEDDING_IDS], **kwargs
        )
        return state[PERTURBATIONS]

    return jax.eval_shape(run)


def make_train_step(model: Any, hyper: AdamHyper, weight_decay: float):
    """`step(state, batch) -> (state, loss)`: forward, backward, `update` (not jitted).

    state: {"params": flat params, "batch_stats", "opt": RowSparseAdamState}. The model must
    be built with `row_sparse_embedding_grads=True`. Loss: `loss_terms(...)["total"]` (the
    tables carry no L2 term, so their whole gradient is the lookup rows). Gradients are taken
    w.r.t. the non-table params and the perturbations only; the tables enter as constants.
    """
    def loss_fn(dense, perturbations, tables, batch_stats, batch):
        params = unflatten_params({**dense, **tables})
        outputs, new_state = model.apply(
            {"params": params, "batch_stats": batch_stats, PERTURBATIONS: perturbations},
            batch,
            train=True,
            mutable=["batch_stats", EMBEDDING_IDS],
        )
        total = loss_terms(outputs, batch["label"], params, weight_decay)["total"]
        return total, (new_state["batch_stats"], new_state[EMBEDDING_IDS])

    def step(state, batch):
        flat = state["params"]
        tables = {k: v for k, v in flat.items() if is_table(k)}
        dense = {k: v for k, v in flat.items() if not is_table(k)}
        variables = {"params": unflatten_params(flat), "batch_stats": state["batch_stats"]}
        shapes = perturbation_shapes(model, variables, batch, train=True)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (loss, (batch_stats, ids)), (dense_grads, row_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(dense, zeros, tables, state["batch_stats"], batch)
        rows = table_gradient_rows(row_grads, ids)
        params, opt = update(flat, dense_grads, rows, state["opt"], hyper)
        return {"params": params, "batch_stats": batch_stats, "opt": opt}, loss

    return step
