"""Model zoo: config validation, structure vs the official constructor, independent numpy
recomputation of the features, BatchNorm, L2 selection, gradient hooks, weight import, jit."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dare_jax.interop import torch_weights
from dare_jax.models import ModelSpec, TwoStageModel, l2_penalty, loss_terms
from dare_jax.models.gradient_paths import combine_path_gradients
from dare_jax.models.search import PADDING_SCORE

ITEM_N, CATE_N, LENGTH, BATCH, TOP_K = 50, 6, 12, 16, 4


def make_cfg(name="dare", **overrides) -> ModelSpec:
    # init_std 0.3: well-separated scores for the tests (the default 0.01 is the paper's)
    fields = {"name": name, "top_k": TOP_K, "init_std": 0.3}
    if name in ("din", "DIN"):
        fields["use_time"] = False
    if name == "projection_two_linear":
        fields["mlp_position_after_concat"] = True
    return ModelSpec(**{**fields, **overrides})


def make_batch(seed=0, batch=BATCH, length=LENGTH):
    rng = np.random.default_rng(seed)
    valid = rng.integers(2, length + 1, size=batch)
    hist_iid = rng.integers(1, ITEM_N, size=(batch, length))
    hist_iid[np.arange(length)[None, :] < (length - valid)[:, None]] = 0  # left padding
    return {
        "iid": rng.integers(1, ITEM_N, size=batch).astype(np.int32),
        "cid": rng.integers(1, CATE_N, size=batch).astype(np.int32),
        "hist_iid": hist_iid.astype(np.int32),
        "hist_cid": np.where(hist_iid > 0, rng.integers(1, CATE_N, size=(batch, length)), 0).astype(
            np.int32
        ),
    }


def init(cfg, seed=0, batch=None):
    model = TwoStageModel(cfg, ITEM_N, CATE_N, LENGTH)
    batch = make_batch(seed) if batch is None else batch
    return model, model.init(jax.random.PRNGKey(seed), batch, train=False), batch


def count(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"name": "sim"}, "name"),
        ({"top_k": LENGTH + 1}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"time_mode": "sum"}, "time_mode"),
        ({"time_mode": "add"}, "time_embedding_dim"),  # 16 != 16 + 16
        ({"name": "twin", "attention_item_embedding_dim": 8}, "attention_item_embedding_dim"),
        ({"name": "din", "use_time": True}, "use_time"),
        ({"only_odot": True, "use_cross_feature": False}, "only_odot"),
        ({"name": "dare", "observe_attn_repr_grad": True}, "observe_attn_repr_grad"),
        ({"name": "projection_with_mlp", "mlp_hidden_layer": (8, 8, 8)}, "mlp_hidden_layer"),
        (
            {"name": "projection_two_linear", "mlp_position_after_concat": False},
            "mlp_position_after_concat",
        ),
        (
            {"name": "projection_only_item", "mlp_position_after_concat": True},
            "mlp_position_after_concat",
        ),
        ({"item_embedding_dim": 0}, "item_embedding_dim"),
        ({"time_table_size": LENGTH}, "time_table_size"),
        ({"name": "projection_large_emb_small_output", "use_time": False}, "use_time"),
    ],
)
def test_validation_names_field_and_value(overrides, field):
    with pytest.raises(ValueError) as err:
        make_cfg(**overrides).check_history_length(LENGTH)
    assert repr(field) in str(err.value)


def test_official_names_are_accepted():
    for official, ours in [
        ("DARE", "dare"),
        ("DIN", "din"),
        ("four_embedding", "twin_4e"),
        ("twin", "twin"),
    ]:
        cfg = make_cfg(official)
        assert cfg.variant.name == ours


# ------------------------------------------------- structure vs the official constructor


def official_parameter_count(cfg, item_n, cate_n):
    """Trainable parameter count of the official `DIN(...)` constructor, from its rules."""
    name = cfg.variant.official_name
    rep = {f: int(getattr(cfg, f"{f}_embedding_dim")) for f in ("item", "category", "time")}
    att = {
        f: rep[f]
        if getattr(cfg, f"attention_{f}_embedding_dim") == -1
        else int(getattr(cfg, f"attention_{f}_embedding_dim"))
        for f in rep
    }
    rows = {"item": item_n, "category": cate_n, "time": 2000}
    table = lambda dims: sum(rows[f] * dims[f] for f in rows)
    observe = cfg.observe_attn_repr_grad or cfg.avoid_domination
    if name == "DARE" or observe:
        total = table(att) + table(rep)
    elif name == "four_embedding":
        total = 2 * table(att) + 2 * table(rep)
    elif name == "three_embedding":
        total = 2 * table(att) + table(rep)
    else:
        total = table(rep)
    linear = lambda i, o, bias: i * o + (o if bias else 0)
    with_time = cfg.use_time and cfg.time_mode == "concat"
    if name == "projection_large_emb_small_output":
        emb_dim = att_dim = 48
    elif with_time:
        emb_dim, att_dim = sum(rep.values()), sum(att.values())
    else:
        emb_dim, att_dim = rep["item"] + rep["category"], att["item"] + att["category"]
    if not cfg.mlp_position_after_concat:
        fields = {
            "projection": 3,
            "projection_with_mlp": 3,
            "projection_no_item": 2,
            "projection_only_time": 1,
            "projection_only_category": 1,
            "projection_only_item": 1,
            "projection_large_emb_small_output": 3,
        }
        chosen = {
            "projection_no_item": ("category", "time"),
            "projection_only_time": ("time",),
            "projection_only_category": ("category",),
            "projection_only_item": ("item",),
        }.get(name, ("item", "category", "time"))
        if name in fields:
            for f in chosen:
                for dims in (att, rep):
                    d = dims[f]
                    if name == "projection":
                        total += 2 * linear(d, d, False)  # target and behaviour maps
                    elif name == "projection_large_emb_small_output":
                        total += linear(d, 16, False)
                    elif name == "projection_with_mlp":
                        h = list(cfg.mlp_hidden_layer)
                        sizes = [d] + h + [d]
                        total += sum(linear(a, b, True) for a, b in itertools.pairwise(sizes))
                        total += len(h)  # PReLU slopes
                    else:
                        total += linear(d, d, False)
    elif name == "projection":
        total += 2 * linear(att_dim, att_dim, True) + 2 * linear(emb_dim, emb_dim, True)
    elif name == "projection_two_linear":
        total += linear(att_dim, att_dim, True) + linear(emb_dim, emb_dim, True)
    target_dim = emb_dim
    long_dim = emb_dim * (2 if cfg.use_long_seq_average else 1)
    if cfg.use_cross_feature and not cfg.only_odot:
        long_dim *= 2
    if cfg.only_odot:
        target_dim = 0
    main_in = target_dim + long_dim
    aux_in = target_dim + (long_dim // 2 if cfg.use_long_seq_average else long_dim)
    total += 2 * main_in + linear(main_in, 200, True) + 1 + linear(200, 80, True) + 1
    total += linear(80, 2, True)
    total += 2 * aux_in + linear(aux_in, 200, True) + 1 + linear(200, 2, True)
    if name == "DIN":
        total += linear(4 * att_dim, 36, True) + 1 + linear(36, 1, True)
    return total, main_in


STRUCTURE_CASES = [
    ("dare", {}),
    (
        "dare",
        {
            "attention_item_embedding_dim": 8,
            "attention_category_embedding_dim": 4,
            "attention_time_embedding_dim": 4,
        },
    ),
    ("twin", {}),
    ("twin", {"use_cross_feature": False}),
    ("twin", {"use_time": False}),
    ("twin", {"time_mode": "add", "time_embedding_dim": 32}),
    ("twin", {"use_long_seq_average": True}),
    ("twin", {"only_odot": True, "use_long_seq_average": True}),
    ("twin", {"use_aux_loss": False}),
    ("twin", {"soft_search": False}),
    ("twin", {"observe_attn_repr_grad": True}),
    ("din", {}),
    ("twin_4e", {"attention_time_embedding_dim": 8}),
    ("three_embedding", {}),
    ("projection", {}),
    ("projection", {"mlp_position_after_concat": True}),
    ("projection", {"use_time": False}),  # the official maps for time exist, unused
    ("projection_with_mlp", {"use_time": False, "use_aux_loss": False}),
    ("projection_two_linear", {}),
    ("projection_with_mlp", {}),
    ("projection_with_mlp", {"mlp_hidden_layer": (8, 12)}),
    ("projection_no_item", {}),
    ("projection_only_time", {}),
    ("projection_only_category", {}),
    ("projection_only_item", {}),
    ("projection_large_emb_small_output", {"item_embedding_dim": 32, "category_embedding_dim": 24}),
]


@pytest.mark.parametrize("name, overrides", STRUCTURE_CASES)
def test_parameter_count_and_shapes_match_official_constructor(name, overrides):
    cfg = make_cfg(name, **overrides)
    model, variables, batch = init(cfg)
    expected_count, main_in = official_parameter_count(cfg, ITEM_N, CATE_N)
    assert count(variables["params"]) == expected_count
    out = model.apply(variables, batch, train=False)
    assert out["prob"].shape == (BATCH, 2)
    assert out["representation"].shape == (BATCH, main_in)
    assert out["attention_scores"].shape == (BATCH, LENGTH)
    assert out["topk_indices"].shape == (BATCH, TOP_K)
    assert ("aux_prob" in out) == bool(cfg.use_aux_loss)
    np.testing.assert_allclose(np.asarray(out["prob"]).sum(1), 1 + 2e-8, rtol=1e-6)
    # Weight import round trip through the official names.
    state = torch_weights.export_state_dict(cfg.variant, variables)
    restored, unused = torch_weights.import_state_dict(cfg.variant, variables, state)
    assert unused == []
    jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(variables))


def test_official_state_dict_names_of_per_field_projection():
    cfg = make_cfg("projection")
    _, variables, _ = init(cfg)
    names = set(torch_weights.export_state_dict(cfg.variant, variables))
    maps = {
        f"mlp_for_{f}_{k}_of_{w}.weight"
        for f in ("item", "category", "time")
        for k in ("attention", "representation")
        for w in ("target", "behavior")
    }
    tables = {
        f"{f}_id_embedding_layer_for_{k}_of_{w}.weight"
        for f in ("item", "category", "time")
        for k in ("attention", "representation")
        for w in ("target", "behavior")
    }
    assert maps | tables <= names
    assert not any(n.startswith("mlp_for_") and n not in maps for n in names)


def test_import_rejects_untied_values():
    cfg = make_cfg("twin")
    _, variables, _ = init(cfg)
    spec = cfg.variant
    state = torch_weights.export_state_dict(spec, variables)
    state["item_id_embedding_layer_for_representation_of_behavior.weight"] = (
        state["item_id_embedding_layer_for_representation_of_behavior.weight"] + 1.0
    )
    with pytest.raises(ValueError, match="tied"):
        torch_weights.import_state_dict(spec, variables, state)


@pytest.mark.parametrize(
    "name, groups",
    [
        ("twin", {"shared"}),
        ("dare", {"attention", "representation"}),
        (
            "twin_4e",
            {
                "attention_target",
                "attention_behavior",
                "representation_target",
                "representation_behavior",
            },
        ),
        ("three_embedding", {"attention_target", "attention_behavior", "representation"}),
    ],
)
def test_table_groups(name, groups):
    _, variables, _ = init(make_cfg(name))
    assert set(variables["params"]["embed"]) == groups


def test_dare_attention_and_representation_tables_are_decoupled():
    model, variables, batch = init(make_cfg("dare"))
    base = model.apply(variables, batch, train=False)
    params = jax.device_get(variables["params"])

    def run_with(group):
        p = jax.tree.map(np.copy, params)
        p["embed"][group]["category"] = p["embed"][group]["category"] + 0.5
        return model.apply({**variables, "params": p}, batch, train=False)

    attn = run_with("attention")
    assert not np.allclose(attn["attention_scores"], base["attention_scores"])
    d = 48  # the target representation (first block of the MLP input) ignores attention
    np.testing.assert_array_equal(attn["representation"][:, :d], base["representation"][:, :d])
    rep = run_with("representation")
    np.testing.assert_array_equal(rep["attention_scores"], base["attention_scores"])


# ------------------------------------------- independent numpy recomputation of features


def numpy_features(cfg, params, batch):
    """The main-MLP input recomputed in numpy from the tables (no projection variants)."""
    spec = cfg.variant
    embed = {
        g: {f: np.asarray(t, np.float64) for f, t in fields.items()}
        for g, fields in params["embed"].items()
    }
    b, length = batch["hist_iid"].shape
    ids_t = {"item": batch["iid"], "category": batch["cid"], "time": np.zeros(b, int)}
    ids_h = {
        "item": batch["hist_iid"],
        "category": batch["hist_cid"],
        "time": np.broadcast_to(length - np.arange(length), (b, length)),
    }
    fields = ("item", "category", "time") if cfg.use_time else ("item", "category")

    def vec(role, ids):
        parts = [embed[spec.tables[role]][f][ids[f]] for f in fields]
        if cfg.use_time and cfg.time_mode == "add":
            return np.concatenate(parts[:2], -1) + parts[2]
        return np.concatenate(parts, -1)

    q, k = vec("attention_target", ids_t), vec("attention_behavior", ids_h)
    rt, rb = vec("representation_target", ids_t), vec("representation_behavior", ids_h)
    if cfg.time_mode == "add":
        scores = np.einsum("bd,bld->bl", q, k) / math.sqrt(q.shape[-1])
    else:
        t = spec.table_dims[spec.tables["attention_target"]]["time"]
        s = q.shape[-1] - t
        scores = np.einsum("bd,bld->bl", q[:, :s], k[:, :, :s]) / math.sqrt(s) + np.einsum(
            "bd,bld->bl", q[:, s:], k[:, :, s:]
        ) / math.sqrt(t)
    mask = batch["hist_iid"] > 0
    masked = np.where(mask, scores, PADDING_SCORE)
    retrieved = np.zeros_like(rt)
    for i in range(b):
        order = np.argsort(-masked[i], kind="stable")[: cfg.top_k]
        w = np.exp(masked[i, order] - masked[i, order].max())
        retrieved[i] = (w / w.sum()) @ rb[i, order]
    average = (mask[..., None] * rb).sum(1) / (mask.sum(1, keepdims=True) + 1.0)
    feats = (
        [] if cfg.only_odot else [rt, retrieved] + ([average] if cfg.use_long_seq_average else [])
    )
    if cfg.use_cross_feature:
        feats.append(rt * retrieved)
        if cfg.use_long_seq_average:
            feats.append(rt * average)
    return np.concatenate(feats, -1), np.where(mask, scores, PADDING_SCORE)


@pytest.mark.parametrize(
    "name, overrides",
    [
        (
            "dare",
            {
                "attention_item_embedding_dim": 8,
                "attention_category_embedding_dim": 4,
                "attention_time_embedding_dim": 4,
                "use_long_seq_average": True,
            },
        ),
        ("twin", {"use_time": False}),  # the official split at the last 16 entries
        ("twin", {"time_mode": "add", "time_embedding_dim": 32}),
        ("twin", {"only_odot": True}),
        ("twin_4e", {"use_cross_feature": False}),
        ("three_embedding", {"use_long_seq_average": True, "only_odot": True}),
    ],
)
def test_features_match_numpy_recomputation(name, overrides):
    cfg = make_cfg(name, **overrides)
    model, variables, batch = init(cfg)
    out = model.apply(variables, batch, train=False)
    expected, scores = numpy_features(cfg, jax.device_get(variables["params"]), batch)
    np.testing.assert_allclose(out["representation"], expected, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out["attention_scores"], scores, rtol=2e-4, atol=2e-5)


def test_hard_search_selects_by_category_and_recency():
    cfg = make_cfg("twin", soft_search=False)
    model, variables, batch = init(cfg)
    out = model.apply(variables, batch, train=False)
    for i in range(BATCH):
        valid = batch["hist_iid"][i] > 0
        same = valid & (batch["hist_cid"][i] == batch["cid"][i])
        order = [j for j in range(LENGTH)[::-1] if same[j]]
        order += [j for j in range(LENGTH)[::-1] if valid[j] and not same[j]]
        assert set(order[:TOP_K]) <= set(np.asarray(out["topk_indices"][i]).tolist())
        # Only the selected behaviours keep a real score.
        kept = np.asarray(out["attention_scores"][i]) != np.float32(PADDING_SCORE)
        assert set(np.flatnonzero(kept)) == set(order[:TOP_K])


# ------------------------------------------------------------------ BatchNorm and init


def test_batchnorm_running_update_is_pytorch_style():
    model, variables, batch = init(make_cfg("twin"))
    out, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
    x = np.asarray(out["representation"], np.float64)
    stats = updates["batch_stats"]["head"]["main"]["batch_norm"]
    np.testing.assert_allclose(stats["mean"], 0.1 * x.mean(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-4)
    # The normalisation itself uses the biased batch variance, eps 1e-5.
    p = variables["params"]["head"]["main"]
    normalised = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * p["batch_norm"]["scale"] + p[
        "batch_norm"
    ]["bias"]
    hidden = normalised @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    slope = float(p["prelu_0"]["slope"][0])
    hidden = np.where(hidden >= 0, hidden, slope * hidden) @ p["dense_1"]["kernel"]
    hidden = hidden + p["dense_1"]["bias"]
    slope = float(p["prelu_1"]["slope"][0])
    logits = np.where(hidden >= 0, hidden, slope * hidden) @ p["dense_2"]["kernel"]
    logits = logits + p["dense_2"]["bias"]
    np.testing.assert_allclose(out["logits"], logits, rtol=2e-4, atol=1e-6)


def test_eval_uses_running_stats_unless_official_option():
    cfg = make_cfg("twin")
    model, variables, batch = init(cfg)
    train_out, _ = model.apply(variables, batch, train=True, mutable=["batch_stats"])
    eval_out = model.apply(variables, batch, train=False)
    assert not np.allclose(train_out["prob"], eval_out["prob"])
    cfg = cfg.replace(eval_batchnorm_uses_batch_stats=True)
    official = TwoStageModel(cfg, ITEM_N, CATE_N, LENGTH).apply(variables, batch, train=False)
    np.testing.assert_allclose(official["prob"], train_out["prob"], rtol=1e-6)


def test_official_initialisation():
    cfg = make_cfg("din", init_std=0.01, item_embedding_dim=64, category_embedding_dim=64)
    model = TwoStageModel(cfg, 2000, CATE_N, LENGTH)
    variables = model.init(jax.random.PRNGKey(0), make_batch(), train=False)
    params = variables["params"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        leaf = np.asarray(leaf)
        if names[-1] == "bias":
            if names[-2] == "batch_norm":
                assert np.all(leaf == 0)
            continue
        if leaf.size >= 1000:
            assert abs(leaf.std() - 0.01) < 1e-3, names
    kernel = np.asarray(params["head"]["main"]["dense_0"]["kernel"])
    bias = np.asarray(params["head"]["main"]["dense_0"]["bias"])
    assert np.all(np.abs(bias) <= 1 / math.sqrt(kernel.shape[0]))
    assert bias.std() > 0.25 / math.sqrt(kernel.shape[0])  # PyTorch's uniform default, not 0
    stats = variables["batch_stats"]["head"]["main"]["batch_norm"]
    assert np.all(stats["mean"] == 0) and np.all(stats["var"] == 1)


# --------------------------------------------------------------------------------- loss


def test_l2_selects_every_non_bias_non_embedding_leaf():
    _, variables, _ = init(make_cfg("din"))
    params = jax.device_get(variables["params"])
    expected = 0.0
    penalised = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        if names[0] != "embed" and names[-1] != "bias":
            expected += float(np.sum(np.asarray(leaf, np.float64) ** 2))
            penalised.append("/".join(names))
    assert "head/main/batch_norm/scale" in penalised and "head/aux/prelu_0/slope" in penalised
    assert "din_attention/dense_0/kernel" in penalised
    assert not any(p.startswith("embed/") or p.endswith("/bias") for p in penalised)
    np.testing.assert_allclose(float(l2_penalty(params)), expected, rtol=1e-5)


def test_loss_terms_and_example_weight():
    prob = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]) + 1e-8
    label = jnp.array([1, 0, 1])
    params = {
        "embed": {"shared": {"item": jnp.ones((3, 2))}},
        "head": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(2)},
    }
    terms = loss_terms({"prob": prob, "aux_prob": prob}, label, params, 0.5)
    nll = -np.log(np.array([0.9, 0.8, 0.5]) + 1e-8)
    np.testing.assert_allclose(terms["ctr"], nll.mean(), rtol=1e-6)
    np.testing.assert_allclose(terms["l2"], 16.0)
    np.testing.assert_allclose(terms["total"], 2 * nll.mean() + 8.0, rtol=1e-6)
    masked = loss_terms(
        {"prob": prob}, label, params, 0.0, example_weight=jnp.array([1.0, 1.0, 0.0])
    )
    np.testing.assert_allclose(masked["ctr"], nll[:2].mean(), rtol=1e-6)
    assert float(masked["aux"]) == 0.0


# ------------------------------------------------------------------------ gradient hooks


def _grads(model, variables, batch, label):
    def loss(params):
        out, _ = model.apply(
            {**variables, "params": params}, batch, train=True, mutable=["batch_stats"]
        )
        return loss_terms(out, label, params, 1e-6)["total"]

    return jax.device_get(jax.grad(loss)(variables["params"]))


@pytest.mark.parametrize("avoid", [False, True])
def test_gradient_path_hooks(avoid):
    batch = make_batch(3)
    label = (np.arange(BATCH) % 2).astype(np.int32)
    cfg = make_cfg("twin", observe_attn_repr_grad=not avoid, avoid_domination=avoid)
    model, variables, _ = init(cfg, batch=batch)
    params = jax.device_get(variables["params"])
    for f in ("item", "category", "time"):  # the copies start synchronised
        np.testing.assert_array_equal(
            params["embed"]["attention"][f], params["embed"]["representation"][f]
        )
    grads = _grads(model, variables, batch, label)
    combined, observed = combine_path_gradients(grads, cfg, observed_fields=None)

    # Plain TWIN with the same values: its shared-table gradient is the sum of the two paths.
    twin_model = TwoStageModel(make_cfg("twin"), ITEM_N, CATE_N, LENGTH)
    twin_params = {k: v for k, v in params.items() if k != "embed"}
    twin_params["embed"] = {"shared": params["embed"]["representation"]}
    twin_vars = {"params": twin_params, "batch_stats": variables["batch_stats"]}
    twin_grads = _grads(twin_model, twin_vars, batch, label)
    for f in ("item", "category", "time"):
        g_a, g_r = grads["embed"]["attention"][f], grads["embed"]["representation"][f]
        np.testing.assert_array_equal(observed[f"attention/{f}"], g_a)
        np.testing.assert_array_equal(observed[f"representation/{f}"], g_r)
        shared = twin_grads["embed"]["shared"][f]
        # float32 sums in a different order: tolerance relative to the table's largest entry
        tol = 1e-4 * float(np.abs(shared).max())
        np.testing.assert_allclose(g_a + g_r, shared, rtol=0, atol=tol)
        if avoid:
            expected = g_a * (np.linalg.norm(g_r) / np.linalg.norm(g_a)) + g_r
        else:
            expected = shared
        np.testing.assert_allclose(combined["embed"]["attention"][f], expected, rtol=0, atol=tol)
        np.testing.assert_array_equal(
            combined["embed"]["attention"][f], combined["embed"]["representation"][f]
        )
    np.testing.assert_allclose(
        combined["head"]["main"]["dense_0"]["kernel"],
        twin_grads["head"]["main"]["dense_0"]["kernel"],
        rtol=1e-4,
        atol=1e-9,
    )
    # The default records only the small category and time tables.
    _, default_observed = combine_path_gradients(grads, cfg)
    assert set(default_observed) == {
        "attention/category",
        "representation/category",
        "attention/time",
        "representation/time",
    }


def test_hooks_are_identity_without_the_switches():
    cfg = make_cfg("twin")
    grads = {"embed": {"shared": {"item": np.ones((2, 2))}}}
    same, observed = combine_path_gradients(grads, cfg)
    assert same is grads and observed == {}


# ---------------------------------------------------------------------------- jit once


def test_train_step_compiles_once_for_repeated_batches():
    cfg = make_cfg("dare")
    model, variables, _ = init(cfg)
    optimizer = optax.adam(0.01)
    traces = []

    def step(state, batch, label):
        traces.append(1)

        def loss(params):
            out, upd = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                batch,
                train=True,
                mutable=["batch_stats"],
            )
            return loss_terms(out, label, params, 1e-6)["total"], upd["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats,
            "opt": opt,
        }, value

    jitted = jax.jit(step, donate_argnums=(0,))
    state = {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt": optimizer.init(variables["params"]),
    }
    losses = []
    for seed in range(4):
        state, value = jitted(state, make_batch(seed), (np.arange(BATCH) % 2).astype(np.int32))
        losses.append(float(value))
    assert len(traces) == 1
    assert all(np.isfinite(losses))


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        (
            "projection_with_mlp",
            {"mlp_hidden_layer": (8, 12)},
            {
                f"mlp_for_time_representation_of_behavior.{suffix}"
                for suffix in (
                    "0.weight",
                    "0.bias",
                    "1.weight",
                    "2.weight",
                    "2.bias",
                    "3.weight",
                    "4.weight",
                    "4.bias",
                )
            },
        ),
        (
            "projection",
            {"mlp_position_after_concat": True},
            {
                f"mlp_for_{k}_of_{w}.{p}"
                for k in ("attention", "representation")
                for w in ("target", "behavior")
                for p in ("weight", "bias")
            },
        ),
    ],
)
def test_official_names_of_projection_modules(name, overrides, expected):
    cfg = make_cfg(name, **overrides)
    _, variables, _ = init(cfg)
    names = set(torch_weights.export_state_dict(cfg.variant, variables))
    prefix = next(iter(expected)).split(".")[0]
    assert expected <= names
    if name == "projection":  # after concatenation: exactly the 4 maps, no per-field ones
        assert {n for n in names if n.startswith("mlp_for_")} == expected
    else:
        assert {n for n in names if n.startswith(prefix + ".")} == expected


def test_derived_time_ids_and_mask_equal_explicit_overrides():
    """Derived time ids are gathered once (the history's time part stays `[L, d]`); same
    outputs and gradients as the explicit per-example ids `[B]`, `[B, L]` (and mask) that the
    parity fixtures pass. In float64: the two paths sum in different orders, and in float32
    the rounding, amplified by the batch-statistics BatchNorm, reaches 5e-5 of a gradient
    leaf's scale."""
    cfg = make_cfg("dare")
    model, variables, batch = init(cfg)
    explicit = dict(batch)
    explicit["tid"] = np.zeros(BATCH, np.int32)
    explicit["hist_tid"] = np.broadcast_to(LENGTH - np.arange(LENGTH), (BATCH, LENGTH)).astype(
        np.int32
    )
    explicit["mask"] = batch["hist_iid"] > 0
    label = (np.arange(BATCH) % 2).astype(np.int32)
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
        grads = [_grads(model, variables, b, label) for b in (batch, explicit)]
        outs = [model.apply(variables, b, train=False) for b in (batch, explicit)]
    np.testing.assert_allclose(outs[0]["prob"], outs[1]["prob"], rtol=1e-12)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), *grads)
    assert np.abs(grads[0]["embed"]["attention"]["time"]).sum() > 0
