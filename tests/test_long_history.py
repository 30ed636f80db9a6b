"""Long histories: chunked search equals the unchunked model (and TwoStageModel), bfloat16
scores, linear compiled memory (no `[B, L, D]` kept), config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dare_jax.models import build_model, default_model_config, validate_model_config
from dare_jax.models.long_model import build_long_history_model, uses_long_model
from tests.test_eta_sdim_twinv2 import CATE_N, ITEM_N, LENGTH, make_batch, make_cfg


def grads_and_outputs(model, variables, batch):
    def loss(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch, train=True, mutable=["batch_stats"],
        )
        total = -jnp.mean(jnp.log(out["prob"][:, 0]))
        if "aux_prob" in out:
            total = total - jnp.mean(jnp.log(out["aux_prob"][:, 1]))
        return total, out

    return jax.grad(loss, has_aux=True)(variables["params"])


def assert_trees_close(a, b, rtol=1e-3, atol=2e-5):  # summation order differs
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", ["twin", "dare", "eta", "sdim"])
def test_chunked_equals_unchunked(name):
    batch = make_batch(5)
    whole = build_long_history_model(make_cfg(name), ITEM_N, CATE_N, LENGTH)
    # 7 does not divide L = 24: exercises the left padding of the last chunk
    chunked = build_long_history_model(make_cfg(name, search_chunk=7), ITEM_N, CATE_N, LENGTH)
    variables = whole.init(jax.random.PRNGKey(1), batch)
    g_whole, out_whole = grads_and_outputs(whole, variables, batch)
    g_chunk, out_chunk = grads_and_outputs(chunked, variables, batch)
    assert set(out_whole) == set(out_chunk)
    for key in out_whole:
        np.testing.assert_allclose(
            out_chunk[key], out_whole[key], rtol=2e-4, atol=1e-6, err_msg=key
        )
    assert_trees_close(g_chunk, g_whole)
    if name in ("twin", "dare"):  # and the chunked model is the plain two-stage model
        plain = build_model(make_cfg(name), ITEM_N, CATE_N, LENGTH)
        g_plain, out_plain = grads_and_outputs(plain, variables, batch)
        for key in ("prob", "aux_prob", "attention_scores", "topk_indices", "representation"):
            np.testing.assert_allclose(out_chunk[key], out_plain[key], rtol=2e-4, atol=1e-6)
        assert_trees_close(g_chunk, g_plain)


def test_bfloat16_scores_are_close_to_float32():
    batch = make_batch(6)
    f32 = build_long_history_model(make_cfg("twin", search_chunk=8), ITEM_N, CATE_N, LENGTH)
    bf16 = build_long_history_model(
        make_cfg("twin", search_chunk=8, score_dtype="bfloat16"), ITEM_N, CATE_N, LENGTH
    )
    assert uses_long_model(make_cfg("twin", score_dtype="bfloat16"))
    variables = f32.init(jax.random.PRNGKey(2), batch)
    a, b = f32.apply(variables, batch), bf16.apply(variables, batch)
    valid = batch["hist_iid"] > 0
    diff = np.abs(np.asarray(a["attention_scores"]) - np.asarray(b["attention_scores"]))[valid]
    scale = np.abs(np.asarray(a["attention_scores"])[valid]).max()
    assert 0 < diff.max() < 0.02 * scale  # really bfloat16 products, close to float32
    np.testing.assert_allclose(a["prob"], b["prob"], atol=2e-2)


def compiled_temp_bytes(name: str, length: int, chunk: int, batch_size: int = 8) -> int:
    cfg = make_cfg(name, search_chunk=chunk, time_table_size=length + 1, top_k=20)
    model = build_long_history_model(cfg, 1000, 20, length)
    rng = np.random.default_rng(0)
    hist = rng.integers(1, 1000, (batch_size, length)).astype(np.int32)
    batch = {
        "iid": rng.integers(1, 1000, batch_size).astype(np.int32),
        "cid": rng.integers(1, 20, batch_size).astype(np.int32),
        "hist_iid": hist,
        "hist_cid": (hist % 19 + 1).astype(np.int32),
    }
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)

    def loss(params, batch_stats, batch):
        out, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch, train=True,
            mutable=["batch_stats"],
        )
        return -jnp.mean(jnp.log(out["prob"][:, 0]))

    compiled = jax.jit(jax.grad(loss)).lower(
        variables["params"], variables["batch_stats"], batch
    ).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("name", ["twin", "eta", "sdim"])
def test_training_step_memory_is_linear_without_a_full_history_tensor(name):
    """Compiled temporaries of a gradient step at L = 6,000 (B = 8, D = 48, chunks of 500)
    stay below ONE `[B, L, D]` float32 array, and grow at most linearly from L = 1,500."""
    one_full = 8 * 6_000 * 48 * 4
    big = compiled_temp_bytes(name, 6_000, 500)
    small = compiled_temp_bytes(name, 1_500, 500)
    assert big < one_full, (big, one_full)
    assert big <= 4.0 * small * 1.05, (small, big)
    if name == "twin":  # the unchunked model keeps several [B, L, D] for the backward pass
        assert compiled_temp_bytes(name, 6_000, 0) > one_full


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"name": "sdim"}, "use_aux_loss"),
        ({"name": "eta", "score_dtype": "float16"}, "score_dtype"),
        ({"name": "eta", "search_chunk": -1}, "search_chunk"),
        ({"name": "sdim", "use_aux_loss": False, "sdim_group_bits": 5}, "sdim_group_bits"),
        ({"name": "twin_v2", "soft_search": False}, "soft_search"),
        ({"name": "eta", "top_k": LENGTH + 1}, "top_k"),
        ({"name": "din"}, "long-history models"),
    ],
)
def test_bad_configs_name_field_and_value(overrides, match):
    cfg = default_model_config()
    for key, value in overrides.items():
        cfg[key] = value
    with pytest.raises(ValueError, match=match):
        build_long_history_model(cfg, ITEM_N, CATE_N, LENGTH)


@pytest.mark.parametrize(
    "variant, model_class",
    [("eta", "LongHistoryModel"), ("sdim_decoupled", "LongHistoryModel"),
     ("twin_v2", "LongHistoryModel"), ("twin", "TwoStageModel"), ("din", "TwoStageModel")],
)
def test_demo_variants_build_through_the_zoo(variant, model_class):
    from configs.demo import get_config
    from dare_jax.models import resolve_variant, validate_model_config

    config = get_config(f"model={variant}")
    validate_model_config(config.model, ITEM_N, CATE_N, int(config.data.max_length))
    model = build_model(config.model, ITEM_N, CATE_N, int(config.data.max_length))
    assert type(model).__name__ == model_class
    spec = resolve_variant(config.model)
    assert ("attention" in spec.table_groups) == variant.endswith("decoupled")


def test_long_history_switches_route_twin_to_the_chunked_model():
    cfg = default_model_config()
    cfg.name = "twin"
    assert type(build_model(cfg, ITEM_N, CATE_N, LENGTH)).__name__ == "TwoStageModel"
    cfg.search_chunk = 8
    assert type(build_model(cfg, ITEM_N, CATE_N, LENGTH)).__name__ == "LongHistoryModel"
    cfg.soft_search = False  # chunked search is soft search only
    with pytest.raises(ValueError, match="soft_search"):
        validate_model_config(cfg, ITEM_N, CATE_N, LENGTH)
