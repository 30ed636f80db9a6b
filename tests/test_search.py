"""Search and aggregation against independent oracles (numpy argsort, plain Python)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from dare_jax.models import search

PAD = np.float32(search.PADDING_SCORE)


def _numpy_soft_search(scores, mask, values, k):
    """Oracle: stable argsort of the masked scores, softmax over the k best, weighted sum."""
    masked = np.where(mask, scores, PAD).astype(np.float64)
    out = np.zeros((scores.shape[0], values.shape[-1]))
    chosen = np.zeros((scores.shape[0], k), dtype=np.int64)
    for b in range(scores.shape[0]):
        order = np.argsort(-masked[b], kind="stable")[:k]
        kept = masked[b, order]
        w = np.exp(kept - kept.max())
        w /= w.sum()
        out[b] = w @ values[b, order]
        chosen[b] = order
    return out, chosen


def _random_case(seed, batch=6, length=30, dim=5, ties=False):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(batch, length)).astype(np.float32)
    if ties:  # quantise so that many scores tie exactly
        scores = np.round(scores * 2) / 2
    values = rng.normal(size=(batch, length, dim)).astype(np.float32)
    valid_counts = rng.integers(0, length + 1, size=batch)
    valid_counts[0] = length  # a full row
    valid_counts[1] = 3  # fewer valid behaviours than k
    mask = np.arange(length)[None, :] >= (length - valid_counts)[:, None]  # left padding
    return scores, mask, values


@pytest.mark.parametrize("ties", [False, True])
def test_soft_search_matches_numpy_argsort_oracle(ties):
    k = 8
    scores, mask, values = _random_case(1 if ties else 0, ties=ties)
    masked = search.mask_scores(scores, mask)
    indices = search.soft_search_indices(masked, k)
    ours = np.asarray(search.aggregate_selected(masked, values, indices))
    expected, chosen = _numpy_soft_search(scores, mask, values, k)
    # Ties are broken towards the lower position, as a stable argsort does.
    np.testing.assert_array_equal(np.asarray(indices), chosen)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_padding_gets_padding_score_and_zero_weight():
    scores, mask, values = _random_case(2)
    masked = np.asarray(search.mask_scores(scores, mask))
    assert np.all(masked[~mask] == PAD)
    np.testing.assert_array_equal(masked[mask], scores[mask])
    # Row 1 has only 3 valid behaviours but k = 8: the aggregate uses only those 3.
    k = 8
    indices = search.soft_search_indices(masked, k)
    ours = np.asarray(search.aggregate_selected(masked, values, indices))[1]
    valid = np.flatnonzero(mask[1])
    w = np.exp(scores[1, valid] - scores[1, valid].max())
    np.testing.assert_allclose(ours, (w / w.sum()) @ values[1, valid], rtol=1e-5, atol=1e-6)


def test_full_attention_is_softmax_over_valid_positions():
    scores, mask, values = _random_case(3)
    ours = np.asarray(search.full_attention(search.mask_scores(scores, mask), values))
    for b in range(scores.shape[0]):
        valid = np.flatnonzero(mask[b])
        if len(valid) == 0:
            continue
        w = np.exp(scores[b, valid] - scores[b, valid].max())
        np.testing.assert_allclose(ours[b], (w / w.sum()) @ values[b, valid], rtol=1e-5, atol=1e-6)


def test_search_is_one_batched_computation_under_jit():
    traces = []

    @jax.jit
    def run(s, m, v):
        traces.append(1)
        masked = search.mask_scores(s, m)
        return search.aggregate_selected(masked, v, search.soft_search_indices(masked, 5))

    for seed in range(3):
        s, m, v = _random_case(seed)
        run(s, m, v)
    assert len(traces) == 1


def test_dot_product_scores_split_semantic_and_time():
    rng = np.random.default_rng(5)
    q = rng.normal(size=(2, 7)).astype(np.float32)
    keys = rng.normal(size=(2, 4, 7)).astype(np.float32)
    ours = np.asarray(search.dot_product_scores(q, keys, split=3))
    expected = np.einsum("bd,bld->bl", q[:, :4], keys[:, :, :4]) / 2.0 + np.einsum(
        "bd,bld->bl", q[:, 4:], keys[:, :, 4:]
    ) / math.sqrt(3)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    whole = np.asarray(search.dot_product_scores(q, keys, split=None))
    np.testing.assert_allclose(whole, np.einsum("bd,bld->bl", q, keys) / math.sqrt(7), rtol=1e-5)


def _python_hard_selection(valid_row, same_row, k):
    """The SIM-style rule, written out: same category most recent first, then other valid."""
    length = len(valid_row)
    same = [j for j in reversed(range(length)) if valid_row[j] and same_row[j]]
    other = [j for j in reversed(range(length)) if valid_row[j] and not same_row[j]]
    return set((same + other)[:k])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_search_matches_plain_python_rule(seed):
    rng = np.random.default_rng(seed)
    batch, length, k = 16, 40, 6
    categories = rng.integers(1, 4, size=(batch, length))
    target_category = rng.integers(1, 4, size=batch)
    valid_counts = rng.integers(0, length + 1, size=batch)
    valid_counts[:3] = [length, 2, 0]  # full, fewer than k, empty
    valid = np.arange(length)[None, :] >= (length - valid_counts)[:, None]
    same = categories == target_category[:, None]
    indices, selected = search.hard_search_indices(valid, same, k)
    indices, selected = np.asarray(indices), np.asarray(selected)
    assert indices.shape == (batch, k)
    for b in range(batch):
        expected = _python_hard_selection(valid[b], same[b], k)
        assert set(np.flatnonzero(selected[b])) == expected
        assert expected <= set(indices[b])  # leftover slots (if any) are padding positions
        assert len(set(indices[b])) == k


def test_hard_search_aggregate_ignores_padding_slots():
    valid = np.array([[False, False, False, True, True]])
    same = np.array([[False, False, False, True, False]])
    indices, selected = search.hard_search_indices(valid, same, 4)
    scores = np.array([[5.0, 4.0, 3.0, 0.5, 0.1]], np.float32)
    values = np.eye(5, dtype=np.float32)[None]
    masked = search.mask_scores(scores, selected)
    out = np.asarray(search.aggregate_selected(masked, values, indices))[0]
    w = np.exp(np.array([0.5, 0.1]) - 0.5)
    np.testing.assert_allclose(out[3:], w / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(out[:3], 0.0, atol=1e-7)
