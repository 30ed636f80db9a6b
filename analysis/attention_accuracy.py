"""Attention accuracy (paper Section 4.2, SPEC 5.1): does the learned search attention follow
the ground-truth mutual information between (behaviour category, relative position) and the
label?

Ground truth: `analysis.mutual_information` over the training split. Learned attention of a
model, two ways (`method`, default "auto": the first where the model allows it):

- "embeddings" (the paper's heat maps; dot-product models on plain tables: TWIN, DARE,
  TWIN-4E): the category and time terms of the search score read off the checkpoint's
  attention tables, <q_cat(t), k_cat(c)> / sqrt(d_item + d_cat) + <q_time(0), k_time(p)> /
  sqrt(d_time);
- "scores" (every variant, including projections and DIN's MLP): for each target category t,
  the mean first-stage score the model gives a behaviour of category c at relative position
  p, averaged over the samples of `split` whose target has category t (masked positions
  excluded); for dot-product models this adds the item term, averaged over the items seen.

Outputs (in --out): `attention_accuracy.json` (per target category: the categories shown,
ground-truth and learned matrices `[categories, L]`, and per model the Pearson and Spearman
correlations between learned score and MI over every cell seen at least --min-count times) and
`attention_heatmaps_target_<t>.png` (ground truth next to each model).

    python -m analysis.attention_accuracy --run TWIN=runs/demo/twin --run DARE=runs/demo/dare \
        --out out/attention
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from analysis import common
from analysis.mutual_information import (
    GroundTruthMI,
    _sum_by_key,
    cell_keys,
    count_ground_truth,
    frequent_target_categories,
)


def learned_cell_scores(
    run: common.LoadedRun,
    target_categories: Sequence[int],
    *,
    split: str = "train",
    max_samples_per_target: int = 2000,
    batch_size: int = 1024,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys `[K]`, mean score `[K]`, count `[K]`) of every (target category, behaviour
    category, relative position) cell, keys as in `mutual_information.cell_keys`."""
    target_all = np.asarray(run.dataset.array(f"{split}_cid"))
    chosen = []
    for target in target_categories:
        chosen.append(np.flatnonzero(target_all == target)[:max_samples_per_target])
    indices = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    if indices.size == 0:
        raise common.AnalysisError(
            f"no {split} sample has one of the target categories {list(target_categories)}"
        )
    out = common.collect_outputs(
        run, split, ("attention_scores",), indices=indices, batch_size=batch_size, progress=progress
    )
    cate_n = int(run.dataset.manifest["cate_n"])
    keys = cell_keys(out["cid"], out["hist_cid"].astype(np.int64), cate_n)
    scores = out["attention_scores"].astype(np.float64)
    valid = (keys >= 0) & (scores > common.PADDING_SCORE_LIMIT)
    unique, total, count = _sum_by_key(keys[valid], scores[valid], np.ones(int(valid.sum())))
    return unique, total / count, count.astype(np.int64)


def embedding_attention_available(run: common.LoadedRun) -> str | None:
    """None if the run's category-and-position attention can be read off its embedding tables
    (dot-product score on plain tables, time concatenated); otherwise the reason it cannot."""
    cfg = run.model_config
    spec = cfg.variant
    if spec.score != "dot":
        return f"variant {spec.name} scores with an MLP"
    if spec.projection is not None:
        return f"variant {spec.name} projects its embeddings"
    if cfg.use_time and cfg.time_mode != "concat":
        return f"time mode {cfg.time_mode!r}"
    return None


def embedding_attention(
    run: common.LoadedRun, target: int, categories: Sequence[int]
) -> np.ndarray:
    """The category-and-position part of the search score, `[len(categories), L]`, from the
    attention tables of the checkpoint (the paper's learned-attention heat map):

        <q_cat(t), k_cat(c)> / sqrt(d_item + d_cat) + <q_time(0), k_time(p)> / sqrt(d_time)

    q_* are rows of the tables that the target reads for attention, k_* those the behaviours
    read (the same tables for TWIN and DARE, different ones for TWIN-4E); time id 0 is the
    target's, p the behaviour's relative position. The item term is left out: it depends on
    the items, not on (category, position).
    """
    reason = embedding_attention_available(run)
    if reason is not None:
        raise common.AnalysisError(f"run {run.name}: no embedding-table attention ({reason})")
    spec = run.model_config.variant
    embed = run.state["params"]["embed"]
    query_tables = embed[spec.tables["attention_target"]]
    key_tables = embed[spec.tables["attention_behavior"]]
    dims = spec.table_dims[spec.tables["attention_target"]]
    query_cat = np.asarray(query_tables["category"][target], np.float64)
    keys_cat = np.asarray(key_tables["category"], np.float64)[np.asarray(categories)]
    scores = (keys_cat @ query_cat / np.sqrt(dims["item"] + dims["category"]))[:, None]
    if run.model_config.use_time:
        query_time = np.asarray(query_tables["time"][0], np.float64)
        keys_time = np.asarray(key_tables["time"], np.float64)[1 : run.max_length + 1]
        scores = scores + (keys_time @ query_time / np.sqrt(dims["time"]))[None, :]
    else:
        scores = np.repeat(scores, run.max_length, axis=1)
    return scores


def cell_matrix(
    keys: np.ndarray,
    values: np.ndarray,
    target: int,
    categories: Sequence[int],
    length: int,
    cate_n: int,
) -> np.ndarray:
    """Dense `[len(categories), L]` of sparse per-cell values for one target; NaN if unseen."""
    out = np.full((len(categories), length), np.nan)
    base = (np.int64(target) * cate_n + np.asarray(categories, np.int64)) * length  # [C]
    wanted = base[:, None] + np.arange(length, dtype=np.int64)[None, :]  # column = p - 1
    where = np.clip(np.searchsorted(keys, wanted), 0, max(len(keys) - 1, 0))
    if len(keys):
        found = keys[where] == wanted
        out[found] = values[where[found]]
    # Column index is p - 1 in key order, i.e. position 1 (most recent) first.
    return out


def correlations(learned: np.ndarray, truth: np.ndarray) -> dict[str, float | int | None]:
    """Pearson and Spearman correlation of two equally long vectors (None if undefined)."""
    result: dict[str, float | int | None] = {
        "cells": len(learned),
        "pearson": None,
        "spearman": None,
    }
    if len(learned) >= 3 and np.ptp(learned) > 0 and np.ptp(truth) > 0:
        result["pearson"] = float(stats.pearsonr(learned, truth).statistic)
        result["spearman"] = float(stats.spearmanr(learned, truth).statistic)
    return result


def check_same_data(runs: Sequence[common.LoadedRun]) -> None:
    """Refuse runs trained on different datasets or history lengths (naming the field)."""
    first = runs[0]
    for run in runs[1:]:
        if run.max_length != first.max_length:
            raise common.AnalysisError(
                f"runs {first.name} and {run.name} differ in data.max_length "
                f"({first.max_length} vs {run.max_length}); compare runs of one history length"
            )
        for key in ("item_n", "cate_n", "counts"):
            if run.dataset.manifest.get(key) != first.dataset.manifest.get(key):
                raise common.AnalysisError(
                    f"runs {first.name} and {run.name} use different datasets (manifest field "
                    f"{key}: {first.dataset.manifest.get(key)} vs "
                    f"{run.dataset.manifest.get(key)})"
                )


def attention_accuracy(
    runs: dict[str, common.LoadedRun],
    out_dir: str | Path,
    *,
    target_categories: Sequence[int] | None = None,
    num_targets: int = 3,
    top_categories: int = 15,
    split: str = "train",
    max_samples_per_target: int = 2000,
    min_count: int = 5,
    ground_truth: GroundTruthMI | None = None,
    method: str = "auto",
    progress: bool = True,
) -> dict:
    """Ground-truth MI vs each run's learned category-position attention; JSON + PNGs.

    method: "scores" (every model: the mean search score per cell), "embeddings" (the
    category and time terms of the score from the attention tables, `embedding_attention`;
    dot-product table models only) or "auto" (embeddings where possible, else scores).

    runs: name -> restored run (`common.load_run`), all on one dataset and history length.
    target_categories: which target categories to analyse (default: the `num_targets` most
    frequent of `split`). Returns the JSON content.
    """
    if not runs:
        raise common.AnalysisError("no run given")
    loaded = list(runs.values())
    check_same_data(loaded)
    dataset, length = loaded[0].dataset, loaded[0].max_length
    cate_n = int(dataset.manifest["cate_n"])
    if target_categories is None:
        target_categories = frequent_target_categories(dataset, split, num_targets)
    target_categories = [int(t) for t in target_categories]
    if ground_truth is None:
        ground_truth = count_ground_truth(
            dataset,
            split="train",
            max_length=length,
            target_categories=target_categories,
            progress=progress,
        )
    elif ground_truth.length != length or ground_truth.cate_n != cate_n:
        raise common.AnalysisError(
            f"ground truth has length {ground_truth.length} / cate_n {ground_truth.cate_n}, the "
            f"runs {length} / {cate_n}"
        )
    if method not in ("auto", "scores", "embeddings"):
        raise common.AnalysisError(f"method {method!r}: expected auto, scores or embeddings")
    methods = {}
    for name, run in runs.items():
        reason = embedding_attention_available(run)
        if method == "embeddings" and reason is not None:
            raise common.AnalysisError(f"run {name}: method 'embeddings' impossible ({reason})")
        methods[name] = "embeddings" if method != "scores" and reason is None else "scores"
    # The per-cell counts (which cells are well observed) come from the scores either way.
    learned = {
        name: learned_cell_scores(
            run,
            target_categories,
            split=split,
            max_samples_per_target=max_samples_per_target,
            progress=progress,
        )
        for name, run in runs.items()
    }
    truth_mi = ground_truth.mi
    out_dir = Path(out_dir)
    report: dict = {
        "methods": methods,
        "split": split,
        "ground_truth_split": ground_truth.split,
        "max_length": length,
        "mi_unit": "nats",
        "position": "column j = relative position j + 1 (1 = most recent)",
        "min_count": min_count,
        "runs": {n: str(r.run_dir) for n, r in runs.items()},
        "targets": [],
        "mean_spearman": {},
    }
    for target in target_categories:
        rows = ground_truth.top_categories(target, top_categories)
        if not rows:
            continue
        entry: dict = {
            "target_category": target,
            "samples": int(ground_truth.samples[target]),
            "categories": rows,
            "ground_truth": ground_truth.matrix(target, rows),
            "learned": {},
            "correlation": {},
        }
        for name, (keys, mean, count) in learned.items():
            if methods[name] == "embeddings":
                entry["learned"][name] = embedding_attention(runs[name], target, rows)
            else:
                entry["learned"][name] = cell_matrix(keys, mean, target, rows, length, cate_n)
            # Correlation over every well-observed cell of this target, not only those shown
            # (for the embedding method: its value at those cells).
            lo, hi = (np.int64(target) * cate_n) * length, (np.int64(target + 1) * cate_n) * length
            cells = (keys >= lo) & (keys < hi) & (count >= min_count)
            where = np.searchsorted(ground_truth.keys, keys[cells])
            where = np.clip(where, 0, max(len(ground_truth.keys) - 1, 0))
            matched = ground_truth.keys[where] == keys[cells]
            truth_values = np.where(matched, truth_mi[where], 0.0)
            learned_values = mean[cells]
            if methods[name] == "embeddings":
                cell_category = keys[cells] // length % cate_n
                cell_position = keys[cells] % length  # p - 1
                full = embedding_attention(runs[name], target, cell_category)
                learned_values = full[np.arange(len(cell_category)), cell_position]
            entry["correlation"][name] = correlations(learned_values, truth_values)
        report["targets"].append(entry)
        _draw_target(entry, methods, out_dir / f"attention_heatmaps_target_{target}.png")
    if not report["targets"]:
        raise common.AnalysisError(
            f"no ground-truth cells for the target categories {target_categories}"
        )
    for name in runs:
        values = [
            t["correlation"][name]["spearman"]
            for t in report["targets"]
            if t["correlation"][name]["spearman"] is not None
        ]
        report["mean_spearman"][name] = float(np.mean(values)) if values else None
    common.write_json(out_dir / "attention_accuracy.json", report)
    return report


def _draw_target(entry: dict, methods: dict[str, str], path: Path) -> None:
    panels = [("ground-truth MI (nats)", entry["ground_truth"], "magma")]
    for name, matrix in entry["learned"].items():
        rho = entry["correlation"][name]["spearman"]
        note = "" if rho is None else f", Spearman {rho:.2f}"
        what = "category+time score" if methods[name] == "embeddings" else "mean search score"
        panels.append((f"{name}: {what}{note}", matrix, "viridis"))
    fig, axes = common.plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for index, (ax, (title, matrix, cmap)) in enumerate(zip(axes[0], panels)):
        common.heatmap(
            ax,
            np.asarray(matrix, np.float64),
            title,
            cmap=cmap,
            row_labels=entry["categories"],
            xlabel="relative position (1 = most recent)",
            ylabel="behaviour category" if index == 0 else "",
        )
    fig.suptitle(f"target category {entry['target_category']} ({entry['samples']} samples)")
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.attention_accuracy", description=__doc__.split("\n\n")[0]
    )
    common.add_run_argument(parser, "NAME=RUN_DIR (repeat for each model)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=None, help="seed folder (default lowest)")
    parser.add_argument("--data-dir", default=None, help="dataset (default: the runs' data.dir)")
    parser.add_argument(
        "--targets",
        type=int,
        nargs="*",
        default=None,
        help="target category ids (default: the most frequent)",
    )
    parser.add_argument("--num-targets", type=int, default=3)
    parser.add_argument("--top-categories", type=int, default=15)
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--max-samples-per-target", type=int, default=2000)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--method", default="auto", choices=("auto", "scores", "embeddings"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    runs = common.load_named_runs(args.run, seed=args.seed, data_dir=args.data_dir)
    report = attention_accuracy(
        runs,
        args.out,
        target_categories=args.targets,
        num_targets=args.num_targets,
        top_categories=args.top_categories,
        split=args.split,
        max_samples_per_target=args.max_samples_per_target,
        min_count=args.min_count,
        method=args.method,
        progress=not args.no_progress,
    )
    for name, rho in report["mean_spearman"].items():
        print(f"{name}: mean Spearman(learned score, ground-truth MI) = {rho}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
