"""The test-metric gap between two models trained with the same seeds, paired by seed.

    python -m analysis.paired_gap \\
        --pair s101:DARE=runs/decoupling_s101/dare,TWIN=runs/decoupling_s101/twin \\
        --pair s102:DARE=runs/decoupling_s102/dare,TWIN=runs/decoupling_s102/twin \\
        --out results/paired_gap

Each `--pair [LABEL:]A=DIR,B=DIR` is one comparison (one log, one setting): training seed s
of run A is paired with seed s of run B (the seeds both finished; `seed_<s>/result.json`
of each run, so a run need not have finished every seed; --seeds 0,1,2 keeps only those),
and the differences d_s = metric_A(s) - metric_B(s) of the chosen split's metric (default
test AUC) give:

- the mean of A and of B over the paired seeds (sample std, ddof=1) and the mean gap;
- the paired t 95 % confidence interval of the mean gap, mean(d) +- t_{0.975, n-1} sd(d)/sqrt(n),
  with its two-sided p;
- the sign test (two-sided binomial p of the count of d_s > 0 among the non-zero d_s) and
  the Wilcoxon signed-rank test (two-sided, exact for small n without ties; scipy). With 5
  seeds neither can go below p = 0.0625: 5 of 5 in one direction is the strongest they see;
- the comparison of the two runs' spreads over the paired seeds (do A and B differ in
  seed-to-seed variability?): the ratio of sample stds B/A, and the Pitman-Morgan test of
  equal variances of paired samples (seed s of both runs shares initialisation and batch
  order, so the two samples are not independent): with r the Pearson correlation of (a + b)
  and (a - b) over the pairs (cov(a + b, a - b) = var(a) - var(b), so r = 0 <=> equal
  variances), t = r sqrt((n - 2) / (1 - r^2)) and its two-sided p from Student's t with
  n - 2 degrees of freedom (needs n >= 3; none when a + b or a - b is constant).

With two --pair or more, two pooled rows: "pooled (pairs)" takes every pair's differences as
one sample (the seed-level test: it ignores that the pairs' logs differ), "pooled (means)"
takes each pair's mean gap as one observation (n = the number of pairs; the log-level
test); the spread columns are per pair only. Prints a markdown table; --out DIR also writes
paired_gap.json and paired_gap.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from analysis import common

SPLITS = ("test", "val")


def seed_metrics(run_dir: str | Path, metric: str = "auc", split: str = "test") -> dict[int, float]:
    """{seed: metric} of every finished seed of a run (`seed_<s>/result.json`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise common.AnalysisError(f"run directory not found: {run_dir}")
    out = {}
    for path in sorted(run_dir.glob("seed_*/result.json")):
        result = common.read_json(path, "result.json")
        value = (result.get(split) or {}).get(metric)
        if value is None:
            raise common.AnalysisError(f"{path}: no {split} {metric}")
        out[int(result.get("seed", path.parent.name.removeprefix("seed_")))] = float(value)
    if not out:
        raise common.AnalysisError(f"{run_dir}: no finished seed (no seed_*/result.json)")
    return out


def paired_statistics(differences: Sequence[float]) -> dict[str, Any]:
    """Mean, paired-t 95 % CI and p, sign-test and Wilcoxon p of the differences [n]."""
    d = np.asarray(differences, np.float64)
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "mean_gap": float(d.mean()) if n else math.nan}
    out.update(sd_gap=math.nan, ci95=[math.nan, math.nan], t=math.nan, t_p=math.nan)
    if n >= 2:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out["sd_gap"] = sd
        out["ci95"] = [out["mean_gap"] - half, out["mean_gap"] + half]
        if sd > 1e-12:  # (equal differences: rounding leaves ~1e-17, not a t)
            out["t"] = out["mean_gap"] / (sd / math.sqrt(n))
            out["t_p"] = float(2 * stats.t.sf(abs(out["t"]), n - 1))
    positive, negative = int((d > 0).sum()), int((d < 0).sum())
    out["positive"], out["negative"] = positive, negative
    nonzero = positive + negative
    out["sign_p"] = (
        float(stats.binomtest(positive, nonzero, 0.5).pvalue) if nonzero else math.nan
    )
    out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue) if nonzero else math.nan
    return out


def spread_statistics(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Ratio of sample stds B/A and the Pitman-Morgan test of var(A) = var(B) of paired
    samples a, b [n]: r = corr(a + b, a - b), t = r sqrt((n-2)/(1-r^2)), two-sided p (t, n-2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = int(a.size)
    out: dict[str, Any] = {
        "std_ratio": math.nan,
        "pitman_morgan_r": math.nan,
        "pitman_morgan_t": math.nan,
        "pitman_morgan_p": math.nan,
    }
    if n >= 2:
        std_a, std_b = float(a.std(ddof=1)), float(b.std(ddof=1))
        if std_a > 1e-12:
            out["std_ratio"] = std_b / std_a
    if n < 3:
        return out
    total, difference = a + b, a - b
    total, difference = total - total.mean(), difference - difference.mean()
    sd_total = math.sqrt(float(total @ total) / (n - 1))
    sd_difference = math.sqrt(float(difference @ difference) / (n - 1))
    if sd_total <= 1e-12 or sd_difference <= 1e-12:  # constant sum or difference: no r
        return out
    r = float(np.clip((total @ difference) / (n - 1) / (sd_total * sd_difference), -1.0, 1.0))
    out["pitman_morgan_r"] = r
    if r * r >= 1.0:
        out["pitman_morgan_t"], out["pitman_morgan_p"] = math.copysign(math.inf, r), 0.0
    else:
        t = r * math.sqrt((n - 2) / (1.0 - r * r))
        out["pitman_morgan_t"] = t
        out["pitman_morgan_p"] = float(2 * stats.t.sf(abs(t), n - 2))
    return out


def compare(
    label: str,
    a: tuple[str, str | Path],
    b: tuple[str, str | Path],
    metric: str,
    split: str,
    only_seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One --pair: per-seed values, their differences and `paired_statistics` (over the
    seeds both runs finished, or those of them in `only_seeds`)."""
    (name_a, dir_a), (name_b, dir_b) = a, b
    values_a, values_b = seed_metrics(dir_a, metric, split), seed_metrics(dir_b, metric, split)
    if only_seeds is not None:
        values_a = {s: v for s, v in values_a.items() if s in set(only_seeds)}
        values_b = {s: v for s, v in values_b.items() if s in set(only_seeds)}
    seeds = sorted(set(values_a) & set(values_b))
    if not seeds:
        raise common.AnalysisError(f"{label}: {dir_a} and {dir_b} share no finished seed")
    xa = np.array([values_a[s] for s in seeds])
    xb = np.array([values_b[s] for s in seeds])
    row = {
        "label": label,
        "a": {"name": name_a, "run": str(dir_a)},
        "b": {"name": name_b, "run": str(dir_b)},
        "seeds": seeds,
        "unpaired_seeds": sorted(set(values_a) ^ set(values_b)),
        "values_a": xa.tolist(),
        "values_b": xb.tolist(),
        "mean_a": float(xa.mean()),
        "std_a": float(xa.std(ddof=1)) if len(seeds) > 1 else math.nan,
        "mean_b": float(xb.mean()),
        "std_b": float(xb.std(ddof=1)) if len(seeds) > 1 else math.nan,
        "differences": (xa - xb).tolist(),
    }
    row.update(paired_statistics(xa - xb))
    row.update(spread_statistics(xa, xb))
    return row


def pooled(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two pooled rows of `rows` (see the module docstring); [] for fewer than two."""
    if len(rows) < 2:
        return []
    every = [d for row in rows for d in row["differences"]]
    means = [row["mean_gap"] for row in rows]
    return [
        {"label": "pooled (pairs)", **paired_statistics(every)},
        {"label": "pooled (means)", **paired_statistics(means)},
    ]


def _number(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def to_markdown(report: dict[str, Any]) -> str:
    metric = f"{report['split']} {report['metric']}"
    lines = [
        (
            "| comparison | n | A: mean ± std | B: mean ± std | gap A-B | paired t 95 % CI | t p "
            "| A>B | sign p | Wilcoxon p | std ratio B/A | Pitman-Morgan r | Pitman-Morgan p |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"] + report["pooled"]:
        if "mean_a" in row:
            names = f"{row['label']} ({row['a']['name']} - {row['b']['name']})"
            a = f"{_number(row['mean_a'])} ± {_number(row['std_a'])}"
            b = f"{_number(row['mean_b'])} ± {_number(row['std_b'])}"
            spread = (
                f"{_number(row['std_ratio'], 3)} | {_number(row['pitman_morgan_r'], 3)} "
                f"| {_number(row['pitman_morgan_p'], 3)}"
            )
        else:
            names, a, b, spread = row["label"], "", "", " |  | "
        low, high = row["ci95"]
        lines.append(
            f"| {names} | {row['n']} | {a} | {b} | {_number(row['mean_gap'])} "
            f"| [{_number(low)}, {_number(high)}] | {_number(row['t_p'], 3)} "
            f"| {row['positive']}/{row['positive'] + row['negative']} "
            f"| {_number(row['sign_p'], 3)} | {_number(row['wilcoxon_p'], 3)} | {spread} |"
        )
    title = f"Paired gap of the {metric} (seed s of A with seed s of B)"
    return title + "\n\n" + "\n".join(lines) + "\n"


def parse_pair(text: str) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """'[LABEL:]A=DIR,B=DIR' -> (label, (A, DIR), (B, DIR)); ValueError on another shape."""
    label, sep, rest = text.partition(":")
    if not sep or "=" in label:
        label, rest = "", text
    parts = rest.split(",")
    if len(parts) != 2 or not all("=" in part for part in parts):
        raise ValueError(f"--pair {text!r}: expected [LABEL:]A=RUN_DIR,B=RUN_DIR")
    (name_a, _, dir_a), (name_b, _, dir_b) = (part.partition("=") for part in parts)
    if not (name_a and dir_a and name_b and dir_b):
        raise ValueError(f"--pair {text!r}: expected [LABEL:]A=RUN_DIR,B=RUN_DIR")
    return label or Path(dir_a).parent.name, (name_a, dir_a), (name_b, dir_b)


def report_of(
    pairs: Sequence[str],
    metric: str = "auc",
    split: str = "test",
    only_seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    rows = [compare(*parse_pair(text), metric, split, only_seeds) for text in pairs]
    report = {"metric": metric, "split": split, "rows": rows, "pooled": pooled(rows)}
    return {**report, "only_seeds": None if only_seeds is None else list(only_seeds)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", action="append", required=True, help="[LABEL:]A=DIR,B=DIR")
    parser.add_argument("--metric", default="auc")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--seeds", help="only these training seeds, e.g. 0,1,2")
    parser.add_argument("--out", help="folder for paired_gap.json and paired_gap.md")
    args = parser.parse_args(argv)
    try:
        only = None
        if args.seeds:
            parts = args.seeds.split(",")
            if not all(part.strip().isdigit() for part in parts):
                raise ValueError(f"--seeds {args.seeds!r}: expected integers, e.g. 0,1,2")
            only = [int(part) for part in parts]
        report = report_of(args.pair, args.metric, args.split, only)
    except (ValueError, common.AnalysisError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = to_markdown(report)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        common.write_json(out / "paired_gap.json", report)
        (out / "paired_gap.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
