"""Training curves (paper Section 4.1, SPEC 5.5): validation AUC, accuracy and log loss over
training steps for several runs on one figure, read from each seed's `metrics.jsonl`.

Several seeds of a run are drawn as their mean with a band from the lowest to the highest seed
(at the steps all seeds share). For each run and seed the JSON also gives the first step at
which the validation accuracy reaches each threshold (the paper: on Tmall TWIN needs over 1,300
steps to reach 90 % validation accuracy, DARE about 450) and the best validation AUC.

Outputs (in --out): `training_curves.json`, `training_curves.png`.

    python -m analysis.training_curves --run TWIN=runs/demo/twin --run DARE=runs/demo/dare \
        --out out/curves
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis import common

METRICS = ("auc", "accuracy", "log_loss")


def read_validation(metrics_path: str | Path) -> dict[str, np.ndarray]:
    """{'step': [E], metric: [E]} of the validation records of a `metrics.jsonl`.

    Raises AnalysisError when the file is missing, a line is not JSON (a torn LAST line, from a
    killed run, is skipped), or it holds no validation record.
    """
    path = Path(metrics_path)
    if not path.is_file():
        raise common.AnalysisError(f"metrics file not found: {path}")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # a run killed mid-write
            raise common.AnalysisError(f"{path} line {number} is not JSON ({error})") from error
    val = sorted((r for r in records if r.get("split") == "val"), key=lambda r: r["step"])
    if not val:
        raise common.AnalysisError(f"{path} holds no validation record (split 'val')")
    out = {"step": np.asarray([int(r["step"]) for r in val])}
    for metric in METRICS:
        values = [r.get(metric) for r in val]
        if any(v is None for v in values):
            raise common.AnalysisError(f"{path}: a validation record lacks the field {metric!r}")
        out[metric] = np.asarray(values, np.float64)
    return out


def first_step_reaching(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    """First step whose value is >= threshold (None if never)."""
    reached = np.flatnonzero(values >= threshold)
    return int(steps[reached[0]]) if reached.size else None


def training_curves(
    runs: dict[str, Path],
    out_dir: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    accuracy_thresholds: Sequence[float] = (0.9,),
) -> dict:
    """Validation curves of several run directories (name -> run dir); writes JSON + PNG."""
    if not runs:
        raise common.AnalysisError("no run given")
    report: dict = {"accuracy_thresholds": list(accuracy_thresholds), "runs": {}}
    for name, run_dir in runs.items():
        dirs = common.seed_dirs(run_dir)
        if seeds is not None:
            dirs = [common.seed_dir(run_dir, s) for s in seeds]
        if not dirs:
            raise common.AnalysisError(f"{run_dir} holds no seed_<s> folder")
        per_seed = {}
        for sdir in dirs:
            curves = read_validation(sdir / "metrics.jsonl")
            per_seed[sdir.name] = {
                **curves,
                "best_auc": float(curves["auc"].max()),
                "best_auc_step": int(curves["step"][np.argmax(curves["auc"])]),
                "steps_to_accuracy": {
                    str(t): first_step_reaching(curves["step"], curves["accuracy"], t)
                    for t in accuracy_thresholds
                },
            }
        report["runs"][name] = {"run_dir": str(run_dir), "seeds": per_seed}
    fig, axes = common.plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.8))
    for index, (name, entry) in enumerate(report["runs"].items()):
        colour = f"C{index % 10}"
        seeds_data = list(entry["seeds"].values())
        common_steps = seeds_data[0]["step"]
        for seed_data in seeds_data[1:]:
            common_steps = np.intersect1d(common_steps, seed_data["step"])
        for ax, metric in zip(axes, METRICS):
            stacked = np.stack([s[metric][np.isin(s["step"], common_steps)] for s in seeds_data])
            ax.plot(
                common_steps,
                stacked.mean(axis=0),
                color=colour,
                label=f"{name} ({len(seeds_data)} seed{'s' * (len(seeds_data) > 1)})",
            )
            if len(seeds_data) > 1:
                ax.fill_between(
                    common_steps, stacked.min(axis=0), stacked.max(axis=0), color=colour, alpha=0.2
                )
    for ax, metric in zip(axes, METRICS):
        ax.set(xlabel="training step", ylabel=f"validation {metric}", title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for threshold in accuracy_thresholds:
        axes[1].axhline(threshold, color="k", lw=0.6, ls=":")
    fig.tight_layout()
    out_dir = Path(out_dir)
    common.save_figure(fig, out_dir / "training_curves.png")
    common.write_json(out_dir / "training_curves.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.training_curves", description=__doc__.split("\n\n")[0]
    )
    common.add_run_argument(parser, "NAME=RUN_DIR (repeat)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: all")
    parser.add_argument("--accuracy-thresholds", type=float, nargs="+", default=[0.9])
    args = parser.parse_args(argv)
    report = training_curves(
        common.parse_named_runs(args.run),
        args.out,
        seeds=args.seeds,
        accuracy_thresholds=args.accuracy_thresholds,
    )
    for name, entry in report["runs"].items():
        for seed, data in entry["seeds"].items():
            print(
                f"{name} {seed}: best val AUC {data['best_auc']:.5f} at step "
                f"{data['best_auc_step']}; steps to accuracy {data['steps_to_accuracy']}"
            )
    print(f"written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
