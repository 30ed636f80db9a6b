"""Ground-truth mutual information between "a behaviour of category c at relative position p"
and the label, per target category, counted over a split (paper Section 4, SPEC 5.1).

For a target category t, the samples whose target has category t are the population. For each
(c, p), X = 1 when the history holds a behaviour of category c at relative position p (p = 1 is
the most recent behaviour, p = L the oldest, the model's time ids), and Y is the click label.
MI(X; Y) in nats comes from four counts: N_t (samples), N1_t (clicks), n (samples with X = 1)
and n1 (clicks with X = 1).

Counting is vectorised: every valid history cell of a chunk of samples becomes one int64 key
`(t * cate_n + c) * L + (p - 1)`; `np.unique` + `np.bincount` count the keys of a chunk, and the
chunks' sparse counts are merged the same way. (The official script loops in Python over every
behaviour of every sample.) Only (t, c, p) cells that occur are stored, so memory follows the
data, not cate_n**2 * L.

    python -m analysis.mutual_information --data-dir data/demo/preprocessed --out out/mi
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis import common


def binary_mutual_information(
    n: np.ndarray, n1: np.ndarray, total: np.ndarray, total1: np.ndarray
) -> np.ndarray:
    """MI (nats) between binary X and Y from counts, elementwise over arrays of any shape.

    n: #(X=1); n1: #(X=1, Y=1); total: #samples; total1: #(Y=1). Empty cells contribute 0.
    """
    n, n1 = np.asarray(n, np.float64), np.asarray(n1, np.float64)
    total, total1 = np.asarray(total, np.float64), np.asarray(total1, np.float64)
    cells = (  # (joint count, X-marginal, Y-marginal)
        (n1, n, total1),
        (n - n1, n, total - total1),
        (total1 - n1, total - n, total1),
        (total - total1 - n + n1, total - n, total - total1),
    )
    mi = np.zeros(np.broadcast(n, n1, total, total1).shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        for joint, x_marginal, y_marginal in cells:
            term = joint / total * np.log(joint * total / (x_marginal * y_marginal))
            mi += np.where(joint > 0, term, 0.0)
    return np.maximum(mi, 0.0)  # rounding can give -1e-17


def cell_keys(target_category: np.ndarray, hist_cid: np.ndarray, cate_n: int) -> np.ndarray:
    """int64 keys `[B, L]` of (target category, behaviour category, relative position); -1 where
    the history cell is padding (category 0). Position j of L gets relative position L - j."""
    length = hist_cid.shape[1]
    position = (length - 1 - np.arange(length, dtype=np.int64))[None, :]  # p - 1
    keys = (target_category.astype(np.int64)[:, None] * cate_n + hist_cid) * length + position
    return np.where(hist_cid > 0, keys, -1)


def _sum_by_key(keys: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, ...]:
    unique, inverse = np.unique(keys, return_inverse=True)
    return (unique,) + tuple(np.bincount(inverse, w, len(unique)) for w in weights)


@dataclasses.dataclass
class GroundTruthMI:
    """Sparse counts and MI of every observed (target category, category, position) cell.

    keys `[K]` int64 (sorted), count `[K]` (#samples with the cell), clicks `[K]` (#clicks with
    it), mi `[K]` nats; samples / clicks_total `[cate_n]` per target category; length L; cate_n.
    """

    keys: np.ndarray
    count: np.ndarray
    clicks: np.ndarray
    samples: np.ndarray
    clicks_total: np.ndarray
    length: int
    cate_n: int
    split: str = "train"

    @property
    def mi(self) -> np.ndarray:
        target = self.keys // (self.cate_n * self.length)
        return binary_mutual_information(
            self.count, self.clicks, self.samples[target], self.clicks_total[target]
        )

    def decode(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(target category, behaviour category, relative position 1..L) of every key."""
        position = self.keys % self.length + 1
        rest = self.keys // self.length
        return rest // self.cate_n, rest % self.cate_n, position

    def lookup(self, target_category: np.ndarray, hist_cid: np.ndarray) -> np.ndarray:
        """MI `[B, L]` of each history cell for its sample's target category; cells never seen
        in the counted split get 0 (no evidence of dependence); padding cells get NaN."""
        if hist_cid.shape[1] != self.length:
            raise common.AnalysisError(
                f"histories of length {hist_cid.shape[1]} but the ground truth was counted "
                f"with length {self.length}"
            )
        keys = cell_keys(np.asarray(target_category), np.asarray(hist_cid, np.int64), self.cate_n)
        mi = self.mi
        where = np.clip(np.searchsorted(self.keys, keys), 0, max(len(self.keys) - 1, 0))
        found = (keys >= 0) & (len(self.keys) > 0)
        if len(self.keys):
            found &= self.keys[where] == keys
        out = np.where(found, mi[where] if len(mi) else 0.0, 0.0)
        return np.where(keys >= 0, out, np.nan)

    def matrix(self, target_category: int, categories: Sequence[int]) -> np.ndarray:
        """MI `[len(categories), L]` for one target category; column p - 1 = position p."""
        out = np.zeros((len(categories), self.length))
        target, category, position = self.decode()
        mi = self.mi
        row_of = {int(c): i for i, c in enumerate(categories)}
        for key_index in np.flatnonzero(target == target_category):
            row = row_of.get(int(category[key_index]))
            if row is not None:
                out[row, position[key_index] - 1] = mi[key_index]
        return out

    def top_categories(self, target_category: int, how_many: int) -> list[int]:
        """Behaviour categories with the largest summed MI over positions for this target."""
        target, category, _ = self.decode()
        chosen = target == target_category
        if not chosen.any():
            return []
        totals = np.bincount(category[chosen], self.mi[chosen], self.cate_n)
        order = np.argsort(-totals, kind="stable")
        return [int(c) for c in order[:how_many] if totals[c] > 0]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            keys=self.keys,
            count=self.count,
            clicks=self.clicks,
            samples=self.samples,
            clicks_total=self.clicks_total,
            length=self.length,
            cate_n=self.cate_n,
            split=self.split,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> GroundTruthMI:
        path = Path(path)
        if not path.is_file():
            raise common.AnalysisError(f"ground-truth file not found: {path}")
        with np.load(path) as z:
            missing = {
                "keys",
                "count",
                "clicks",
                "samples",
                "clicks_total",
                "length",
                "cate_n",
            } - set(z.files)
            if missing:
                raise common.AnalysisError(f"{path} lacks the arrays {sorted(missing)}")
            return cls(
                z["keys"],
                z["count"],
                z["clicks"],
                z["samples"],
                z["clicks_total"],
                int(z["length"]),
                int(z["cate_n"]),
                str(z["split"]) if "split" in z.files else "train",
            )


def count_ground_truth(
    dataset,
    *,
    split: str = "train",
    max_length: int = 200,
    target_categories: Sequence[int] | None = None,
    chunk_size: int = 8192,
    progress: bool = True,
) -> GroundTruthMI:
    """Count the (target category, category, position) cells of `split` (vectorised, chunked).

    dataset: an opened dataset (`dare_jax.data.open_dataset`). target_categories: count only
    samples whose target has one of these categories (None: all).
    """
    from tqdm import tqdm

    cate_n = int(dataset.manifest["cate_n"])
    total = dataset.num_samples(split)
    target_all = np.asarray(dataset.array(f"{split}_cid"))
    label_all = np.asarray(dataset.array(f"{split}_label")).astype(np.int64)
    selected = np.arange(total)
    if target_categories is not None:
        wanted = np.asarray(list(target_categories), np.int64)
        if wanted.size and (wanted.min() < 1 or wanted.max() >= cate_n):
            raise common.AnalysisError(
                f"target categories must be in 1..{cate_n - 1} (dataset {dataset.directory}); "
                f"got {wanted.min()}..{wanted.max()}"
            )
        selected = selected[np.isin(target_all, wanted)]
    samples = np.bincount(target_all[selected], minlength=cate_n).astype(np.int64)
    clicks_total = np.bincount(target_all[selected], label_all[selected], cate_n).astype(np.int64)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = tqdm(
        total=selected.size,
        desc=f"counting {split} cells",
        unit="sample",
        disable=not progress,
        leave=False,
    )
    for start in range(0, selected.size, chunk_size):
        batch = dataset.gather(split, selected[start : start + chunk_size], max_length)
        keys = cell_keys(batch["cid"], batch["hist_cid"].astype(np.int64), cate_n)
        label = np.broadcast_to(batch["label"].astype(np.float64)[:, None], keys.shape)
        valid = keys >= 0
        parts.append(_sum_by_key(keys[valid], np.ones(int(valid.sum())), label[valid]))
        bar.update(len(batch["cid"]))
    bar.close()
    if parts:
        keys, count, clicks = _sum_by_key(
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
        )
    else:
        keys, count, clicks = np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return GroundTruthMI(
        keys.astype(np.int64),
        np.rint(count).astype(np.int64),
        np.rint(clicks).astype(np.int64),
        samples,
        clicks_total,
        int(max_length),
        cate_n,
        split,
    )


def frequent_target_categories(dataset, split: str, how_many: int) -> list[int]:
    """The `how_many` most frequent target categories of `split` (ties: smaller id first)."""
    counts = np.bincount(
        np.asarray(dataset.array(f"{split}_cid")), minlength=int(dataset.manifest["cate_n"])
    )
    counts[0] = 0
    order = np.argsort(-counts, kind="stable")
    return [int(c) for c in order[:how_many] if counts[c] > 0]


def ground_truth_report(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    max_length: int = 200,
    num_targets: int = 4,
    top_categories: int = 20,
    progress: bool = True,
) -> dict:
    """Count the ground truth of a dataset; write ground_truth_mi.npz, .json and heat maps.

    Returns the JSON content: per shown target category its sample/click counts, the
    behaviour categories shown and the MI matrix `[categories, L]`.
    """
    from dare_jax.data import DatasetError, open_dataset

    try:
        dataset = open_dataset(data_dir)
    except (DatasetError, OSError) as error:
        raise common.AnalysisError(f"cannot open the dataset {data_dir}: {error}") from error
    out_dir = Path(out_dir)
    targets = frequent_target_categories(dataset, split, num_targets)
    truth = count_ground_truth(dataset, split=split, max_length=max_length, progress=progress)
    truth.save(out_dir / "ground_truth_mi.npz")
    report = {
        "data_dir": str(data_dir),
        "split": split,
        "max_length": max_length,
        "mi_unit": "nats",
        "position": "1 = most recent behaviour",
        "targets": [],
    }
    fig, axes = common.plt.subplots(
        len(targets), 1, figsize=(8, 3 * max(len(targets), 1)), squeeze=False
    )
    for ax, target in zip(axes[:, 0], targets):
        rows = truth.top_categories(target, top_categories)
        matrix = truth.matrix(target, rows)
        report["targets"].append(
            {
                "target_category": target,
                "samples": int(truth.samples[target]),
                "clicks": int(truth.clicks_total[target]),
                "categories": rows,
                "mi": matrix,
            }
        )
        common.heatmap(
            ax,
            matrix,
            f"ground-truth MI, target category {target}",
            row_labels=rows,
            xlabel="relative position (1 = most recent)",
            ylabel="behaviour category",
            cmap="magma",
        )
    fig.tight_layout()
    common.save_figure(fig, out_dir / "ground_truth_mi.png")
    common.write_json(out_dir / "ground_truth_mi.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.mutual_information", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data-dir", required=True, help="preprocessed dataset directory")
    parser.add_argument("--out", required=True, help="output directory (JSON, NPZ, PNG)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--max-length", type=int, default=200, help="history length L")
    parser.add_argument("--targets", type=int, default=4, help="target categories to draw")
    parser.add_argument("--top-categories", type=int, default=20)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = ground_truth_report(
        args.data_dir,
        args.out,
        split=args.split,
        max_length=args.max_length,
        num_targets=args.targets,
        top_categories=args.top_categories,
        progress=not args.no_progress,
    )
    print(f"ground truth of {len(report['targets'])} target categories written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
