"""Gradient domination and conflict statistics against numpy, on the gradients the driver records
for a real `model=twin_observe_grad` run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from analysis_support import record_gradients, tiny_data
from conftest import REPO_ROOT

from analysis import common
from analysis.gradients import gradient_analysis, gradient_statistics


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    data_dir = tiny_data(tmp_path_factory.getbasetemp() / "analysis_runs")
    return record_gradients(data_dir, tmp_path_factory.mktemp("grad_run") / "twin_observe_grad")


def numpy_reference(directory, field):
    norms_a, norms_r, cosines, per_row = [], [], [], {}
    for path in sorted(directory.glob("step_*.npz")):
        with np.load(path) as data:
            a = data[f"attention.{field}"].astype(np.float64)
            r = data[f"representation.{field}"].astype(np.float64)
        norms_a.append(np.sqrt((a**2).sum()))
        norms_r.append(np.sqrt((r**2).sum()))
        for row in range(a.shape[0]):
            na, nr = np.linalg.norm(a[row]), np.linalg.norm(r[row])
            if na > 0 and nr > 0:
                cosine = a[row] @ r[row] / (na * nr)
                cosines.append(cosine)
                per_row.setdefault(row, []).append(cosine < 0)
    return np.array(norms_a), np.array(norms_r), np.array(cosines), per_row


@pytest.mark.parametrize("field", ["category", "time"])
def test_statistics_equal_numpy(recorded, field):
    stats = gradient_statistics(
        recorded, field=field, bins=10, min_steps_per_category=2, progress=False
    )
    norms_a, norms_r, cosines, per_row = numpy_reference(recorded, field)
    assert len(stats["steps"]) == 6 and len(cosines) > 0
    np.testing.assert_allclose(stats["attention_norm"], norms_a, rtol=1e-10)
    np.testing.assert_allclose(stats["representation_norm"], norms_r, rtol=1e-10)
    assert norms_a.min() > 0 and norms_r.min() > 0  # both paths really carry gradient
    assert stats["domination_ratio"] == pytest.approx(norms_r.mean() / norms_a.mean())
    assert stats["cosine_count"] == len(cosines)
    assert stats["negative_share"] == pytest.approx(np.mean(cosines < 0))
    assert stats["mean_cosine"] == pytest.approx(cosines.mean())
    hist, _ = np.histogram(cosines, bins=np.linspace(-1, 1, 11))
    assert stats["cosine_histogram"]["counts"].tolist() == hist.tolist()
    expected_rows = sorted(r for r, flags in per_row.items() if len(flags) >= 2)
    assert stats["category_ids"].tolist() == expected_rows
    assert stats["category_conflict_ratio"] == pytest.approx(
        [np.mean(per_row[r]) for r in expected_rows]
    )


def test_figures_json_and_cli(recorded, tmp_path):
    run_dir = recorded.parent.parent
    report = gradient_analysis(run_dir, tmp_path, fields=("category", "time"), progress=False)
    saved = json.loads((tmp_path / "gradients.json").read_text())
    assert saved["category"]["domination_ratio"] == pytest.approx(
        report["category"]["domination_ratio"]
    )
    for name in (
        "gradient_norms.png",
        "gradient_cosine_hist.png",
        "gradient_conflict_per_category.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis.gradients",
            "--run",
            str(run_dir),
            "--out",
            str(tmp_path / "cli"),
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "gradients.json").stat().st_size > 0


def test_refuses_missing_or_mismatched_gradients(tmp_path):
    with pytest.raises(common.AnalysisError, match="no recorded gradients folder"):
        gradient_statistics(tmp_path / "gradients")
    folder = tmp_path / "gradients"
    folder.mkdir()
    np.savez(folder / "step_00000001.npz", **{"attention.category": np.ones((3, 2))})
    with pytest.raises(common.AnalysisError, match="representation.category"):
        gradient_statistics(folder, progress=False)
    np.savez(
        folder / "step_00000001.npz",
        **{"attention.category": np.ones((3, 2)), "representation.category": np.ones((4, 2))},
    )
    with pytest.raises(common.AnalysisError, match="one shape"):
        gradient_statistics(folder, progress=False)
