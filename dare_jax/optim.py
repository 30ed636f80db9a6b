"""The official dense Adam on embedding tables, without building a dense table gradient.

The official training updates every table row every step (dense embedding gradients, torch
Adam: b1 0.9, b2 0.999, eps 1e-8, bias correction; the maths of `optax.adam`). Here:
  * the model (config `row_sparse_embedding_grads`) passes each table gather through a Flax
    perturbation, so `jax.grad` w.r.t. `perturbations` yields the looked-up rows' cotangents
    `[..., d]` (ids sown in `embedding_ids`) and autodiff never forms a dense table gradient;
  * each table's dense gradient lives in a buffer carried in the optimizer state: the
    previous step's rows are set back to 0 and this step's rows scatter-added (duplicates
    summed), both in place (no fresh 260 MB buffer, no page faults);
  * the Adam step of each leaf is one elementwise expression, optax.adam's operations in its
    order (m, v, then p from the new m, v), which XLA compiles to 3 table-sized loops reading
    p, m, v and the gradient once (optax's chain compiles to 5 loops, ~11 table passes).
The result is the dense Adam on the dense gradient (tests compare with optax).

Measured and rejected (benchmarks/README.md): a "decay every row with g = 0, then fix up the
touched rows from their old values" form is also exact, but XLA:CPU fuses the old-row
gathers into consumers scheduled after the in-place table writes and so inserts table-sized
copies (4 per table, ~210k page faults per step): slower than the form above.

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
    `[rows, d]`} the last step's summed table gradient (zero outside `touched`); touched:
    {table key: int32 `[N]`} the ids it was summed at (re-zeroed at the next step)."""

    count: jax.Array
    mu: Flat
    nu: Flat
    grad_sum: Flat
    touched: dict[str, jax.Array]


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
        touched={k: jnp.zeros((0,), jnp.int32) for k in params_flat if is_table(k)},
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
    new_p, new_m, new_v = {}, {}, {}
    new_buf, new_touched = dict(state.grad_sum), dict(state.touched)
    for key, p in params_flat.items():
        m, v = state.mu[key], state.nu[key]
        if not is_table(key):
            if key not in dense_grads:
                raise KeyError(f"no gradient for the non-table parameter {key!r}")
            new_p[key], new_m[key], new_v[key] = _adam_leaf(
                p, m, v, dense_grads[key], hyper, bc1, bc2
            )
            continue
        no_rows = (jnp.zeros((0,), jnp.int32), jnp.zeros((0, *p.shape[1:]), p.dtype))
        ids, rows = table_rows.get(key, no_rows)  # an unused table: the g = 0 update
        ids = ids.astype(jnp.int32)
        # The table's dense gradient, in the carried buffer: zero the last step's rows, add
        # this step's (duplicates summed, as autodiff's scatter-add into zeros). Both
        # scatters work in place and no table-sized buffer is allocated or copied.
        buf = state.grad_sum[key].at[state.touched[key]].set(0, mode="drop")
        buf = buf.at[ids].add(rows.astype(p.dtype), mode="drop")
        new_p[key], new_m[key], new_v[key] = _adam_leaf(p, m, v, buf, hyper, bc1, bc2)
        new_buf[key], new_touched[key] = buf, ids
    unknown = set(table_rows) - {k for k in params_flat if is_table(k)}
    if unknown:
        raise KeyError(f"gradient rows for unknown tables {sorted(unknown)}")
    return new_p, RowSparseAdamState(count, new_m, new_v, new_buf, new_touched)


def perturbation_shapes(model: Any, variables: dict[str, Any], batch: Any, **kwargs) -> Any:
    """Shapes of the `perturbations` collection a training apply creates for `batch`
    (model config `row_sparse_embedding_grads` on); trace-time only (jax.eval_shape)."""

    def run():
        _, state = model.apply(
            variables, batch, mutable=[PERTURBATIONS, "batch_stats", EMBEDDING_IDS], **kwargs
        )
        return state.get(PERTURBATIONS, {})  # absent: the model ignores the flag

    return jax.eval_shape(run)


def make_gradient_fn(model: Any, weight_decay: float):
    """`grads(state, batch) -> (loss, batch_stats, dense_grads, table_rows)` (not jitted).

    dense_grads: {key: gradient} of every non-table leaf; table_rows: `table_gradient_rows`.
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

    def grads(state, batch):
        flat = state["params"]
        tables = {k: v for k, v in flat.items() if is_table(k)}
        dense = {k: v for k, v in flat.items() if not is_table(k)}
        variables = {"params": unflatten_params(flat), "batch_stats": state["batch_stats"]}
        shapes = perturbation_shapes(model, variables, batch, train=True)
        if not shapes:
            # A model that ignores the flag would leave every table at its g = 0 update.
            raise ValueError(
                f"{type(model).__name__} exposes no table-gradient rows: build it with model "
                "config row_sparse_embedding_grads=True (TwoStageModel only)"
            )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (loss, (batch_stats, ids)), (dense_grads, row_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(dense, zeros, tables, state["batch_stats"], batch)
        return loss, batch_stats, dense_grads, table_gradient_rows(row_grads, ids)

    return grads


def make_split_train_step(model: Any, hyper: AdamHyper, weight_decay: float):
    """`step(state, batch) -> (state, loss)` as two jitted calls: gradients, then the Adam
    update with params and optimizer state donated. XLA:CPU runs the table passes of a
    separate update program on both cores; inside one program with the backward pass they
    ran on one thread (benchmarks/README.md)."""
    grads_fn = jax.jit(make_gradient_fn(model, weight_decay))

    def apply_update(params, opt, dense_grads, rows):
        return update(params, dense_grads, rows, opt, hyper)

    update_fn = jax.jit(apply_update, donate_argnums=(0, 1))

    def step(state, batch):
        loss, batch_stats, dense_grads, rows = grads_fn(state, batch)
        params, opt = update_fn(state["params"], state["opt"], dense_grads, rows)
        return {"params": params, "batch_stats": batch_stats, "opt": opt}, loss

    return step


def make_train_step(model: Any, hyper: AdamHyper, weight_decay: float):
    """`step(state, batch) -> (state, loss)`: gradients and `update` in one function (not
    jitted; for one program). state: {"params": flat params, "batch_stats", "opt":
    RowSparseAdamState}; the model must be built with `row_sparse_embedding_grads=True`. The
    tables carry no L2 term, so their whole gradient is the lookup rows."""
    grads_fn = make_gradient_fn(model, weight_decay)

    def step(state, batch):
        loss, batch_stats, dense_grads, rows = grads_fn(state, batch)
        params, opt = update(state["params"], dense_grads, rows, state["opt"], hyper)
        return {"params": params, "batch_stats": batch_stats, "opt": opt}, loss

    return step
