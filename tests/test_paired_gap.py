"""analysis.paired_gap against numbers computed by hand (t quantiles from a printed table)."""

from __future__ import annotations

import json

import pytest

from analysis import paired_gap


def _run(path, aucs: dict[int, float]):
    """A run directory with seed_<s>/result.json holding the test (and val) AUC."""
    for seed, auc in aucs.items():
        seed_dir = path / f"seed_{seed}"
        seed_dir.mkdir(parents=True)
        result = {"seed": seed, "test": {"auc": auc}, "val": {"auc": auc - 0.5}}
        (seed_dir / "result.json").write_text(json.dumps(result))
    return path


def test_one_pair_matches_the_hand_computation(tmp_path):
    # d = A - B = [0.02, 0.04, -0.01, 0.03]: mean 0.02, deviations 0, .02, -.03, .01, squares
    # sum 1.4e-3, sd = sqrt(1.4e-3 / 3) = 0.0216025, se = 0.0108012, t_{0.975,3} = 3.182446
    # (table), half-width 0.0343743; t = 0.02 / 0.0108012 = 1.85164.
    # Sign test: 3 of 4 positive, two-sided p = 2 * (4 + 1) / 16 = 0.625.
    # Wilcoxon: ranks of |d| 2, 4, 1, 3; W- = 1; exact two-sided p = 2 * 2 / 16 = 0.25.
    a = _run(tmp_path / "dare", {0: 0.92, 1: 0.94, 2: 0.90, 3: 0.93, 4: 0.95})  # seed 4 unpaired
    b = _run(tmp_path / "twin", {0: 0.90, 1: 0.90, 2: 0.91, 3: 0.90})
    row = paired_gap.compare("log", ("DARE", a), ("TWIN", b), "auc", "test")
    assert row["seeds"] == [0, 1, 2, 3] and row["unpaired_seeds"] == [4]
    assert row["n"] == 4
    assert row["mean_gap"] == pytest.approx(0.02, abs=1e-12)
    assert row["sd_gap"] == pytest.approx(0.0216025, abs=1e-7)
    assert row["ci95"][0] == pytest.approx(0.02 - 0.0343743, abs=1e-6)
    assert row["ci95"][1] == pytest.approx(0.02 + 0.0343743, abs=1e-6)
    assert row["t"] == pytest.approx(1.85164, abs=1e-4)
    assert (row["positive"], row["negative"]) == (3, 1)
    assert row["sign_p"] == pytest.approx(0.625)
    assert row["wilcoxon_p"] == pytest.approx(0.25)
    assert row["mean_a"] == pytest.approx(0.9225) and row["mean_b"] == pytest.approx(0.9025)


def test_pooled_rows_and_the_cli(tmp_path, capsys):
    # Second pair: d = [0.01, 0.03, 0.05] (mean 0.03). Pooled over pairs: the 7 differences,
    # mean 0.17 / 7. Pooled over means: [0.02, 0.03], mean 0.025, sd 0.0070711, se 0.005,
    # t_{0.975,1} = 12.7062 (table), half-width 0.063531, t = 5.
    _run(tmp_path / "x/dare", {0: 0.92, 1: 0.94, 2: 0.90, 3: 0.93})
    _run(tmp_path / "x/twin", {0: 0.90, 1: 0.90, 2: 0.91, 3: 0.90})
    _run(tmp_path / "y/dare", {0: 0.91, 1: 0.93, 2: 0.95})
    _run(tmp_path / "y/twin", {0: 0.90, 1: 0.90, 2: 0.90})
    out = tmp_path / "out"
    code = paired_gap.main(
        [
            "--pair", f"DARE={tmp_path}/x/dare,TWIN={tmp_path}/x/twin",
            "--pair", f"second:DARE={tmp_path}/y/dare,TWIN={tmp_path}/y/twin",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "paired_gap.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["x", "second"]
    pairs, means = report["pooled"]
    assert pairs["n"] == 7 and pairs["mean_gap"] == pytest.approx(0.17 / 7)
    assert (pairs["positive"], pairs["negative"]) == (6, 1)
    assert means["n"] == 2 and means["mean_gap"] == pytest.approx(0.025)
    assert means["sd_gap"] == pytest.approx(0.0070711, abs=1e-7)
    assert means["ci95"] == pytest.approx([0.025 - 0.063531, 0.025 + 0.063531], abs=1e-5)
    assert means["t"] == pytest.approx(5.0)
    text = capsys.readouterr().out
    assert "| second (DARE - TWIN) | 3 |" in text and "pooled (pairs)" in text
    assert (out / "paired_gap.md").read_text() == text
    # The validation split reads val.
    report = paired_gap.report_of([f"DARE={tmp_path}/y/dare,TWIN={tmp_path}/y/twin"], split="val")
    assert report["rows"][0]["mean_a"] == pytest.approx(0.43)
    # --seeds keeps those seeds only: seeds 0 and 2 of the first pair, d = [0.02, -0.01].
    assert paired_gap.main(["--pair", f"DARE={tmp_path}/x/dare,TWIN={tmp_path}/x/twin",
                            "--seeds", "0,2", "--out", str(out)]) == 0  # fmt: skip
    row = json.loads((out / "paired_gap.json").read_text())["rows"][0]
    assert row["seeds"] == [0, 2] and row["mean_gap"] == pytest.approx(0.005)


def test_bad_pairs_are_named(tmp_path, capsys):
    assert paired_gap.main(["--pair", "DARE=a"]) == 2
    assert "expected [LABEL:]A=RUN_DIR,B=RUN_DIR" in capsys.readouterr().err
    assert paired_gap.main(["--pair", f"A={tmp_path}/none,B={tmp_path}/none"]) == 2
    assert "run directory not found" in capsys.readouterr().err
