"""dare_jax.optim: `adam` is PyTorch's Adam (a float64 numpy oracle), and RowSparseAdam equals
`adam` on the dense gradient (params and moments), alone and inside the driver's whole training
steps (dare_jax.steps) for several variants."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dare_jax import optim, steps
from dare_jax.config import OptimSpec
from dare_jax.models import ModelSpec, TableKey, TwoStageModel, loss_terms
from tiny_setup import random_batch as _batch

LR = 0.01


def _close(a, b, what, atol=1e-7):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=atol, err_msg=what)


# Whole steps: the target time row (id 0 for every example) feeds BatchNorm as a constant,
# so its true gradient is 0 and both paths see float noise that Adam normalises to steps of
# order lr; the summation order differs between programs, so those params may differ by a
# small fraction of lr (measured up to 3.5e-5). Any wrong update would be off by ~lr (0.01).
STEP_PARAM_ATOL = 1e-4


def _flat(tree):
    return optim.flatten_params(tree)


def _torch_adam_oracle(grads, lr=LR, b1=0.9, b2=0.999, eps=1e-8):
    """Parameters after each step of PyTorch's Adam (torch.optim.Adam's formula, bias
    corrections in Python floats), in float64 from zero parameters."""
    p = np.zeros_like(grads[0], np.float64)
    m, v, out = np.zeros_like(p), np.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / math.sqrt(1 - b2**t) + eps
        p = p - (lr / (1 - b1**t)) * m / denom
        out.append(p)
    return out


def test_adam_matches_pytorch_adam_in_float32_where_optax_adam_does_not():
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=(64,)).astype(np.float32) for _ in range(6)]
    grads[3][:8] = 0  # steps with g = 0: the moments alone move the parameter
    want = _torch_adam_oracle([g.astype(np.float64) for g in grads])

    def run(optimizer):
        params = {"w": jnp.zeros((64,), jnp.float32)}
        state, out = optimizer.init(params), []
        for g in grads:
            updates, state = optimizer.update({"w": jnp.asarray(g)}, state, params)
            params = optax.apply_updates(params, updates)
            out.append(np.asarray(params["w"], np.float64))
        return out

    def worst(got):  # in units of lr, the size of one Adam step
        return max(float(np.max(np.abs(a - b))) for a, b in zip(got, want)) / LR

    # float32 rounding of the moments, the steps and the sums: about 1e-6 of a step.
    assert worst(run(optim.adam(LR))) < 2e-6
    # optax.adam's float32 `1 - 0.999**t` is 1.3e-5 to 2e-5 too small (measured: 4e-5).
    assert worst(run(optax.adam(LR))) > 1e-5
    # Same state layout as optax.adam (checkpoints restore into either).
    params = {"w": jnp.zeros((3,))}
    layout = jax.tree.structure(optax.adam(LR).init(params))
    assert jax.tree.structure(optim.adam(LR).init(params)) == layout


def test_bias_correction_is_accurate_in_float32():
    for decay in (0.9, 0.999):
        for count in (1, 2, 10, 100, 1000, 10_000):
            got = float(optim.bias_correction(decay, jnp.int32(count), jnp.float32))
            want = 1 - decay**count  # Python float (double)
            assert abs(got - want) <= 4e-7 * want, (decay, count, got, want)


def test_update_equals_adam_on_dense_gradient_with_duplicates_and_untouched_rows():
    rng = np.random.default_rng(0)
    rows_n, d = 50, 4
    params = {
        "embed": {
            "g": {
                "item": jnp.asarray(rng.normal(size=(rows_n, d)), jnp.float32),
                "time": jnp.asarray(rng.normal(size=(7, d)), jnp.float32),  # never looked up
            }
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }
    adam = optim.RowSparseAdam(LR)
    state = adam.init(params)
    item = TableKey("g", "item")
    scratch = adam.init_scratch(params, {item: 30})
    ref_opt = optim.adam(LR)
    ref_params = params
    ref_state = ref_opt.init(ref_params)
    step = jax.jit(adam.update)
    touched_ever = set()
    for t in range(4):
        ids = rng.integers(0, 20, size=30).astype(np.int32)  # duplicates; rows 20.. never
        ids[:3] = ids[3]  # at least one triple duplicate
        touched_ever |= set(ids.tolist())
        rows = rng.normal(size=(30, d)).astype(np.float32)
        head_grad = rng.normal(size=(3, 2)).astype(np.float32)
        # Oracle dense gradient: a plain-Python sum of duplicate rows.
        dense = np.zeros((rows_n, d), np.float32)
        for i, r in zip(ids.tolist(), rows):
            dense[i] += r
        grads = {
            "embed": {"g": {"item": jnp.asarray(dense), "time": jnp.zeros((7, d))}},
            "head": {"kernel": jnp.asarray(head_grad)},
        }
        updates, ref_state = ref_opt.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        # The rows of one table may come as several lookups (target and history).
        pairs = [(jnp.asarray(ids[:10]), jnp.asarray(rows[:10]))]
        pairs.append((jnp.asarray(ids[10:]), jnp.asarray(rows[10:])))
        params, state, scratch = step(
            params, {("head", "kernel"): jnp.asarray(head_grad)}, {item: pairs}, state, scratch
        )
        for k, ref in _flat(ref_params).items():
            _close(_flat(params)[k], ref, f"step {t} params {k}")
            for name in ("mu", "nu"):  # table moments are stored flat
                have = _flat(getattr(state, name))[k].reshape(ref.shape)
                _close(have, _flat(getattr(ref_state[0], name))[k], f"step {t} {name} {k}")
        # The carried buffer holds exactly this step's summed gradient (older rows zeroed).
        _close(scratch.grad_sum["embed"]["g"]["item"].reshape(rows_n, d), dense, f"step {t} buffer")
    # Untouched rows still moved (dense Adam), as the reference says.
    never = sorted(set(range(rows_n)) - touched_ever)
    assert never and not np.allclose(np.asarray(params["embed"]["g"]["item"])[never], 0)
    assert int(state.count) == 4


def _as_optax_layout(state: dict, optimizer) -> dict:
    """A RowSparseAdam state with its flat table moments in optax.adam's layout (shaped like
    the params), so that it compares leaf by leaf with the dense Adam's."""
    if not isinstance(optimizer, optim.RowSparseAdam):
        return state
    count, mu, nu = state["opt_state"]
    shaped = [jax.tree.map(lambda m, p: m.reshape(p.shape), x, state["params"]) for x in (mu, nu)]
    template = optim.adam(LR).init(state["params"])
    return {
        **state,
        "opt_state": (template[0]._replace(count=count, mu=shaped[0], nu=shaped[1]), *template[1:]),
    }


def _optim_spec(sparse: bool) -> OptimSpec:
    """Adam on the tables' rows ("row_sparse") or on autodiff's dense gradients ("dense")."""
    return OptimSpec(
        lr=LR, b1=0.9, b2=0.999, eps=1e-8, table_updates="row_sparse" if sparse else "dense"
    )


# TWIN, DARE and observed TWIN in the default run; the others (~10 s each) in the slow pass.
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("twin", {}),
        ("dare", {}),
        pytest.param("din", {"use_time": False}, marks=pytest.mark.slow),
        pytest.param("twin", {"soft_search": False}, marks=pytest.mark.slow),  # SIM hard search
        pytest.param("projection", {"mlp_position_after_concat": True}, marks=pytest.mark.slow),
        pytest.param("four_embedding", {"use_long_seq_average": True}, marks=pytest.mark.slow),
        pytest.param("eta", {}, marks=pytest.mark.slow),
        pytest.param("sdim", {"use_aux_loss": False}, marks=pytest.mark.slow),
        pytest.param("twin_v2", {"cluster_max_size": 4}, marks=pytest.mark.slow),
        pytest.param("dare", {"search_chunk": 5}, marks=pytest.mark.slow),  # chunked history
        ("twin", {"observe_attn_repr_grad": True}),  # path gradients combined as rows
        pytest.param(
            "eta",
            {"observe_attn_repr_grad": True, "avoid_domination": True},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_driver_step_matches_the_dense_adam_step(name, overrides):
    item_n, cate_n, length, wd = 60, 9, 12, 1e-3
    cfg = ModelSpec(name=name, top_k=4, **overrides)
    rng = np.random.default_rng(1)
    batches = [_batch(rng, 8, length, item_n, cate_n) for _ in range(3)]
    runs = {}
    for sparse in (False, True):
        model = TwoStageModel(cfg, item_n, cate_n, length)
        optimizer = optim.make_optimizer(_optim_spec(sparse))
        assert isinstance(optimizer, optim.RowSparseAdam) == sparse
        train_step = steps.make_train_step(model, optimizer, wd)
        key = jax.random.PRNGKey(0)
        state = steps.make_init_state(model, optimizer)(key, batches[0], key)
        losses, observed = [], []
        for batch in batches:
            state, metrics = train_step(state, batch)
            losses.append(float(metrics["total"]))
            observed.append(metrics.get("observed", {}))
        runs[sparse] = (losses, _as_optax_layout(steps.to_checkpoint(state), optimizer), observed)
        assert train_step._cache_size() == 1  # compiled once
    (dense_losses, dense, dense_seen), (sparse_losses, sparse_state, sparse_seen) = (
        runs[False],
        runs[True],
    )
    _close(sparse_losses, dense_losses, f"{name} losses")
    assert set(dense_seen[0]) == set(sparse_seen[0])
    for step_seen, step_want in zip(sparse_seen, dense_seen):
        for key, want in step_want.items():
            _close(step_seen[key], want, f"{name} observed {key}", 1e-7)
    assert jax.tree.structure(dense) == jax.tree.structure(sparse_state)
    flat_dense = jax.tree_util.tree_flatten_with_path(dense)[0]
    for (path, want), have in zip(flat_dense, jax.tree.leaves(sparse_state)):
        # BatchNorm statistics are computed from those params: the same tolerance.
        noisy = jax.tree_util.keystr(path).startswith(("['params']", "['batch_stats']"))
        atol = STEP_PARAM_ATOL if noisy else 1e-7
        _close(have, want, f"{name} {jax.tree_util.keystr(path)}", atol)


def test_every_model_uses_row_sparse_updates_and_checkpoint_layout_round_trips():
    cfg = ModelSpec(name="twin", top_k=2)
    # The optimizer is the optim spec's alone (no model-dependent choice): row-sparse Adam by
    # default, optax-style Adam on dense gradients on request.
    assert OptimSpec().table_updates == "row_sparse"
    assert isinstance(optim.make_optimizer(OptimSpec()), optim.RowSparseAdam)
    assert isinstance(optim.make_optimizer(_optim_spec(True)), optim.RowSparseAdam)
    assert isinstance(optim.make_optimizer(_optim_spec(False)), optax.GradientTransformation)

    model = TwoStageModel(cfg, 20, 5, 12)
    optimizer = optim.make_optimizer(_optim_spec(True))
    batch = _batch(np.random.default_rng(0), 4, 12, 20, 5)
    key = jax.random.PRNGKey(0)
    state = steps.make_init_state(model, optimizer)(key, batch, key)
    state, _ = steps.make_train_step(model, optimizer, 0.0)(state, batch)
    saved = steps.to_checkpoint(state)
    template = steps.to_checkpoint(steps.abstract_state(model, optimizer, batch))
    assert "scratch" not in saved
    assert jax.tree.structure(saved) == jax.tree.structure(template)
    restored = steps.make_from_checkpoint(model, optimizer, batch)(saved)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for name in ("params", "opt_state", "batch_stats", "step"):
        for a, b in zip(jax.tree.leaves(restored[name]), jax.tree.leaves(state[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # Fresh scratch: zero buffers, nothing to re-zero (out-of-range ids).
    grad_sum = restored["scratch"].grad_sum["embed"]["shared"]["item"]
    touched = restored["scratch"].touched["embed"]["shared"]["item"]
    assert not np.any(np.asarray(grad_sum))
    assert np.all(np.asarray(touched) == 20)
    assert touched.shape == (4 * 13,)


def test_bad_rows_and_missing_gradients_raise():
    params = {"embed": {"g": {"item": jnp.zeros((4, 2))}}, "w": jnp.zeros((2,))}
    adam = optim.RowSparseAdam(LR)
    item = TableKey("g", "item")
    state, scratch = adam.init(params), adam.init_scratch(params, {item: 1})
    one_row = {item: [(jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2)))]}
    with pytest.raises(KeyError, match="'w'"):
        adam.update(params, {}, one_row, state, scratch)
    with pytest.raises(KeyError, match="unknown tables"):
        rows = {TableKey("g", "other"): [(jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2)))]}
        adam.update(params, {("w",): jnp.zeros((2,))}, rows, state, scratch)
    with pytest.raises(ValueError, match="2 gradient rows"):
        rows = {item: [(jnp.zeros((2,), jnp.int32), jnp.zeros((2, 2)))]}
        adam.update(params, {("w",): jnp.zeros((2,))}, rows, state, scratch)
    # Tables are the leaves under `embed`, typed by (group, field).
    assert optim.table_of(("embed", "g", "item")) == item
    assert optim.table_of(("w",)) is None


def test_gradient_fn_gives_any_model_its_table_gradients_as_rows():
    """No flag: `make_gradient_fn` gets every table's gradient of a plain model as lookup rows,
    which, scattered by their ids, are autodiff's dense table gradients; the other leaves get
    autodiff's gradients."""
    model = TwoStageModel(ModelSpec(name="twin", top_k=2), 20, 5, 12)
    batch = _batch(np.random.default_rng(0), 4, 12, 20, 5)
    variables = model.init(jax.random.PRNGKey(0), batch, train=False)
    params, stats, wd = variables["params"], variables["batch_stats"], 1e-3
    terms, _, dense, rows = optim.make_gradient_fn(model, wd)(params, stats, batch)

    def loss(params):
        outputs, _ = model.apply(
            {"params": params, "batch_stats": stats}, batch, train=True, mutable=["batch_stats"]
        )
        return loss_terms(outputs, batch["label"], params, wd)["total"]

    want_loss, want = jax.value_and_grad(loss)(params)
    _close(terms["total"], want_loss, "loss")
    want = optim.flatten_params(want)
    tables = {optim.table_of(path) for path in want} - {None}
    assert set(rows) == tables == {TableKey("shared", f) for f in ("item", "category", "time")}
    assert set(dense) == {path for path in want if optim.table_of(path) is None}
    for path, expected in want.items():
        table = optim.table_of(path)
        if table is None:
            _close(dense[path], expected, str(path))
            continue
        got = np.zeros(expected.shape, np.float64)
        for ids, values in rows[table]:
            np.add.at(got, np.asarray(ids), np.asarray(values, np.float64))
        _close(got, expected, str(path))
