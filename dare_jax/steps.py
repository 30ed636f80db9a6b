"""Pure training and evaluation steps.

The training state is a plain pytree (a dict):

    {"step": int32 [], "rng": uint32 [2], "params": ..., "batch_stats": ...,
     "opt_state": ...}

whose leaves carry `NamedSharding`s (`dare_jax.sharding.Partitioner`): the
same functions run on one device or on a mesh, the shardings being passed to
`jax.jit` as in/out shardings. `make_train_step` returns one function,
`jax.jit`-compiled once: the state is donated, every batch has the same static
shapes, and the step number is traced data (not a Python int), so nothing
recompiles between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dare_jax.models import loss as loss_lib

State = dict[str, Any]
Batch = dict[str, jax.Array]


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam as in the official code (the L2 penalty is part of the loss, not of Adam)."""
    return optax.adam(learning_rate=optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)


def init_state_fn(
    model: Any, optimizer: optax.GradientTransformation
) -> Callable[[jax.Array, Batch, jax.Array], State]:
    """The pure (unjitted) `init_state(init_rng, example_batch, step_rng) -> State`.

    Parameters and BatchNorm statistics come from `model.init(init_rng, ...)`;
    `step_rng` (a raw uint32 [2] key) is kept in the state: step s draws its
    randomness from `fold_in(step_rng, s)`, so a resumed run draws the same
    numbers as an uninterrupted one, and seeds share one compiled step.
    """

    def init_state(init_rng: jax.Array, example_batch: Batch, step_rng: jax.Array) -> State:
        variables = model.init(init_rng, example_batch, train=False)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": step_rng,
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": optimizer.init(params),
        }

    return init_state


def abstract_state(
    model: Any, optimizer: optax.GradientTransformation, example_batch: Batch
) -> State:
    """The state's shapes and dtypes (ShapeDtypeStructs), computed without any FLOP.

    `example_batch` may hold arrays or ShapeDtypeStructs.
    """
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(init_state_fn(model, optimizer), key, example_batch, key)


def make_init_state(
    model: Any, optimizer: optax.GradientTransformation, state_shardings: Any = None
) -> Callable[[jax.Array, Batch, jax.Array], State]:
    """The jitted `init_state(init_rng, example_batch, step_rng) -> State`.

    With `state_shardings` (a `NamedSharding` per state leaf, from
    `Partitioner.state_shardings(abstract_state(...))`) every leaf is created
    directly in its sharding: a row-split table and its Adam moments are never
    materialised whole on one device. Jitted because running `init` op by op
    costs a compilation per operation.
    """
    return jax.jit(init_state_fn(model, optimizer), out_shardings=state_shardings)


def create_train_state(
    model: Any,
    optimizer: optax.GradientTransformation,
    init_rng: jax.Array,
    example_batch: Batch,
    step_rng: jax.Array,
) -> State:
    """One-off `make_init_state(model, optimizer)(init_rng, example_batch, step_rng)`."""
    return make_init_state(model, optimizer)(init_rng, example_batch, step_rng)


def _observes_gradients(model_cfg: ml_collections.ConfigDict) -> bool:
    return bool(model_cfg.observe_attn_repr_grad or model_cfg.avoid_domination)


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    model_cfg: ml_collections.ConfigDict,
    weight_decay: float,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    replicated: Any = None,
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """The jitted `train_step(state, batch) -> (new_state, metrics)`.

    Args:
      model: the Linen module of `dare_jax.models.build_model`.
      optimizer: from `make_optimizer`.
      model_cfg: the model config (decides whether path gradients are observed).
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
    observe = _observes_gradients(model_cfg)
    if observe:
        from dare_jax.models import combine_path_gradients  # only the analysis runs need it

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
        metrics = {name: terms[name] for name in ("total", "ctr", "aux", "l2")}
        if observe:
            grads, observed = combine_path_gradients(grads, model_cfg)
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

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=(0,))
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(
    model: Any,
    model_cfg: ml_collections.ConfigDict,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    replicated: Any = None,
) -> Callable[[State, Batch], jax.Array]:
    """The jitted `eval_step(state, batch) -> click probability [B]`.

    By default BatchNorm uses its running statistics; with
    `model_cfg.eval_batchnorm_uses_batch_stats` (the official code's behaviour)
    the model normalises with the batch's own statistics, and the statistics
    it would update are thrown away. With shardings (from a `Partitioner`) the
    probabilities come back replicated: every process holds the whole `[B]`,
    which the exact (rank-based) AUC needs.
    """
    batch_stats_mode = bool(model_cfg.eval_batchnorm_uses_batch_stats)

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
