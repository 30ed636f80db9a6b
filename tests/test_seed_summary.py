"""analysis.seed_summary against means and sample stds computed by hand on small JSON files."""

from __future__ import annotations

import json
import math

import pytest

from analysis import seed_summary


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _retrieval(ndcg: dict[str, float], kept: int) -> dict:
    """The fields of retrieval.json that the summary reads (plus a few it ignores)."""
    return {
        "k_max": 20,
        "split": "test",
        "samples_kept": kept,
        "models": {name: {"k": list(range(1, 21)), "ndcg@20": v} for name, v in ndcg.items()},
    }


def _gradients(negative_share: float, ratio: float) -> dict:
    return {"category": {"negative_share": negative_share, "domination_ratio": ratio}}


@pytest.fixture
def root(tmp_path):
    """Seeds 0, 1, 2; seed 1 has no gradients.json, seed 2's TWIN Spearman is null."""
    root = tmp_path / "out"
    ndcg = {0: (0.50, 0.40), 1: (0.56, 0.44), 2: (0.53, 0.48)}
    spearman = {0: (0.10, 0.04), 1: (0.08, 0.05), 2: (0.06, None)}
    for seed in (0, 1, 2):
        dare, twin = ndcg[seed]
        _write(
            root / f"{seed}/retrieval/retrieval.json",
            _retrieval({"DARE": dare, "TWIN": twin, "random": 0.07}, 7000 + seed),
        )
        dare, twin = spearman[seed]
        _write(
            root / f"{seed}/attention/attention_accuracy.json",
            {"mean_spearman": {"DARE": dare, "TWIN": twin}},
        )
    _write(root / "0/gradients/gradients.json", _gradients(0.40, 2.0))
    _write(root / "2/gradients/gradients.json", _gradients(0.50, 1.7))
    (root / "notes").mkdir()  # not a seed folder: ignored
    return root


def test_summary_matches_the_hand_computation(root):
    summary = seed_summary.summarise(root)
    assert summary["seeds"] == [0, 1, 2]
    rows = {row["quantity"]: row for row in summary["rows"]}
    assert list(rows) == [
        "NDCG@20 (test) DARE",
        "NDCG@20 (test) TWIN",
        "NDCG@20 (test) random",
        "retrieval samples kept (test)",
        "Spearman(attention, MI) DARE",
        "Spearman(attention, MI) TWIN",
        "gradients (category): share of negative cosines",
        "gradients (category): representation/attention norm ratio",
    ]
    # DARE NDCG [0.50, 0.56, 0.53]: mean 0.53, deviations -.03, .03, 0, var 1.8e-3 / 2 = 9e-4,
    # std 0.03.
    dare = rows["NDCG@20 (test) DARE"]
    assert dare["mean"] == pytest.approx(0.53) and dare["std"] == pytest.approx(0.03)
    assert dare["n"] == 3 and dare["missing_seeds"] == []
    assert dare["per_seed"] == {"0": 0.50, "1": 0.56, "2": 0.53}
    # TWIN NDCG [0.40, 0.44, 0.48]: mean 0.44, std 0.04.
    twin = rows["NDCG@20 (test) TWIN"]
    assert twin["mean"] == pytest.approx(0.44) and twin["std"] == pytest.approx(0.04)
    # The same value on every seed: std 0.
    assert rows["NDCG@20 (test) random"]["std"] == pytest.approx(0.0, abs=1e-15)
    # Samples kept [7000, 7001, 7002]: mean 7001, std 1.
    kept = rows["retrieval samples kept (test)"]
    assert kept["mean"] == pytest.approx(7001) and kept["std"] == pytest.approx(1.0)
    # Spearman DARE [0.10, 0.08, 0.06]: mean 0.08, std 0.02.
    spearman = rows["Spearman(attention, MI) DARE"]
    assert spearman["mean"] == pytest.approx(0.08) and spearman["std"] == pytest.approx(0.02)
    # Spearman TWIN null on seed 2: [0.04, 0.05], mean 0.045, std sqrt(2 * 0.005^2) = 0.0070711.
    twin = rows["Spearman(attention, MI) TWIN"]
    assert twin["n"] == 2 and twin["seeds"] == [0, 1] and twin["missing_seeds"] == [2]
    assert twin["mean"] == pytest.approx(0.045) and twin["std"] == pytest.approx(
        0.0070711, abs=1e-7
    )
    # Gradients of seeds 0 and 2 (seed 1 has no file): share [0.40, 0.50], mean 0.45,
    # std 0.070711; ratio [2.0, 1.7], mean 1.85, std 0.212132.
    share = rows["gradients (category): share of negative cosines"]
    assert share["n"] == 2 and share["seeds"] == [0, 2] and share["missing_seeds"] == [1]
    assert share["mean"] == pytest.approx(0.45) and share["std"] == pytest.approx(
        0.0707107, abs=1e-7
    )
    ratio = rows["gradients (category): representation/attention norm ratio"]
    assert ratio["mean"] == pytest.approx(1.85) and ratio["std"] == pytest.approx(
        0.2121320, abs=1e-7
    )


def test_cli_writes_json_and_markdown(root, tmp_path, capsys):
    out = tmp_path / "summary"
    assert seed_summary.main([str(root), "--out", str(out)]) is None
    printed = capsys.readouterr().out
    text = (out / "seed_summary.md").read_text()
    assert printed.startswith(text)
    assert "| quantity | mean ± std | seeds | per seed |" in text
    assert "| NDCG@20 (test) DARE | 0.5300 ± 0.0300 | 3 | 0: 0.5000, 1: 0.5600, 2: 0.5300 |" in text
    assert (
        "| retrieval samples kept (test) | 7001.0000 ± 1.0000 | 3 | 0: 7000, 1: 7001, 2: 7002 |"
        in text
    )
    # The seeds column says when a seed is left out.
    assert (
        "| gradients (category): share of negative cosines | 0.4500 ± 0.0707 | 2 of 3 "
        "| 0: 0.4000, 2: 0.5000 |"
    ) in text
    assert (
        "| Spearman(attention, MI) TWIN | 0.0450 ± 0.0071 | 2 of 3 | 0: 0.0400, 1: 0.0500 |" in text
    )
    data = json.loads((out / "seed_summary.json").read_text())
    assert data["seeds"] == [0, 1, 2] and len(data["rows"]) == 8


def test_one_seed_has_no_std(tmp_path):
    _write(tmp_path / "4/attention/attention_accuracy.json", {"mean_spearman": {"DARE": 0.1}})
    (row,) = seed_summary.summarise(tmp_path)["rows"]
    assert row["mean"] == pytest.approx(0.1) and math.isnan(row["std"]) and row["n"] == 1
    assert "| 0.1000 ± n/a | 1 |" in seed_summary.to_markdown(seed_summary.summarise(tmp_path))


def test_missing_or_empty_root_is_an_error(tmp_path, capsys):
    run = seed_summary.common.run_cli
    assert run(seed_summary.main, [str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "analysis output folder not found" in capsys.readouterr().err
    assert run(seed_summary.main, [str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds no per-seed folder" in capsys.readouterr().err
    (tmp_path / "0").mkdir()
    assert run(seed_summary.main, [str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no analysis output" in capsys.readouterr().err
    _write(tmp_path / "0/retrieval/retrieval.json", {"models": {}})
    assert run(seed_summary.main, [str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no field samples_kept" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
