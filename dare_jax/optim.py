"""The official dense Adam on embedding tables, without building a dense table gradient.

The official training updates every table row every step (dense embedding gradients, torch
Adam: b1 0.9, b2 0.999, eps 1e-8, bias correction). `adam` is that optimizer as an optax
transformation (the driver's path for models without row gradients); `RowSparseAdam`, used by
the driver when `optim.sparse_table_updates` is on, computes the same update differently:
  * the model (config `row_sparse_embedding_grads`) passes each table gather through a Flax
    perturbation, so `jax.grad` w.r.t. `perturbations` yields the looked-up rows' cotangents
    `[..., d]` (ids sown in `embedding_ids`) and autodiff never forms a dense table gradient;
  * each table's dense gradient lives in a buffer carried from step to step (`TableScratch`):
    the previous step's rows are set back to 0 and this step's rows scatter-added
    (duplicates summed), both in place: no fresh 260 MB buffer (page faults) per step;
  * each table's Adam moments, gradient buffer and step buffer are stored FLAT (`[rows * d]`):
    XLA:CPU emits scalar code for the square root and divisions of a `[rows, 16]` loop but
    vectorises the same loop over a 1-D array (measured 2x faster, benchmarks/README.md).
    The params keep their `[rows, d]` shape (the model, checkpoints and analyses read them),
    so the Adam step `(m / bc1) / (sqrt(v / bc2) + eps)` is written to the flat step buffer
    and the params move by `-lr` times it in a second, sqrt-free pass.
The result is the dense Adam on the dense gradient, operation for operation (tests compare
with `adam`). Non-table leaves get the same Adam expression on their dense gradient.

Bias correction: both compute `1 - b**t` with `bias_correction`, as accurately as the
moments' dtype allows. `optax.adam` evaluates `1 - 0.999**t` in float32, where 0.999 is
already rounded: its second-moment correction is 1.3e-5 to 2e-5 too small for the first
thousand steps, so every early Adam step is off by ~1e-5 relative. PyTorch evaluates the
corrections in double precision; with optax's expression the driver drifted away from the
official float32 training within two steps (`dare_jax.interop.check_trajectory`, issue 13).

Checkpoints hold the optimizer state in optax.adam's layout (`adam` shares it;
`to_optax_state`), so a run can be resumed, or analysed, with either optimizer; the scratch
buffers are not saved (`init_scratch` rebuilds them: a zero buffer with nothing to re-zero is
the same state).

Measured and rejected (benchmarks/README.md): a "decay every row with g = 0, then fix up the
touched rows from their old values" form is also exact, but XLA:CPU fuses the old-row
gathers into consumers scheduled after the in-place table writes and so inserts table-sized
copies; storing the params flat as well is faster still but changes their shape everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from dare_jax.models.embeddings import EMBEDDING_IDS
from dare_jax.models.loss import loss_terms

TABLE_ROOT = "embed"
PERTURBATIONS = "perturbations"

Flat = dict[str, jax.Array]
Rows = dict[str, list[tuple[jax.Array, jax.Array]]]


class RowSparseAdamState(NamedTuple):
    """count: int32 `[]` steps done; mu, nu: nested like the params, table leaves flat
    `[rows * d]` (the checkpointed part; see `to_optax_state`)."""

    count: jax.Array
    mu: Any
    nu: Any


class TableScratch(NamedTuple):
    """Per-table buffers carried between steps, not checkpointed ({table key: array}).

    grad_sum: flat `[rows * d]`, the last step's summed gradient (zero outside `touched`);
    step: flat `[rows * d]`, the last Adam step (overwritten every step; carried only so that
    its memory is reused in place); touched: int32 `[n]`, the ids the gradient was summed at
    (n = the lookups of one batch; `rows` = out of range = nothing to re-zero).
    """

    grad_sum: Flat
    step: Flat
    touched: Flat


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


def table_gradient_rows(perturbation_grads: Flat, embedding_ids: dict[str, Any]) -> Rows:
    """{table key: [(ids `[n]`, cotangent rows `[n, d]`), ...]}, one pair per lookup.

    perturbation_grads: {lookup name: `[..., d]`} (grad w.r.t. the `perturbations` collection);
    embedding_ids: the sown `embedding_ids` collection ({name: (ids `[...]`,)}). The lookups
    are kept apart (not concatenated: that would copy every row once more).
    """
    rows: Rows = {}
    for name in sorted(perturbation_grads):
        cotangent = perturbation_grads[name]
        ids = embedding_ids[name]
        ids = ids[0] if isinstance(ids, tuple) else ids
        d = cotangent.shape[-1]
        flat_ids = jnp.broadcast_to(ids, cotangent.shape[:-1]).reshape(-1).astype(jnp.int32)
        rows.setdefault(table_key(name), []).append((flat_ids, cotangent.reshape(-1, d)))
    return rows


def perturbation_shapes(model: Any, variables: dict[str, Any], batch: Any, **kwargs) -> Any:
    """Shapes of the `perturbations` collection a training apply creates for `batch` (empty
    when the model exposes no row gradients: config `row_sparse_embedding_grads` off).
    Trace-time only (jax.eval_shape)."""

    def run(variables, batch, kwargs):
        _, state = model.apply(
            variables,
            batch,
            train=True,
            mutable=[PERTURBATIONS, "batch_stats", EMBEDDING_IDS],
            **kwargs,
        )
        return state.get(PERTURBATIONS, {})

    # Everything as arguments: `batch` may hold ShapeDtypeStructs.
    return jax.eval_shape(run, variables, batch, kwargs)


def lookup_sizes(model: Any, variables: dict[str, Any], batch: Any, **kwargs) -> dict[str, int]:
    """{table key: number of rows one training apply on `batch` looks up}."""
    sizes: dict[str, int] = {}
    shapes = perturbation_shapes(model, variables, batch, **kwargs)
    for name, shape in traverse_util.flatten_dict(shapes, sep="/").items():
        key = table_key(name.split("/")[-1])
        sizes[key] = sizes.get(key, 0) + math.prod(shape.shape[:-1])
    return sizes


def bias_correction(decay: float, count: jax.Array, dtype: Any) -> jax.Array:
    """`1 - decay**count` in `dtype`, accurate to that dtype's rounding.

    Computed as `-expm1(count * log(decay))` with `log(decay)` taken in double precision on
    the host (PyTorch's Adam takes `1 - beta**step` in Python floats). optax's float32
    `1 - decay**count` rounds decay first: for 0.999 it is 1.3e-5 relative too small.
    """
    return -jnp.expm1(jnp.asarray(count).astype(dtype) * math.log(decay))


def adam_direction(m: jax.Array, v: jax.Array, count: jax.Array, b1: float, b2: float, eps):
    """The bias-corrected Adam step direction `m_hat / (sqrt(v_hat) + eps)` after `count`
    updates of the moments (eps_root 0; scaled by -lr afterwards)."""
    bc1, bc2 = bias_correction(b1, count, m.dtype), bias_correction(b2, count, v.dtype)
    return (m / bc1) / (jnp.sqrt(v / bc2) + eps)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """`optax.scale_by_adam(b1, b2, eps)` (same moments, same state) with `bias_correction`."""
    base = optax.scale_by_adam(b1, b2, eps)

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        directions = jax.tree.map(lambda m, v: adam_direction(m, v, count, b1, b2, eps), mu, nu)
        return directions, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(base.init, update)


def adam(
    lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """PyTorch's Adam (the official optimizer) as an optax transformation: `optax.adam`'s
    maths and state layout, with bias corrections accurate in float32 (`bias_correction`)."""
    return optax.chain(scale_by_adam(b1, b2, eps), optax.scale_by_learning_rate(lr))


@dataclasses.dataclass(frozen=True)
class RowSparseAdam:
    """`adam(lr, b1, b2, eps)` for models with row gradients."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def init(self, params: Any) -> RowSparseAdamState:
        """Zero moments; table leaves flat."""
        zeros = jax.tree.map(jnp.zeros_like, _flat_tables(params))
        return RowSparseAdamState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.copy, zeros))

    def init_scratch(self, params: Any, sizes: dict[str, int]) -> TableScratch:
        """Zero buffers for every table; `touched` of length `sizes[key]` (from
        `lookup_sizes`; 0 for a table no lookup reads), filled with the out-of-range id."""
        tables = {k: v for k, v in flatten_params(params).items() if is_table(k)}
        return TableScratch(
            grad_sum={k: jnp.zeros((v.size,), v.dtype) for k, v in tables.items()},
            step={k: jnp.zeros((v.size,), v.dtype) for k, v in tables.items()},
            touched={
                k: jnp.full((sizes.get(k, 0),), v.shape[0], jnp.int32) for k, v in tables.items()
            },
        )

    def update(
        self,
        params: Any,
        dense_grads: Flat,
        table_rows: Rows,
        state: RowSparseAdamState,
        scratch: TableScratch,
    ) -> tuple[Any, RowSparseAdamState, TableScratch]:
        """One Adam step, numerically the dense Adam on the dense gradient.

        params: nested; dense_grads: {key: gradient} of every non-table leaf; table_rows:
        `table_gradient_rows` (a table without rows gets the g = 0 update). Returns (params,
        state, scratch). Jit with all three donated so that the table passes run in place;
        the total rows of a table must equal its `touched` length (fixed shapes).
        """
        count = state.count + 1
        flat_p = flatten_params(params)
        flat_m, flat_v = flatten_params(state.mu), flatten_params(state.nu)
        unknown = set(table_rows) - set(scratch.touched)
        if unknown:
            raise KeyError(f"gradient rows for unknown tables {sorted(unknown)}")
        new_p, new_m, new_v = {}, {}, {}
        grad_sum, steps, touched = dict(scratch.grad_sum), dict(scratch.step), {}
        for key, p in flat_p.items():
            m, v = flat_m[key], flat_v[key]
            if not is_table(key):
                if key not in dense_grads:
                    raise KeyError(f"no gradient for the non-table parameter {key!r}")
                new_m[key], new_v[key] = self._moments(m, v, dense_grads[key])
                new_p[key] = p + (-self.lr) * self._step(new_m[key], new_v[key], count)
                continue
            pairs = table_rows.get(key, [])
            ids = [i for i, _ in pairs]
            new_touched = jnp.concatenate(ids) if ids else jnp.zeros((0,), jnp.int32)
            if new_touched.shape != scratch.touched[key].shape:
                raise ValueError(
                    f"{key}: {new_touched.shape[0]} gradient rows, but the scratch buffers "
                    f"were built for {scratch.touched[key].shape[0]} (another batch shape)"
                )
            # The table's dense gradient in the carried buffer: zero the last step's rows,
            # add this step's (duplicates summed, as autodiff's scatter-add into zeros).
            grad = scratch.grad_sum[key].reshape(p.shape)
            grad = grad.at[scratch.touched[key]].set(0, mode="drop")
            for i, r in pairs:
                grad = grad.at[i].add(r.astype(p.dtype), mode="drop")
            g = grad.reshape(-1)
            new_m[key], new_v[key] = self._moments(m, v, g)
            steps[key] = self._step(new_m[key], new_v[key], count)
            new_p[key] = p + (-self.lr) * steps[key].reshape(p.shape)
            grad_sum[key], touched[key] = g, new_touched
        for key in scratch.touched.keys() - touched.keys():
            touched[key] = scratch.touched[key]  # a table without the flag's rows: untouched
        state = RowSparseAdamState(count, unflatten_params(new_m), unflatten_params(new_v))
        return unflatten_params(new_p), state, TableScratch(grad_sum, steps, touched)

    def _moments(self, m, v, g):
        """optax.adam's first and second moment updates, in its order."""
        return (1 - self.b1) * g + self.b1 * m, (1 - self.b2) * (g * g) + self.b2 * v

    def _step(self, m, v, count):
        return adam_direction(m, v, count, self.b1, self.b2, self.eps)

    def to_optax_state(self, state: RowSparseAdamState, params: Any) -> Any:
        """The same state in optax.adam's layout (moments shaped like the params)."""

        def reshape(moment, p):
            return moment.reshape(p.shape)

        template = adam(self.lr, self.b1, self.b2, self.eps).init(
            jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
        )
        adam_state = template[0]._replace(
            count=state.count,
            mu=jax.tree.map(reshape, state.mu, params),
            nu=jax.tree.map(reshape, state.nu, params),
        )
        return (adam_state, *template[1:])

    def from_optax_state(self, optax_state: Any) -> RowSparseAdamState:
        """Inverse of `to_optax_state`."""
        adam_state = optax_state[0]
        return RowSparseAdamState(
            adam_state.count, _flat_tables(adam_state.mu), _flat_tables(adam_state.nu)
        )


def _flat_tables(tree: Any) -> Any:
    """`tree` (nested like the params) with every table leaf reshaped to 1-D."""
    flat = flatten_params(tree)
    return unflatten_params({k: v.reshape(-1) if is_table(k) else v for k, v in flat.items()})


def make_gradient_fn(model: Any, weight_decay: float):
    """`grads(params, batch_stats, batch, **apply_kwargs) -> (terms, batch_stats, dense_grads,
    table_rows)` (not jitted). terms: the `loss_terms` dict; dense_grads: {key: gradient} of
    every non-table leaf; table_rows: `table_gradient_rows`. The model must be built with
    `row_sparse_embedding_grads=True`; the tables carry no L2 term, so their whole gradient
    is the lookup rows."""

    def loss_fn(dense, perturbations, tables, batch_stats, batch, kwargs):
        params = unflatten_params({**dense, **tables})
        outputs, new_state = model.apply(
            {"params": params, "batch_stats": batch_stats, PERTURBATIONS: perturbations},
            batch,
            train=True,
            mutable=["batch_stats", EMBEDDING_IDS],
            **kwargs,
        )
        terms = loss_terms(outputs, batch["label"], params, weight_decay)
        return terms["total"], (terms, new_state["batch_stats"], new_state[EMBEDDING_IDS])

    def grads(params, batch_stats, batch, **kwargs):
        flat = flatten_params(params)
        tables = {k: v for k, v in flat.items() if is_table(k)}
        dense = {k: v for k, v in flat.items() if not is_table(k)}
        variables = {"params": params, "batch_stats": batch_stats}
        shapes = perturbation_shapes(model, variables, batch, **kwargs)
        if not shapes:
            # A model that ignores the flag would leave every table at its g = 0 update.
            raise ValueError(
                f"{type(model).__name__} exposes no table-gradient rows: build it with model "
                "config row_sparse_embedding_grads=True (TwoStageModel only)"
            )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (dense_grads, row_grads), (terms, new_stats, ids) = jax.grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(dense, zeros, tables, batch_stats, batch, kwargs)
        return terms, new_stats, dense_grads, table_gradient_rows(row_grads, ids)

    return grads
