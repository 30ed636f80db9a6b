"""What an evaluation's checkpoint costs the training loop: the time it stalls, the time the
write takes, CPU and peak memory, with the write waited for (a blocking save) or not
(`dare_jax.checkpointing`'s asynchronous save).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/checkpoint_write.py \\
        --rows 4320325 --evaluations 3

A DARE-sized training state (two [rows, 16] float32 item tables and their two Adam
moments) is checkpointed with `dare_jax.checkpointing.RunCheckpoints`, `--evaluations`
times in a row, each in its own child process (with this process's environment, the
allocator setting included) so that its peak RSS (`wait4`) is its own:

- `blocking`: `save` and then `wait`: the loop stalls for the whole write;
- `async`: `save` only: the loop stalls until the arrays are off the device, the files are
  written in the background (the `write` column: from `save` until `wait` returns, measured
  with nothing else running).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from child_process import run_measured  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("blocking", "async")
GIB = 1024**3


def child(variant: str, rows: int, evaluations: int, directory: Path) -> None:
    """Build the state, run the evaluations' saves, print one JSON line of timings."""
    import jax

    from dare_jax import checkpointing

    key = jax.random.PRNGKey(0)
    names = [f"{kind}_{table}" for kind in ("param", "mu", "nu")
             for table in ("attention", "representation")]
    state = {name: jax.random.normal(jax.random.fold_in(key, i), (rows, 16)) * 0.01
             for i, name in enumerate(names)}
    jax.block_until_ready(state)
    checkpoints = checkpointing.RunCheckpoints(directory)
    stall, write, cpu = [], [], []
    for evaluation in range(evaluations):
        step = 150 * (evaluation + 1)
        started, cpu_started = time.perf_counter(), time.process_time()
        checkpoints.save(checkpointing.BEST, step, state, {"best_step": step})
        if variant == "blocking":
            checkpoints.wait()
        stall.append(time.perf_counter() - started)
        checkpoints.wait()
        write.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    checkpoints.close()
    disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    print(json.dumps({"stall": stall, "write": write, "cpu": cpu, "bytes_on_disk": disk}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4_320_325, help="item table rows")
    parser.add_argument("--evaluations", type=int, default=3, help="evaluations in a row")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where checkpoints are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rows, args.evaluations, args.dir)
        return 0
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir))
    state_gib = 6 * args.rows * 16 * 4 / GIB
    print(f"state: {args.rows:,} rows x 16 x 2 tables, params + 2 moments = {state_gib:.2f} GiB"
          f"; {args.evaluations} evaluations; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| variant | loop stalled, s per evaluation | write, s | CPU s | peak RSS | on disk |")
    print("|---|---|---|---|---|---|")
    try:
        for variant in args.variants.split(","):
            out = root / variant
            command = [sys.executable, __file__, "--child", variant, "--rows", str(args.rows),
                       "--evaluations", str(args.evaluations), "--dir", str(out)]
            with tempfile.TemporaryFile("w+") as output:
                result = run_measured(command, cwd=REPO, output=output)
                output.seek(0)
                lines = output.read().splitlines()
            if result["exit_code"] != 0:
                raise SystemExit(f"{variant} failed:\n" + "\n".join(lines[-20:]))
            figures = json.loads(lines[-1])
            stall, write, cpu = (", ".join(f"{s:.2f}" for s in figures[key])
                                 for key in ("stall", "write", "cpu"))
            print(f"| {variant} | {stall} | {write} | {cpu} | "
                  f"{result['peak_rss_bytes'] / GIB:.2f} GiB | "
                  f"{figures['bytes_on_disk'] / GIB:.2f} GiB |", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
