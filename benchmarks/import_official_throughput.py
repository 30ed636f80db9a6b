"""Throughput and peak memory of ``python -m preprocessing.import_official``.

Generates (once, cached) a directory in the official DARE preprocessed layout with
about ``--train-samples`` train samples in ``train_XXXX_N.npy`` files of
``--file-rows`` rows (pickled object arrays, rows ``[uid, iid, cid, [1, 0] / [0, 1],
list(200), list(200)]`` of Python ints, like the official scripts write), plus
``val.npy``, ``test.npy`` and the three ``*_mapping.npy`` dicts, then imports it in a
child process and prints samples/s, wall time and the child's peak resident memory
(``wait4`` rusage: the kernel's high-water mark, not a sampled value).

The generated data follow the official structure, not real behaviour: each user has
one random click sequence (210-599 events, item ids skewed towards small ids over
Taobao's 4,068,790 items, each item in one of 9,407 categories); the user's 19 train,
1 val and 1 test positives take the protocol's target positions with the most recent
200 events before them as history; each positive has 2 random negatives sharing its
history; train samples are shuffled once, globally. ``iid_mapping.npy`` holds all
4,068,790 items, as the full Taobao one does.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/import_official_throughput.py
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/import_official_throughput.py
        --files 3                                       # the first 3 train files only

The child process inherits the allocator setting. Generated files are large (the script
prints their size): keep them under data/ (git-ignored) or /tmp, never in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from child_process import run_measured  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
N_ITEMS = 4_068_790  # Taobao's item count (item_n - 1)
N_CATEGORIES = 9_407
WINDOW = 200
TRAIN_OFFSETS = tuple(range(3, 94, 5))  # target = e_{T+1-j}: 19 train positives per user
SAMPLES_PER_USER = 3 * len(TRAIN_OFFSETS)


def _object_rows(uid, iid, cid, label, hist_iid, hist_cid) -> np.ndarray:
    """Official rows: object array [N, 6] of Python ints and lists."""
    n = uid.shape[0]
    rows = np.empty((n, 6), dtype=object)
    cols = (uid.tolist(), iid.tolist(), cid.tolist(), hist_iid.tolist(), hist_cid.tolist())
    for i, (u, it, c, hi, hc) in enumerate(zip(*cols, strict=True)):
        rows[i, 0], rows[i, 1], rows[i, 2] = u, it, c
        rows[i, 3] = [1, 0] if label[i] else [0, 1]
        rows[i, 4], rows[i, 5] = hi, hc
    return rows


def generate(out: Path, train_samples: int, file_rows: int, seed: int) -> dict:
    """Write the official-format directory ``out``; returns counts."""
    rng = np.random.default_rng(seed)
    users = max(1, train_samples // SAMPLES_PER_USER)
    lengths = rng.integers(210, 600, size=users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    category_of = rng.integers(1, N_CATEGORIES + 1, size=N_ITEMS + 1).astype(np.int32)
    category_of[0] = 0
    seq_iid = (1 + N_ITEMS * rng.random(int(offsets[-1])) ** 2).astype(np.int32)
    seq_iid = np.minimum(seq_iid, N_ITEMS)
    seq_cid = category_of[seq_iid]

    def samples(target_back: list[int]) -> dict[str, np.ndarray]:
        """Positives at e_{T+1-j} (j in target_back) of every user, 2 negatives each."""
        user = np.repeat(np.arange(users), len(target_back))
        pos = offsets[user + 1] - np.tile(target_back, users)  # flat index of the target
        user, pos = np.repeat(user, 3), np.repeat(pos, 3)
        label = np.tile([1, 0, 0], user.shape[0] // 3)
        iid = np.where(label == 1, seq_iid[pos], rng.integers(1, N_ITEMS + 1, size=pos.shape))
        return {
            "uid": user + 1,
            "iid": iid,
            "cid": category_of[iid],
            "label": label,
            "pos": pos,
            "start": offsets[user],
        }

    def windows(s: dict[str, np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = s["pos"][idx, None] + np.arange(-WINDOW, 0)[None, :]
        valid = flat >= s["start"][idx, None]
        flat = np.maximum(flat, s["start"][idx, None])
        return seq_iid[flat] * valid, seq_cid[flat] * valid

    def save(path: Path, s: dict[str, np.ndarray], idx: np.ndarray) -> None:
        hist_iid, hist_cid = windows(s, idx)
        rows = _object_rows(
            s["uid"][idx], s["iid"][idx], s["cid"][idx], s["label"][idx], hist_iid, hist_cid
        )
        np.save(path, rows, allow_pickle=True)

    out.mkdir(parents=True)
    train = samples(list(TRAIN_OFFSETS))
    order = rng.permutation(train["uid"].shape[0])  # the official global shuffle
    n_files = 0
    for k, lo in enumerate(range(0, order.shape[0], file_rows), start=1):
        idx = order[lo : lo + file_rows]
        save(out / f"train_{k:04d}_{idx.shape[0]}.npy", train, idx)
        n_files = k
        print(f"  wrote train file {k}", flush=True)
    for split, back in (("val", [2]), ("test", [1])):
        s = samples(back)
        save(out / f"{split}.npy", s, np.arange(s["uid"].shape[0]))
    for name, count in (("uid", users), ("iid", N_ITEMS), ("cid", N_CATEGORIES)):
        raw = 3 * rng.permutation(count) + 1  # distinct raw id of each dense id 1..count
        mapping = dict(zip(raw.tolist(), range(1, count + 1), strict=True))
        np.save(out / f"{name}_mapping.npy", mapping, allow_pickle=True)  # a pickled dict
    return {
        "users": users,
        "train": int(order.shape[0]),
        "val": 3 * users,
        "test": 3 * users,
        "train_files": n_files,
    }


def cached_official(train_samples: int, file_rows: int, seed: int, cache_dir: Path) -> Path:
    """Path of the generated directory, generating it if no complete cached copy exists."""
    out = cache_dir / f"official_synth_{train_samples}s_{file_rows}r_s{seed}"
    stamp = out / "complete.json"  # written last: marks a complete copy
    if stamp.is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    info = generate(out, train_samples, file_rows, seed)
    info["generate_seconds"] = round(time.perf_counter() - started, 1)
    stamp.write_text(json.dumps(info, indent=2))
    return out


def first_files_view(src: Path, n_files: int) -> Path:
    """A directory of links to ``src`` with only its first ``n_files`` train files."""
    view = src.parent / f"{src.name}_first{n_files}"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir()
    for path in src.glob("*.npy"):
        if not path.name.startswith("train_") or int(path.name.split("_")[1]) <= n_files:
            (view / path.name).symlink_to(path.resolve())
    return view


def run_child(src: Path, out_dir: Path) -> dict:
    """Import ``src`` in a child process; wall time and peak RSS of that child."""
    cmd = [
        sys.executable,
        "-m",
        "preprocessing.import_official",
        "--input",
        str(src),
        "--output",
        str(out_dir),
        "--overwrite",
        "--no-progress",
    ]
    result = run_measured(cmd, cwd=REPO)
    if result["exit_code"] != 0:
        raise SystemExit(f"import failed with exit code {result['exit_code']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--train-samples",
        type=int,
        default=1_024_000,
        help="about this many train samples (default 10 files of 102,400)",
    )
    parser.add_argument(
        "--file-rows",
        type=int,
        default=102_400,
        help="rows per train file (the official scripts: 102,400)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO / "data" / "bench",
        help="where the generated directory is kept between runs",
    )
    parser.add_argument(
        "--keep-output", action="store_true", help="keep the imported dataset (deleted by default)"
    )
    parser.add_argument(
        "--files",
        type=int,
        default=None,
        help="import only the first FILES train files (to compare memory)",
    )
    args = parser.parse_args(argv)
    src = cached_official(args.train_samples, args.file_rows, args.seed, args.cache_dir)
    info = json.loads((src / "complete.json").read_text())
    if args.files is not None:
        src = first_files_view(src, args.files)
        info["train_files"] = min(args.files, info["train_files"])
    out_dir = args.cache_dir / f"imported_{src.name}"
    load_before = os.getloadavg()
    result = run_child(src, out_dir)
    load_after = os.getloadavg()
    manifest = json.loads((out_dir / "manifest.json").read_text())
    if not args.keep_output:
        shutil.rmtree(out_dir)
    counts = manifest["counts"]
    total = sum(counts.values())
    size = sum(p.stat().st_size for p in src.glob("*.npy"))
    if args.files is not None:
        shutil.rmtree(src)  # the links only
    print(
        f"input: {src} ({size / 1e9:.2f} GB, {info['train_files']} train files of "
        f"<= {args.file_rows:,} rows)"
    )
    print(
        f"samples: train {counts['train']:,} / val {counts['val']:,} / test "
        f"{counts['test']:,}; distinct windows {manifest['sequence_rows']:,}"
    )
    print(
        f"wall time: {result['wall_s']:.1f} s (user {result['user_s']:.1f} s, "
        f"sys {result['sys_s']:.1f} s)"
    )
    print(f"throughput: {total / result['wall_s']:,.0f} samples/s")
    print(f"peak RSS of the import process: {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(
        "load average (1/5/15 min) before -> after: "
        + " ".join(f"{x:.2f}" for x in load_before)
        + " -> "
        + " ".join(f"{x:.2f}" for x in load_after)
        + f"; cpus: {os.cpu_count()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
