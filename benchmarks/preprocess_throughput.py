"""Throughput of the Taobao preprocessing on a synthetic log shaped like the real one,
optionally side by side with the official script.

Generates (once, cached) a Taobao-format file of ``--rows`` rows with
``dare_jax.data.synthetic.write_taobao_log``, runs ``python -m preprocessing.taobao`` on
it in a child process and, with ``--official CHECKOUT`` (a checkout of
github.com/thuml/DARE), the official ``preprocess/taobao_v4.py`` on the same file in
another child process. Each child is measured by ``child_process.run_measured``: wall
time, CPU time (user + sys) and peak resident memory (``wait4`` rusage, the kernel's
high-water mark, not a sampled value). Prints one table with both rows, the ratio of the
wall times, the machine, the load average before and after, the date, and the sample
counts of both implementations side by side (they should agree: same filter, same
targets, same number of negatives; a difference is printed, not hidden).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/preprocess_throughput.py \\
        --rows 10000000
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/preprocess_throughput.py \\
        --rows 10000000 --official /work/official_dare
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/preprocess_throughput.py \\
        --rows 100000000 --cache-dir /tmp/dare_bench
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/preprocess_throughput.py \\
        --rows 300000 --official /work/official_dare    # a quick rehearsal

The log is shaped like the real sample (``UserBehavior_head_84k.csv``; its statistics:
``python -m analysis.log_stats FILE``): 812 users in 84,287 rows, so users =
rows // 104 by default, and per-user lengths log-normal with ``--length-sigma`` fitted
to the sample's median and 90th percentile of pv events per user (69 and 205): a
log-normal's p90 / median is exp(1.2816 sigma), so sigma = ln(205 / 69) / 1.2816
(computed below from those constants). The generator draws total rows per user; pv rows
are a near-constant ~90 % share of them, so the ratio carries over. The share of users
that pass the protocol's 210-pv-event filter (what sets the number of samples built) then
lands near the sample's 78 / 812; the script prints it (validation samples / 3) beside
the sample's.

The official script uses relative paths (``../data/taobao/UserBehavior.csv``) and
writes its outputs (id mappings, ``train_NNNN_<count>.npy``, ``val.npy``,
``test.npy``: pickled object arrays, larger than the log) beside the log, so it runs in
a scratch folder laid out as it expects (``preprocess/taobao_v4.py`` a symlink to the
checkout's, ``data/taobao/UserBehavior.csv`` a symlink to the generated log) under
``--scratch-dir`` (default: the system temporary folder; never inside the repository),
deleted afterwards unless ``--keep-output``. It runs with this Python (it needs numpy and
tqdm) unless ``--official-python``. Ours runs first, then the official one; both read
the same file (in the page cache after generation) and inherit the environment, so the
allocator setting (``GLIBC_TUNABLES``) is the same for both. The official script is pure
Python, row by row, and holds every history and sample as Python lists: its time and
peak memory grow in proportion to the log, so time a small size first and check that the
full size fits the machine's memory.

Generated files are large (the script prints their size): keep them under data/
(git-ignored, the default ``data/bench``) or /tmp, never in the repository proper.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child_process import run_measured  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent

# The real sample (/work/shared/data/taobao/UserBehavior_head_84k.csv), from
# `python -m analysis.log_stats`: users with pv events, rows, median and 90th
# percentile of pv events per user, users with >= 210 pv events.
REAL_USERS, REAL_ROWS = 812, 84_287
REAL_MEDIAN_PV, REAL_P90_PV = 69, 205
REAL_QUALIFYING = 78
ROWS_PER_USER = 104  # 84,287 / 812 = 103.8
# Log-normal with median m and sigma s: p90 = m * exp(z90 * s), z90 = 1.2816.
FITTED_LENGTH_SIGMA = math.log(REAL_P90_PV / REAL_MEDIAN_PV) / statistics.NormalDist().inv_cdf(0.9)
OFFICIAL_SCRIPT = Path("preprocess") / "taobao_v4.py"
_TRAIN_FILE = re.compile(r"^train_(\d+)_(\d+)\.npy$")  # train_0001_102400.npy


def cached_log(rows: int, users: int, length_sigma: float, seed: int, cache_dir: Path) -> Path:
    """Path of the synthetic log, generating it if no complete cached copy exists.

    Generated in a child process: a child's peak RSS as `wait4` reports it is at least its
    parent's peak (Linux carries the parent's high-water mark over the exec of a vforked
    child), so this process stays small to keep the measured children's figures their own.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"taobao_synth_{rows}r_{users}u_sigma{length_sigma:g}_s{seed}.csv"
    stamp = path.with_suffix(".json")  # written after the file: marks a complete copy
    if path.is_file() and stamp.is_file():
        return path
    started = time.perf_counter()
    options = {"path": str(path), "n_users": users, "seed": seed, "target_rows": rows,
               "progress": True, "length_sigma": length_sigma}
    code = ("import json, sys; from dare_jax.data.synthetic import write_taobao_log; "
            "options = json.loads(sys.argv[1]); "
            "print(json.dumps(write_taobao_log(options.pop('path'), **options)))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(options)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"generating {path} failed with exit code {done.returncode}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    info["length_sigma"] = length_sigma
    info["generate_seconds"] = round(time.perf_counter() - started, 1)
    stamp.write_text(json.dumps(info, indent=2))
    return path


def _fail(what: str, result: dict, log: Path) -> SystemExit:
    tail = log.read_bytes()[-3000:].decode(errors="replace") if log.is_file() else ""
    return SystemExit(f"{what} failed with exit code {result['exit_code']}; "
                      f"end of its output ({log}):\n{tail}")


def run_ours(log: Path, out_dir: Path) -> tuple[dict, dict]:
    """Preprocess ``log`` with ours in a child process: its measurement and manifest."""
    cmd = [sys.executable, "-m", "preprocessing.taobao", "--input", str(log),
           "--output", str(out_dir), "--overwrite", "--no-progress"]
    output = out_dir.with_name(out_dir.name + ".log")
    with output.open("wb") as sink:
        result = run_measured(cmd, cwd=REPO, output=sink)
    if result["exit_code"] != 0:
        raise _fail("our preprocessing", result, output)
    output.unlink()
    return result, json.loads((out_dir / "manifest.json").read_text())


def official_layout(checkout: Path, log: Path, scratch_parent: Path) -> Path:
    """A new scratch folder laid out as the official script expects; its path."""
    script = checkout.resolve() / OFFICIAL_SCRIPT
    if not script.is_file():
        raise SystemExit(f"--official: no {OFFICIAL_SCRIPT} in {checkout}")
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dare_official_preprocess_", dir=scratch_parent))
    if scratch.resolve().is_relative_to(REPO):
        shutil.rmtree(scratch)
        raise SystemExit(f"--scratch-dir must be outside the repository ({REPO})")
    (scratch / "preprocess").mkdir()
    (scratch / OFFICIAL_SCRIPT).symlink_to(script)
    (scratch / "data" / "taobao").mkdir(parents=True)
    (scratch / "data" / "taobao" / "UserBehavior.csv").symlink_to(log.resolve())
    return scratch


def npy_length(path: Path) -> int:
    """First dimension of a .npy array, from its header (no unpickling of object arrays)."""
    import numpy as np  # here: numpy would raise this process's peak RSS (see cached_log)

    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, _ = read_header(f)
    return shape[0] if shape else 0


def official_counts(data_dir: Path, printed: str) -> dict:
    """Sample counts of the official outputs in ``data_dir``, checked against its output.

    train: the sum of the counts in the train_NNNN_<count>.npy names; val and test: the
    arrays' lengths. Raises SystemExit when a file is missing or a count disagrees with
    the n_train / n_val / n_test lines it printed.
    """
    train_files = sorted(p for p in data_dir.iterdir() if _TRAIN_FILE.match(p.name))
    reported = {k: int(v) for k, v in re.findall(r"^n_(\w+): (\d+)\s*$", printed, re.MULTILINE)}
    missing = [name for name in ("val.npy", "test.npy") if not (data_dir / name).is_file()]
    if not train_files and reported.get("train", 1) > 0:
        missing.append("train_*.npy")
    if missing:
        raise SystemExit(f"the official script did not write {', '.join(missing)} in {data_dir}")
    counts = {
        "train": sum(int(_TRAIN_FILE.match(p.name).group(2)) for p in train_files),
        "val": npy_length(data_dir / "val.npy"),
        "test": npy_length(data_dir / "test.npy"),
    }
    for split, count in counts.items():
        if reported.get(split) != count:
            raise SystemExit(f"official {split}: files hold {count:,} samples, it printed "
                             f"n_{split}: {reported.get(split)}")
    counts.update(user_count=reported.get("user"), item_count=reported.get("item"),
                  category_count=reported.get("cate"), train_files=len(train_files))
    return counts


def run_official(checkout: Path, python: str, log: Path, scratch_parent: Path,
                 keep: bool) -> tuple[dict, dict, Path]:
    """The official preprocessing on ``log`` in a child process: measurement, counts, scratch."""
    scratch = official_layout(checkout, log, scratch_parent)
    output = scratch / "official_output.log"
    with output.open("wb") as sink:
        result = run_measured([python, OFFICIAL_SCRIPT.name], cwd=scratch / "preprocess",
                              output=sink)
    if result["exit_code"] != 0:
        raise _fail(f"the official preprocessing (scratch folder kept: {scratch})", result, output)
    counts = official_counts(scratch / "data" / "taobao", output.read_text(errors="replace"))
    counts["output_bytes"] = sum(p.stat().st_size for p in (scratch / "data" / "taobao").iterdir()
                                 if not p.is_symlink())
    if not keep:
        shutil.rmtree(scratch)
    return result, counts, scratch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _row(name: str, result: dict, rows: int) -> str:
    cpu = result["user_s"] + result["sys_s"]
    return (f"| {name} | {result['wall_s']:.1f} | {cpu:.1f} | "
            f"{result['peak_rss_bytes'] / 2**30:.2f} | {rows / result['wall_s'] / 1e6:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the raw log")
    parser.add_argument("--users", type=int, default=None,
                        help=f"users (default rows // {ROWS_PER_USER}, the real sample's ratio)")
    parser.add_argument("--length-sigma", type=float, default=FITTED_LENGTH_SIGMA,
                        help="log-normal sigma of the rows per user (default "
                        f"ln({REAL_P90_PV}/{REAL_MEDIAN_PV})/1.2816 = {FITTED_LENGTH_SIGMA:.3f}, "
                        "fitted to the real sample's median and 90th percentile)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "data" / "bench",
                        help="where the generated log is kept between runs")
    parser.add_argument("--official", type=Path, default=None, metavar="CHECKOUT",
                        help="a checkout of github.com/thuml/DARE: also time its "
                        "preprocess/taobao_v4.py on the same log")
    parser.add_argument("--official-python", default=sys.executable,
                        help="Python for the official script (needs numpy, tqdm; default: this one)")
    parser.add_argument("--scratch-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="parent of the official script's scratch folder (outside the "
                        "repository; default: the system temporary folder)")
    parser.add_argument("--keep-output", action="store_true",
                        help="keep the preprocessed outputs (deleted by default)")
    args = parser.parse_args(argv)
    users = args.users or max(1, args.rows // ROWS_PER_USER)
    log = cached_log(args.rows, users, args.length_sigma, args.seed, args.cache_dir)
    out_dir = args.cache_dir / f"out_{log.stem}"

    load_before = _load()
    started = datetime.datetime.now(datetime.UTC)
    ours, manifest = run_ours(log, out_dir)
    load_after_ours = _load()
    if not args.keep_output:
        shutil.rmtree(out_dir)
    official = None
    if args.official is not None:
        official, official_samples, scratch = run_official(
            args.official, args.official_python, log, args.scratch_dir, args.keep_output)
        load_after_official = _load()

    counts = manifest["counts"]
    qualifying = counts["val"] // 3  # one positive and two negatives per qualifying user
    memory = memory_gib()
    print(f"input: {log} ({log.stat().st_size / 1e9:.3f} GB, {args.rows:,} rows, {users:,} "
          f"users, length sigma {args.length_sigma:.3f}, seed {args.seed})")
    print(f"users with >= 210 pv events: {qualifying:,} of {manifest['user_count']:,} "
          f"({100 * qualifying / manifest['user_count']:.1f} %); real sample: "
          f"{REAL_QUALIFYING} of {REAL_USERS} ({100 * REAL_QUALIFYING / REAL_USERS:.1f} %)")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores"
          + (f", {memory:.0f} GiB RAM" if memory else "")
          + f"; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC")
    print()
    print("| implementation | wall s | CPU s | peak RSS GiB | M rows/s |")
    print("|---|---|---|---|---|")
    print(_row("ours (python -m preprocessing.taobao)", ours, args.rows))
    if official is not None:
        print(_row(f"official ({OFFICIAL_SCRIPT})", official, args.rows))
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print(f"(a child's peak RSS includes this process's own peak, {own_peak:.3f} GiB)")
    print()
    if official is None:
        print(f"load average (1/5/15 min): before {load_before}, after {load_after_ours}")
    else:
        cpu_ratio = (official["user_s"] + official["sys_s"]) / (ours["user_s"] + ours["sys_s"])
        print(f"official / ours wall time: {official['wall_s'] / ours['wall_s']:.1f}x "
              f"(CPU time: {cpu_ratio:.1f}x)")
        print(f"official: {official['wall_s'] / args.rows * 1e6:.1f} s per million rows")
        print(f"load average (1/5/15 min): before {load_before}, after ours {load_after_ours}, "
              f"after official {load_after_official}")
    print()
    print("| implementation | users | items | categories | train | val | test |")
    print("|---|---|---|---|---|---|---|")
    columns = ("user_count", "item_count", "category_count", "train", "val", "test")
    ours_samples = {**counts, **manifest}
    print("| ours | " + " | ".join(f"{ours_samples[c]:,}" for c in columns) + " |")
    if official is None:
        return 0
    print("| official | " + " | ".join(
        "?" if official_samples[c] is None else f"{official_samples[c]:,}" for c in columns
    ) + " |")
    differ = [c for c in columns if official_samples[c] != ours_samples[c]]
    if differ:
        print(f"DIFFERENT: {', '.join(differ)} (see the two rows above)")
    else:
        print("same users, items, categories and samples per split")
    print(f"official outputs: {official_samples['train_files']} train files, "
          f"{official_samples['output_bytes'] / 1e9:.3f} GB"
          + (f", kept in {scratch}" if args.keep_output else " (deleted)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
