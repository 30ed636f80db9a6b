"""Long histories: every search chunked equals it unchunked, bfloat16 scores, linear compiled
memory (no `[B, L, D]` kept), config errors; one model class for every variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dare_jax.models import ModelSpec, TwoStageModel
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


# ETA in the default run (tests/test_recorded_outputs.py also compares DIN, hard search and
# one-cluster TWIN-V2 chunked with the recorded unchunked outputs); the others in the slow pass.
@pytest.mark.parametrize(
    "name, overrides",
    [
        pytest.param("twin", {}, marks=pytest.mark.slow),
        pytest.param("dare", {"use_long_seq_average": True}, marks=pytest.mark.slow),
        ("eta", {}),
        pytest.param("sdim", {}, marks=pytest.mark.slow),
        pytest.param("twin_v2", {"cluster_max_size": 4}, marks=pytest.mark.slow),
        pytest.param("din", {"use_time": False}, marks=pytest.mark.slow),
        pytest.param("twin", {"soft_search": False}, marks=pytest.mark.slow),
        pytest.param("projection", {}, marks=pytest.mark.slow),
    ],
)
def test_chunked_equals_unchunked(name, overrides):
    batch = make_batch(5)
    whole = TwoStageModel(make_cfg(name, **overrides), ITEM_N, CATE_N, LENGTH)
    # 7 does not divide L = 24: exercises the left padding of the first chunk
    chunked = TwoStageModel(make_cfg(name, search_chunk=7, **overrides), ITEM_N, CATE_N, LENGTH)
    variables = whole.init(jax.random.PRNGKey(1), batch)
    g_whole, out_whole = grads_and_outputs(whole, variables, batch)
    g_chunk, out_chunk = grads_and_outputs(chunked, variables, batch)
    assert set(out_whole) == set(out_chunk)
    for key in out_whole:
        np.testing.assert_allclose(
            out_chunk[key], out_whole[key], rtol=2e-4, atol=1e-6, err_msg=key
        )
    assert_trees_close(g_chunk, g_whole)


def test_bfloat16_scores_are_close_to_float32():
    batch = make_batch(6)
    f32 = TwoStageModel(make_cfg("twin", search_chunk=8), ITEM_N, CATE_N, LENGTH)
    bf16 = TwoStageModel(
        make_cfg("twin", search_chunk=8, score_dtype="bfloat16"), ITEM_N, CATE_N, LENGTH
    )
    variables = f32.init(jax.random.PRNGKey(2), batch)
    a, b = f32.apply(variables, batch), bf16.apply(variables, batch)
    valid = batch["hist_iid"] > 0
    diff = np.abs(np.asarray(a["attention_scores"]) - np.asarray(b["attention_scores"]))[valid]
    scale = np.abs(np.asarray(a["attention_scores"])[valid]).max()
    assert 0 < diff.max() < 0.02 * scale  # really bfloat16 products, close to float32
    np.testing.assert_allclose(a["prob"], b["prob"], atol=2e-2)


def compiled_temp_bytes(name: str, length: int, chunk: int, batch_size: int = 8) -> int:
    cfg = make_cfg(name, search_chunk=chunk, time_table_size=length + 1, top_k=20)
    model = TwoStageModel(cfg, 1000, 20, length)
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


@pytest.mark.parametrize(
    "name", ["twin", "eta", "sdim", pytest.param("twin_v2", marks=pytest.mark.slow)]
)
def test_training_step_memory_is_linear_without_a_full_history_tensor(name):
    """Compiled temporaries of a gradient step at L = 6,000 (B = 8, D = 48, chunks of 500)
    stay below ONE `[B, L, D]` float32 array (TWIN-V2: two; its clustering holds a few
    `[B, L, 8]` coordinate arrays and `[B, L / 6, D]` cluster sums), and grow at most
    linearly from L = 1,500."""
    one_full = 8 * 6_000 * 48 * 4
    big = compiled_temp_bytes(name, 6_000, 500)
    small = compiled_temp_bytes(name, 1_500, 500)
    assert big < (2 if name == "twin_v2" else 1) * one_full, (big, one_full)
    assert big <= 4.0 * small * 1.05, (small, big)
    if name == "twin":  # unchunked, the step keeps `[B, L, d]` lookups for the backward pass
        assert compiled_temp_bytes(name, 6_000, 0) > 4 * big


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"name": "sdim"}, "use_aux_loss"),
        ({"name": "eta", "score_dtype": "float16"}, "score_dtype"),
        ({"name": "eta", "search_chunk": -1}, "search_chunk"),
        ({"name": "sdim", "use_aux_loss": False, "sdim_group_bits": 5}, "sdim_group_bits"),
        ({"name": "twin_v2", "soft_search": False}, "soft_search"),
        ({"name": "twin_v2", "cluster_iterations": -1}, "cluster_iterations"),
        ({"name": "eta", "top_k": LENGTH + 1}, "top_k"),
        ({"name": "eta", "hash_bits": 0}, "hash_bits"),
        ({"name": "eta", "attention_item_embedding_dim": 8}, "attention_item_embedding_dim"),
        ({"name": "sdim", "use_aux_loss": False, "observe_attn_repr_grad": True}, "SDIM"),
        ({"name": "eta", "decoupled_tables": True, "observe_attn_repr_grad": True}, "observe"),
    ],
)
def test_bad_configs_name_field_and_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**overrides).check_history_length(LENGTH)


def test_every_variant_is_the_one_model_with_its_search_as_data():
    from configs.base import MODEL_VARIANTS
    from configs.demo import get_config
    from dare_jax.config import resolve

    searches = {}
    for variant in MODEL_VARIANTS:
        experiment = resolve(get_config(f"model={variant}"))
        model = TwoStageModel(experiment.model, ITEM_N, CATE_N, experiment.data.max_length)
        assert type(model) is TwoStageModel
        spec = experiment.model.variant
        searches[variant] = spec.search
        assert ("attention" in spec.table_groups) == (
            variant.startswith("dare") or variant.endswith(("decoupled", "observe_grad"))
            or variant in ("twin_avoid_domination", "target_only")
        ), variant
    assert searches["twin_hard"] == "hard" and searches["din"] == searches["twin"] == "soft"
    assert {searches[n] for n in ("eta", "sdim", "twin_v2")} == {"eta", "sdim", "twin_v2"}
    # Chunks, bfloat16 scores and gradient observation apply across searches.
    cfg = make_cfg("twin", soft_search=False, search_chunk=8, score_dtype="bfloat16")
    assert cfg.variant.search == "hard"
    cfg = make_cfg("twin_v2", observe_attn_repr_grad=True, search_chunk=8)
    assert cfg.variant.observes_gradients
