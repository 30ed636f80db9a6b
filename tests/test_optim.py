"""dare_jax.optim: the decay-pass + touched-row fix-up Adam equals optax.adam on the dense
gradient (moments and params), alone and inside whole TWIN / DARE training steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dare_jax import optim
from dare_jax.models import build_model, default_model_config, loss_terms

LR = 0.01


def _close(a, b, what, atol=1e-7):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=atol, err_msg=what)


# Whole steps: the target time row (id 0 for every example) feeds BatchNorm as a constant,
# so its true gradient is 0 and both paths see float noise that Adam normalises to steps of
# order lr; the summation order differs between programs, so those params may differ by a
# small fraction of lr. Any wrong update would be off by ~lr (0.01).
STEP_PARAM_ATOL = 3e-5


def test_update_equals_optax_on_dense_gradient_with_duplicates_and_untouched_rows():
    rng = np.random.default_rng(0)
    rows_n, d = 50, 4
    params = {
        "embed/g/item": jnp.asarray(rng.normal(size=(rows_n, d)), jnp.float32),
        "embed/g/time": jnp.asarray(rng.normal(size=(7, d)), jnp.float32),  # never looked up
        "head/kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
    }
    hyper = optim.AdamHyper(LR)
    state = optim.init(params)
    ref_opt = optax.adam(LR)
    ref_params = dict(params)
    ref_state = ref_opt.init(ref_params)
    step = jax.jit(optim.update, static_argnums=4)
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
            "embed/g/item": jnp.asarray(dense),
            "embed/g/time": jnp.zeros((7, d)),
            "head/kernel": jnp.asarray(head_grad),
        }
        updates, ref_state = ref_opt.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        params, state = step(
            params,
            {"head/kernel": jnp.asarray(head_grad)},
            {"embed/g/item": (jnp.asarray(ids), jnp.asarray(rows))},
            state,
            hyper,
        )
        for k in params:
            _close(params[k], ref_params[k], f"step {t} params {k}")
            _close(state.mu[k], ref_state[0].mu[k], f"step {t} mu {k}")
            _close(state.nu[k], ref_state[0].nu[k], f"step {t} nu {k}")
        # The carried buffer holds exactly this step's summed gradient (older rows zeroed).
        _close(state.grad_sum["embed/g/item"], dense, f"step {t} gradient buffer")
    # Untouched rows still moved (dense Adam), as the reference says.
    never = sorted(set(range(rows_n)) - touched_ever)
    assert never and not np.allclose(np.asarray(params["embed/g/item"])[never], 0)
    assert int(state.count) == 4


def _batch(rng, b, length, item_n, cate_n):
    hist = rng.integers(1, item_n, size=(b, length)).astype(np.int32)
    hist[:, :2] = 0
    hist[0, 5] = hist[1, 7] = hist[2, 2]  # duplicate ids across examples
    return {
        "iid": jnp.asarray(rng.integers(1, item_n, size=b), jnp.int32),
        "cid": jnp.asarray(rng.integers(1, cate_n, size=b), jnp.int32),
        "hist_iid": jnp.asarray(hist),
        "hist_cid": jnp.asarray(np.where(hist > 0, rng.integers(1, cate_n, hist.shape), 0)),
        "label": jnp.asarray(rng.integers(0, 2, size=b), jnp.int32),
    }


@pytest.mark.parametrize("name,split", [("twin", False), ("dare", True)])
def test_whole_training_step_matches_dense_optax_step(name, split):
    item_n, cate_n, length, wd = 60, 9, 12, 1e-3
    cfg = default_model_config()
    cfg.name, cfg.top_k = name, 4
    dense_model = build_model(cfg, item_n, cate_n, length)
    cfg.row_sparse_embedding_grads = True
    sparse_model = build_model(cfg, item_n, cate_n, length)
    rng = np.random.default_rng(1)
    batches = [_batch(rng, 8, length, item_n, cate_n) for _ in range(3)]
    variables = dense_model.init(jax.random.PRNGKey(0), batches[0], train=False)
    # The flag changes no forward value.
    out_d = dense_model.apply(variables, batches[0])["prob"]
    out_s = sparse_model.apply(variables, batches[0])["prob"]
    np.testing.assert_array_equal(np.asarray(out_d), np.asarray(out_s))
    # Without perturbations passed in, the flagged model still gives dense table gradients.
    def plain_grad(m):
        def prob_sum(p):
            return m.apply({**variables, "params": p}, batches[0])["prob"][:, 0].sum()

        return optim.flatten_params(jax.grad(prob_sum)(variables["params"]))

    g_d, g_s = plain_grad(dense_model), plain_grad(sparse_model)
    items = [k for k in g_s if optim.is_table(k) and k.endswith("/item")]
    assert items and all(np.any(np.asarray(g_s[k])) for k in items)
    for k in g_s:
        np.testing.assert_array_equal(np.asarray(g_s[k]), np.asarray(g_d[k]), err_msg=k)

    opt = optax.adam(LR)

    def dense_step(state, batch):
        def loss_fn(params):
            outputs, upd = dense_model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                batch,
                train=True,
                mutable=["batch_stats"],
            )
            return loss_terms(outputs, batch["label"], params, wd)["total"], upd
        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, o = opt.update(grads, state["opt"], state["params"])
        new = optax.apply_updates(state["params"], updates)
        return {"params": new, "batch_stats": upd["batch_stats"], "opt": o}, loss

    ref = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    ref["opt"] = opt.init(ref["params"])
    flat = optim.flatten_params(variables["params"])
    mine = {"params": flat, "batch_stats": variables["batch_stats"], "opt": optim.init(flat)}
    if split:  # two jitted programs, params and moments donated
        sparse_step = optim.make_split_train_step(sparse_model, optim.AdamHyper(LR), wd)
    else:
        sparse_step = jax.jit(optim.make_train_step(sparse_model, optim.AdamHyper(LR), wd))
    dense_step = jax.jit(dense_step)
    for t, batch in enumerate(batches):
        ref, loss_ref = dense_step(ref, batch)
        mine, loss = sparse_step(mine, batch)
        _close(loss, loss_ref, f"loss step {t}")
        ref_flat = optim.flatten_params(ref["params"])
        ref_mu = optim.flatten_params(ref["opt"][0].mu)
        ref_nu = optim.flatten_params(ref["opt"][0].nu)
        assert set(ref_flat) == set(mine["params"])
        for k in ref_flat:
            _close(mine["params"][k], ref_flat[k], f"{name} step {t} {k}", STEP_PARAM_ATOL)
            _close(mine["opt"].mu[k], ref_mu[k], f"{name} step {t} mu {k}")
            _close(mine["opt"].nu[k], ref_nu[k], f"{name} step {t} nu {k}")
    assert any(optim.is_table(k) for k in ref_flat)


def test_bad_rows_and_missing_gradients_raise():
    params = {"embed/g/item": jnp.zeros((4, 2)), "w": jnp.zeros((2,))}
    state = optim.init(params)
    with pytest.raises(KeyError, match="'w'"):
        optim.update(params, {}, {}, state, optim.AdamHyper(LR))
    with pytest.raises(KeyError, match="unknown tables"):
        rows = {"embed/g/other": (jnp.zeros((1,), jnp.int32), jnp.zeros((1, 2)))}
        optim.update(params, {"w": jnp.zeros((2,))}, rows, state, optim.AdamHyper(LR))
    with pytest.raises(ValueError, match="group:field:role"):
        optim.table_key("item")


def test_gradient_fn_refuses_a_model_without_row_gradients():
    cfg = default_model_config()
    cfg.name, cfg.top_k = "twin", 2
    model = build_model(cfg, 20, 5, 12)  # flag off: no perturbations
    batch = _batch(np.random.default_rng(0), 4, 12, 20, 5)
    variables = model.init(jax.random.PRNGKey(0), batch, train=False)
    state = {
        "params": optim.flatten_params(variables["params"]),
        "batch_stats": variables["batch_stats"],
    }
    with pytest.raises(ValueError, match="row_sparse_embedding_grads=True"):
        optim.make_gradient_fn(model, 0.0)(state, batch)
