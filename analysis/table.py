"""The paper's Table 1 from finished runs: models as rows, one column per (dataset, d) setting,
mean ± std over seeds of each test metric, the best of each column marked, and where every
number came from.

    python -m analysis.table --run runs/taobao/dare_d16 --run runs/taobao/twin_d16 \\
        --run runs/taobao/dare_d64 --run runs/taobao/twin_d64 --out tables/taobao

Each run's `results.json` (written by `python -m dare_jax.main` when every seed has finished)
gives its cell:

- row: the model, named after the run's variant (`results.json` "variant", the `model=` of
  the config) with the paper's spelling where it has one (twin_hard -> "TWIN (hard)");
  `--row NAME=LABEL` overrides it for run NAME;
- column: `<dataset> d=<d>`, the dataset being `data.name` of the run's config and d its
  embedding dimension `model.item_embedding_dim` (the `dim=` of the variant; DARE's
  attention width `attn_dim=` is not part of it); `--column NAME=LABEL` overrides it;
- value: mean and sample standard deviation (ddof=1; none for a single seed) of the metric
  over the run's seeds, recomputed from the per-seed test metrics. The best mean of a column
  (highest; lowest for log loss) is marked when the column holds two numbers or more.

Two runs that land in the same cell are refused (give one of them another --row/--column);
a column whose runs were trained on different datasets (their provenance's manifest
checksums differ) gets a warning in every output.
Rows and columns appear in the order of their first run on the command line.

Outputs (in --out): `table.md` (one table per metric, then the runs and their provenance),
`table.tex` (one booktabs `tabular` per metric, best in bold, provenance as comments),
`table.csv` (one line per metric, model and setting: mean, std, seeds, best flag, run
directory, commit, dataset checksum), `table.json` (everything, with each run's full
provenance record).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis import common

METRICS = ("auc", "gauc", "category_auc", "log_loss", "accuracy")
LOWER_IS_BETTER = frozenset({"log_loss"})
METRIC_TITLES = {
    "auc": "test AUC",
    "gauc": "test GAUC (per user)",
    "category_auc": "test category AUC",
    "log_loss": "test log loss",
    "accuracy": "test accuracy",
}
# The paper's names of the Table 1 models (configs/base.py MODEL_VARIANTS keys).
PAPER_NAMES = {
    "eta": "ETA",
    "sdim": "SDIM",
    "din": "DIN",
    "twin": "TWIN",
    "twin_hard": "TWIN (hard)",
    "twin_proj": "TWIN (w/ proj.)",
    "twin_wo_tr": "TWIN (w/o TR)",
    "twin_v2": "TWIN-V2",
    "twin_4e": "TWIN-4E",
    "dare": "DARE",
}
CSV_FIELDS = (
    "metric",
    "model",
    "setting",
    "dataset",
    "dim",
    "mean",
    "std",
    "seeds",
    "best",
    "run",
    "run_dir",
    "commit",
    "dirty",
    "dataset_manifest_sha256",
)


@dataclasses.dataclass
class RunEntry:
    """One finished run: where it goes in the table, its per-seed values and provenance.

    values: metric -> [S] test values of its S seeds (NaN where a seed's metric is null).
    """

    name: str
    run_dir: Path
    row: str
    column: str
    dataset: str
    dim: int | None
    variant: str
    seeds: list[int]
    values: dict[str, np.ndarray]
    provenance: dict[str, Any] | None
    seed_provenance: list[dict[str, Any] | None]


def read_run(
    name: str, run_dir: str | Path, *, row: str | None = None, column: str | None = None
) -> RunEntry:
    """The table entry of a finished run directory; AnalysisError naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise common.AnalysisError(f"run directory not found: {run_dir}")
    path = run_dir / "results.json"
    if not path.is_file():
        done = sorted(p.parent.name for p in run_dir.glob("seed_*/result.json"))
        raise common.AnalysisError(
            f"{path} not found: the run has not finished (seeds finished: {done or 'none'})"
        )
    results = common.read_json(path, "results.json")
    seeds = results.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise common.AnalysisError(f"{path} holds no per-seed results ('seeds')")
    values = {}
    for metric in METRICS:
        column_values = []
        for seed in seeds:
            value = (seed.get("test") or {}).get(metric, "absent")
            if value == "absent":
                raise common.AnalysisError(f"{path}: seed {seed.get('seed')} lacks test {metric}")
            column_values.append(math.nan if value is None else float(value))
        values[metric] = np.asarray(column_values, np.float64)
    config = results.get("config") or {}
    variant = str(results.get("variant") or config.get("variant") or run_dir.name)
    dataset = str(results.get("dataset") or (config.get("data") or {}).get("name") or "?")
    dim = (config.get("model") or {}).get("item_embedding_dim")
    return RunEntry(
        name=name,
        run_dir=run_dir,
        row=row or PAPER_NAMES.get(variant, variant),
        column=column or f"{dataset} d={dim if dim is not None else '?'}",
        dataset=dataset,
        dim=None if dim is None else int(dim),
        variant=variant,
        seeds=[int(seed.get("seed", index)) for index, seed in enumerate(seeds)],
        values=values,
        provenance=results.get("provenance"),
        seed_provenance=[seed.get("provenance") for seed in seeds],
    )


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for one value) of `values` [S]."""
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if values.size > 1 else math.nan
    return mean, std


def build_table(entries: Sequence[RunEntry], metrics: Sequence[str] = METRICS) -> dict:
    """{"rows", "columns", "metrics", "cells": {metric: {row: {column: cell}}}, "runs"}.

    A cell: {"mean", "std", "seeds", "best", "run"}. Raises AnalysisError when two runs
    share a cell or a metric is unknown.
    """
    for metric in metrics:
        if metric not in METRICS:
            raise common.AnalysisError(f"metric {metric!r} unknown; expected one of {METRICS}")
    rows: list[str] = []
    columns: list[str] = []
    owner: dict[tuple[str, str], str] = {}
    for entry in entries:
        key = (entry.row, entry.column)
        if key in owner:
            raise common.AnalysisError(
                f"runs {owner[key]!r} and {entry.name!r} both give model {entry.row!r} in "
                f"column {entry.column!r}; name one apart with --row or --column"
            )
        owner[key] = entry.name
        rows += [entry.row] if entry.row not in rows else []
        columns += [entry.column] if entry.column not in columns else []
    cells: dict[str, dict[str, dict[str, dict]]] = {}
    for metric in metrics:
        table: dict[str, dict[str, dict]] = {row: {} for row in rows}
        for entry in entries:
            mean, std = mean_std(entry.values[metric])
            table[entry.row][entry.column] = {
                "mean": mean,
                "std": std,
                "seeds": int(entry.values[metric].size),
                "best": False,
                "run": entry.name,
            }
        for column in columns:
            found = [table[row][column] for row in rows if column in table[row]]
            finite = [cell["mean"] for cell in found if math.isfinite(cell["mean"])]
            if len(finite) < 2:
                continue  # nothing to compare with
            best = min(finite) if metric in LOWER_IS_BETTER else max(finite)
            for cell in found:
                cell["best"] = cell["mean"] == best
        cells[metric] = table
    runs = [run_record(entry) for entry in entries]
    return {
        "rows": rows,
        "columns": columns,
        "metrics": list(metrics),
        "cells": cells,
        "runs": runs,
        "warnings": dataset_warnings(runs),
    }


def dataset_warnings(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per column whose runs were trained on different datasets (by the manifest
    checksum their provenance records): their numbers are not comparable."""
    warnings = []
    for column in dict.fromkeys(run["setting"] for run in runs):
        checksums = {
            run["name"]: run["dataset_manifest_sha256"]
            for run in runs
            if run["setting"] == column and run["dataset_manifest_sha256"]
        }
        if len(set(checksums.values())) > 1:
            listed = ", ".join(f"{name} {sha[:12]}" for name, sha in checksums.items())
            warnings.append(f"column {column!r} mixes datasets (manifest sha256: {listed})")
    return warnings


# ------------------------------------------------------------------------- provenance


def _commit_text(code: Mapping[str, Any] | None) -> str:
    if not code:
        return "unknown"
    if not code.get("commit"):
        return f"unknown ({code.get('error') or 'no commit recorded'})"
    return str(code["commit"])[:12] + (" (dirty)" if code.get("dirty") else "")


def run_record(entry: RunEntry) -> dict[str, Any]:
    """A run's line of the provenance list (short texts) and its full provenance record."""
    record = entry.provenance or {}
    code = record.get("code")
    seed_commits = sorted(
        {_commit_text((p or {}).get("code")) for p in entry.seed_provenance if p is not None}
    )
    packages = record.get("packages") or {}
    devices = record.get("devices") or {}
    dataset = record.get("dataset") or {}
    return {
        "name": entry.name,
        "run_dir": str(entry.run_dir),
        "model": entry.row,
        "variant": entry.variant,
        "setting": entry.column,
        "dataset": entry.dataset,
        "dim": entry.dim,
        "seeds": entry.seeds,
        "commit": _commit_text(code) if record else "unknown (no provenance in results.json)",
        "commit_full": (code or {}).get("commit"),
        "dirty": (code or {}).get("dirty"),
        # Seeds finished by other invocations than the one that wrote results.json.
        "seed_commits": seed_commits,
        "versions": " ".join(f"{k} {v}" for k, v in packages.items()) or "unknown",
        "devices": (
            f"{devices['device_count']} x {devices['device_kind']} "
            f"({devices['process_count']} process{'es' * (devices['process_count'] > 1)})"
            if devices
            else "unknown"
        ),
        "dataset_manifest_sha256": dataset.get("manifest_sha256"),
        "dataset_dir": dataset.get("dir"),
        "provenance": entry.provenance,
    }


def _commit_with_seeds(run: Mapping[str, Any]) -> str:
    others = [c for c in run["seed_commits"] if c != run["commit"]]
    return run["commit"] + (f"; seeds finished at {', '.join(others)}" if others else "")


# ---------------------------------------------------------------------------- formats


def format_cell(cell: Mapping[str, Any] | None, digits: int) -> str:
    """'0.92568 ± 0.00020' (no ± for one seed, 'n/a' for a NaN mean, '' for no run)."""
    if cell is None:
        return ""
    if not math.isfinite(cell["mean"]):
        return "n/a"
    text = f"{cell['mean']:.{digits}f}"
    if math.isfinite(cell["std"]):
        text += f" ± {cell['std']:.{digits}f}"
    return text


def to_markdown(table: Mapping[str, Any], digits: int = 5) -> str:
    """One Markdown table per metric, then the runs with their provenance."""
    lines = [
        "# Test metrics: mean ± sample std over seeds",
        "",
        "Best of each column in bold (highest; lowest for log loss).",
    ]
    lines += [f"\n**Warning**: {warning}" for warning in table["warnings"]]
    for metric in table["metrics"]:
        lines += ["", f"## {METRIC_TITLES[metric]}", ""]
        lines.append("| model | " + " | ".join(_md_escape(c) for c in table["columns"]) + " |")
        lines.append("|---" * (len(table["columns"]) + 1) + "|")
        for row in table["rows"]:
            texts = []
            for column in table["columns"]:
                cell = table["cells"][metric][row].get(column)
                text = format_cell(cell, digits)
                texts.append(f"**{text}**" if cell and cell["best"] else text)
            lines.append(f"| {_md_escape(row)} | " + " | ".join(texts) + " |")
    lines += [
        "",
        "## Runs",
        "",
        "| run | model | setting | seeds | directory | commit | versions | devices "
        "| dataset manifest sha256 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in table["runs"]:
        fields = [
            run["name"],
            run["model"],
            run["setting"],
            ", ".join(str(s) for s in run["seeds"]),
            f"`{run['run_dir']}`",
            _commit_with_seeds(run),
            run["versions"],
            run["devices"],
            (run["dataset_manifest_sha256"] or "unknown")[:16],
        ]
        lines.append("| " + " | ".join(_md_escape(str(f)) for f in fields) + " |")
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped (for table cells)."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def to_latex(table: Mapping[str, Any], digits: int = 5) -> str:
    """One booktabs tabular per metric (needs \\usepackage{booktabs}); provenance as comments."""
    lines = ["% Generated by python -m analysis.table; needs \\usepackage{booktabs}."]
    lines += [f"% WARNING: {warning}" for warning in table["warnings"]]
    lines.append("% Runs:")
    for run in table["runs"]:
        lines.append(
            f"%   {run['name']}: {run['run_dir']}; {run['model']}, {run['setting']}; seeds "
            f"{run['seeds']}; commit {_commit_with_seeds(run)}; {run['versions']}; "
            f"{run['devices']}; dataset manifest sha256 {run['dataset_manifest_sha256']}"
        )
    for metric in table["metrics"]:
        spec = "l" + "c" * len(table["columns"])
        header = " & ".join(["Model"] + [latex_escape(c) for c in table["columns"]])
        lines += [
            "",
            f"% {METRIC_TITLES[metric]}: mean $\\pm$ sample std over seeds; best in bold",
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
            header + r" \\",
            "\\midrule",
        ]
        for row in table["rows"]:
            texts = [latex_escape(row)]
            for column in table["columns"]:
                cell = table["cells"][metric][row].get(column)
                text = format_cell(cell, digits).replace("±", "$\\pm$")
                texts.append(f"\\textbf{{{text}}}" if cell and cell["best"] else text)
            lines.append(" & ".join(texts) + r" \\")
        lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Mapping[str, Any]) -> str:
    """Long format: one line per metric, model and setting (CSV_FIELDS); full precision."""
    runs = {run["name"]: run for run in table["runs"]}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for metric in table["metrics"]:
        for row in table["rows"]:
            for column in table["columns"]:
                cell = table["cells"][metric][row].get(column)
                if cell is None:
                    continue
                run = runs[cell["run"]]
                writer.writerow(
                    {
                        "metric": metric,
                        "model": row,
                        "setting": column,
                        "dataset": run["dataset"],
                        "dim": "" if run["dim"] is None else run["dim"],
                        "mean": _number(cell["mean"]),
                        "std": _number(cell["std"]),
                        "seeds": cell["seeds"],
                        "best": int(cell["best"]),
                        "run": cell["run"],
                        "run_dir": run["run_dir"],
                        "commit": run["commit_full"] or "",
                        "dirty": "" if run["dirty"] is None else int(run["dirty"]),
                        "dataset_manifest_sha256": run["dataset_manifest_sha256"] or "",
                    }
                )
    return buffer.getvalue()


def _number(value: float) -> str:
    return repr(value) if math.isfinite(value) else ""


# ------------------------------------------------------------------------------ entry


def write_table(
    runs: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    rows: Mapping[str, str] | None = None,
    columns: Mapping[str, str] | None = None,
    metrics: Sequence[str] = METRICS,
    digits: int = 5,
) -> dict:
    """Read the runs (name -> run dir), write table.{md,tex,csv,json} into `out_dir`.

    rows / columns: run name -> row / column label, replacing the derived ones.
    Returns the table (see :func:`build_table`).
    """
    rows, columns = dict(rows or {}), dict(columns or {})
    for option, labels in (("--row", rows), ("--column", columns)):
        unknown = sorted(set(labels) - set(runs))
        if unknown:
            raise common.AnalysisError(f"{option} names no given run: {unknown}")
    entries = [
        read_run(name, path, row=rows.get(name), column=columns.get(name))
        for name, path in runs.items()
    ]
    table = build_table(entries, metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "table.md", to_markdown(table, digits))
    _write_text(out_dir / "table.tex", to_latex(table, digits))
    _write_text(out_dir / "table.csv", to_csv(table))
    common.write_json(out_dir / "table.json", table)
    return table


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _labels(items: Sequence[str], option: str) -> dict[str, str]:
    labels = {}
    for item in items:
        name, sep, label = item.partition("=")
        if not sep or not name.strip() or not label.strip():
            raise common.AnalysisError(f"{option} {item!r}: expected RUN_NAME=LABEL")
        labels[name.strip()] = label.strip()
    return labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.table", description=__doc__.split("\n\n")[0]
    )
    common.add_run_argument(parser, "NAME=RUN_DIR or RUN_DIR (repeat; NAME labels the run)")
    parser.add_argument("--out", required=True, help="folder for table.{md,tex,csv,json}")
    parser.add_argument(
        "--row", action="append", default=[], help="NAME=LABEL: model label of run NAME"
    )
    parser.add_argument(
        "--column", action="append", default=[], help="NAME=LABEL: setting label of run NAME"
    )
    parser.add_argument(
        "--metrics", default=",".join(METRICS), help=f"comma-separated, of {','.join(METRICS)}"
    )
    parser.add_argument("--digits", type=int, default=5, help="decimals shown (default 5)")
    args = parser.parse_args(argv)
    if not 0 <= args.digits <= 12:
        raise common.AnalysisError(f"--digits {args.digits}: expected 0..12")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    table = write_table(
        common.parse_named_runs(args.run),
        args.out,
        rows=_labels(args.row, "--row"),
        columns=_labels(args.column, "--column"),
        metrics=metrics,
        digits=args.digits,
    )
    print(to_markdown(table, args.digits), end="")
    for warning in table["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"written to {args.out}/table.{{md,tex,csv,json}}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
