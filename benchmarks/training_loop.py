"""Whole-loop training speed: fresh `python -m dare_jax.main` runs, read back from their timings.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/training_loop.py
        [--models dare twin din] [--histories host,device]
        [--config configs/taobao_synthetic.py] [--steps 300] [--workdir DIR]
        [--set FIELD=VALUE ...] [--compile-cache DIR] [--timeout S] [--json PATH]

For each model and each `data.histories` value, one fresh process runs the command line
`python -m dare_jax.main --config CONFIG:model=M,steps=N --config.data.histories=H
--config.workdir=WORKDIR/M_H [--config.FIELD=VALUE ...]` (the first run generates and
preprocesses the config's synthetic log, once), then this script reads the seed's
`result.json` "timings" (`dare_jax.phase_timer`: wall seconds per phase of the loop and the
XLA compile seconds inside each) and prints, compile seconds excluded everywhere:

* `steps`: samples/s of the training-step phase alone (dispatching steps and waiting for
  their losses, `train.dispatch_ahead` late);
* `loop`: samples/s of the training loop, steps plus the waits for the input pipeline (its
  gathering and copying run in background threads; `input` is the time the loop waited);
* `run`: samples/s of everything the seed did after its state existed: the loop, the
  evaluations (validation, then test of the best checkpoint) and the checkpoint writes and
  restore; the seconds of each part are printed too;
* compile seconds (every phase), peak device memory (GPU/TPU) and peak resident memory.

`--compile-cache DIR` gives the runs a persistent XLA compilation cache: a second run of
the same model (another `data.histories`) then loads the compiled steps instead of
compiling them again, and its compile seconds are those of what was not cached. `--json`
writes every figure. The runs inherit this process's environment, so
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` on the command line (the allocator setting the
figures are measured with: XLA:CPU's buffers in 2 MiB pages) reaches them; the setting
(`dare_jax.huge_pages.status()`) is printed and recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dare_jax import huge_pages

REPO = Path(__file__).resolve().parent.parent
# Phases of a seed after its state exists (dare_jax.train.train_seed); "init" and "export"
# (state creation, embedding export) are reported apart.
LOOP_PHASES = ("input", "train_steps")
RUN_PHASES = ("input", "train_steps", "eval", "checkpoint")


def run_one(args: argparse.Namespace, model: str, histories: str) -> dict:
    """One `dare_jax.main` process; its figures (or the reason it failed)."""
    workdir = Path(args.workdir) / f"{model}_{histories}"
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resumption
    command = [
        sys.executable,
        "-m",
        "dare_jax.main",
        "--config",
        f"{args.config}:model={model},steps={args.steps}",
        f"--config.data.histories={histories}",
        f"--config.workdir={workdir}",
        "--config.log.progress_bar=false",
        *(f"--config.{setting}" for setting in args.set),
    ]
    env = dict(os.environ)
    if args.compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(args.compile_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"model": model, "histories": histories, "error": f"timeout {args.timeout} s"}
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        print(tail, flush=True)
        return {"model": model, "histories": histories, "error": f"exit {done.returncode}"}
    figures = summarize_run(workdir)
    return {"model": model, "histories": histories, "process_seconds": round(wall, 1), **figures}


def summarize_run(workdir: Path) -> dict:
    """Samples/s and the split of one finished run directory (one seed)."""
    results = json.loads((workdir / "results.json").read_text())
    seed = results["seeds"][0]
    timings = seed["timings"]
    seconds, compiled = timings["seconds"], timings["compile_seconds"]
    samples = int(timings["samples_timed"])

    def work(phases) -> float:  # wall seconds of `phases` without their compile seconds
        return sum(seconds.get(p, 0.0) - compiled.get(p, 0.0) for p in phases)

    data_dir = REPO / results["config"]["data"]["dir"]  # relative paths are the runs' cwd's
    counts = json.loads((data_dir / "manifest.json").read_text())
    val_evaluations = sum(
        1
        for line in (workdir / f"seed_{seed['seed']}/metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") == "val"
    )
    eval_samples = val_evaluations * counts["counts"]["val"] + counts["counts"]["test"]
    out = {
        "steps": int(timings["steps_timed"]),
        "samples": samples,
        "steps_samples_per_s": _rate(samples, work(["train_steps"])),
        "loop_samples_per_s": _rate(samples, work(LOOP_PHASES)),
        "run_samples_per_s": _rate(samples, work(RUN_PHASES)),
        "eval_samples": eval_samples,
        "eval_samples_per_s": _rate(eval_samples, work(["eval"])),
        "seconds": seconds,
        "compile_seconds": compiled,
        "compile_seconds_total": round(sum(compiled.values()), 2),
        "prepare_data_seconds": results["timings"]["seconds"].get("prepare_data"),
        "setup_seconds": results["timings"]["seconds"].get("setup"),
        "table_rows": {
            "min_item_rows": results["config"]["data"].get("min_item_rows"),
            "item_n": counts["item_n"],
            "cate_n": counts["cate_n"],
        },
    }
    for key in ("peak_rss_bytes", "device_peak_bytes"):
        if key in timings:
            out[key] = timings[key]
    return out


def _rate(samples: int, seconds: float) -> float | None:
    return round(samples / seconds, 1) if seconds > 0 else None


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':6s} {'histories':9s} {'steps/s':>8s} {'steps':>10s} {'loop':>10s} "
        f"{'run':>10s}  (samples/s)  input / steps / eval / ckpt s  compile s  "
        f"peak device / RSS GiB"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['model']:6s} {row['histories']:9s} FAILED: {row['error']}")
            continue
        s = row["seconds"]
        device = row.get("device_peak_bytes", 0) / 2**30
        steps_per_s = (row["steps_samples_per_s"] or math.nan) / (row["samples"] / row["steps"])
        print(
            f"{row['model']:6s} {row['histories']:9s} {steps_per_s:8.1f} "
            f"{row['steps_samples_per_s'] or math.nan:10.0f} "
            f"{row['loop_samples_per_s'] or math.nan:10.0f} "
            f"{row['run_samples_per_s'] or math.nan:10.0f}               "
            f"{s.get('input', 0):.2f} / {s.get('train_steps', 0):.2f} / {s.get('eval', 0):.2f} / "
            f"{s.get('checkpoint', 0):.2f}  {row['compile_seconds_total']:8.1f}  "
            f"{device:.2f} / {row.get('peak_rss_bytes', 0) / 2**30:.2f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dare", "twin", "din"])
    parser.add_argument("--histories", default="host,device", help="comma-separated")
    parser.add_argument("--config", default="configs/taobao_synthetic.py")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default="runs/training_loop_benchmark")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a config override"
    )
    parser.add_argument("--compile-cache", help="persistent XLA compilation cache folder")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    histories = [h.strip() for h in args.histories.split(",") if h.strip()]
    memory = huge_pages.status()
    print(f"memory {memory}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for model in args.models:
        for mode in histories:
            rows.append(run_one(args, model, mode))
            if args.json:
                Path(args.json).write_text(json.dumps({"memory": memory, "runs": rows}, indent=1))
    print_table(rows)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
