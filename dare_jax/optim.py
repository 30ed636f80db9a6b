"""The three kinds of table maths (config `optim.table_updates`), all PyTorch's Adam (b1 0.9,
b2 0.999, eps 1e-8, bias correction; the L2 penalty is part of the loss):

* "dense" (`adam`): the official optimizer as an optax transformation on autodiff's dense
  gradient: every table row moves at every step.
* "row_sparse" (`RowSparseAdam`, the default): the same maths, operation for operation, from
  the tables' gradients as looked-up rows (`jax.grad` w.r.t. the `perturbations` the model
  adds to each gather, `TwoStageModel.lookups`), so autodiff never forms a dense table
  gradient; the dense one is summed in place in a buffer carried between steps
  (`TableScratch`). Moments and buffers are stored flat (`[rows * d]`) because XLA:CPU
  vectorises the sqrt and divisions of a 1-D loop, not of a `[rows, 16]` one.
* "lazy" (`LazyAdam`): a table row changes only at the steps whose batch looks it up
  (whatever the gradient: the padding row 0 counts). With G_r the sum of this batch's
  cotangents of row r and k_r the number of steps so far that looked r up:

      if the batch looks r up:  k_r += 1
                                m_r = b1 m_r + (1 - b1) G_r
                                v_r = b2 v_r + (1 - b2) G_r^2
                                p_r -= lr (m_r / (1 - b1^k_r)) / (sqrt(v_r / (1 - b2^k_r)) + eps)
      otherwise:                p_r, m_r, v_r, k_r unchanged.

  With its own count k_r, a row's bias correction removes exactly the zero-initialisation
  bias of its moments (with the global step, as in TensorFlow Addons' LazyAdam and PyTorch's
  SparseAdam, a row first seen at step 1,000 takes a first step 0.1 sqrt(1 - 0.999^1000) /
  sqrt(0.001) = 2.5 times Adam's). A row looked up at every step follows dense Adam.

Checkpoints hold each optimizer's state as it is (RowSparseAdam's flat moments too, without
its scratch buffers): converting them would copy every table's moments at every save.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from dare_jax.models.embeddings import (
    EMBEDDING_IDS,
    PERTURBATIONS,
    TABLE_ROOT,
    Lookup,
    TableKey,
)
from dare_jax.models.loss import loss_terms

# Looked-up rows per step of LazyAdam's update loop (8,192 x 16 floats: 512 KiB per array).
UPDATE_CHUNK = 8192

Path = tuple[str, ...]  # a parameter's path in the params tree, e.g. ("embed", "shared", "item")
Flat = dict[Path, jax.Array]
Rows = dict[TableKey, list[tuple[jax.Array, jax.Array]]]


class RowSparseAdamState(NamedTuple):
    """count: int32 `[]` steps done; mu, nu: nested like the params, table leaves flat
    `[rows * d]` (the checkpointed part)."""

    count: jax.Array
    mu: Any
    nu: Any


class TableScratch(NamedTuple):
    """Per-table buffers carried between steps (nested like the params' tables), not
    checkpointed. grad_sum: flat `[rows * d]`, the last step's summed gradient (zero outside
    `touched`); step: flat `[rows * d]`, the last Adam step (carried to reuse its memory);
    touched: int32 `[n]` (n: one batch's lookups), the ids summed at (`rows`: none)."""

    grad_sum: Any
    step: Any
    touched: Any


class LazyAdamState(NamedTuple):
    """count: int32 `[]` steps done; mu, nu: nested like the params; row_count: int32 `[rows]`
    per table (nested like the params' tables), the steps that have looked each row up."""

    count: jax.Array
    mu: Any
    nu: Any
    row_count: Any


def flatten_params(params: Any) -> Flat:
    """{("embed", "representation", "item"): array, ...} from a nested params dict."""
    return traverse_util.flatten_dict(params)


def unflatten_params(flat: Flat) -> dict[str, Any]:
    return traverse_util.unflatten_dict(flat)


def table_of(path: Path) -> TableKey | None:
    """The embedding table at `path` (updated from gradient rows), or None for other leaves."""
    return TableKey(*path[1:]) if path[0] == TABLE_ROOT else None


def table_gradient_rows(
    perturbation_grads: dict[str, jax.Array],
    embedding_ids: dict[str, Any],
    lookups: tuple[Lookup, ...],
) -> Rows:
    """{table: [(ids `[n]`, cotangent rows `[n, d]`), ...]}, one pair per lookup in name order
    (not concatenated: that would copy every row once more). perturbation_grads: {lookup
    name: `[..., d]`}; embedding_ids: the sown `embedding_ids` ({name: (ids `[...]`,)})."""
    table = {lookup.name: lookup.table for lookup in lookups}
    rows: Rows = {}
    for name in sorted(perturbation_grads):
        cotangent, ids = perturbation_grads[name], embedding_ids[name]
        ids = ids[0] if isinstance(ids, tuple) else ids
        d = cotangent.shape[-1]
        flat_ids = jnp.broadcast_to(ids, cotangent.shape[:-1]).reshape(-1).astype(jnp.int32)
        rows.setdefault(table[name], []).append((flat_ids, cotangent.reshape(-1, d)))
    return rows


def perturbation_shapes(model: Any, variables: dict[str, Any], batch: Any, **kwargs) -> Any:
    """Shapes of the `perturbations` collection a training apply creates for `batch`:
    {lookup name: ShapeDtypeStruct}. Trace-time only (jax.eval_shape)."""

    def run(variables, batch, kwargs):
        mutable = [PERTURBATIONS, "batch_stats", EMBEDDING_IDS]
        _, state = model.apply(variables, batch, train=True, mutable=mutable, **kwargs)
        return state.get(PERTURBATIONS, {})

    # Everything as arguments: `batch` may hold ShapeDtypeStructs.
    return jax.eval_shape(run, variables, batch, kwargs)


def lookup_sizes(model: Any, variables: dict, batch: Any, **kwargs) -> dict[TableKey, int]:
    """{table: number of rows one training apply on `batch` looks up}."""
    table = {lookup.name: lookup.table for lookup in model.lookups}
    sizes: dict[TableKey, int] = {}
    for name, shape in perturbation_shapes(model, variables, batch, **kwargs).items():
        sizes[table[name]] = sizes.get(table[name], 0) + math.prod(shape.shape[:-1])
    return sizes


def bias_correction(decay: float, count: jax.Array, dtype: Any) -> jax.Array:
    """`1 - decay**count` in `dtype`, accurate to its rounding (PyTorch takes it in Python
    floats): `-expm1(count * log(decay))`, `log(decay)` in double precision on the host,
    because optax's float32 `1 - decay**count` rounds decay first (0.999: 1.3e-5 too small)."""
    return -jnp.expm1(jnp.asarray(count).astype(dtype) * math.log(decay))


def adam_direction(m: jax.Array, v: jax.Array, bc1: jax.Array, bc2: jax.Array, eps: float):
    """Adam's direction `m_hat / (sqrt(v_hat) + eps)` (eps_root 0; scaled by -lr afterwards);
    bc1, bc2: the bias corrections, broadcastable to m."""
    return (m / bc1.astype(m.dtype)) / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """`optax.scale_by_adam(b1, b2, eps)` (same moments, same state) with `bias_correction`."""

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)

        def direction(m, v):
            bc1, bc2 = bias_correction(b1, count, m.dtype), bias_correction(b2, count, v.dtype)
            return adam_direction(m, v, bc1, bc2, eps)

        return jax.tree.map(direction, mu, nu), optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(optax.scale_by_adam(b1, b2, eps).init, update)


def adam(
    lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """PyTorch's Adam (the official optimizer) as an optax transformation: `optax.adam`'s
    maths and state layout, with bias corrections accurate in float32 (`bias_correction`)."""
    return optax.chain(scale_by_adam(b1, b2, eps), optax.scale_by_learning_rate(lr))


@dataclasses.dataclass(frozen=True)
class _Adam:
    """Adam's hyperparameters and optax.adam's expressions (eps_root 0) with
    `bias_correction`, so that both optimizers below round as `adam` does."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def _moments(self, m, v, g):
        """optax.adam's first and second moment updates, in its order."""
        return (1 - self.b1) * g + self.b1 * m, (1 - self.b2) * (g * g) + self.b2 * v

    def _bias_corrections(self, count: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """(1 - b1^count, 1 - b2^count) in `dtype`; count int32, any shape (LazyAdam: per row)."""
        return bias_correction(self.b1, count, dtype), bias_correction(self.b2, count, dtype)

    def _update_all(self, params, state, dense_grads: Flat, table_rows: Rows, count, table_step):
        """Adam over every leaf: non-table leaves here, on their dense gradient with the global
        `count`; table leaves by `table_step(table, pairs, p, m, v) -> (p, m, v)` (pairs: the
        table's `table_rows`, m and v from `state`). Returns the nested (params, mu, nu)."""
        flat_p, flat_m, flat_v = (flatten_params(tree) for tree in (params, state.mu, state.nu))
        if unknown := {t for t in table_rows if t.path not in flat_p}:
            raise KeyError(f"gradient rows for unknown tables {sorted(unknown)}")
        new_p, new_m, new_v = {}, {}, {}
        for key, p in flat_p.items():
            m, v = flat_m[key], flat_v[key]
            if (table := table_of(key)) is not None:
                pairs = table_rows.get(table, [])
                new_p[key], new_m[key], new_v[key] = table_step(table, pairs, p, m, v)
                continue
            if key not in dense_grads:
                raise KeyError(f"no gradient for the non-table parameter {key!r}")
            new_m[key], new_v[key] = self._moments(m, v, dense_grads[key])
            bc1, bc2 = self._bias_corrections(count, m.dtype)
            new_p[key] = p + (-self.lr) * adam_direction(new_m[key], new_v[key], bc1, bc2, self.eps)
        return tuple(unflatten_params(tree) for tree in (new_p, new_m, new_v))


@dataclasses.dataclass(frozen=True)
class RowSparseAdam(_Adam):
    """optax.adam(lr, b1, b2, eps) for models with row gradients (eps_root 0)."""

    def init(self, params: Any) -> RowSparseAdamState:
        """Zero moments; table leaves flat."""
        zeros = jax.tree.map(jnp.zeros_like, _flat_tables(params))
        return RowSparseAdamState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.copy, zeros))

    def init_scratch(self, params: Any, sizes: dict[TableKey, int]) -> TableScratch:
        """Zero buffers; `touched` of length `sizes[table]` (`lookup_sizes`), out of range."""
        tables = {k: v for k, v in flatten_params(params).items() if table_of(k)}

        def per_table(make):
            return unflatten_params({k: make(table_of(k), v) for k, v in tables.items()})

        return TableScratch(
            grad_sum=per_table(lambda _, v: jnp.zeros((v.size,), v.dtype)),
            step=per_table(lambda _, v: jnp.zeros((v.size,), v.dtype)),
            touched=per_table(lambda t, v: jnp.full((sizes.get(t, 0),), v.shape[0], jnp.int32)),
        )

    def update(
        self,
        params: Any,
        dense_grads: Flat,
        table_rows: Rows,
        state: RowSparseAdamState,
        scratch: TableScratch,
    ) -> tuple[Any, RowSparseAdamState, TableScratch]:
        """One step of dense Adam on the dense gradient -> (params, state, scratch).
        dense_grads: {key: gradient} of every non-table leaf; table_rows: `table_gradient_rows`
        (a table without rows gets the g = 0 update; a table's rows must number its `touched`
        length). Jit with all three donated so that the table passes run in place."""
        count = state.count + 1
        old = {name: flatten_params(tree) for name, tree in scratch._asdict().items()}
        new = {name: dict(flat) for name, flat in old.items()}

        def table_step(table, pairs, p, m, v):
            path, ids = table.path, [i for i, _ in pairs]
            new_touched = jnp.concatenate(ids) if ids else jnp.zeros((0,), jnp.int32)
            if new_touched.shape != old["touched"][path].shape:
                raise ValueError(
                    f"{table}: {new_touched.shape[0]} gradient rows, but the scratch buffers "
                    f"were built for {old['touched'][path].shape[0]} (another batch shape)"
                )
            # The table's dense gradient in the carried buffer: zero the last step's rows,
            # add this step's (duplicates summed, as autodiff's scatter-add into zeros).
            grad = old["grad_sum"][path].reshape(p.shape)
            grad = grad.at[old["touched"][path]].set(0, mode="drop")
            for i, r in pairs:
                grad = grad.at[i].add(r.astype(p.dtype), mode="drop")
            g = grad.reshape(-1)
            m, v = self._moments(m, v, g)
            step = adam_direction(m, v, *self._bias_corrections(count, m.dtype), self.eps)
            new["grad_sum"][path], new["step"][path], new["touched"][path] = g, step, new_touched
            return p + (-self.lr) * step.reshape(p.shape), m, v

        params, mu, nu = self._update_all(params, state, dense_grads, table_rows, count, table_step)
        scratch = TableScratch(**{name: unflatten_params(flat) for name, flat in new.items()})
        return params, RowSparseAdamState(count, mu, nu), scratch


@dataclasses.dataclass(frozen=True)
class LazyAdam(_Adam):
    """Adam whose table rows move only at steps that look them up, with per-row bias
    corrections (the rule in the module docstring); non-table leaves: optax.adam's update."""

    def init(self, params: Any) -> LazyAdamState:
        """Zero moments shaped like the params, zero row counts, count 0."""
        flat = flatten_params(params)
        counts = {k: jnp.zeros((v.shape[0],), jnp.int32) for k, v in flat.items() if table_of(k)}
        zeros = jax.tree.map(jnp.zeros_like, params)
        count = jnp.zeros((), jnp.int32)
        return LazyAdamState(count, zeros, jax.tree.map(jnp.copy, zeros), unflatten_params(counts))

    def update(
        self, params: Any, dense_grads: Flat, table_rows: Rows, state: LazyAdamState
    ) -> tuple[Any, LazyAdamState]:
        """One step -> (params, state), arguments as `RowSparseAdam.update` (a table without
        rows is left as it is). Jit with both donated so that the rows are written in place."""
        flat_k = flatten_params(state.row_count)
        new_k = dict(flat_k)

        def table_step(table, pairs, p, m, v):
            lookups = sum(ids.shape[0] for ids, _ in pairs)
            if lookups == 0:
                return p, m, v
            by_rows = self._small_table if p.shape[0] <= lookups else self._large_table
            p, m, v, new_k[table.path] = by_rows(p, m, v, flat_k[table.path], pairs)
            return p, m, v

        count = state.count + 1
        params, mu, nu = self._update_all(params, state, dense_grads, table_rows, count, table_step)
        return params, LazyAdamState(count, mu, nu, unflatten_params(new_k))

    def _small_table(self, p, m, v, row_count, pairs):
        """A table with no more rows than the batch's lookups: the dense gradient and a
        looked-up mask `[rows]`, then every row updated under the mask (cost ~ the lookups)."""
        grad = jnp.zeros_like(p)
        looked_up = jnp.zeros(p.shape[:1], jnp.bool_)
        for ids, rows in pairs:
            grad = grad.at[ids].add(rows.astype(p.dtype), mode="drop")
            looked_up = looked_up.at[ids].set(True, mode="drop")
        row_count = row_count + looked_up.astype(row_count.dtype)
        bc1, bc2 = self._bias_corrections(row_count, m.dtype)
        m_new, v_new = self._moments(m, v, grad)
        step = adam_direction(m_new, v_new, bc1[:, None], bc2[:, None], self.eps)
        mask = looked_up[:, None]
        p = jnp.where(mask, p + (-self.lr) * step, p)
        return p, jnp.where(mask, m_new, m), jnp.where(mask, v_new, v), row_count

    def _large_table(self, p, m, v, row_count, pairs):
        """A table with more rows than the batch's n lookups: only the looked-up rows of p,
        m, v and the counts are read and written (in place when donated); temporaries `[n, d]`,
        and `[UPDATE_CHUNK, d]` for the Adam update of the distinct looked-up rows."""
        rows_n, width = p.shape
        ids = jnp.concatenate([i for i, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
        n = ids.shape[0]
        chunk = min(UPDATE_CHUNK, n)
        padded = -(-n // chunk) * chunk
        position = jnp.arange(n, dtype=jnp.int32)
        before = row_count.at[ids].get(mode="fill", fill_value=0)
        # Merge duplicate lookups without sorting: a looked-up row's count slot briefly holds
        # -1 - the position of one of its lookups (whichever write lands), which all its
        # lookups read back. `min(before, 0)` is 0 but makes XLA read the old counts first
        # and write in place instead of copying the whole count array.
        marked = row_count.at[ids].set(-1 - position + jnp.minimum(before, 0), mode="drop")
        # An out-of-range id (which makes the forward pass NaN) reads n: no representative.
        representative = -1 - marked.at[ids].get(mode="fill", fill_value=-1 - n)
        first = representative == position  # one lookup per distinct looked-up row
        counts = before + 1
        row_count = marked.at[jnp.where(first, ids, rows_n)].set(counts, mode="drop")
        # Each representative's summed gradient at its position: a copy of the rows, the
        # other lookups' rows added onto their representative's (a zero buffer would be
        # merged by XLA with the other tables' into one buffer that it then copies for each).
        pad = jnp.zeros((padded - n, width), p.dtype)
        grad = jnp.concatenate([rows.astype(p.dtype) for _, rows in pairs] + [pad])
        onto = jnp.where(first, padded, representative)  # padded: none
        start = 0
        for lookup_ids, rows in pairs:
            stop = start + lookup_ids.shape[0]
            grad = grad.at[onto[start:stop]].add(rows.astype(p.dtype), mode="drop")
            start = stop
        # The representatives' positions in order, then n (none) up to whole chunks: the
        # update loop runs over ceil(distinct rows / chunk) chunks, not over every lookup.
        slot = jnp.cumsum(first, dtype=jnp.int32) - 1
        firsts = jnp.full((padded,), n, jnp.int32)
        firsts = firsts.at[jnp.where(first, slot, padded)].set(position, mode="drop")
        chunks = (slot[-1] + chunk) // chunk  # slot[-1] + 1 distinct rows

        # The Adam update chunk by chunk, so that its rows and intermediates stay in the cache.
        def update_chunk(index, tables):
            p, m, v = tables
            at = jax.lax.dynamic_slice_in_dim(firsts, index * chunk, chunk)
            rows = ids.at[at].get(mode="fill", fill_value=rows_n)  # rows_n: none (dropped)
            g = grad.at[at].get(mode="fill", fill_value=0)
            bc1, bc2 = self._bias_corrections(counts.at[at].get(mode="fill", fill_value=1), m.dtype)
            m_rows = m.at[rows].get(mode="fill", fill_value=0)
            v_rows = v.at[rows].get(mode="fill", fill_value=0)
            m_rows, v_rows = self._moments(m_rows, v_rows, g)
            step = adam_direction(m_rows, v_rows, bc1[:, None], bc2[:, None], self.eps)
            p = p.at[rows].add((-self.lr) * step, mode="drop")
            return p, m.at[rows].set(m_rows, mode="drop"), v.at[rows].set(v_rows, mode="drop")

        p, m, v = jax.lax.fori_loop(0, chunks, update_chunk, (p, m, v))
        return p, m, v, row_count


def _flat_tables(tree: Any) -> Any:
    """`tree` (nested like the params) with every table leaf reshaped to 1-D."""
    flat = flatten_params(tree)
    return unflatten_params({k: v.reshape(-1) if table_of(k) else v for k, v in flat.items()})


def make_gradient_fn(model: Any, weight_decay: float):
    """`grads(params, batch_stats, batch, **apply_kwargs) -> (terms, batch_stats, dense_grads,
    table_rows)` (not jitted): the `loss_terms` dict, {path: gradient} of every non-table leaf
    and `table_gradient_rows` (the tables carry no L2 term: their gradient is the rows)."""

    def loss_fn(dense, perturbations, tables, batch_stats, batch, kwargs):
        params = unflatten_params({**dense, **tables})
        variables = {"params": params, "batch_stats": batch_stats, PERTURBATIONS: perturbations}
        mutable = ["batch_stats", EMBEDDING_IDS]
        outputs, new_state = model.apply(variables, batch, train=True, mutable=mutable, **kwargs)
        terms = loss_terms(outputs, batch["label"], params, weight_decay, batch.get("example_mask"))
        return terms["total"], (terms, new_state["batch_stats"], new_state[EMBEDDING_IDS])

    def grads(params, batch_stats, batch, **kwargs):
        flat = flatten_params(params)
        tables = {k: v for k, v in flat.items() if table_of(k)}
        dense = {k: v for k, v in flat.items() if not table_of(k)}
        variables = {"params": params, "batch_stats": batch_stats}
        shapes = perturbation_shapes(model, variables, batch, **kwargs)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (dense_grads, row_grads), (terms, new_stats, ids) = jax.grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(dense, zeros, tables, batch_stats, batch, kwargs)
        return terms, new_stats, dense_grads, table_gradient_rows(row_grads, ids, model.lookups)

    return grads


def make_optimizer(spec: Any) -> optax.GradientTransformation | RowSparseAdam | LazyAdam:
    """The optimizer of an `OptimSpec` (`dare_jax.config`): its `table_updates` kind."""
    kinds = {"dense": adam, "row_sparse": RowSparseAdam, "lazy": LazyAdam}
    return kinds[spec.table_updates](spec.lr, spec.b1, spec.b2, spec.eps)
