"""ETA, SDIM and TWIN-V2: hashing, Hamming top-k, bucket pooling and clustering against numpy /
plain-Python oracles, the models' features recomputed from their tables, and gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dare_jax.models import ModelSpec, TwoStageModel, eta, sdim, twin_v2
from dare_jax.models.search import PADDING_SCORE

ITEM_N, CATE_N, LENGTH, BATCH, TOP_K = 60, 7, 24, 6, 4


def make_cfg(name: str, **overrides) -> ModelSpec:
    fields = {"name": name, "top_k": TOP_K, "init_std": 0.3}
    if name == "sdim":
        fields["use_aux_loss"] = False
    return ModelSpec(**{**fields, **overrides})


def make_batch(seed=0, batch=BATCH, length=LENGTH):
    rng = np.random.default_rng(seed)
    valid = rng.integers(TOP_K - 2, length + 1, size=batch)
    hist_iid = rng.integers(1, ITEM_N, size=(batch, length))
    hist_iid[np.arange(length)[None, :] < (length - valid)[:, None]] = 0
    hist_cid = np.where(hist_iid > 0, hist_iid % (CATE_N - 1) + 1, 0)
    return {
        "iid": rng.integers(1, ITEM_N, size=batch).astype(np.int32),
        "cid": rng.integers(1, CATE_N, size=batch).astype(np.int32),
        "hist_iid": hist_iid.astype(np.int32),
        "hist_cid": hist_cid.astype(np.int32),
    }


def setup(name, seed=0, **overrides):
    cfg = make_cfg(name, **overrides)
    model = TwoStageModel(cfg, ITEM_N, CATE_N, LENGTH)
    batch = make_batch(seed)
    variables = model.init(jax.random.PRNGKey(seed), batch)
    return cfg, model, batch, variables


def np_vectors(variables, group, item, cate, time):
    """Numpy [item | category | time] vectors from the tables."""
    t = {k: np.asarray(v) for k, v in variables["params"]["embed"][group].items()}
    return np.concatenate([t["item"][item], t["category"][cate], t["time"][time]], axis=-1)


def np_history_vectors(variables, group, batch):
    length = batch["hist_iid"].shape[1]
    times = np.broadcast_to(length - np.arange(length), batch["hist_iid"].shape)
    return np_vectors(variables, group, batch["hist_iid"], batch["hist_cid"], times)


def np_target_vectors(variables, group, batch):
    return np_vectors(variables, group, batch["iid"], batch["cid"], np.zeros_like(batch["iid"]))


def np_scores(q, keys, split=16):
    d_sem = q.shape[-1] - split
    sem = np.einsum("bd,bld->bl", q[:, :d_sem], keys[..., :d_sem]) / math.sqrt(d_sem)
    tim = np.einsum("bd,bld->bl", q[:, d_sem:], keys[..., d_sem:]) / math.sqrt(split)
    return sem + tim


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- hashing


def np_signature_bits(vectors, planes):
    return np.einsum("...d,md->...m", vectors, planes) > 0


def np_pack(bits):
    """Plain-Python packing: bit i of the signature -> word i // 32, bit i % 32."""
    flat = bits.reshape(-1, bits.shape[-1])
    words = -(-bits.shape[-1] // 32)
    out = np.zeros((flat.shape[0], words), np.uint64)
    for r, row in enumerate(flat):
        for i, bit in enumerate(row):
            if bit:
                out[r, i // 32] += 1 << (i % 32)
    return out.reshape(bits.shape[:-1] + (words,)).astype(np.uint32)


@pytest.mark.parametrize("num_bits", [32, 20, 48])
def test_signatures_and_hamming_distance_match_numpy(num_bits):
    rng = np.random.default_rng(num_bits)
    planes = np.asarray(eta.random_hyperplanes(num_bits, 10, seed=3))
    assert planes.shape == (num_bits, 10) and abs(planes.std() - 1) < 0.35  # Gaussian, fixed
    np.testing.assert_array_equal(planes, np.asarray(eta.random_hyperplanes(num_bits, 10, 3)))
    hist = rng.normal(size=(3, 9, 10)).astype(np.float32)
    target = rng.normal(size=(3, 10)).astype(np.float32)
    bits_h, bits_t = np_signature_bits(hist, planes), np_signature_bits(target, planes)
    packed_h = np.asarray(eta.signatures(jnp.asarray(hist), jnp.asarray(planes)))
    packed_t = np.asarray(eta.signatures(jnp.asarray(target), jnp.asarray(planes)))
    assert packed_h.dtype == np.uint32 and packed_h.shape == (3, 9, -(-num_bits // 32))
    np.testing.assert_array_equal(packed_h, np_pack(bits_h))
    np.testing.assert_array_equal(packed_t, np_pack(bits_t))
    distance = np.asarray(eta.hamming_distance(jnp.asarray(packed_h), jnp.asarray(packed_t)))
    np.testing.assert_array_equal(distance, (bits_h != bits_t[:, None, :]).sum(-1))


def np_hamming_top_k(distance, valid, k):
    """Oracle: valid first, smaller distance first, then the more recent position."""
    out = []
    for d, v in zip(distance, valid):
        order = sorted(range(len(d)), key=lambda j: (not v[j], d[j] if v[j] else 0, -j))
        out.append(order[:k])
    return np.array(out)


def test_hamming_top_k_matches_sorting_oracle():
    rng = np.random.default_rng(1)
    distance = rng.integers(0, 6, size=(20, 15))  # many ties
    valid = rng.random((20, 15)) < 0.7
    valid[0] = False
    valid[0, :2] = True  # fewer valid than k
    got = np.asarray(eta.hamming_top_k(jnp.asarray(distance), jnp.asarray(valid), 5, 32))
    want = np_hamming_top_k(distance, valid, 5)
    for row in range(20):
        n_valid = min(5, valid[row].sum())
        np.testing.assert_array_equal(got[row, :n_valid], want[row, :n_valid])


def test_eta_model_features_equal_numpy_recomputation():
    cfg, model, batch, variables = setup("eta", hash_bits=40, search_chunk=5)
    out = model.apply(variables, batch)
    keys = np_history_vectors(variables, "shared", batch)
    q = np_target_vectors(variables, "shared", batch)
    planes = np.asarray(eta.random_hyperplanes(40, q.shape[-1], 0))
    distance = (np_signature_bits(keys, planes) != np_signature_bits(q, planes)[:, None]).sum(-1)
    valid = batch["hist_iid"] > 0
    np.testing.assert_array_equal(out["hamming_distance"], distance)
    want_idx = np_hamming_top_k(distance, valid, TOP_K)
    np.testing.assert_array_equal(out["topk_indices"], want_idx)
    scores = np.where(valid, np_scores(q, keys), PADDING_SCORE)
    kept = np.take_along_axis(scores, want_idx, 1)
    kept_keys = np.take_along_axis(keys, want_idx[..., None], 1)
    retrieved = np.einsum("bk,bkd->bd", softmax(kept), kept_keys)
    np.testing.assert_allclose(out["representation"][:, 48:96], retrieved, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["attention_scores"], scores, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- SDIM


def test_sdim_bucket_codes_and_pooling_match_plain_python():
    rng = np.random.default_rng(2)
    planes = np.asarray(eta.random_hyperplanes(12, 5, seed=1))
    hist = rng.normal(size=(2, 30, 5)).astype(np.float32)
    target = rng.normal(size=(2, 5)).astype(np.float32)
    values = rng.normal(size=(2, 30, 4)).astype(np.float32)
    valid = rng.random((2, 30)) < 0.8
    codes_h = np.asarray(sdim.bucket_codes(jnp.asarray(hist), jnp.asarray(planes), 3))
    codes_t = np.asarray(sdim.bucket_codes(jnp.asarray(target), jnp.asarray(planes), 3))
    want = np.zeros((2, 4, 4), np.float64)
    for b in range(2):
        for g in range(4):
            t_code = sum(int(target[b] @ planes[g * 3 + i] > 0) << i for i in range(3))
            assert codes_t[b, g] == t_code
            for j in range(30):
                code = sum(int(hist[b, j] @ planes[g * 3 + i] > 0) << i for i in range(3))
                assert codes_h[b, j, g] == code
                if valid[b, j] and code == t_code:
                    want[b, g] += values[b, j]
    matches = sdim.bucket_matches(jnp.asarray(codes_h), jnp.asarray(codes_t), jnp.asarray(valid))
    sums = np.einsum("blg,bld->bgd", np.asarray(matches, np.float32), values)
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=1e-5)
    pooled = np.asarray(sdim.normalised_group_average(jnp.asarray(sums)))
    want_pooled = np.zeros((2, 4))
    for b in range(2):
        for g in range(4):
            norm = math.sqrt(sum(x * x for x in want[b, g]))
            want_pooled[b] += (want[b, g] / norm if norm > 0 else 0) / 4
    np.testing.assert_allclose(pooled, want_pooled, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="groups of 5"):
        sdim.bucket_codes(jnp.asarray(hist), jnp.asarray(planes), 5)


@pytest.mark.parametrize("decoupled", [False, True])
def test_sdim_model_equals_plain_pooling(decoupled):
    cfg, model, batch, variables = setup("sdim", search_chunk=7, decoupled_tables=decoupled)
    out = model.apply(variables, batch)
    att, rep = ("attention", "representation") if decoupled else ("shared", "shared")
    keys = np_history_vectors(variables, att, batch)
    values = np_history_vectors(variables, rep, batch)
    q = np_target_vectors(variables, att, batch)
    planes = np.asarray(eta.random_hyperplanes(48, q.shape[-1], 0))
    bits_h, bits_t = np_signature_bits(keys, planes), np_signature_bits(q, planes)
    valid = batch["hist_iid"] > 0
    retrieved = np.zeros((BATCH, values.shape[-1]))
    for b in range(BATCH):
        for g in range(16):
            same = [j for j in range(LENGTH) if valid[b, j] and
                    (bits_h[b, j, 3 * g:3 * g + 3] == bits_t[b, 3 * g:3 * g + 3]).all()]
            total = values[b, same].sum(0) if same else np.zeros(values.shape[-1])
            norm = np.linalg.norm(total)
            retrieved[b] += (total / norm if norm > 0 else total) / 16
    np.testing.assert_allclose(out["representation"][:, 48:96], retrieved, rtol=1e-4, atol=1e-5)
    assert "aux_prob" not in out


# ----------------------------------------------------------------------------- TWIN-V2


def cluster(x, valid, max_size, iterations=3):
    """The model's clustering of each row: balanced bisection of the principal sketch."""
    from dare_jax.models.search import History

    def one(xu, vu):
        history = History({"valid": vu, "x": xu}, lambda p, role: p["x"], None, 0)
        sketch = twin_v2.principal_sketch(history)
        return twin_v2.balanced_bisection(sketch, vu, max_size, iterations)

    return np.asarray(jax.vmap(one)(jnp.asarray(x), jnp.asarray(valid)))


@pytest.mark.slow
def test_clustering_invariants():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 60, 12)).astype(np.float32)
    x[1] = x[1, :1]  # identical vectors must still be split
    valid = rng.random((5, 60)) < 0.85
    valid[2] = False
    valid[3, :55] = False
    x[4, :, 5:] = 0.0  # fewer principal directions than the sketch has
    labels = cluster(x, valid, 8)
    levels = math.ceil(math.log2(60 / 8))
    clusters = 2**levels
    assert labels.shape == (5, 60)
    for b in range(5):
        # every valid behaviour in exactly one cluster; padding in none
        assert ((labels[b] >= 0) & (labels[b] < clusters) == valid[b]).all()
        assert (labels[b][~valid[b]] == clusters).all()
        counts = np.bincount(labels[b][valid[b]], minlength=clusters)
        assert counts.sum() == valid[b].sum() and counts.max(initial=0) <= 8


def test_clustering_recovers_separated_groups():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(4, 16)) * 50
    members = rng.permutation(np.repeat(np.arange(4), 8))
    x = (centres[members] + rng.normal(size=(32, 16))).astype(np.float32)[None]
    labels = cluster(x, np.ones((1, 32), bool), 8)[0]
    for c in range(4):  # each cluster is exactly one group
        assert len(set(members[labels == c])) == 1 and (labels == c).sum() == 8


def test_radix_select_matches_a_stable_sort():
    rng = np.random.default_rng(5)
    values = np.round(rng.normal(size=(50, 16)), 1).astype(np.float32)  # many ties
    values[0] = np.inf  # all padding
    values[1, :5] = np.inf
    values[2] = -0.0
    values[2, ::2] = 0.0  # -0.0 orders below 0.0
    counts = rng.integers(0, 17, size=50)
    chosen = np.asarray(twin_v2.smallest(jnp.asarray(values), jnp.asarray(counts)))
    for row, count, got in zip(values, counts, chosen):
        order = sorted(range(16), key=lambda j: (row[j], np.signbit(row[j]) == 0, j))
        assert set(np.flatnonzero(got)) == set(order[:count])


def test_principal_sketch_spans_the_top_principal_directions():
    rng = np.random.default_rng(6)
    basis, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    scales = np.array([30.0, 20, 15, 12, 10, 8, 7, 6] + [0.1] * 12)
    x = ((rng.normal(size=(300, 20)) * scales) @ basis.T).astype(np.float32)
    valid = np.ones(300, bool)
    from dare_jax.models.search import History

    positions = {"valid": jnp.asarray(valid), "x": jnp.asarray(x)}
    history = History(positions, lambda p, role: p["x"], None, 0)
    sketch = np.asarray(twin_v2.principal_sketch(history), np.float64)
    # The sketch's coordinates are x's projection on an orthonormal basis of the top-8
    # subspace: distances between behaviours are (almost) preserved.
    centred = x - x.mean(0)
    kept_variance = np.sum((sketch - sketch.mean(0)) ** 2) / np.sum(centred**2)
    assert kept_variance > 0.999
    d_sketch = np.linalg.norm(sketch[:50, None] - sketch[None, :50], axis=-1)
    d_full = np.linalg.norm(x[:50, None] - x[None, :50], axis=-1)
    np.testing.assert_allclose(d_sketch, d_full, rtol=0.02, atol=0.5)


@pytest.mark.slow
def test_twin_v2_cluster_scores_carry_the_log_size_bias():
    cfg, model, batch, variables = setup("twin_v2", cluster_max_size=4)
    out = model.apply(variables, batch)
    labels, sizes = np.asarray(out["cluster_ids"]), np.asarray(out["cluster_sizes"])
    clusters = sizes.shape[1]
    assert clusters == 2 ** math.ceil(math.log2(LENGTH / 4))
    keys = np_history_vectors(variables, "shared", batch)
    q = np_target_vectors(variables, "shared", batch)
    for b in range(BATCH):
        valid = batch["hist_iid"][b] > 0
        np.testing.assert_array_equal(sizes[b], np.bincount(labels[b][valid], minlength=clusters))
        assert sizes[b].max() <= 4
        means = np.zeros((clusters, keys.shape[-1]))
        for c in range(clusters):
            got = out["attention_scores"][b, c]
            if sizes[b, c] == 0:
                assert got == np.float32(PADDING_SCORE)
                continue
            means[c] = keys[b][labels[b] == c].mean(0)
            want = np_scores(q[b : b + 1], means[c][None, None])[0, 0] + math.log(sizes[b, c])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        # The retrieved feature: softmax over the top-k cluster scores, weighted cluster means
        # (keys and values are the same shared-table vectors).
        scores = np.asarray(out["attention_scores"][b], np.float64)
        top = np.argsort(-scores, kind="stable")[:TOP_K]
        np.testing.assert_array_equal(np.sort(out["topk_indices"][b]), np.sort(top))
        retrieved = softmax(scores[top]) @ means[top]
        np.testing.assert_allclose(out["representation"][b, 48:96], retrieved, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- gradients


def table_grads(model, variables, batch):
    def loss(params):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            batch, train=True, mutable=["batch_stats"],
        )
        return jnp.mean(jnp.log(out["prob"][:, 0]))

    return jax.grad(loss)(variables["params"])["embed"]


@pytest.mark.parametrize("name", ["eta", "sdim", "twin_v2"])
def test_gradients_reach_embeddings(name):
    cfg, model, batch, variables = setup(name, decoupled_tables=True)
    grads = table_grads(model, variables, batch)
    for group in ("representation",) + (() if name == "sdim" else ("attention",)):
        assert float(jnp.abs(grads[group]["item"]).sum()) > 0, group
    if name == "sdim":  # attention tables only feed the hash: no gradient through it
        assert float(jnp.abs(grads["attention"]["item"]).sum()) == 0


def test_eta_gradient_only_through_the_kept_behaviours():
    """Without the aux head, an item neither target nor among the k kept gets no gradient:
    the Hamming selection passes none (if it did, every history item would get some)."""
    cfg, model, batch, variables = setup("eta", use_aux_loss=False)
    grads = np.asarray(table_grads(model, variables, batch)["shared"]["item"])
    out = model.apply(variables, batch)
    kept = np.take_along_axis(batch["hist_iid"], np.asarray(out["topk_indices"]), 1)
    touched = set(kept[kept > 0].tolist()) | set(batch["iid"].tolist())
    others = sorted(set(batch["hist_iid"][batch["hist_iid"] > 0].tolist()) - touched)
    assert others, "test batch must have history items outside the top-k"
    assert np.abs(grads[others]).sum() == 0
    assert all(np.abs(grads[i]).sum() > 0 for i in set(kept[kept > 0].tolist()))
