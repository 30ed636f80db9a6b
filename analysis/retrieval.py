"""Retrieval quality of the first-stage search (paper Section 4.2, SPEC 5.2).

Per test sample, every history behaviour has a ground-truth relevance: the mutual information
between "a behaviour of its category at its relative position" and the label, for the sample's
target category (`analysis.mutual_information`, counted on the training split). The ground-truth
top-`gt_k` (20) behaviours are those of largest MI. A model ranks the behaviours by its search
score; for k = 1..`k_max`:

- hits@k: how many of the model's top-k are relevant: in the ground-truth top-gt_k with MI > 0
  (behaviours with zero MI carry no evidence and are never relevant);
- NDCG@k: DCG@k / IDCG@k with gain g = MI of the behaviour if it is in the ground-truth
  top-gt_k, else 0 (`relevance="binary"`: g = 1 instead of MI), DCG@k = sum over ranks
  r = 1..k of g / log2(r + 1), IDCG@k the same for the ideal order. Ties (equal MI or equal
  score) go to the more recent behaviour.

Sample-quality filters (the official script hard-codes its own; here they are options, see
`RetrievalFilters`): clicked samples only, a minimum history length, a minimum number of
ground-truth behaviours with MI above a floor, optionally the target category present in the
history. Reference searchers can be added next to the models: `category_recency` (the rule the
synthetic generator plants: same category as the target first, then most recent), `recency`
and `random`.

Outputs (in --out): `retrieval.json` (mean hits@k and NDCG@k per model, sample counts, the
filters), `retrieval_per_sample.npz`, `retrieval_curves.png` and `retrieval_case_<i>.png`
(single-sample case studies: ground-truth MI and each model's scores along the history).

    python -m analysis.retrieval --run DARE=runs/demo/dare --run TWIN=runs/demo/twin \
        --baseline category_recency --baseline random --out out/retrieval
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis import common
from analysis.mutual_information import GroundTruthMI, count_ground_truth

BASELINES = ("category_recency", "recency", "random")


@dataclasses.dataclass(frozen=True)
class RetrievalFilters:
    """Which test samples count.

    positives_only: clicked samples only (the history explains a click, not a negative).
    min_history: at least this many valid (non-padding) behaviours.
    min_relevant: at least this many behaviours with MI > min_mi in the ground-truth top-gt_k.
    min_mi: the MI floor (nats) of min_relevant.
    target_category_in_history: the target's category occurs in the history.
    """

    positives_only: bool = True
    min_history: int = 20
    min_relevant: int = 1
    min_mi: float = 0.0
    target_category_in_history: bool = False


def _rank(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Positions `[N, L]` in descending `values` order, valid first, ties to the more recent
    (larger index) position."""
    length = values.shape[1]
    keyed = np.where(valid, values, -np.inf)
    recency = np.broadcast_to(np.arange(length), values.shape)
    # lexsort sorts ascending by the last key first: primary -value, then -position.
    return np.lexsort((-recency, -keyed), axis=-1)


def retrieval_metrics(
    scores: np.ndarray,
    truth_mi: np.ndarray,
    valid: np.ndarray,
    *,
    k_max: int = 20,
    gt_k: int = 20,
    relevance: str = "graded",
) -> tuple[np.ndarray, np.ndarray]:
    """(hits `[N, k_max]`, ndcg `[N, k_max]`) of model `scores [N, L]` against the ground-truth
    MI `[N, L]`; column k - 1 holds the value at k. valid `[N, L]` marks real behaviours.
    NDCG is NaN where IDCG@k is 0 (no relevant behaviour)."""
    if relevance not in ("graded", "binary"):
        raise common.AnalysisError(f"relevance {relevance!r}: expected 'graded' or 'binary'")
    scores, valid = np.asarray(scores, np.float64), np.asarray(valid, bool)
    truth_mi = np.where(valid, np.nan_to_num(np.asarray(truth_mi, np.float64)), 0.0)
    if scores.shape != truth_mi.shape or scores.shape != valid.shape:
        raise common.AnalysisError(
            f"shapes differ: scores {scores.shape}, ground truth "
            f"{truth_mi.shape}, valid {valid.shape}"
        )
    rows, length = scores.shape
    k_max = min(k_max, length)
    truth_order = _rank(truth_mi, valid)[:, :gt_k]
    in_truth = np.zeros((rows, length), bool)
    np.put_along_axis(in_truth, truth_order, True, axis=1)
    in_truth &= valid & (truth_mi > 0)  # a zero-MI behaviour is never relevant
    gains = np.where(in_truth, truth_mi if relevance == "graded" else 1.0, 0.0)
    model_order = _rank(scores, valid & (scores > common.PADDING_SCORE_LIMIT))[:, :k_max]
    picked = np.take_along_axis(valid & (scores > common.PADDING_SCORE_LIMIT), model_order, 1)
    hits = np.cumsum(np.take_along_axis(in_truth, model_order, 1) & picked, axis=1)
    discount = 1.0 / np.log2(np.arange(2, k_max + 2))
    dcg = np.cumsum(np.take_along_axis(gains, model_order, 1) * picked * discount, axis=1)
    ideal = -np.sort(-gains, axis=1)[:, :k_max]
    idcg = np.cumsum(ideal * discount, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(idcg > 0, dcg / idcg, np.nan)
    return hits.astype(np.float64), ndcg


def sample_filter(
    batch: dict[str, np.ndarray], truth_mi: np.ndarray, filters: RetrievalFilters, gt_k: int = 20
) -> np.ndarray:
    """Boolean `[N]`: the samples that pass `filters`."""
    valid = batch["hist_iid"] > 0
    keep = valid.sum(axis=1) >= filters.min_history
    if filters.positives_only:
        keep &= batch["label"] == 1
    mi = np.where(valid, np.nan_to_num(truth_mi), -np.inf)
    top = -np.sort(-mi, axis=1)[:, :gt_k]
    keep &= (top > filters.min_mi).sum(axis=1) >= filters.min_relevant
    if filters.target_category_in_history:
        keep &= ((batch["hist_cid"] == batch["cid"][:, None]) & valid).any(axis=1)
    return keep


def baseline_scores(kind: str, batch: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """Scores `[N, L]` of a reference searcher (padding gets the model's padding score).

    category_recency: behaviours of the target's category first, each group most recent first;
    recency: most recent first; random: uniform random order.
    """
    hist_iid, hist_cid = batch["hist_iid"], batch["hist_cid"]
    length = hist_iid.shape[1]
    recency = np.broadcast_to(np.arange(length, dtype=np.float64) / length, hist_iid.shape)
    if kind == "category_recency":
        scores = (hist_cid == batch["cid"][:, None]).astype(np.float64) + recency
    elif kind == "recency":
        scores = recency.copy()
    elif kind == "random":
        scores = np.random.default_rng(seed).random(hist_iid.shape)
    else:
        raise common.AnalysisError(f"baseline {kind!r} unknown; expected one of {BASELINES}")
    return np.where(hist_iid > 0, scores, -(2.0**32) + 1)


def summarise(hits: np.ndarray, ndcg: np.ndarray) -> dict:
    """Means over samples (NDCG ignores NaN) of hits@k and NDCG@k, k = 1..k_max."""
    with np.errstate(invalid="ignore"):
        ndcg_mean = np.nanmean(ndcg, axis=0) if len(ndcg) else np.full(ndcg.shape[1], np.nan)
    return {
        "k": list(range(1, hits.shape[1] + 1)),
        "hits": hits.mean(axis=0) if len(hits) else [],
        "ndcg": ndcg_mean,
        "samples": len(hits),
        f"ndcg@{hits.shape[1]}": float(ndcg_mean[-1]) if len(hits) else None,
    }


def retrieval_quality(
    scorers: dict[str, np.ndarray],
    batch: dict[str, np.ndarray],
    truth: GroundTruthMI,
    out_dir: str | Path,
    *,
    filters: RetrievalFilters = RetrievalFilters(),
    k_max: int = 20,
    gt_k: int = 20,
    relevance: str = "graded",
    case_samples: int = 2,
    extra: dict | None = None,
) -> dict:
    """Retrieval metrics of several searchers on one set of samples; writes JSON, NPZ, PNGs.

    scorers: name -> search scores `[N, L]` over the histories of `batch` (the gathered
    samples: cid, label `[N]`, hist_iid, hist_cid `[N, L]`). Returns the JSON content.
    """
    truth_mi = truth.lookup(batch["cid"], batch["hist_cid"].astype(np.int64))
    keep = sample_filter(batch, truth_mi, filters, gt_k)
    if not keep.any():
        raise common.AnalysisError(
            f"no sample of {len(keep)} passes the filters {dataclasses.asdict(filters)}; "
            "relax them (e.g. --min-history, --all-labels)"
        )
    valid = batch["hist_iid"] > 0
    report: dict = {
        "filters": dataclasses.asdict(filters),
        "k_max": k_max,
        "gt_k": gt_k,
        "relevance": relevance,
        "ground_truth_split": truth.split,
        "samples_total": len(keep),
        "samples_kept": int(keep.sum()),
        "models": {},
        **(extra or {}),
    }
    per_sample: dict[str, np.ndarray] = {"sample_index": np.flatnonzero(keep)}
    for name, scores in scorers.items():
        if scores.shape != batch["hist_iid"].shape:
            raise common.AnalysisError(
                f"scores of {name} have shape {scores.shape}, the "
                f"histories {batch['hist_iid'].shape}"
            )
        hits, ndcg = retrieval_metrics(
            scores[keep], truth_mi[keep], valid[keep], k_max=k_max, gt_k=gt_k, relevance=relevance
        )
        report["models"][name] = summarise(hits, ndcg)
        per_sample[f"{name}/hits"], per_sample[f"{name}/ndcg"] = hits, ndcg
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "retrieval_per_sample.npz", **per_sample)
    _draw_curves(report, out_dir / "retrieval_curves.png")
    # Case studies: the kept samples with the most relevant behaviours (most informative).
    relevant = (np.nan_to_num(truth_mi) > 0).sum(axis=1)
    kept_index = np.flatnonzero(keep)
    cases = kept_index[np.argsort(-relevant[kept_index], kind="stable")[:case_samples]]
    report["case_samples"] = [int(i) for i in cases]
    for number, index in enumerate(cases):
        draw_case(
            index, batch, truth_mi, scorers, k_max, gt_k, out_dir / f"retrieval_case_{number}.png"
        )
    common.write_json(out_dir / "retrieval.json", report)
    return report


def _draw_curves(report: dict, path: Path) -> None:
    fig, (left, right) = common.plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in report["models"].items():
        left.plot(entry["k"], entry["hits"], marker="o", ms=3, label=name)
        right.plot(
            entry["k"], entry["ndcg"], marker="o", ms=3, label=f"{name} ({entry['ndcg'][-1]:.3f})"
        )
    left.plot(
        report["models"][next(iter(report["models"]))]["k"],
        [min(k, report["gt_k"]) for k in range(1, report["k_max"] + 1)],
        "k:",
        lw=1,
        label="ideal",
    )
    left.set(
        xlabel="k (model's top-k searched behaviours)",
        ylabel=f"hits in ground-truth top-{report['gt_k']}",
        title="hits@k",
    )
    right.set(
        xlabel="k",
        ylabel="NDCG@k",
        title=f"NDCG@k ({report['relevance']} relevance)",
        ylim=(0, 1.02),
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"retrieval quality on {report['samples_kept']} test samples")
    fig.tight_layout()
    common.save_figure(fig, path)


def draw_case(
    index: int,
    batch: dict[str, np.ndarray],
    truth_mi: np.ndarray,
    scorers: dict[str, np.ndarray],
    k: int,
    gt_k: int,
    path: Path,
) -> None:
    """One sample: ground-truth MI per relative position and each model's scores, with the
    ground-truth top-gt_k and each model's top-k marked."""
    valid = batch["hist_iid"][index] > 0
    length = valid.size
    position = length - np.arange(length)  # relative position of history index j
    mi = np.where(valid, np.nan_to_num(truth_mi[index]), 0.0)
    fig, axes = common.plt.subplots(
        len(scorers) + 1, 1, sharex=True, figsize=(10, 1.8 * (len(scorers) + 1))
    )
    truth_top = _rank(mi[None], valid[None])[0, :gt_k]
    axes[0].bar(position, mi, color="0.6")
    axes[0].bar(position[truth_top], mi[truth_top], color="C3", label=f"top-{gt_k}")
    axes[0].set_ylabel("MI (nats)")
    axes[0].legend(fontsize=7)
    axes[0].set_title(
        f"sample {index}: target category {int(batch['cid'][index])}, "
        f"label {int(batch['label'][index])}",
        fontsize=9,
    )
    for ax, (name, scores) in zip(axes[1:], scorers.items()):
        row = np.asarray(scores[index], np.float64)
        usable = valid & (row > common.PADDING_SCORE_LIMIT)
        shown = np.where(usable, row, np.nan)
        top = _rank(row[None], usable[None])[0, :k]
        ax.plot(position, shown, ".", color="0.5", ms=4)
        hit = np.isin(top, truth_top)
        ax.plot(position[top[hit]], shown[top[hit]], "o", color="C2", ms=5, label="top-k, hit")
        ax.plot(position[top[~hit]], shown[top[~hit]], "x", color="C1", ms=5, label="top-k, miss")
        ax.set_ylabel(name, fontsize=8)
        ax.margins(y=0.15)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("relative position (1 = most recent)")
    axes[-1].invert_xaxis()
    fig.tight_layout()
    common.save_figure(fig, path)


def retrieval_analysis(
    runs: dict[str, common.LoadedRun],
    out_dir: str | Path,
    *,
    baselines: Sequence[str] = (),
    filters: RetrievalFilters = RetrievalFilters(),
    split: str = "test",
    max_samples: int | None = None,
    k_max: int = 20,
    gt_k: int = 20,
    relevance: str = "graded",
    case_samples: int = 2,
    ground_truth: GroundTruthMI | None = None,
    progress: bool = True,
) -> dict:
    """Retrieval quality of restored runs (and reference searchers) on `split`."""
    from analysis.attention_accuracy import check_same_data

    if not runs and not baselines:
        raise common.AnalysisError("no run and no baseline given")
    if not runs:
        raise common.AnalysisError("give at least one run (it defines the dataset)")
    loaded = list(runs.values())
    check_same_data(loaded)
    dataset, length = loaded[0].dataset, loaded[0].max_length
    total = dataset.num_samples(split)
    indices = np.arange(total if max_samples is None else min(total, max_samples))
    if ground_truth is None:
        targets = np.unique(np.asarray(dataset.array(f"{split}_cid"))[indices])
        ground_truth = count_ground_truth(
            dataset, split="train", max_length=length, target_categories=targets, progress=progress
        )
    scorers: dict[str, np.ndarray] = {}
    batch = None
    for name, run in runs.items():
        out = common.collect_outputs(
            run, split, ("attention_scores",), indices=indices, progress=progress
        )
        scorers[name] = out.pop("attention_scores")
        batch = out
    for kind in baselines:
        scorers[kind] = baseline_scores(kind, batch)
    extra = {"split": split, "runs": {n: str(r.run_dir) for n, r in runs.items()}}
    return retrieval_quality(
        scorers,
        batch,
        ground_truth,
        out_dir,
        filters=filters,
        k_max=k_max,
        gt_k=gt_k,
        relevance=relevance,
        case_samples=case_samples,
        extra=extra,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.retrieval", description=__doc__.split("\n\n")[0]
    )
    common.add_run_argument(parser, "NAME=RUN_DIR (repeat for each model)")
    parser.add_argument("--baseline", action="append", default=[], choices=BASELINES)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--k-max", type=int, default=20)
    parser.add_argument("--gt-k", type=int, default=20)
    parser.add_argument("--relevance", default="graded", choices=("graded", "binary"))
    parser.add_argument("--all-labels", action="store_true", help="keep non-clicked samples")
    parser.add_argument("--min-history", type=int, default=20)
    parser.add_argument("--min-relevant", type=int, default=1)
    parser.add_argument("--min-mi", type=float, default=0.0)
    parser.add_argument("--target-category-in-history", action="store_true")
    parser.add_argument("--case-samples", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    filters = RetrievalFilters(
        not args.all_labels,
        args.min_history,
        args.min_relevant,
        args.min_mi,
        args.target_category_in_history,
    )
    runs = common.load_named_runs(args.run, seed=args.seed, data_dir=args.data_dir)
    report = retrieval_analysis(
        runs,
        args.out,
        baselines=args.baseline,
        filters=filters,
        split=args.split,
        max_samples=args.max_samples,
        k_max=args.k_max,
        gt_k=args.gt_k,
        relevance=args.relevance,
        case_samples=args.case_samples,
        progress=not args.no_progress,
    )
    for name, entry in report["models"].items():
        print(
            f"{name}: NDCG@{args.k_max} = {entry[f'ndcg@{args.k_max}']:.4f} "
            f"over {entry['samples']} samples"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
