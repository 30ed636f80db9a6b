"""Gradient domination and conflict (paper Section 3, SPEC 5.3) from recorded path gradients.

A run with `model=twin_observe_grad` (TWIN whose shared tables are split into two synchronised
copies) records, every `export.gradients_every_steps` steps, `seed_<s>/gradients/
step_<n>.npz` holding `attention.<field>` and `representation.<field>`: the gradients
`[rows, d]` of the field's table through the search (attention) path and through the aggregation
(representation) path. From them, for one field (default `category`):

- domination: per step the Frobenius norms of both gradients; the ratio of their means
  mean_s ||g_repr|| / mean_s ||g_attn|| (the paper: about 5 for TWIN);
- conflict: per step and per table row that both paths touch (both row gradients non-zero),
  the cosine between the two row gradients; the histogram of all these cosines, the share
  below zero (the paper: about two thirds for TWIN), and per category the share of its steps
  with a negative cosine (its conflict ratio).

The files are streamed one step at a time (a table's gradients over thousands of steps need
not fit in memory).

Outputs (in --out): `gradients.json`, `gradient_norms.png`, `gradient_cosine_hist.png`,
`gradient_conflict_per_category.png`.

    python -m analysis.gradients --run runs/demo/twin_observe_grad --out out/gradients
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from analysis import common

STEP_FILE = re.compile(r"^step_(\d+)\.npz$")


def gradient_files(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_<n>.npz` in a gradients folder, by step."""
    directory = Path(directory)
    if not directory.is_dir():
        raise common.AnalysisError(
            f"no recorded gradients folder {directory} (train with model=twin_observe_grad, "
            "i.e. model.observe_attn_repr_grad=True and export.gradients=True)"
        )
    found = [
        (int(m.group(1)), directory / name)
        for name in (p.name for p in directory.iterdir())
        if (m := STEP_FILE.match(name))
    ]
    if not found:
        raise common.AnalysisError(f"{directory} holds no step_<n>.npz gradient files")
    return sorted(found)


def path_keys(names: list[str], field: str, path: Path) -> tuple[str, str]:
    """The (attention, representation) array names of `field` in a gradient file."""
    keys = (f"attention.{field}", f"representation.{field}")
    if all(key in names for key in keys):
        return keys
    raise common.AnalysisError(
        f"{path} lacks attention.{field} / representation.{field}; it has {sorted(names)}"
    )


def row_cosines(
    attention: np.ndarray, representation: np.ndarray, eps: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, cosines) of the rows `[R, d]` where both gradients have norm > eps."""
    attention = np.asarray(attention, np.float64)
    representation = np.asarray(representation, np.float64)
    norm_a = np.linalg.norm(attention, axis=1)
    norm_r = np.linalg.norm(representation, axis=1)
    rows = np.flatnonzero((norm_a > eps) & (norm_r > eps))
    dots = np.einsum("rd,rd->r", attention[rows], representation[rows])
    return rows, np.clip(dots / (norm_a[rows] * norm_r[rows]), -1.0, 1.0)


def gradient_statistics(
    directory: str | Path,
    *,
    field: str = "category",
    bins: int = 40,
    min_steps_per_category: int = 5,
    progress: bool = True,
) -> dict:
    """Domination and conflict statistics of one field's recorded path gradients.

    Returns: steps `[S]`; attention_norm, representation_norm `[S]` (Frobenius);
    table_cosine `[S]` (cosine of the whole flattened tables); negative_share_per_step `[S]`;
    domination_ratio; cosine histogram (edges `[bins + 1]`, counts `[bins]`), cosine_count,
    negative_share, mean_cosine; per-category (rows with >= min_steps_per_category
    observations) ids, observations and conflict ratios.
    """
    from tqdm import tqdm

    files = gradient_files(directory)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    counts = np.zeros(bins, np.int64)
    per_row_total = per_row_negative = None
    steps, norm_a, norm_r, table_cos, neg_share = [], [], [], [], []
    cos_sum, cos_count, cos_negative = 0.0, 0, 0
    shape = None
    for step, path in tqdm(
        files, desc=f"gradients ({field})", unit="step", disable=not progress, leave=False
    ):
        try:
            with np.load(path) as data:
                keys = path_keys(data.files, field, path)
                attention, representation = data[keys[0]], data[keys[1]]
        except (OSError, ValueError) as error:
            if isinstance(error, common.AnalysisError):
                raise
            raise common.AnalysisError(f"cannot read {path}: {error}") from error
        if attention.shape != representation.shape or attention.ndim != 2:
            raise common.AnalysisError(
                f"{path}: {keys[0]} {attention.shape} and {keys[1]} {representation.shape} "
                "must be tables of one shape [rows, d]"
            )
        if shape is None:
            shape = attention.shape
            per_row_total = np.zeros(shape[0], np.int64)
            per_row_negative = np.zeros(shape[0], np.int64)
        elif attention.shape != shape:
            raise common.AnalysisError(
                f"{path}: table shape {attention.shape} differs from the first step's {shape}"
            )
        a64, r64 = attention.astype(np.float64), representation.astype(np.float64)
        steps.append(step)
        norm_a.append(float(np.linalg.norm(a64)))
        norm_r.append(float(np.linalg.norm(r64)))
        denominator = norm_a[-1] * norm_r[-1]
        table_cos.append(float(np.sum(a64 * r64) / denominator) if denominator > 0 else np.nan)
        rows, cosines = row_cosines(a64, r64)
        counts += np.histogram(cosines, bins=edges)[0]
        negative = cosines < 0
        per_row_total[rows] += 1
        per_row_negative[rows] += negative
        cos_sum += float(cosines.sum())
        cos_count += int(cosines.size)
        cos_negative += int(negative.sum())
        neg_share.append(float(negative.mean()) if cosines.size else np.nan)
    norm_a_arr, norm_r_arr = np.asarray(norm_a), np.asarray(norm_r)
    mean_a = float(norm_a_arr.mean())
    categories = np.flatnonzero(per_row_total >= min_steps_per_category)
    ratios = per_row_negative[categories] / np.maximum(per_row_total[categories], 1)
    return {
        "field": field,
        "directory": str(directory),
        "steps": np.asarray(steps),
        "table_shape": list(shape),
        "attention_norm": norm_a_arr,
        "representation_norm": norm_r_arr,
        "mean_attention_norm": mean_a,
        "mean_representation_norm": float(norm_r_arr.mean()),
        "domination_ratio": float(norm_r_arr.mean() / mean_a) if mean_a > 0 else None,
        "table_cosine": np.asarray(table_cos),
        "negative_share_per_step": np.asarray(neg_share),
        "cosine_histogram": {"edges": edges, "counts": counts},
        "cosine_count": cos_count,
        "negative_share": cos_negative / cos_count if cos_count else None,
        "mean_cosine": cos_sum / cos_count if cos_count else None,
        "min_steps_per_category": min_steps_per_category,
        "category_ids": categories,
        "category_observations": per_row_total[categories],
        "category_conflict_ratio": ratios,
    }


def gradient_analysis(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    fields: tuple[str, ...] = ("category",),
    bins: int = 40,
    min_steps_per_category: int = 5,
    progress: bool = True,
) -> dict:
    """Statistics and figures of a run's recorded gradients (`seed_<s>/gradients/`).

    run_dir may also be a `gradients` folder itself. Returns the JSON content
    ({field: statistics}).
    """
    run_dir = Path(run_dir)
    directory = (
        run_dir if run_dir.name == "gradients" else common.seed_dir(run_dir, seed) / "gradients"
    )
    report = {
        field: gradient_statistics(
            directory,
            field=field,
            bins=bins,
            min_steps_per_category=min_steps_per_category,
            progress=progress,
        )
        for field in fields
    }
    out_dir = Path(out_dir)
    _draw(report, out_dir)
    common.write_json(out_dir / "gradients.json", report)
    return report


def _draw(report: dict, out_dir: Path) -> None:
    fig, axes = common.plt.subplots(1, len(report), figsize=(6 * len(report), 4), squeeze=False)
    for ax, (field, stats) in zip(axes[0], report.items()):
        ax.plot(stats["steps"], stats["representation_norm"], label="representation path")
        ax.plot(stats["steps"], stats["attention_norm"], label="attention path")
        ax.set_yscale("log")
        ratio = stats["domination_ratio"]
        ax.set(
            xlabel="step",
            ylabel="gradient norm (Frobenius)",
            title=f"{field} table: repr / attn mean norm = "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, out_dir / "gradient_norms.png")

    fig, axes = common.plt.subplots(1, len(report), figsize=(6 * len(report), 4), squeeze=False)
    for ax, (field, stats) in zip(axes[0], report.items()):
        edges, counts = stats["cosine_histogram"]["edges"], stats["cosine_histogram"]["counts"]
        share = counts / max(counts.sum(), 1)
        colours = ["C3" if right <= 0 else "C0" for right in edges[1:]]
        ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color=colours)
        ax.axvline(0, color="k", lw=0.8)
        negative = stats["negative_share"]
        ax.set(
            xlabel="cosine(attention gradient, representation gradient) per row and step",
            ylabel="share",
            title=f"{field}: {stats['cosine_count']} cosines, "
            f"{'n/a' if negative is None else f'{100 * negative:.1f}%'} below 0",
        )
    fig.tight_layout()
    common.save_figure(fig, out_dir / "gradient_cosine_hist.png")

    fig, axes = common.plt.subplots(1, len(report), figsize=(6 * len(report), 4), squeeze=False)
    for ax, (field, stats) in zip(axes[0], report.items()):
        ratios = stats["category_conflict_ratio"]
        ax.hist(ratios, bins=np.linspace(0, 1, 21), color="C1")
        ax.axvline(0.5, color="k", lw=0.8, ls=":")
        ax.set(
            xlabel=f"conflict ratio (share of steps with cosine < 0) per {field} row",
            ylabel="rows",
            title=f"{field}: {len(ratios)} rows with >= "
            f"{stats['min_steps_per_category']} observed steps",
        )
    fig.tight_layout()
    common.save_figure(fig, out_dir / "gradient_conflict_per_category.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.gradients", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--run",
        required=True,
        help="run directory of a twin_observe_grad run (or a gradients folder)",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--fields", nargs="+", default=["category"])
    parser.add_argument("--bins", type=int, default=40)
    parser.add_argument("--min-steps-per-category", type=int, default=5)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = gradient_analysis(
        args.run,
        args.out,
        seed=args.seed,
        fields=tuple(args.fields),
        bins=args.bins,
        min_steps_per_category=args.min_steps_per_category,
        progress=not args.no_progress,
    )
    for field, stats in report.items():
        print(
            f"{field}: domination ratio {stats['domination_ratio']}, share of negative "
            f"cosines {stats['negative_share']} over {stats['cosine_count']}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
