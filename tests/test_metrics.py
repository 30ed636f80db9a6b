"""Metrics against independent oracles: scikit-learn and plain-Python pair counts."""

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from dare_jax import metrics


def _pairwise_auc(labels, scores):
    """AUC by counting every (positive, negative) pair; ties count 1/2."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return None
    wins = 0.0
    for p, n in itertools.product(pos, neg):
        wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def _python_grouped_auc(labels, scores, groups):
    """Plain-Python weighted group AUC: per-group pair counts, one-class groups skipped."""
    by_group = {}
    for y, s, g in zip(labels, scores, groups):
        by_group.setdefault(g, ([], []))
        by_group[g][0].append(y)
        by_group[g][1].append(s)
    total, weight = 0.0, 0
    for ys, ss in by_group.values():
        value = _pairwise_auc(ys, ss)
        if value is None:
            continue
        total += value * len(ys)
        weight += len(ys)
    return total / weight


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=3000)
    # Coarse scores: many ties, inside and across classes.
    scores = np.round(rng.random(3000) * 0.5 + 0.3 * labels, 2)
    assert metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_small_cases_by_hand():
    assert metrics.auc([0, 1], [0.2, 0.9]) == 1.0
    assert metrics.auc([0, 1], [0.9, 0.2]) == 0.0
    assert metrics.auc([0, 1, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert metrics.auc([1, 0, 0], [0.4, 0.4, 0.1]) == pytest.approx(0.75)
    assert math.isnan(metrics.auc([1, 1], [0.1, 0.2]))


def test_log_loss_and_accuracy_match_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=1000)
    probs = rng.uniform(0.01, 0.99, size=1000)
    assert metrics.log_loss(labels, probs) == pytest.approx(
        sk_log_loss(labels, probs, labels=[0, 1]), rel=1e-10
    )
    expected_acc = np.mean([(p >= 0.5) == bool(y) for y, p in zip(labels, probs)])
    assert metrics.accuracy(labels, probs) == pytest.approx(expected_acc)
    # The 0.5 tie is a click (argmax over [p, 1 - p] picks column 0).
    assert metrics.accuracy([1, 0], [0.5, 0.5]) == 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_auc_matches_plain_python(seed):
    rng = np.random.default_rng(seed)
    n = 600
    groups = rng.integers(0, 40, size=n) * 7 - 50  # unsorted, negative ids too
    labels = rng.integers(0, 2, size=n)
    labels[groups == groups[0]] = 1  # at least one one-class group to skip
    scores = np.round(rng.random(n) + 0.2 * labels, 1)  # heavy ties
    value, used, samples = metrics.grouped_auc(labels, scores, groups)
    assert value == pytest.approx(_python_grouped_auc(labels, scores, groups), abs=1e-12)
    one_class = {g for g in set(groups) if len(set(labels[groups == g])) == 1}
    assert used == len(set(groups)) - len(one_class)
    assert samples == sum(int((groups == g).sum()) for g in set(groups) - one_class)


def test_ctr_metrics_gauc_and_category_auc():
    rng = np.random.default_rng(5)
    n = 400
    users = rng.integers(1, 30, size=n)
    cates = rng.integers(1, 12, size=n)
    labels = rng.integers(0, 2, size=n)
    probs = np.round(rng.random(n), 2)
    out = metrics.ctr_metrics(labels, probs, users, cates)
    assert out["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert out["gauc"] == pytest.approx(_python_grouped_auc(labels, probs, users))
    assert out["category_auc"] == pytest.approx(_python_grouped_auc(labels, probs, cates))
    assert out["num_samples"] == n


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        metrics.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.log_loss([0, 1], [0.1, float("nan")])
