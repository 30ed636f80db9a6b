"""Attention accuracy on trained runs: learned per-cell scores against a plain recomputation
from the model's own outputs, the figures and JSON."""

import json

import numpy as np
import pytest
from analysis_support import loaded_runs

from analysis import common
from analysis.attention_accuracy import (
    attention_accuracy,
    cell_matrix,
    embedding_attention,
    learned_cell_scores,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return loaded_runs(tmp_path_factory.getbasetemp() / "analysis_runs")


def test_learned_cell_scores_equal_plain_average(runs):
    run = runs["DARE"]
    target = int(np.bincount(np.asarray(run.dataset.array("train_cid"))).argmax())
    keys, mean, count = learned_cell_scores(
        run, [target], max_samples_per_target=200, progress=False
    )
    indices = np.flatnonzero(np.asarray(run.dataset.array("train_cid")) == target)[:200]
    out = common.collect_outputs(
        run, "train", ("attention_scores",), indices=indices, batch_size=64, progress=False
    )
    sums, counts = {}, {}
    length = run.max_length
    for i in range(len(indices)):
        for j in range(length):
            category = int(out["hist_cid"][i, j])
            if category == 0:
                continue
            cell = (category, length - j)
            sums[cell] = sums.get(cell, 0.0) + float(out["attention_scores"][i, j])
            counts[cell] = counts.get(cell, 0) + 1
    categories = sorted({c for c, _ in counts})[:12]
    matrix = cell_matrix(
        keys, mean, target, categories, length, int(run.dataset.manifest["cate_n"])
    )
    for row, category in enumerate(categories):
        for position in range(1, length + 1):
            if (category, position) in counts:
                expected = sums[category, position] / counts[category, position]
                assert matrix[row, position - 1] == pytest.approx(expected, rel=1e-5, abs=1e-6)
            else:
                assert np.isnan(matrix[row, position - 1])
    assert count.sum() == sum(counts.values())


def test_attention_accuracy_writes_heatmaps_and_json(runs, tmp_path):
    report = attention_accuracy(
        runs, tmp_path, num_targets=2, top_categories=8, max_samples_per_target=300, progress=False
    )
    assert len(report["targets"]) == 2
    saved = json.loads((tmp_path / "attention_accuracy.json").read_text())
    for entry in saved["targets"]:
        assert np.asarray(entry["ground_truth"]).shape == (len(entry["categories"]), 30)
        assert set(entry["learned"]) == {"DARE", "TWIN"}
        png = tmp_path / f"attention_heatmaps_target_{entry['target_category']}.png"
        assert png.stat().st_size > 0
        for name in ("DARE", "TWIN"):
            rho = entry["correlation"][name]["spearman"]
            assert rho is None or -1 <= rho <= 1
    with pytest.raises(common.AnalysisError, match="target categories"):
        attention_accuracy(runs, tmp_path, target_categories=[10**6], progress=False)


def test_embedding_attention_equals_exported_tables(runs):
    """The checkpoint's category+time score against the driver's exported .npy tables."""
    for name, run in runs.items():
        directory = run.seed_dir / "embeddings"
        group = "attention" if name == "DARE" else "shared"
        category = np.load(directory / f"embed.{group}.category.npy").astype(np.float64)
        time = np.load(directory / f"embed.{group}.time.npy").astype(np.float64)
        target, rows = 7, [3, 7, 11]
        got = embedding_attention(run, target, rows)
        for i, c in enumerate(rows):
            for p in range(1, run.max_length + 1):
                expected = category[target] @ category[c] / np.sqrt(8) + time[0] @ time[p] / 2
                assert got[i, p - 1] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_method_choice(runs, tmp_path):
    report = attention_accuracy(
        runs, tmp_path, num_targets=1, top_categories=5, method="scores", progress=False
    )
    assert report["methods"] == {"DARE": "scores", "TWIN": "scores"}
    auto = attention_accuracy(runs, tmp_path, num_targets=1, top_categories=5, progress=False)
    assert auto["methods"] == {"DARE": "embeddings", "TWIN": "embeddings"}
    with pytest.raises(common.AnalysisError, match="method"):
        attention_accuracy(runs, tmp_path, method="guess", progress=False)
