"""Exact, vectorised evaluation metrics for click-through-rate prediction, on the host over
numpy arrays of the whole evaluation split (no sampling, no dropped last batch):

- AUC: the Mann-Whitney rank statistic; tied scores get their average rank, so a tie
  between a positive and a negative counts one half (as scikit-learn's `roc_auc_score`).
- grouped AUC (GAUC by user, category AUC): the AUC inside each group, for all groups at
  once from one lexicographic sort; groups with one class only are skipped, the others
  averaged with weights equal to their sample count (the usual GAUC, as in the DIN paper).
- log loss: mean negative log-likelihood of the true class, probabilities clipped to
  [1e-7, 1 - 1e-7] (they are float32 on the device; nothing finer is meaningful).
- accuracy: a click is predicted when its probability is at least 0.5, which is what
  `argmax` over `[p_click, p_no_click]` gives (ties go to the click).
"""

from __future__ import annotations

import numpy as np

LOG_LOSS_EPS = 1e-7


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"labels must be 0 or 1, found {labels[bad][0]!r}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return labels.astype(np.int64), scores


def _average_ranks_within_groups(groups: np.ndarray, scores: np.ndarray) -> tuple:
    """1-based ranks of `scores` inside each group, tied scores averaged: (order,
    ranks_sorted, group_ids_sorted), where `order` sorts the samples by (group, score) and
    `ranks_sorted[i]` is the rank of sample `order[i]`."""
    order = np.lexsort((scores, groups))
    sorted_groups, sorted_scores = groups[order], scores[order]
    n = sorted_scores.size
    position = np.arange(n, dtype=np.float64)
    # Start of each group in the sorted order.
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = sorted_groups[1:] != sorted_groups[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, position, 0.0))
    # Runs of equal (group, score): a tie block. Its members share the mean of the ranks
    # they would occupy: (first + last) / 2.
    new_block = new_group.copy()
    new_block[1:] |= sorted_scores[1:] != sorted_scores[:-1]
    block_id = np.cumsum(new_block) - 1
    block_first = position[new_block]
    block_last = np.append(block_first[1:] - 1, n - 1)
    mean_position = (block_first + block_last)[block_id] / 2.0
    ranks = mean_position - group_start + 1.0
    return order, ranks, sorted_groups


def grouped_auc(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> tuple[float, int, int]:
    """Sample-count-weighted mean of the per-group AUC of labels `[N]` (0/1, 1 = click),
    click scores `[N]` (probabilities or logits) and integer group ids `[N]`.

    Returns (weighted AUC, number of groups used, number of samples in them); groups of one
    class have no AUC and are skipped; the AUC is NaN when no group has both classes.
    """
    labels, scores = _check_binary(labels, scores)
    groups = np.asarray(groups).reshape(-1)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ in length")
    if labels.size == 0:
        return float("nan"), 0, 0
    order, ranks, sorted_groups = _average_ranks_within_groups(groups, scores)
    _, group_index = np.unique(sorted_groups, return_inverse=True)
    sorted_labels = labels[order]
    n_total = np.bincount(group_index)
    n_pos = np.bincount(group_index, weights=sorted_labels).astype(np.float64)
    n_neg = n_total - n_pos
    rank_sum_pos = np.bincount(group_index, weights=ranks * sorted_labels)
    usable = (n_pos > 0) & (n_neg > 0)
    if not usable.any():
        return float("nan"), 0, 0
    n_pos, n_neg, rank_sum_pos = n_pos[usable], n_neg[usable], rank_sum_pos[usable]
    auc = (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    weights = n_total[usable].astype(np.float64)
    return float(np.sum(auc * weights) / np.sum(weights)), int(usable.sum()), int(weights.sum())


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC of labels `[N]` (0/1) and scores `[N]` (ties count one half); NaN with
    one class."""
    labels = np.asarray(labels).reshape(-1)
    return grouped_auc(labels, scores, np.zeros(labels.shape, dtype=np.int64))[0]


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy of click probabilities `[N]` against labels `[N]`."""
    labels, probs = _check_binary(labels, probs)
    if labels.size == 0:
        return float("nan")
    p = np.clip(probs, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Share of samples whose `probs >= 0.5` agrees with the label."""
    labels, probs = _check_binary(labels, probs)
    if labels.size == 0:
        return float("nan")
    return float(np.mean((probs >= 0.5).astype(np.int64) == labels))


def ctr_metrics(
    labels: np.ndarray, probs: np.ndarray, users: np.ndarray, categories: np.ndarray
) -> dict[str, float]:
    """All evaluation metrics of one split from labels `[N]` (0/1), click probabilities `[N]`,
    each sample's user id `[N]` (GAUC) and target category id `[N]` (category AUC): auc,
    log_loss, accuracy, gauc, category_auc, num_samples, gauc_users and
    category_auc_categories (the groups that had both classes)."""
    gauc, gauc_groups, _ = grouped_auc(labels, probs, users)
    cate_auc, cate_groups, _ = grouped_auc(labels, probs, categories)
    return {
        "auc": auc(labels, probs), "log_loss": log_loss(labels, probs),
        "accuracy": accuracy(labels, probs), "gauc": gauc, "category_auc": cate_auc,
        "num_samples": int(np.asarray(labels).size), "gauc_users": gauc_groups,
        "category_auc_categories": cate_groups,
    }
