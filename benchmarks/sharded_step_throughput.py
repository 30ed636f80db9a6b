"""Training samples/s of the driver's sharded step on 1 and on N simulated host devices.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/sharded_step_throughput.py
        [--models dare twin] [--steps 20] [--warmup 3] [--batch 256] [--length 100]
        [--users 1500] [--devices 8]

Each (model, mesh) runs in its own child process (with this process's environment, the
allocator setting included), since a JAX process's device count is fixed when JAX starts
(`--xla_force_host_platform_device_count`). The child builds the driver's experiment
(`dare_jax.experiment.Experiment` of `configs/demo.py`: parameters created in their
shardings, batches split on `data`, state donated) on the demo-scale synthetic dataset
(generated once under data/bench/, git-ignored) and times
`train_step(state, device_batch(batch))` over pre-gathered batches, excluding
compilation and warm-up. Meshes: 1 device; N devices data parallel (`mesh.data=N`);
N devices as (N/2, 2) with the item and category tables split by rows over
`model`. Simulated devices share the machine's cores: the figures show the
overhead of the sharded code path, not a speed-up. The 1-minute load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLES = "embed/.*/(item|category)$"


def _child(spec: dict) -> dict:
    import jax

    from configs import demo
    from dare_jax import config
    from dare_jax.data import pipeline
    from dare_jax.data.preprocess import prepare_dataset
    from dare_jax.experiment import Experiment

    cfg = demo.get_config(f"model={spec['model']}")
    cfg.data.synthetic_users = spec["users"]
    cfg.data.raw_path = str(REPO / f"data/bench/sharded_{spec['users']}/log.csv")
    cfg.data.dir = str(REPO / f"data/bench/sharded_{spec['users']}/pre")
    cfg.data.max_length = spec["length"]
    cfg.train.batch_size = spec["batch"]
    for key, value in spec["mesh"].items():
        cfg.mesh[key] = value
    resolved = config.resolve(cfg)
    dataset = prepare_dataset(resolved.data)
    experiment = Experiment(resolved, dataset)
    data = pipeline.train_dataset(
        dataset,
        batch_size=experiment.batch_size,
        seed=0,
        num_epochs=1,
        max_length=spec["length"],
        rows=experiment.partitioner.local_rows(experiment.batch_size),
    )
    count = spec["warmup"] + spec["steps"]
    if count > len(data):
        raise SystemExit(f"only {len(data)} batches per epoch; lower --steps or --batch")
    batches = [data[i] for i in range(count)]
    state = experiment.initial_state(0)
    times = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        state, out = experiment.train_step(state, experiment.device_batch(batch))
        jax.block_until_ready(out["total"])
        if index >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    return {
        "devices": jax.device_count(),
        "mesh": dict(experiment.partitioner.mesh.shape),
        "samples_per_s": spec["batch"] / statistics.median(times),
        "step_ms": 1000 * statistics.median(times),
        "compiled": experiment.train_step._cache_size(),
    }


def _run(spec: dict, devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"child {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dare", "twin"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    if args.devices % 2 or args.batch % args.devices:
        print("--devices must be even and divide --batch", file=sys.stderr)
        return 2
    meshes = [
        ("1 device", 1, {}),
        (f"{args.devices} devices, data parallel", args.devices, {"data": args.devices}),
        (
            f"{args.devices} devices, ({args.devices // 2}, 2), item+category tables row-split",
            args.devices,
            {"data": args.devices // 2, "model": 2, "row_sharded": TABLES},
        ),
    ]
    print(
        f"batch {args.batch}, L {args.length}, demo synthetic data ({args.users} users), "
        f"{args.steps} timed steps after {args.warmup} warm-up; "
        f"load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print("| model | mesh | train samples/s | ms/step |")
    print("|---|---|---|---|")
    for model in args.models:
        for label, devices, mesh in meshes:
            spec = {
                "model": model,
                "mesh": mesh,
                "steps": args.steps,
                "warmup": args.warmup,
                "batch": args.batch,
                "length": args.length,
                "users": args.users,
            }
            out = _run(spec, devices)
            assert out["devices"] == devices and out["compiled"] == 1, out
            print(
                f"| {model.upper()} | {label} | {out['samples_per_s']:,.0f} | "
                f"{out['step_ms']:.1f} |",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
