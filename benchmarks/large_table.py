"""DARE with an item table of tens of millions of rows, end to end on one machine (lazy
table updates).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/large_table.py --root /tmp/dare_large
        [--catalogue 44000000] [--rows 126000000] [--users 120000] [--steps 300]
        [--table-updates lazy|row_sparse|dense]

1. Writes (once) a synthetic Taobao-format log (`dare_jax.data.synthetic.write_taobao_log`)
   whose catalogue has `--catalogue` items, with near-uniform item popularity and few re-visits
   (`item_zipf`, `p_revisit` below) so that most of the catalogue shows up in the log: the
   preprocessed dataset's item table has item_n rows (printed).
2. Preprocesses it (once) with `python -m preprocessing.taobao` in a child process.
3. Trains with the driver in a child process:
   `python -m dare_jax.main --config configs/taobao.py:model=dare,seeds=1,steps=N
   --config.optim.table_updates=lazy ...` (`--table-updates`: the `optim.table_updates`
   value; the child inherits the allocator setting; paper setup otherwise: batch 2048,
   L = 200, dims 16), one validation + checkpoint at the last step (the best, so the test
   evaluation reuses the state in memory), then the test; no embedding export.

Prints, per phase, wall time and the child's peak resident memory (`wait4` rusage: the kernel's
high-water mark), and for training the samples/s between the first and the last logged
training loss (rows of the run's metrics.jsonl, written every `--log-every` steps, timed as
they appear): compilation, evaluation and checkpointing excluded, the input pipeline included.
The load average is printed before and after each phase. Needs a large machine: memory
for the tables and their Adam moments, and disk under `--root` for the log, the dataset and
two checkpoints (benchmarks/README.md gives the sizes): run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Generator settings that spread the log over the catalogue (defaults: item_zipf 0.4,
# p_revisit 0.31, which concentrate a log on fewer, more popular items).
SPREAD = {"item_zipf": 0.05, "p_revisit": 0.05}
BATCH = 2048


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run_child(cmd: list[str], on_start=None) -> dict:
    """Run `cmd` (cwd: the repository); wall seconds, peak RSS and CPU seconds of the child."""
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO)
    if on_start is not None:
        on_start()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {code}")
    return {
        "wall_s": time.perf_counter() - started,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def make_log(args: argparse.Namespace) -> Path:
    """The synthetic log (generated once; a .json stamp marks a complete file)."""
    path = args.root / f"log_{args.catalogue}i_{args.rows}r_{args.users}u.csv"
    stamp = path.with_suffix(".json")
    if path.is_file() and stamp.is_file():
        return path
    print(f"generating {path} ({_load()})", flush=True)
    settings = [f"--set={k}={v}" for k, v in {"n_items": args.catalogue, **SPREAD}.items()]
    cmd = [sys.executable, "-m", "preprocessing.synthetic", "--output", str(path),
           "--users", str(args.users), "--rows", str(args.rows), "--overwrite",
           "--no-progress", *settings]
    result = run_child(cmd)
    stamp.write_text(json.dumps(result))
    print(f"  generated in {result['wall_s']:.0f} s, peak RSS {result['peak_rss_gib']:.2f} GiB "
          f"({_load()})", flush=True)
    return path


def make_dataset(args: argparse.Namespace, log: Path) -> Path:
    """The preprocessed dataset of `log` (once)."""
    out = args.root / f"pre_{log.stem}"
    if (out / "manifest.json").is_file():
        return out
    print(f"preprocessing into {out} ({_load()})", flush=True)
    cmd = [sys.executable, "-m", "preprocessing.taobao", "--input", str(log), "--output",
           str(out), "--overwrite", "--no-progress"]
    result = run_child(cmd)
    print(f"  preprocessed in {result['wall_s']:.0f} s, peak RSS "
          f"{result['peak_rss_gib']:.2f} GiB ({_load()})", flush=True)
    return out


class StepClock:
    """Watches a run's metrics.jsonl and records when each training row appears."""

    def __init__(self, path: Path):
        self.path, self.seen, self.done = path, [], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _watch(self) -> None:
        offset = 0
        while not self.done.is_set():
            if self.path.is_file():
                with open(self.path) as f:
                    f.seek(offset)
                    text = f.read()
                complete = text[: text.rfind("\n") + 1]
                offset += len(complete)
                now = time.perf_counter()
                for line in complete.splitlines():
                    row = json.loads(line)
                    if row.get("split") == "train":
                        self.seen.append((now, int(row["step"])))
            time.sleep(0.05)

    def samples_per_second(self) -> tuple[float, int, int]:
        (t0, s0), (t1, s1) = self.seen[0], self.seen[-1]
        return (s1 - s0) * BATCH / (t1 - t0), s0, s1


def train(args: argparse.Namespace, data_dir: Path, log: Path) -> None:
    workdir = args.root / f"run_{args.model}_{args.table_updates}_{args.steps}"
    shutil.rmtree(workdir, ignore_errors=True)
    overrides = {
        "data.dir": data_dir,
        "data.raw_path": log,
        "workdir": workdir,
        "optim.table_updates": args.table_updates,
        "train.eval_every_steps": args.steps,
        "log.every_steps": args.log_every,
        "log.progress_bar": False,
        "log.tensorboard": False,
        "export.embeddings": False,
    }
    cmd = [sys.executable, "-m", "dare_jax.main",
           f"--config=configs/taobao.py:model={args.model},seeds=1,steps={args.steps}",
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    print(f"training: {' '.join(cmd[1:])} ({_load()})", flush=True)
    clock = StepClock(workdir / "seed_0" / "metrics.jsonl")
    result = run_child(cmd, on_start=clock.start)
    clock.done.set()
    rate, first, last = clock.samples_per_second()
    results = json.loads((workdir / "results.json").read_text())
    print(f"  trained in {result['wall_s']:.0f} s wall (CPU {result['cpu_s']:.0f} s), peak RSS "
          f"{result['peak_rss_gib']:.2f} GiB ({_load()})")
    print(f"  training throughput, steps {first} -> {last}: {rate:,.0f} samples/s")
    print(f"  test AUC {results['mean']['auc']:.4f} after {args.steps} steps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder for data and the run")
    parser.add_argument("--catalogue", type=int, default=44_000_000, help="items in the world")
    parser.add_argument("--rows", type=int, default=126_000_000, help="rows of the log")
    parser.add_argument("--users", type=int, default=120_000)
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--log-every", type=int, default=25, help="training-loss rows, steps")
    parser.add_argument("--model", default="dare")
    parser.add_argument(
        "--table-updates", default="lazy", choices=("lazy", "row_sparse", "dense"),
        help="optim.table_updates (row_sparse: the paper's dense Adam from looked-up rows; "
        "dense: the same maths on autodiff's dense gradients)",
    )
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    log = make_log(args)
    data_dir = make_dataset(args, log)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    print(f"dataset: item_n {manifest['item_n']:,} (item table rows), cate_n "
          f"{manifest['cate_n']:,}; samples train {counts['train']:,} / val {counts['val']:,} "
          f"/ test {counts['test']:,}; {os.cpu_count()} cpus", flush=True)
    train(args, data_dir, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
