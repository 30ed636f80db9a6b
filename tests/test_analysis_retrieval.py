"""Retrieval quality: NDCG and hits on a hand-worked example, the planted rule beats random
search on synthetic data, filters, and the analysis on trained runs."""

import dataclasses
import types
import json
import math

import numpy as np
import pytest
from analysis_support import loaded_runs, tiny_data

from analysis import common
from analysis.mutual_information import count_ground_truth
from analysis.retrieval import (
    RetrievalFilters,
    baseline_scores,
    retrieval_analysis,
    retrieval_metrics,
    retrieval_quality,
    sample_filter,
)
from dare_jax.data import open_dataset

PAD = -(2.0**32) + 1


def test_ndcg_and_hits_hand_worked_example():
    # History of 5 behaviours (index 4 is padding). Ground-truth MI: 0.1, 0, 0.3, 0.2.
    # Ground-truth top-2 = {index 2 (0.3), index 3 (0.2)}.
    mi = np.array([[0.1, 0.0, 0.3, 0.2, np.nan]])
    valid = np.array([[True, True, True, True, False]])
    # The model ranks index 3, then 0, then 2, then 1.
    scores = np.array([[0.8, 0.1, 0.5, 0.9, PAD]])
    hits, ndcg = retrieval_metrics(scores, mi, valid, k_max=4, gt_k=2)
    assert hits[0].tolist() == [1, 1, 2, 2]
    # DCG@1 = 0.2; IDCG@1 = 0.3.  DCG@2 = 0.2 + 0 / log2(3); IDCG@2 = 0.3 + 0.2 / log2(3).
    # DCG@3 = 0.2 + 0.3 / log2(4) = 0.35; IDCG@3 = IDCG@2 (only two relevant behaviours).
    idcg2 = 0.3 + 0.2 / math.log2(3)
    expected = [0.2 / 0.3, 0.2 / idcg2, 0.35 / idcg2, 0.35 / idcg2]
    assert ndcg[0] == pytest.approx(expected)
    # Binary relevance: gains 1 for the two relevant ones.
    _, binary = retrieval_metrics(scores, mi, valid, k_max=3, gt_k=2, relevance="binary")
    assert binary[0] == pytest.approx(
        [1.0, 1.0 / (1 + 1 / math.log2(3)), (1 + 0.5) / (1 + 1 / math.log2(3))]
    )
    # A perfect ranking scores 1 at every k; no relevant behaviour gives NaN, not 0.
    _, perfect = retrieval_metrics(np.nan_to_num(mi, nan=PAD), mi, valid, k_max=4, gt_k=2)
    assert perfect[0] == pytest.approx([1, 1, 1, 1])
    _, empty = retrieval_metrics(scores, np.zeros_like(mi), valid, k_max=2, gt_k=2)
    assert np.isnan(empty).all()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    dataset = open_dataset(tiny_data(tmp_path_factory.getbasetemp() / "analysis_runs"))
    truth = count_ground_truth(dataset, split="train", max_length=30, progress=False)
    batch = dataset.gather("test", np.arange(dataset.num_samples("test")), 30)
    return dataset, truth, batch


def test_planted_rule_ranks_above_random_search(synthetic, tmp_path):
    _, truth, batch = synthetic
    scorers = {rule: baseline_scores(rule, batch) for rule in ("category_recency", "random")}
    report = retrieval_quality(
        scorers, batch, truth, tmp_path, k_max=10, gt_k=10, filters=RetrievalFilters(min_history=30)
    )
    planted, random = report["models"]["category_recency"], report["models"]["random"]
    assert planted["samples"] == random["samples"] > 30
    assert planted["ndcg@10"] > random["ndcg@10"] + 0.2
    assert np.all(np.asarray(planted["hits"]) >= np.asarray(random["hits"]))
    for name in (
        "retrieval.json",
        "retrieval_curves.png",
        "retrieval_case_0.png",
        "retrieval_case_1.png",
        "retrieval_per_sample.npz",
    ):
        assert (tmp_path / name).stat().st_size > 0


def test_filters(synthetic):
    _, truth, batch = synthetic
    mi = truth.lookup(batch["cid"], batch["hist_cid"].astype(np.int64))
    everything = RetrievalFilters(positives_only=False, min_history=0, min_relevant=0)
    assert sample_filter(batch, mi, everything).all()
    clicked = sample_filter(batch, mi, dataclasses.replace(everything, positives_only=True))
    assert np.array_equal(clicked, batch["label"] == 1)
    in_history = sample_filter(
        batch, mi, dataclasses.replace(everything, target_category_in_history=True)
    )
    expected = [
        (batch["cid"][i] == batch["hist_cid"][i][batch["hist_iid"][i] > 0]).any()
        for i in range(len(batch["cid"]))
    ]
    assert in_history.tolist() == expected
    with pytest.raises(common.AnalysisError, match="passes the filters"):
        retrieval_quality(
            {"r": baseline_scores("random", batch)},
            batch,
            truth,
            "/tmp/unused",
            filters=RetrievalFilters(min_history=10**6),
        )


def test_retrieval_on_trained_runs(tmp_path_factory, tmp_path):
    runs = loaded_runs(tmp_path_factory.getbasetemp() / "analysis_runs")
    report = retrieval_analysis(
        runs,
        tmp_path,
        baselines=("category_recency", "random"),
        k_max=10,
        gt_k=10,
        filters=RetrievalFilters(min_history=30),
        progress=False,
    )
    assert set(report["models"]) == {"DARE", "TWIN", "category_recency", "random"}
    saved = json.loads((tmp_path / "retrieval.json").read_text())
    assert saved["models"]["DARE"]["samples"] == report["samples_kept"] > 0
    assert 0 <= saved["models"]["DARE"]["ndcg@10"] <= 1
    assert (tmp_path / "retrieval_curves.png").stat().st_size > 0
    # Runs with different history lengths are refused, naming the field.
    twin = runs["TWIN"]
    spec = twin.experiment.spec
    spec = spec.replace(data=dataclasses.replace(spec.data, max_length=20))
    shorter = types.SimpleNamespace(spec=spec, dataset=twin.dataset, model=twin.model)
    other = dataclasses.replace(twin, experiment=shorter)
    with pytest.raises(common.AnalysisError, match="data.max_length"):
        retrieval_analysis({"DARE": runs["DARE"], "TWIN": other}, tmp_path, progress=False)
