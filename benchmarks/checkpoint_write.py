"""What one evaluation's checkpoint writes cost: time, CPU and peak memory, before and after
the driver wrote a new best only once.

    python benchmarks/checkpoint_write.py --rows 4320325 --evaluations 3

A DARE-sized training state (two [rows, 16] float32 item tables, their Adam moments kept
flat as `RowSparseAdam` keeps them, reshaped to optax's layout for the checkpoint as
`steps.to_checkpoint` does) is checkpointed with `dare_jax.checkpointing.RunCheckpoints` as
the driver does at an evaluation that finds a new best, `--evaluations` times in a row.
Each variant runs in its own child process, so its peak RSS (`wait4`) is its own:

- `twice`: the best and the latest written separately (the driver until commit 3f56789),
  with Orbax's default of writing every array at once;
- `twice_limited`: the same with at most `SAVE_CONCURRENT_GB` written at a time;
- `once_linked`: written once as the best, hard-linked as the latest (`RunCheckpoints.copy`),
  limited (the driver now).
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
VARIANTS = ("twice", "twice_limited", "once_linked")
GIB = 1024**3


def child(variant: str, rows: int, evaluations: int, directory: Path) -> None:
    """Build the state, run the evaluations' writes, print one JSON line of timings."""
    import jax
    import jax.numpy as jnp

    from dare_jax import checkpointing

    if variant == "twice":
        checkpointing.SAVE_CONCURRENT_GB = 96  # Orbax's own default
    key = jax.random.PRNGKey(0)
    tables = ("attention", "representation")
    params = {t: jax.random.normal(jax.random.fold_in(key, i), (rows, 16)) * 0.01
              for i, t in enumerate(tables)}
    mu = {t: jax.random.normal(jax.random.fold_in(key, 10 + i), (rows * 16,)) * 1e-3
          for i, t in enumerate(tables)}
    nu = {t: jnp.square(m) for t, m in mu.items()}
    jax.block_until_ready((params, mu, nu))
    checkpoints = checkpointing.RunCheckpoints(directory)
    seconds, cpu = [], []
    for evaluation in range(evaluations):
        step = 150 * (evaluation + 1)
        progress = {"best_step": step}
        started, cpu_started = time.perf_counter(), time.process_time()

        def saved_state():  # optax's layout, as steps.to_checkpoint makes it per save
            return {"params": params,
                    "mu": {t: m.reshape(rows, 16) for t, m in mu.items()},
                    "nu": {t: n.reshape(rows, 16) for t, n in nu.items()}}

        checkpoints.save(checkpointing.BEST, step, saved_state(), progress)
        if variant == "once_linked":
            checkpoints.copy(checkpointing.BEST, checkpointing.LATEST, step)
        else:
            checkpoints.save(checkpointing.LATEST, step, saved_state(), progress)
        checkpoints.keep_only(checkpointing.BEST, step)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    checkpoints.close()
    sizes = {p.stat().st_ino: p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu,
                      "bytes_on_disk": sum(sizes.values())}))  # hard links counted once


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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    state_gib = 6 * args.rows * 16 * 4 / GIB
    print(f"state: {args.rows:,} rows x 16 x 2 tables, params + 2 moments = {state_gib:.2f} GiB"
          f"; {args.evaluations} evaluations, each a new best; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| variant | seconds per evaluation | CPU s per evaluation | peak RSS | on disk |")
    print("|---|---|---|---|---|")
    try:
        for variant in args.variants.split(","):
            out = root / variant
            command = [sys.executable, __file__, "--child", variant, "--rows", str(args.rows),
                       "--evaluations", str(args.evaluations), "--dir", str(out)]
            with tempfile.TemporaryFile("w+") as output:
                result = run_measured(command, cwd=REPO, env=env, output=output)
                output.seek(0)
                lines = output.read().splitlines()
            if result["exit_code"] != 0:
                raise SystemExit(f"{variant} failed:\n" + "\n".join(lines[-20:]))
            figures = json.loads(lines[-1])
            per_eval = ", ".join(f"{s:.1f}" for s in figures["seconds"])
            per_cpu = ", ".join(f"{s:.1f}" for s in figures["cpu_seconds"])
            print(f"| {variant} | {per_eval} | {per_cpu} | "
                  f"{result['peak_rss_bytes'] / GIB:.2f} GiB | "
                  f"{figures['bytes_on_disk'] / GIB:.2f} GiB |", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
