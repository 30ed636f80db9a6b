"""Representation discriminability (paper Section 4.3, SPEC 5.4).

Collect the main-MLP input (`representation [N, F]`) of every test sample from a run's
checkpoint, quantise it with mini-batch k-means for several cluster counts k (2..1000) and
seeds, and measure the mutual information (nats) and the normalised mutual information
(arithmetic normalisation, as scikit-learn's default) between the cluster id and the click
label. A more discriminative representation keeps more label information at the same k.
Comparing DARE with and without the cross feature (TR) is the paper's use.

Outputs (in --out): `discriminability.json` (per run: k, seeds, MI and NMI per (k, seed), their
means and standard deviations) and `discriminability.png` (MI and NMI vs k, one line per run,
band = +- one standard deviation over seeds).

    python -m analysis.discriminability --run DARE=runs/demo/dare \
        --run "DARE w/o TR=runs/demo/dare_wo_tr" --out out/discriminability
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis import common

DEFAULT_CLUSTERS = (2, 5, 10, 20, 50, 100, 200, 500, 1000)


def discrete_mutual_information(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(MI in nats, NMI) between two label vectors `[N]` (non-negative ints), from the
    contingency table; NMI = MI / mean(H(a), H(b)) (0 when both entropies are 0)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise common.AnalysisError(f"label vectors of shapes {a.shape} and {b.shape}")
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1))
    joint = joint.reshape(a.max() + 1, b.max() + 1) / a.size
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))
    ha = float(-np.sum(pa[pa > 0] * np.log(pa[pa > 0])))
    hb = float(-np.sum(pb[pb > 0] * np.log(pb[pb > 0])))
    mean_entropy = (ha + hb) / 2
    return max(mi, 0.0), (max(mi, 0.0) / mean_entropy if mean_entropy > 0 else 0.0)


def quantised_information(
    representation: np.ndarray,
    labels: np.ndarray,
    *,
    clusters: Sequence[int] = DEFAULT_CLUSTERS,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 4096,
    progress: bool = True,
) -> dict:
    """MI and NMI between k-means cluster ids of `representation [N, F]` and `labels [N]`.

    Cluster counts above N - 1 are dropped (k-means needs fewer clusters than samples).
    Returns k `[K]`, seeds `[S]`, mi / nmi `[K, S]`, their means and stds over seeds `[K]`.
    """
    from sklearn.cluster import MiniBatchKMeans
    from tqdm import tqdm

    representation = np.asarray(representation, np.float64)
    labels = np.asarray(labels)
    if representation.ndim != 2 or len(representation) != len(labels):
        raise common.AnalysisError(
            f"representation {representation.shape} and labels "
            f"{labels.shape} do not describe the same samples"
        )
    usable = [int(k) for k in clusters if 2 <= int(k) < len(representation)]
    if not usable:
        raise common.AnalysisError(
            f"no usable cluster count in {list(clusters)} for {len(representation)} samples"
        )
    mi = np.zeros((len(usable), len(seeds)))
    nmi = np.zeros_like(mi)
    bar = tqdm(total=mi.size, desc="k-means", disable=not progress, leave=False)
    for i, k in enumerate(usable):
        for j, seed in enumerate(seeds):
            kmeans = MiniBatchKMeans(
                n_clusters=k, random_state=int(seed), n_init=1, batch_size=max(batch_size, k)
            )
            assignment = kmeans.fit_predict(representation)
            mi[i, j], nmi[i, j] = discrete_mutual_information(assignment, labels)
            bar.update(1)
    bar.close()
    return {
        "k": usable,
        "seeds": list(seeds),
        "mi": mi,
        "nmi": nmi,
        "mi_mean": mi.mean(axis=1),
        "mi_std": mi.std(axis=1),
        "nmi_mean": nmi.mean(axis=1),
        "nmi_std": nmi.std(axis=1),
        "samples": len(labels),
        "features": int(representation.shape[1]),
    }


def discriminability(
    runs: dict[str, common.LoadedRun],
    out_dir: str | Path,
    *,
    split: str = "test",
    clusters: Sequence[int] = DEFAULT_CLUSTERS,
    seeds: Sequence[int] = (0, 1, 2),
    max_samples: int | None = None,
    progress: bool = True,
) -> dict:
    """Collect each run's representation on `split` and quantise it; writes JSON + PNG."""
    if not runs:
        raise common.AnalysisError("no run given")
    report: dict = {"split": split, "mi_unit": "nats", "runs": {}}
    for name, run in runs.items():
        total = run.dataset.num_samples(split)
        indices = np.arange(total if max_samples is None else min(total, max_samples))
        out = common.collect_outputs(
            run, split, ("representation",), indices=indices, progress=progress
        )
        stats = quantised_information(
            out["representation"], out["label"], clusters=clusters, seeds=seeds, progress=progress
        )
        stats.update(
            run_dir=str(run.run_dir),
            cross_feature=bool(run.model_config.use_cross_feature),
            variant=run.variant,
        )
        report["runs"][name] = stats
    out_dir = Path(out_dir)
    fig, axes = common.plt.subplots(1, 2, figsize=(10, 4))
    for name, stats in report["runs"].items():
        for ax, key in zip(axes, ("mi", "nmi")):
            mean, std = stats[f"{key}_mean"], stats[f"{key}_std"]
            ax.plot(stats["k"], mean, marker="o", ms=3, label=name)
            ax.fill_between(stats["k"], mean - std, mean + std, alpha=0.2)
    axes[0].set(
        xscale="log",
        xlabel="clusters k",
        ylabel="MI(cluster, label) (nats)",
        title="mutual information",
    )
    axes[1].set(
        xscale="log",
        xlabel="clusters k",
        ylabel="NMI(cluster, label)",
        title="normalised mutual information",
    )
    all_k = sorted({k for stats in report["runs"].values() for k in stats["k"]})
    for ax in axes:
        ax.set_xticks(all_k)
        ax.xaxis.set_major_formatter(common.matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(common.matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"representation discriminability ({split} split, mini-batch k-means)")
    fig.tight_layout()
    common.save_figure(fig, out_dir / "discriminability.png")
    common.write_json(out_dir / "discriminability.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.discriminability", description=__doc__.split("\n\n")[0]
    )
    common.add_run_argument(parser, "NAME=RUN_DIR (repeat, e.g. with and without TR)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=None, help="the runs' seed folder")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--clusters", type=int, nargs="+", default=list(DEFAULT_CLUSTERS))
    parser.add_argument("--kmeans-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    runs = common.load_named_runs(args.run, seed=args.seed, data_dir=args.data_dir)
    report = discriminability(
        runs,
        args.out,
        split=args.split,
        clusters=args.clusters,
        seeds=args.kmeans_seeds,
        max_samples=args.max_samples,
        progress=not args.no_progress,
    )
    for name, stats in report["runs"].items():
        print(f"{name}: MI at k={stats['k'][-1]}: {stats['mi_mean'][-1]:.4f} nats")
    print(f"written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
