"""Pure training and evaluation steps on a state that is a plain dict,

    {"step": int32 [], "rng": uint32 [2], "params": ..., "batch_stats": ...,
     "opt_state": ...[, "scratch": ...]}

whose leaves' `NamedSharding`s (`dare_jax.sharding.Partitioner`) are the jitted functions'
in/out shardings. The train step compiles once (donated state, static batch shapes, traced
step number). `adam` steps on autodiff's gradients, `RowSparseAdam` / `LazyAdam` on the
tables' rows (`RowSparseAdam` also carries `state["scratch"]`, which checkpoints leave out).
"""

from __future__ import annotations

import functools
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


def init_state_fn(model: Any, optimizer: Optimizer, first=lambda f: f, second=lambda f: f):
    """The pure `init_state(init_rng, example_batch, step_rng) -> State`, in two parts passed
    through `first` / `second` (`make_init_state` jits them): the state without the
    optimizer's part, then the whole state from it."""

    def variables_part(init_rng: jax.Array, example_batch: Batch, step_rng: jax.Array) -> State:
        variables = model.init(init_rng, example_batch, train=False)
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        step = jnp.zeros((), jnp.int32)
        return {"step": step, "rng": step_rng, "params": params, "batch_stats": batch_stats}

    def optimizer_part(state: State, example_batch: Batch) -> State:
        state = {**state, "opt_state": optimizer.init(state["params"])}
        if isinstance(optimizer, optim_lib.RowSparseAdam):
            variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            state["scratch"] = _init_scratch(model, optimizer, variables, example_batch)
        return state

    variables_part, optimizer_part = first(variables_part), second(optimizer_part)

    def init_state(init_rng: jax.Array, example_batch: Batch, step_rng: jax.Array) -> State:
        return optimizer_part(variables_part(init_rng, example_batch, step_rng), example_batch)

    return init_state


def _init_scratch(model, optimizer, variables, batch) -> optim_lib.TableScratch:
    # The dropout key only shapes the trace (lookup counts do not depend on it).
    sizes = optim_lib.lookup_sizes(model, variables, batch, rngs={"dropout": jax.random.PRNGKey(0)})
    if model.spec.observes_gradients:  # both synchronised copies get both paths' rows
        for key in [k for k in sizes if k.group == "attention"]:
            copy = TableKey("representation", key.field)
            sizes[key] = sizes[copy] = sizes[key] + sizes.get(copy, 0)
    return optimizer.init_scratch(variables["params"], sizes)


def to_checkpoint(state: State) -> State:
    """The state as checkpoints hold it: every optimizer's state as it is, without
    RowSparseAdam's scratch buffers; the same arrays, nothing copied (a save stalls the
    training loop for as long as this takes)."""
    return {key: value for key, value in state.items() if key != "scratch"}


def make_from_checkpoint(
    model: Any, optimizer: Optimizer, example_batch: Batch, state_shardings: Any = None
) -> Callable[[State], State]:
    """The jitted inverse of `to_checkpoint` (fresh scratch buffers, in their shardings);
    `example_batch` (arrays or ShapeDtypeStructs) fixes the scratch id-list lengths."""
    if not isinstance(optimizer, optim_lib.RowSparseAdam):
        return lambda saved: saved

    def from_checkpoint(saved: State) -> State:
        variables = {"params": saved["params"], "batch_stats": saved["batch_stats"]}
        return {**saved, "scratch": _init_scratch(model, optimizer, variables, example_batch)}

    return jax.jit(from_checkpoint, out_shardings=state_shardings)


def abstract_state(model: Any, optimizer: Optimizer, example_batch: Batch) -> State:
    """The state's shapes and dtypes (ShapeDtypeStructs), computed without any FLOP.
    `example_batch` may hold arrays or ShapeDtypeStructs."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(init_state_fn(model, optimizer), key, example_batch, key)


def make_init_state(
    model: Any, optimizer: Optimizer, state_shardings: Any = None
) -> Callable[[jax.Array, Batch, jax.Array], State]:
    """The jitted `init_state(init_rng, example_batch, step_rng) -> State`.

    Step s draws from `fold_in(step_rng, s)` (a raw uint32 [2] key kept in the state), so a
    resumed run draws the same numbers and seeds share one compiled step. Each leaf is created
    in its `state_shardings` (`Partitioner.state_shardings(abstract_state(...))`). Jitted (op
    by op, `init` would compile every operation) as two programs, the variables first,
    because a big table's random initialisation holds four table-sized temporaries (XLA's
    threefry) that would otherwise live with the moments.
    """
    first_shardings = None
    if state_shardings is not None:  # without the entries of the optimizer's part
        first_shardings = {
            k: v for k, v in state_shardings.items() if k not in ("opt_state", "scratch")
        }
    first = functools.partial(jax.jit, out_shardings=first_shardings)
    second = functools.partial(jax.jit, out_shardings=state_shardings, donate_argnums=(0,))
    return init_state_fn(model, optimizer, first, second)


def make_train_step(
    model: Any,
    optimizer: Optimizer,
    weight_decay: float,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    replicated: Any = None,
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """The jitted `train_step(state, batch) -> (new_state, metrics)`.

    The shardings come from a `Partitioner` (all three or none: the state keeps its own, the
    batch is split on `data`, the metrics come back replicated). `batch`: uid, iid, cid,
    label `[B]` and hist_iid, hist_cid `[B, L]`. `metrics`: the scalar loss terms (total, ctr,
    aux, l2) and, when the model observes path gradients, `observed`: the per-path gradients
    of the category and time tables.
    """
    if isinstance(optimizer, RowGradientOptimizer):
        step = _row_gradient_train_step(model, optimizer, weight_decay)
    else:
        step = _dense_train_step(model, optimizer, weight_decay)
    shardings = {}
    if state_shardings is not None:
        shardings["in_shardings"] = (state_shardings, batch_sharding)
        shardings["out_shardings"] = (state_shardings, replicated)
    # keep_unused: the scratch step buffers are only written, and an argument the program
    # does not read would be dropped, losing the in-place reuse of its donated memory.
    return jax.jit(step, donate_argnums=(0,), keep_unused=True, **shardings)


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
            shapes = {t: v.shape for k, v in flat.items() if (t := optim_lib.table_of(k))}
            rows, metrics["observed"] = combine_path_rows(rows, model.cfg, shapes)
        new_state = {"step": state["step"] + 1, "rng": state["rng"], "batch_stats": batch_stats}
        scratch = (state["scratch"],) if "scratch" in state else ()  # RowSparseAdam's buffers
        updated = optimizer.update(state["params"], dense_grads, rows, state["opt_state"], *scratch)
        new_state.update(zip(("params", "opt_state", "scratch"), updated))
        return new_state, metrics

    return train_step


def _dense_train_step(model, optimizer, weight_decay: float):
    def loss_fn(params, state, batch, rng):
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        outputs, updates = model.apply(
            variables, batch, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
        )
        terms = loss_lib.loss_terms(
            outputs, batch["label"], params, weight_decay, batch.get("example_mask")
        )
        return terms["total"], (terms, updates.get("batch_stats", state["batch_stats"]))

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(
            state["params"], state, batch, rng
        )
        metrics = _metrics(terms)
        if model.spec.observes_gradients:
            grads, metrics["observed"] = combine_path_gradients(grads, model.cfg)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"step": state["step"] + 1, "rng": state["rng"], "params": params}
        return {**new_state, "batch_stats": batch_stats, "opt_state": opt_state}, metrics

    return train_step


def make_eval_step(
    model: Any, state_shardings: Any = None, batch_sharding: Any = None, replicated: Any = None
) -> Callable[[State, Batch], jax.Array]:
    """The jitted `eval_step(state, batch) -> click probability [B]`. BatchNorm uses its
    running statistics, or with `model.eval_batchnorm_uses_batch_stats` (the official code's
    behaviour) the batch's own, the updated ones thrown away. With shardings (from a
    `Partitioner`) the `[B]` comes back replicated, as the exact (rank-based) AUC needs."""

    def eval_step(state: State, batch: Batch) -> jax.Array:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        if model.cfg.eval_batchnorm_uses_batch_stats:
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
