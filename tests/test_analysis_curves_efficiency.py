"""Training curves (from metrics.jsonl) and efficiency (measured search time, AUC vs attention
width): values against the files, refusals, figures."""

import json

import numpy as np
import pytest
from analysis_support import tiny_runs

from analysis import common
from analysis.efficiency import attention_dims, efficiency, measure_search_time
from analysis.training_curves import first_step_reaching, read_validation, training_curves


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.getbasetemp() / "analysis_runs")


def test_training_curves_follow_metrics_files(runs, tmp_path):
    report = training_curves(runs, tmp_path, accuracy_thresholds=(0.5, 0.99))
    for name, run_dir in runs.items():
        records = [
            json.loads(line)
            for line in (run_dir / "seed_0" / "metrics.jsonl").read_text().splitlines()
        ]
        val = [r for r in records if r["split"] == "val"]
        seed = report["runs"][name]["seeds"]["seed_0"]
        assert seed["step"].tolist() == [r["step"] for r in val]
        assert seed["auc"].tolist() == [r["auc"] for r in val]
        assert seed["best_auc"] == max(r["auc"] for r in val)
        assert seed["steps_to_accuracy"]["0.5"] == next(
            r["step"] for r in val if r["accuracy"] >= 0.5
        )
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert (tmp_path / "training_curves.json").stat().st_size > 0


def test_read_validation_refusals(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(common.AnalysisError, match="not found"):
        read_validation(path)
    good = {"step": 5, "split": "val", "auc": 0.6, "accuracy": 0.7, "log_loss": 0.5}
    path.write_text(json.dumps(good) + "\n" + '{"step": 10, "spl')  # torn last line: skipped
    assert read_validation(path)["step"].tolist() == [5]
    path.write_text('{"oops"\n' + json.dumps(good) + "\n")
    with pytest.raises(common.AnalysisError, match="line 1"):
        read_validation(path)
    path.write_text(json.dumps({"step": 5, "split": "train", "total": 1.0}) + "\n")
    with pytest.raises(common.AnalysisError, match="no validation record"):
        read_validation(path)
    assert first_step_reaching(np.array([1, 2, 3]), np.array([0.1, 0.95, 0.2]), 0.9) == 2
    assert first_step_reaching(np.array([1]), np.array([0.1]), 0.9) is None


def test_attention_dims_from_config():
    flat = {
        "model.item_embedding_dim": 16,
        "model.category_embedding_dim": 16,
        "model.time_embedding_dim": 16,
        "model.attention_item_embedding_dim": 8,
        "model.attention_category_embedding_dim": -1,
        "model.attention_time_embedding_dim": 4,
        "model.use_time": True,
    }
    assert attention_dims(flat) == {"item": 8, "category": 16, "time": 4}
    with pytest.raises(common.AnalysisError, match="model.item_embedding_dim"):
        attention_dims({})


def test_efficiency_report(runs, tmp_path):
    report = efficiency(
        runs, tmp_path, batch_size=64, repeats=2, extra_widths=(24,), progress=False
    )
    for name, run_dir in runs.items():
        results = json.loads((run_dir / "results.json").read_text())
        assert report["runs"][name]["test_auc_mean"] == results["mean"]["auc"]
        assert report["runs"][name]["attention_width"] == 12
    assert sorted(t["attention_width"] for t in report["search_time"]) == [12, 24]
    assert all(t["milliseconds"] > 0 for t in report["search_time"])
    assert (tmp_path / "efficiency.png").stat().st_size > 0
    assert measure_search_time(8, 4, batch_size=8, length=10, top_k=3, repeats=1) > 0
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    with pytest.raises(common.AnalysisError, match="results.json"):
        efficiency({"x": tmp_path / "unfinished"}, tmp_path, progress=False)
