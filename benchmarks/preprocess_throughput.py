"""Throughput of the Taobao preprocessing on a synthetic log of a given size.

Generates (once, cached) a Taobao-format file of ``--rows`` rows with
``dare_jax.data.synthetic.write_taobao_log``, then runs
``python -m preprocessing.taobao`` on it in a child process and prints rows/s, wall
time and the child's peak resident memory (``wait4`` rusage, i.e. the kernel's
high-water mark, not a sampled value).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/preprocess_throughput.py
        --rows 10000000
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/preprocess_throughput.py
        --rows 100000000 --cache-dir /tmp/dare_bench

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

from child_process import run_measured  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent


def cached_log(rows: int, users: int, seed: int, cache_dir: Path) -> Path:
    """Path of the synthetic log, generating it if no complete cached copy exists."""
    from dare_jax.data.synthetic import write_taobao_log

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"taobao_synth_{rows}r_{users}u_s{seed}.csv"
    stamp = path.with_suffix(".json")  # written after the file: marks a complete copy
    if path.is_file() and stamp.is_file():
        return path
    started = time.perf_counter()
    info = write_taobao_log(path, n_users=users, seed=seed, target_rows=rows, progress=True)
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}
    info["generate_seconds"] = round(time.perf_counter() - started, 1)
    stamp.write_text(json.dumps(info, indent=2))
    return path


def run_child(log: Path, out_dir: Path) -> dict:
    """Preprocess ``log`` in a child process; wall time and peak RSS of that child."""
    cmd = [sys.executable, "-m", "preprocessing.taobao", "--input", str(log),
           "--output", str(out_dir), "--overwrite", "--no-progress"]
    result = run_measured(cmd, cwd=REPO)
    if result["exit_code"] != 0:
        raise SystemExit(f"preprocessing failed with exit code {result['exit_code']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the raw log")
    parser.add_argument("--users", type=int, default=None,
                        help="users (default rows // 100, about the real log's ratio)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "data" / "bench",
                        help="where the generated log is kept between runs")
    parser.add_argument("--keep-output", action="store_true",
                        help="keep the preprocessed dataset (deleted by default)")
    args = parser.parse_args(argv)
    users = args.users or max(1, args.rows // 100)
    log = cached_log(args.rows, users, args.seed, args.cache_dir)
    out_dir = args.cache_dir / f"out_{log.stem}"
    result = run_child(log, out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    if not args.keep_output:
        shutil.rmtree(out_dir)
    load = os.getloadavg()
    print(f"input: {log} ({log.stat().st_size / 1e9:.2f} GB, {args.rows:,} rows, {users:,} users)")
    print(f"samples: train {manifest['counts']['train']:,} / val {manifest['counts']['val']:,}"
          f" / test {manifest['counts']['test']:,}; item_n {manifest['item_n']:,}, "
          f"cate_n {manifest['cate_n']:,}")
    print(f"wall time: {result['wall_s']:.1f} s (user {result['user_s']:.1f} s, "
          f"sys {result['sys_s']:.1f} s)")
    print(f"throughput: {args.rows / result['wall_s'] / 1e6:.2f} M rows/s")
    print(f"peak RSS of the preprocessing process: {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"load average after the run (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"cpus: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
