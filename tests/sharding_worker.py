"""Child process of tests/test_sharding.py: runs on N simulated CPU devices.

The device count of a JAX process is fixed when JAX starts, so the tests run
the many-device side here, under `XLA_FLAGS=--xla_force_host_platform_device_count=N`
set by the parent. Usage:

    python tests/sharding_worker.py JOB.json

JOB.json: {"runs": [{"overrides": {...dotted config fields...}, "arg": "model=twin"}],
           "inspect": {...overrides...} | null, "restore": {...} | null, "out": "report.json"}

- every entry of `runs` is a full `train.run` of the demo config with the overrides;
- `inspect` initialises the state, takes two training steps and reports the
  sharding (PartitionSpec and shard shapes) of every state leaf after init and
  after the steps;
- `restore` restores each of its {"dir", "step", "npz"} checkpoints under the mesh of
  its overrides,
  reports the shardings and the validation metrics of the restored state, and
  writes the restored leaves to an .npz.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from configs import demo
from configs.base import set_path
from dare_jax import checkpointing, config, train
from dare_jax.data import open_dataset, pipeline
from dare_jax.evaluate import evaluate
from dare_jax.experiment import Experiment
from dare_jax.sharding import path_name


def make_spec(overrides: dict, arg: str = "") -> config.ExperimentSpec:
    """The demo config's variant `arg` with the dotted overrides, resolved."""
    values = demo.get_config(arg)
    for dotted, value in overrides.items():
        set_path(values, dotted, value)
    return config.resolve(values)


def leaf_report(state) -> dict:
    """{path: {"spec": str, "shard_shapes": [...], "shape": [...]}} of every state leaf."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = path_name(path)
        out[name] = {
            "spec": str(tuple(leaf.sharding.spec)),
            "shape": list(leaf.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
            "devices": len(leaf.sharding.device_set),
        }
    return out


def gathered(state, partitioner) -> dict:
    replicated = partitioner.replicate_fn()(state)
    return {
        path_name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(replicated)[0]
    }


def inspect(overrides: dict, arg: str) -> dict:
    spec = make_spec(overrides, arg)
    dataset = open_dataset(spec.data.dir)
    trainer = Experiment(spec, dataset)
    state = trainer.initial_state(0)
    after_init = leaf_report(state)
    data = pipeline.train_dataset(
        dataset,
        batch_size=trainer.batch_size,
        seed=0,
        num_epochs=1,
        max_length=spec.data.max_length,
        rows=trainer.partitioner.local_rows(trainer.batch_size),
    )
    losses = []
    for index in range(2):
        batch = trainer.device_batch(data[index])
        batch_spec = str(tuple(batch["hist_iid"].sharding.spec))
        state, out = trainer.train_step(state, batch)
        losses.append(float(out["total"]))
    return {
        "devices": jax.device_count(),
        "mesh": dict(trainer.partitioner.mesh.shape),
        "after_init": after_init,
        "after_step": leaf_report(state),
        "batch_spec": batch_spec,
        "losses": losses,
        "compiled": trainer.train_step._cache_size(),
    }


def restore(job: dict) -> dict:
    spec = make_spec(job["overrides"], job.get("arg", ""))
    trainer = Experiment(spec, open_dataset(spec.data.dir))
    reports = []
    for checkpoint in job["checkpoints"]:
        checkpoints = checkpointing.RunCheckpoints(checkpoint["dir"])
        which, _ = checkpoints.newest()
        state, progress = trainer.restore(checkpoints, which, checkpoint["step"])
        checkpoints.close()
        np.savez(checkpoint["npz"], **gathered(state, trainer.partitioner))
        val = evaluate(trainer, state, "val")
        reports.append({"leaves": leaf_report(state), "progress": progress, "val": val})
    return reports


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    report: dict = {"devices": jax.device_count(), "runs": []}
    for run in job.get("runs", []):
        results = train.run(make_spec(run["overrides"], run.get("arg", "")))
        report["runs"].append({"mean": results["mean"]})
    if job.get("inspect"):
        report["inspect"] = inspect(job["inspect"]["overrides"], job["inspect"].get("arg", ""))
    if job.get("restore"):
        report["restore"] = restore(job["restore"])
    Path(job["out"]).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
