"""The model keeps behaviour vectors as per-field parts (the time part unbatched) and never
concatenates them to `[B, L, D]` where it need not. This checks every soft- and hard-search
variant of configs.base.MODEL_VARIANTS against a plain reference written here: compose
`[item | category | time]` per behaviour, score with the original formulas (DIN's MLP on
`[q, k, q - k, q * k]`), select, aggregate, heads. Outputs and parameter gradients must agree,
and the row-sparse lookup gradients must scatter to the same table gradients. Both run in
float64, so the only differences are the rounding of re-associated sums (about 1e-15; in
float32 cancellations in the table gradients make it about 1e-5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from configs.taobao import get_config
from dare_jax.config import resolve
from dare_jax.models import ModelSpec, TwoStageModel

ITEM_N, CATE_N, LENGTH, BATCH, TOP_K = 40, 5, 12, 6, 4
PAD = float(-(2**32) + 1)


def variant_cfg(variant, **overrides) -> ModelSpec:
    model = resolve(get_config(f"model={variant}")).model
    # init_std 0.3: well-separated scores, so the top-k is not decided by rounding
    return model.replace(**{"top_k": TOP_K, "init_std": 0.3, **overrides})


def two_stage_variants():
    """The variants whose search is TWIN's soft or hard one (ETA, SDIM and TWIN-V2 have
    their own oracles in tests/test_eta_sdim_twinv2.py)."""
    return [
        variant
        for variant in sorted(base.MODEL_VARIANTS)
        if variant_cfg(variant).variant.search in ("soft", "hard")
    ]


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    valid = rng.integers(2, LENGTH + 1, size=BATCH)
    hist_iid = rng.integers(1, ITEM_N, size=(BATCH, LENGTH))
    hist_iid[np.arange(LENGTH)[None, :] < (LENGTH - valid)[:, None]] = 0  # left padding
    hist_cid = np.where(hist_iid > 0, rng.integers(1, CATE_N, size=(BATCH, LENGTH)), 0)
    return {
        "iid": rng.integers(1, ITEM_N, size=BATCH).astype(np.int32),
        "cid": rng.integers(1, CATE_N, size=BATCH).astype(np.int32),
        "hist_iid": hist_iid.astype(np.int32),
        "hist_cid": hist_cid.astype(np.int32),
        "label": (np.arange(BATCH) % 2).astype(np.int32),
    }


# ------------------------------------------------------------------ the plain reference


def prelu(x, slope):
    return jnp.where(x >= 0, x, slope[0] * x)


def dense_stack(p, x):
    """dense_0, prelu_0, dense_1, ... as ProjectionMLP / MLPHead name them."""
    i = 0
    while f"dense_{i}" in p:
        layer = p[f"dense_{i}"]
        x = x @ layer["kernel"] + layer.get("bias", 0.0)
        if f"prelu_{i}" in p:
            x = prelu(x, p[f"prelu_{i}"]["slope"])
        i += 1
    return x


def head(p, x):
    """BatchNorm with the batch statistics (training), then the MLP."""
    mean = x.mean(0)
    var = jnp.square(x - mean).mean(0)
    x = (x - mean) / jnp.sqrt(var + 1e-5) * p["batch_norm"]["scale"] + p["batch_norm"]["bias"]
    return dense_stack(p, x)


def hard_indices(batch, k):
    """The most recent same-category behaviours, then the most recent other valid ones, then
    the most recent padding positions."""
    valid = batch["hist_iid"] > 0
    same = valid & (batch["hist_cid"] == batch["cid"][:, None])
    tier = same.astype(int) + valid.astype(int)
    order = np.lexsort((-np.arange(LENGTH)[None].repeat(BATCH, 0), -tier), axis=-1)
    return order[:, :k], same, valid


def reference(cfg, params, batch):
    spec = cfg.variant
    proj = spec.projection
    fields = ("item", "category", "time") if cfg.use_time else ("item", "category")
    target_ids = {"item": batch["iid"], "category": batch["cid"], "time": np.zeros(BATCH, int)}
    history_ids = {
        "item": batch["hist_iid"],
        "category": batch["hist_cid"],
        "time": np.broadcast_to(LENGTH - np.arange(LENGTH), (BATCH, LENGTH)),
    }

    def vector(role, ids):
        parts = {f: params["embed"][spec.tables[role]][f][ids[f]] for f in fields}
        if proj is not None and proj.per_field:
            for f in set(proj.fields) & set(parts):
                parts[f] = dense_stack(params["project"][proj.groups[role]][f], parts[f])
        v = jnp.concatenate([parts["item"], parts["category"]], -1)
        if cfg.use_time:
            add = cfg.time_mode == "add"
            v = v + parts["time"] if add else jnp.concatenate([v, parts["time"]], -1)
        if proj is not None and not proj.per_field:
            v = dense_stack(params["project"][proj.groups[role]], v)
        return v

    q, k = vector("attention_target", target_ids), vector("attention_behavior", history_ids)
    rt = vector("representation_target", target_ids)
    rb = vector("representation_behavior", history_ids)
    d = q.shape[-1]
    if spec.score == "din_mlp":
        qb = jnp.broadcast_to(q[:, None], k.shape)
        x = jnp.concatenate([qb, k, qb - k, qb * k], -1)
        scores = dense_stack(params["din_attention"], x)[..., 0] / d
    elif cfg.time_mode == "add":
        scores = jnp.einsum("bd,bld->bl", q, k) / math.sqrt(d)
    else:
        t = spec.table_dims[spec.tables["attention_target"]]["time"]
        if cfg.use_time and proj is not None and proj.per_field and proj.output_dim:
            t = proj.output_dim
        s = d - t
        scores = jnp.einsum("bd,bld->bl", q[:, :s], k[:, :, :s]) / math.sqrt(s) + jnp.einsum(
            "bd,bld->bl", q[:, s:], k[:, :, s:]
        ) / math.sqrt(t)
    valid = batch["hist_iid"] > 0
    if cfg.soft_search:
        kept = valid
        masked = jnp.where(kept, scores, PAD)
        _, indices = jax.lax.top_k(jax.lax.stop_gradient(masked), cfg.top_k)
    else:
        indices, _, _ = hard_indices(batch, cfg.top_k)
        chosen = np.zeros_like(valid)
        np.put_along_axis(chosen, indices, True, axis=1)
        kept = chosen & valid
        masked = jnp.where(kept, scores, PAD)
    selected = jax.nn.softmax(jnp.take_along_axis(masked, indices, 1), -1)
    retrieved = jnp.einsum("bk,bkd->bd", selected, jnp.take_along_axis(rb, indices[..., None], 1))
    full = jnp.einsum("bl,bld->bd", jax.nn.softmax(masked, -1), rb)
    average = (kept[..., None] * rb).sum(1) / (kept.sum(1, keepdims=True) + 1.0)

    feats = [] if cfg.only_odot else [rt, retrieved]
    if cfg.use_long_seq_average and not cfg.only_odot:
        feats.append(average)
    if cfg.use_cross_feature:
        feats.append(rt * retrieved)
        if cfg.use_long_seq_average:
            feats.append(rt * average)
    representation = jnp.concatenate(feats, -1)
    out = {
        "attention_scores": masked,
        "representation": representation,
        "topk_indices": indices,
        "logits": head(params["head"]["main"], representation),
    }
    if cfg.use_aux_loss:
        if cfg.only_odot:
            aux_in = rt * full
        elif cfg.use_cross_feature:
            aux_in = jnp.concatenate([rt, full, rt * full], -1)
        else:
            aux_in = jnp.concatenate([rt, full], -1)
        out["aux_logits"] = head(params["head"]["aux"], aux_in)
        out["aux_prob"] = jax.nn.softmax(out["aux_logits"], -1) + 1e-8
    out["prob"] = jax.nn.softmax(out["logits"], -1) + 1e-8
    return out


def log_likelihood(outputs, label):
    total = jnp.sum(jnp.log(jnp.take_along_axis(outputs["prob"], label[:, None], 1)))
    if "aux_prob" in outputs:
        total += jnp.sum(jnp.log(jnp.take_along_axis(outputs["aux_prob"], label[:, None], 1)))
    return total


# ------------------------------------------------------------------ the checks


def assert_close(got, want):
    """Gradients that are 0 in exact arithmetic (e.g. of a bias every score shares) are
    compared at the scale of their leaf."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * max(1.0, np.abs(want).max()))


def check_against_reference(cfg, batch):
    with jax.enable_x64(True):
        return _check_against_reference(cfg, batch)


def _check_against_reference(cfg, batch):
    model = TwoStageModel(cfg, ITEM_N, CATE_N, LENGTH)
    variables = model.init(jax.random.PRNGKey(1), batch, train=False)
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
    label = jnp.asarray(batch["label"])

    def model_outputs(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch,
            train=True,
            mutable=["batch_stats"],
        )
        return log_likelihood(out, label), out

    def reference_outputs(params):
        out = reference(cfg, params, batch)
        return log_likelihood(out, label), out

    (_, got), got_grads = jax.value_and_grad(model_outputs, has_aux=True)(variables["params"])
    (_, want), want_grads = jax.value_and_grad(reference_outputs, has_aux=True)(
        variables["params"]
    )
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["topk_indices"], want["topk_indices"])
    for key in set(want) - {"topk_indices"}:
        assert_close(got[key], want[key])
    jax.tree.map(assert_close, got_grads, want_grads)
    return model, variables, want_grads


@pytest.mark.parametrize("variant", two_stage_variants())
def test_every_variant_matches_the_composed_reference(variant):
    check_against_reference(variant_cfg(variant), make_batch())


@pytest.mark.parametrize(
    "variant, overrides",
    [
        ("twin", {"use_long_seq_average": True}),
        ("dare", {"use_long_seq_average": True, "only_odot": True}),
        ("twin_hard", {"use_long_seq_average": True}),
        ("twin", {"time_mode": "add", "time_embedding_dim": 32}),  # composed fallback
        ("twin", {"use_time": False}),  # the official split inside the semantic part
        ("dare", {"attention_item_embedding_dim": 8, "attention_category_embedding_dim": 4}),
    ],
)
def test_other_configurations_match_the_composed_reference(variant, overrides):
    check_against_reference(variant_cfg(variant, **overrides), make_batch(1))


@pytest.mark.parametrize("variant", ["twin", "dare", "din", "twin_proj"])
def test_row_sparse_gradients_scatter_to_the_reference_table_gradients(variant):
    """Lookup rows keep their contract (names, `[B, d]`, `[B, L, d]`, unbatched time
    `[L, d]` with ids `[L]`); scattered by their ids they give the tables' gradients."""
    with jax.enable_x64(True):
        _check_row_sparse(variant_cfg(variant), make_batch(2))


def lookup_row_gradients(model, variables, batch, objective):
    """(rows, ids): the gradient of `objective(outputs)` (training mode) w.r.t. every lookup's
    rows, {name: `[..., d]`}, and the sown ids, {name: (`[...]`,)} (the model exposes them
    when the `perturbations` collection is mutable)."""
    _, state = model.apply(
        variables, batch, train=True, mutable=["perturbations", "batch_stats", "embedding_ids"]
    )

    def loss(perturbations):
        out, _ = model.apply(
            {**variables, "perturbations": perturbations},
            batch,
            train=True,
            mutable=["batch_stats", "embedding_ids"],
        )
        return objective(out)

    zeros = jax.tree.map(jnp.zeros_like, state["perturbations"])
    return jax.jit(jax.grad(loss))(zeros), state["embedding_ids"]


def _check_row_sparse(cfg, batch):
    _, variables, want = _check_against_reference(cfg, batch)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    model = TwoStageModel(cfg, ITEM_N, CATE_N, LENGTH)
    label = jnp.asarray(batch["label"])
    rows, ids = lookup_row_gradients(
        model, variables, batch, lambda out: log_likelihood(out, label)
    )
    tables = {}
    for name, cotangent in rows.items():
        group, field, role = name.split(":")
        (row_ids,) = ids[name]
        expected_ids = {
            ("time", "history"): (LENGTH,),
            ("time", "target"): (),
        }.get((field, role), (BATCH, LENGTH) if role == "history" else (BATCH,))
        assert row_ids.shape == expected_ids and cotangent.shape[:-1] == expected_ids, name
        shape = variables["params"]["embed"][group][field].shape
        table = tables.setdefault((group, field), np.zeros(shape))
        np.add.at(table, np.asarray(row_ids), np.asarray(cotangent, np.float64))
    fields = ("item", "category", "time") if cfg.use_time else ("item", "category")
    assert set(tables) == {(group, f) for group in want["embed"] for f in fields}
    for (group, field), table in tables.items():
        assert_close(table, want["embed"][group][field])
