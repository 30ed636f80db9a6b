"""Mean ± sample std over training seeds of the per-seed outputs of the paper's analyses.

    python -m analysis.seed_summary out/decoupling_table1 --out results/seed_summary

ROOT holds one folder per training seed, named by the seed number (ROOT/<seed>/), each with
the outputs of the analyses run with `--seed <seed>` (any of them may be missing):

- `retrieval/retrieval.json` (`python -m analysis.retrieval ... --seed S --out ROOT/S/retrieval`):
  NDCG@k_max of each model and baseline (`models[name]["ndcg@<k_max>"]`, on the report's
  split) and the number of samples that passed the filters (`samples_kept`);
- `attention/attention_accuracy.json` (`python -m analysis.attention_accuracy`): the mean
  Spearman correlation of each model's attention with the ground-truth MI (`mean_spearman`);
- `gradients/gradients.json` (`python -m analysis.gradients`): for every field it holds, the
  share of negative attention/representation gradient cosines (`negative_share`) and the
  representation/attention gradient norm ratio (`domination_ratio`).

Each quantity's mean and sample standard deviation (ddof=1; none for a single seed) are taken
over the seeds that have it: a seed whose file is missing, or whose value is null, is left
out of that quantity (listed as missing; the seeds column reads "n of N"). Prints a markdown
table (quantity | mean ± std | seeds | per seed) and writes `seed_summary.json` and
`seed_summary.md` into --out.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from analysis import common

RETRIEVAL = "retrieval/retrieval.json"
ATTENTION = "attention/attention_accuracy.json"
GRADIENTS = "gradients/gradients.json"


def seed_folders(root: str | Path) -> dict[int, Path]:
    """{seed: ROOT/<seed>} of the folders of ROOT named by a number, by seed."""
    root = Path(root)
    if not root.is_dir():
        raise common.AnalysisError(f"analysis output folder not found: {root}")
    found = {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}
    if not found:
        raise common.AnalysisError(
            f"{root} holds no per-seed folder (ROOT/<seed>/ with the analyses' outputs)"
        )
    return dict(sorted(found.items()))


def _field(report: Any, path: Path, *keys: str) -> Any:
    """report[keys[0]][keys[1]]...; AnalysisError naming the file and field if absent."""
    value = report
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise common.AnalysisError(f"{path}: no field {'.'.join(keys[: depth + 1])}")
        value = value[key]
    return value


def _retrieval(report: dict, path: Path) -> dict[str, Any]:
    k = report.get("k_max", 20)
    split = report.get("split", "test")
    out = {
        f"NDCG@{k} ({split}) {name}": _field(report, path, "models", name, f"ndcg@{k}")
        for name in _field(report, path, "models")
    }
    out[f"retrieval samples kept ({split})"] = _field(report, path, "samples_kept")
    return out


def _attention(report: dict, path: Path) -> dict[str, Any]:
    return {
        f"Spearman(attention, MI) {name}": value
        for name, value in _field(report, path, "mean_spearman").items()
    }


def _gradients(report: dict, path: Path) -> dict[str, Any]:
    if not isinstance(report, dict) or not report:
        raise common.AnalysisError(f"{path}: no gradient field (expected {{field: statistics}})")
    out = {}
    for field in report:
        out[f"gradients ({field}): share of negative cosines"] = _field(
            report, path, field, "negative_share"
        )
        out[f"gradients ({field}): representation/attention norm ratio"] = _field(
            report, path, field, "domination_ratio"
        )
    return out


READERS: tuple[tuple[str, str, Callable[[Any, Path], dict[str, Any]]], ...] = (
    ("retrieval", RETRIEVAL, _retrieval),
    ("attention_accuracy", ATTENTION, _attention),
    ("gradients", GRADIENTS, _gradients),
)


def seed_quantities(folder: str | Path) -> dict[str, tuple[str, Any]]:
    """{quantity: (analysis, value)} of one seed's folder (the files it has; value may be None)."""
    folder = Path(folder)
    out: dict[str, tuple[str, Any]] = {}
    for analysis, relative, reader in READERS:
        path = folder / relative
        if path.is_file():
            report = common.read_json(path, f"{analysis} output")
            for key, value in reader(report, path).items():
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))
                ):
                    raise common.AnalysisError(f"{path}: {key} is {value!r}, not a number")
                out[key] = (analysis, value)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of `values` (NaN std for one value, NaN both for none)."""
    x = np.asarray(values, np.float64)
    if not x.size:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def summarise(root: str | Path) -> dict[str, Any]:
    """The summary of ROOT: its seeds and one row per quantity (in order of first appearance):
    quantity, analysis, mean, std, n, seeds (those with a value), missing_seeds, per_seed."""
    folders = seed_folders(root)
    collected: dict[str, dict[int, Any]] = {}
    analyses: dict[str, str] = {}
    for seed, folder in folders.items():
        for key, (analysis, value) in seed_quantities(folder).items():
            analyses.setdefault(key, analysis)
            collected.setdefault(key, {})[seed] = value
    if not collected:
        raise common.AnalysisError(
            f"no analysis output under {root}/<seed>/ (expected {RETRIEVAL}, {ATTENTION} "
            f"or {GRADIENTS})"
        )
    rows = []
    for key, per_seed in collected.items():
        present = {s: v for s, v in per_seed.items() if v is not None}
        mean, std = mean_std(list(present.values()))
        rows.append(
            {
                "quantity": key,
                "analysis": analyses[key],
                "mean": mean,
                "std": std,
                "n": len(present),
                "seeds": list(present),
                "missing_seeds": [s for s in folders if s not in present],
                "per_seed": {str(s): v for s, v in present.items()},
            }
        )
    return {"root": str(root), "seeds": list(folders), "rows": rows}


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def to_markdown(summary: dict[str, Any], digits: int = 4) -> str:
    total = len(summary["seeds"])
    lines = [
        (
            f"Mean ± sample std (ddof=1) over the training seeds {summary['seeds']} of "
            f"{summary['root']}"
        ),
        "",
        "| quantity | mean ± std | seeds | per seed |",
        "|---|---|---|---|",
    ]
    for row in summary["rows"]:
        count = str(row["n"]) if row["n"] == total else f"{row['n']} of {total}"
        per = ", ".join(f"{s}: {_number(v, digits)}" for s, v in row["per_seed"].items())
        lines.append(
            f"| {row['quantity']} | {_number(row['mean'], digits)} ± "
            f"{_number(row['std'], digits)} | {count} | {per} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.seed_summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("root", help="folder of the per-seed analysis outputs, ROOT/<seed>/")
    parser.add_argument("--out", required=True, help="folder for seed_summary.{json,md}")
    parser.add_argument("--digits", type=int, default=4, help="decimals shown (default 4)")
    args = parser.parse_args(argv)
    if not 0 <= args.digits <= 12:
        raise common.AnalysisError(f"--digits {args.digits}: expected 0..12")
    summary = summarise(args.root)
    text = to_markdown(summary, args.digits)
    out = Path(args.out)
    common.write_json(out / "seed_summary.json", summary)
    (out / "seed_summary.md").write_text(text)
    print(text, end="")
    print(f"written to {out}/seed_summary.{{json,md}}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
