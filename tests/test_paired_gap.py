"""analysis.paired_gap against numbers computed by hand (t quantiles from a printed table)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

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
    # Spreads over the 4 paired seeds. By hand: A deviations -.0025, .0175, -.0225, .0075,
    # squares sum 8.75e-4, var 2.91667e-4; B deviations -.0025 (x3), .0075, squares sum 7.5e-5,
    # var 2.5e-5; std ratio B/A = sqrt(2.5e-5 / 2.91667e-4) = 0.292770.
    assert row["std_ratio"] == pytest.approx(0.292770, abs=1e-6)
    # Pitman-Morgan, the oracle from numpy/scipy: r = corr(a + b, a - b), t with n - 2 = 2 df.
    xa, xb = np.array([0.92, 0.94, 0.90, 0.93]), np.array([0.90, 0.90, 0.91, 0.90])
    r = stats.pearsonr(xa + xb, xa - xb)[0]
    t = r * math.sqrt(2 / (1 - r**2))
    p = 2 * stats.t.sf(abs(t), 2)
    # cov(a + b, a - b) = var(a) - var(b) > 0 here: r is positive (A spreads more).
    assert r > 0
    assert row["pitman_morgan_r"] == pytest.approx(r, rel=1e-9)
    assert row["pitman_morgan_t"] == pytest.approx(t, rel=1e-9)
    assert row["pitman_morgan_p"] == pytest.approx(p, rel=1e-9)


def test_spread_statistics_edge_cases():
    # Swapping A and B inverts the ratio and flips r and t; p is unchanged.
    a, b = [0.1, 0.4, 0.2, 0.7, 0.5], [0.3, 0.35, 0.2, 0.4, 0.33]
    forward, backward = paired_gap.spread_statistics(a, b), paired_gap.spread_statistics(b, a)
    assert forward["std_ratio"] * backward["std_ratio"] == pytest.approx(1.0)
    assert forward["pitman_morgan_r"] == pytest.approx(-backward["pitman_morgan_r"])
    assert forward["pitman_morgan_p"] == pytest.approx(backward["pitman_morgan_p"])
    r = np.corrcoef(np.add(a, b), np.subtract(a, b))[0, 1]
    assert forward["pitman_morgan_r"] == pytest.approx(r)
    assert forward["pitman_morgan_p"] == pytest.approx(
        2 * stats.t.sf(abs(r) * math.sqrt(3 / (1 - r * r)), 3)
    )
    # Two pairs: a ratio but no test (n - 2 = 0 degrees of freedom).
    two = paired_gap.spread_statistics([0.1, 0.3], [0.2, 0.3])
    assert two["std_ratio"] == pytest.approx(0.5)
    assert math.isnan(two["pitman_morgan_r"]) and math.isnan(two["pitman_morgan_p"])
    # B = A + constant: a - b is constant, r is undefined (equal spreads, nothing to test).
    shifted = paired_gap.spread_statistics([0.1, 0.4, 0.2], [0.2, 0.5, 0.3])
    assert shifted["std_ratio"] == pytest.approx(1.0)
    assert math.isnan(shifted["pitman_morgan_p"])


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
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].endswith("| std ratio B/A | Pitman-Morgan r | Pitman-Morgan p |")
    assert {line.count("|") for line in table} == {14}  # 13 columns on every row, pooled too
    second = report["rows"][1]  # B constant: var(B) = 0, a + b = a - b + 1.8, r = 1
    assert second["std_ratio"] == 0.0 and second["pitman_morgan_r"] == pytest.approx(1.0)
    assert second["pitman_morgan_p"] == pytest.approx(0.0, abs=1e-6)
    # The validation split reads val.
    report = paired_gap.report_of([f"DARE={tmp_path}/y/dare,TWIN={tmp_path}/y/twin"], split="val")
    assert report["rows"][0]["mean_a"] == pytest.approx(0.43)
    # --seeds keeps those seeds only: seeds 0 and 2 of the first pair, d = [0.02, -0.01].
    assert paired_gap.main(["--pair", f"DARE={tmp_path}/x/dare,TWIN={tmp_path}/x/twin",
                            "--seeds", "0,2", "--out", str(out)]) == 0  # fmt: skip
    row = json.loads((out / "paired_gap.json").read_text())["rows"][0]
    assert row["seeds"] == [0, 2] and row["mean_gap"] == pytest.approx(0.005)
    assert row["pitman_morgan_p"] is None  # n = 2: no Pitman-Morgan test (JSON null)


def test_bad_pairs_are_named(tmp_path, capsys):
    assert paired_gap.main(["--pair", "DARE=a"]) == 2
    assert "expected [LABEL:]A=RUN_DIR,B=RUN_DIR" in capsys.readouterr().err
    assert paired_gap.main(["--pair", f"A={tmp_path}/none,B={tmp_path}/none"]) == 2
    assert "run directory not found" in capsys.readouterr().err
