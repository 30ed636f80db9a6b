"""Pure training and evaluation steps.

The training state is a plain pytree (a dict):

    {"step": int32 [], "rng": uint32 [2], "params": ..., "batch_stats": ...,
     "opt_state": ...[, "scratch": ...]}

whose leaves carry `NamedSharding`s (`dare_jax.sharding.Partitioner`): the same functions run
on one device or on a mesh, the shardings being passed to `jax.jit` as in/out shardings.
`make_train_step` returns one function, `jax.jit`-compiled once: the state is donated, every
batch has the same static shapes, and the step number is traced data (not a Python int), so
nothing recompiles between steps. The optimizer (`dare_jax.optim.make_optimizer`) decides the
step's form: `adam` on autodiff's gradients, or `RowSparseAdam` / `LazyAdam` on the tables'
gradients as looked-up rows (`RowSparseAdam` carries per-table buffers in
`state["scratch"]`). Checkpoints hold RowSparseAdam's state in `adam`'s layout without the
scratch (`to_checkpoint` / `make_from_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dare_jax import optim as optim_lib
from dare_jax.models import loss as loss_lib
from dare_jax.models.embeddings import TableKey
from dare_jax.models.gradient_paths import combine_path_gradients, combine_path_rows

State = dict[str, Any]
Batch = dict[str, jax.Array]
Optimizer = optax.GradientTransformation | optim_lib.RowSparseAdam | optim_lib.LazyAdam
RowGradientOptimizer = (optim_lib.RowSparseAdam, optim_lib.LazyAdam)


def checkpoint_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer whose state layout the checkpoints of `optimizer` use (optax's for
    RowSparseAdam; LazyAdam and optax checkpoint their own state)."""
    if isinstance(optimizer, optim_lib.RowSparseAdam):
        return optim_lib.adam(optimizer.lr, optimizer.b1, optimizer.b2, optimizer.eps)
    return optimizer


def init_state_fn(
    model: Any, optimizer: Optimizer
) -> Callable[[jax.Array, Batch, jax.Array], State]:
    """The pure (unjitted) `init_state(init_rng, example_batch, step_rng) -> State`.

    Parameters and BatchNorm statistics come from `model.init(init_rng, ...)`;
    `step_rng` (a raw uint32 [2] key) is kept in the state: step s draws its
    randomness from `fold_in(step_rng, s)`, so a resumed run draws the same
    numbers as an uninterrupted one, and seeds share one compiled step.
    """
    variables_part, optimizer_part = _init_parts(model, optimizer)

    def init_state(init_rng: jax.Array, example_batch: Batch, step_rng: jax.Array) -> State:
        return optimizer_part(variables_part(init_rng, example_batch, step_rng), example_batch)

    return init_state


def _init_parts(model: Any, optimizer: Optimizer):
    """`init_state` in two parts: (init_rng, example_batch, step_rng) -> the state without
    the optimizer's part; (that, example_batch) -> the whole state."""

    def variables_part(init_rng: jax.Array, example_batch: Batch, step_rng: jax.Array) -> State:
        variables = model.init(init_rng, example_batch, train=False)
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": step_rng,
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
        }

    def optimizer_part(state: State, example_batch: Batch) -> State:
        state = {**state, "opt_state": optimizer.init(state["params"])}
        if isinstance(optimizer, optim_lib.RowSparseAdam):
            variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            state["scratch"] = _init_scratch(model, optimizer, variables, example_batch)
        return state

    return variables_part, optimizer_part


def _init_scratch(model, optimizer, variables, batch) -> optim_lib.TableScratch:
    # The dropout key only shapes the trace (lookup counts do not depend on it).
    sizes = optim_lib.lookup_sizes(model, variables, batch, rngs={"dropout": jax.random.PRNGKey(0)})
    if model.spec.observes_gradients:  # both synchronised copies get both paths' rows
        for key in [k for k in sizes if k.group == "attention"]:
            copy = TableKey("representation", key.field)
            sizes[key] = sizes[copy] = sizes[key] + sizes.get(copy, 0)
    return optimizer.init_scratch(variables["params"], sizes)


def to_checkpoint(state: State, optimizer: Optimizer) -> State:
    """The state as checkpoints hold it: optax.adam's layout, without scratch buffers."""
    if not isinstance(optimizer, optim_lib.RowSparseAdam):
        return state
    saved = {key: value for key, value in state.items() if key != "scratch"}
    saved["opt_state"] = optimizer.to_optax_state(state["opt_state"], state["params"])
    return saved


def make_from_checkpoint(
    model: Any, optimizer: Optimizer, example_batch: Batch, state_shardings: Any = None
) -> Callable[[State], State]:
    """`from_checkpoint(saved) -> State`, the inverse of `to_checkpoint` (jitted; fresh
    scratch buffers, created in their shardings). `example_batch`: a training batch (arrays
    or ShapeDtypeStructs), which fixes the scratch id-list lengths."""
    if not isinstance(optimizer, optim_lib.RowSparseAdam):
        return lambda saved: saved

    def from_checkpoint(saved: State) -> State:
        state = dict(saved)
        state["opt_state"] = optimizer.from_optax_state(saved["opt_state"])
        variables = {"params": saved["params"], "batch_stats": saved["batch_stats"]}
        state["scratch"] = _init_scratch(model, optimizer, variables, example_batch)
        return state

    return jax.jit(from_checkpoint, out_shardings=state_shardings)


def abstract_state(model: Any, optimizer: Optimizer, example_batch: Batch) -> State:
    """The state's shapes and dtypes (ShapeDtypeStructs), computed without any FLOP.

    `example_batch` may hold arrays or ShapeDtypeStructs.
    """
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(init_state_fn(model, optimizer), key, example_batch, key)


def make_init_state(
    model: Any, optimizer: Optimizer, state_shardings: Any = None
) -> Callable[[jax.Array, Batch, jax.Array], State]:
    """The jitted `init_state(init_rng, example_batch, step_rng) -> State`.

    With `state_shardings` (a `NamedSharding` per state leaf, from
    `Partitioner.state_shardings(abstract_state(...))`) every leaf is created
    directly in its sharding: a row-split table and its Adam moments are never
    materialised whole on one device. Jitted because running `init` op by op
    costs a compilation per operation; as two programs, the variables first and
    then the optimizer state from them, because the random initialisation of a
    big table holds four table-sized temporaries (XLA's threefry), which would
    otherwise be alive together with the Adam moments (DARE with 30 M-row item
    tables: peak 18.1 -> 11.5 GiB).
    """
    variables_part, optimizer_part = _init_parts(model, optimizer)
    first_shardings = None
    if state_shardings is not None:
        first_shardings = {k: v for k, v in state_shardings.items() if k not in _OPTIMIZER_KEYS}
    first = jax.jit(variables_part, out_shardings=first_shardings)
    second = jax.jit(optimizer_part, out_shardings=state_shardings, donate_argnums=(0,))

    def init_state(init_rng: jax.Array, example_batch: Batch, step_rng: jax.Array) -> State:
        return second(first(init_rng, example_batch, step_rng), example_batch)

    return init_state


_OPTIMIZER_KEYS = ("opt_state", "scratch")  # the state entries `_init_parts` adds second


def make_train_step(
    model: Any,
    optimizer: Optimizer,
    weight_decay: float,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    replicated: Any = None,
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """The jitted `train_step(state, batch) -> (new_state, metrics)`.

    Args:
      model: a `dare_jax.models.TwoStageModel` (its variant decides whether path gradients
        are observed).
      optimizer: from `dare_jax.optim.make_optimizer`.
      weight_decay: the L2 coefficient (SPEC: 1e-6).
      state_shardings, batch_sharding, replicated: from a `Partitioner` (all
        three or none). The state keeps its shardings through the step (a
        row-split table's gradient and Adam moments stay row-split: the
        out_shardings pin them), the batch is split on `data`, the metrics
        come back replicated so that every process can read them.

    `batch` holds uid, iid, cid, label `[B]` and hist_iid, hist_cid `[B, L]`.
    `metrics` holds the scalar loss terms (total, ctr, aux, l2) and, when the
    model observes path gradients, `observed`: the per-path gradients of the
    category and time tables returned by `combine_path_gradients`.
    """
    if isinstance(optimizer, RowGradientOptimizer):
        step = _row_gradient_train_step(model, optimizer, weight_decay)
    else:
        step = _dense_train_step(model, optimizer, weight_decay)
    # keep_unused: the scratch step buffers are only written, and an argument the program
    # does not read would be dropped, losing the in-place reuse of its donated memory.
    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,), keep_unused=True)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        keep_unused=True,
    )


def _metrics(terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: terms[name] for name in ("total", "ctr", "aux", "l2")}


def _row_gradient_train_step(model: Any, optimizer: Optimizer, weight_decay: float):
    grads_fn = optim_lib.make_gradient_fn(model, weight_decay)

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        terms, batch_stats, dense_grads, rows = grads_fn(
            state["params"], state["batch_stats"], batch, rngs={"dropout": rng}
        )
        metrics = _metrics(terms)
        if model.spec.observes_gradients:
            flat = optim_lib.flatten_params(state["params"])
            shapes = {
                optim_lib.table_of(k): v.shape for k, v in flat.items() if optim_lib.table_of(k)
            }
            rows, metrics["observed"] = combine_path_rows(rows, model.cfg, shapes)
        new_state = {"step": state["step"] + 1, "rng": state["rng"], "batch_stats": batch_stats}
        if "scratch" in state:  # RowSparseAdam's carried buffers
            new_state["params"], new_state["opt_state"], new_state["scratch"] = optimizer.update(
                state["params"], dense_grads, rows, state["opt_state"], state["scratch"]
            )
        else:
            new_state["params"], new_state["opt_state"] = optimizer.update(
                state["params"], dense_grads, rows, state["opt_state"]
            )
        return new_state, metrics

    return train_step


def _dense_train_step(model, optimizer, weight_decay: float):

    def loss_fn(params, state, batch, rng):
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        outputs, updates = model.apply(
            variables, batch, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
        )
        terms = loss_lib.loss_terms(outputs, batch["label"], params, weight_decay)
        return terms["total"], (terms, updates.get("batch_stats", state["batch_stats"]))

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(
            state["params"], state, batch, rng
        )
        metrics = _metrics(terms)
        if model.spec.observes_gradients:
            grads, observed = combine_path_gradients(grads, model.cfg)
            metrics["observed"] = observed
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "rng": state["rng"],
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }
        return new_state, metrics

    return train_step


def make_eval_step(
    model: Any,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    replicated: Any = None,
) -> Callable[[State, Batch], jax.Array]:
    """The jitted `eval_step(state, batch) -> click probability [B]`.

    By default BatchNorm uses its running statistics; with
    the model option `eval_batchnorm_uses_batch_stats` (the official code's behaviour)
    the model normalises with the batch's own statistics, and the statistics
    it would update are thrown away. With shardings (from a `Partitioner`) the
    probabilities come back replicated: every process holds the whole `[B]`,
    which the exact (rank-based) AUC needs.
    """
    batch_stats_mode = model.cfg.eval_batchnorm_uses_batch_stats

    def eval_step(state: State, batch: Batch) -> jax.Array:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        if batch_stats_mode:
            outputs, _ = model.apply(variables, batch, train=False, mutable=["batch_stats"])
        else:
            outputs = model.apply(variables, batch, train=False)
        return outputs["prob"][:, 0]

    if state_shardings is None:
        return jax.jit(eval_step)
    return jax.jit(
        eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated
    )


def check_finite(loss: float, step: int) -> None:
    """Raise FloatingPointError naming the step when the training loss is NaN or infinite."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {float(loss)} at step {step}; stopping (try a lower "
            "--config.optim.lr, or check the data)"
        )
