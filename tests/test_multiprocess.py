"""Two processes on this machine (localhost coordinator, gloo CPU collectives, 2
simulated devices each) give the numbers of one process on one device.

The run directory starts as a 2-seed run killed on one device during seed 0
(latest checkpoint at step 4). The two processes, started with the real
command line (process 0 with flags, process 1 with the JAX_* environment
variables), resume seed 0 from that checkpoint (a multi-process Orbax restore
onto a 2 x 2 mesh with row-sharded tables) and train seed 1 from scratch
(parameters created sharded across the processes). Each process reads its own
rows of every batch; only process 0 writes logs and results.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from crash_support import SimulatedCrash, crashing_train_iterator
from sharding_worker import make_spec
from test_sharding import (
    REPO,
    TABLES,
    assert_same_run,
    child_env,
    data_dir,  # noqa: F401  (module fixture)
    overrides,
)

from dare_jax import checkpointing, train
from dare_jax.data import pipeline
from dare_jax.run_logging import read_jsonl


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_device(data_dir, tmp_path):  # noqa: F811
    rules = {"mesh.row_sharded": TABLES, "train.num_seeds": 2}
    reference = tmp_path / "one_device"
    train.run(make_spec(overrides(data_dir, reference, **rules), "model=dare"))

    workdir = tmp_path / "two_processes"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "train_iterator", crashing_train_iterator(6))
        with pytest.raises(SimulatedCrash):
            train.run(make_spec(overrides(data_dir, workdir, **rules), "model=dare"))
    assert checkpointing.RunCheckpoints(workdir / "seed_0/checkpoints").newest()[1] == 4

    flags = [
        f"--config.{key}={value}"
        for key, value in overrides(
            data_dir, workdir, **rules, **{"mesh.data": 2, "mesh.model": 2}
        ).items()
    ]
    command = [sys.executable, "-m", "dare_jax.main", "--config", "configs/demo.py:model=dare"]
    address = f"localhost:{free_port()}"
    env = child_env(2)  # two simulated CPU devices per process: a 2 x 2 mesh in all
    process_1_env = {
        **env,
        "JAX_COORDINATOR_ADDRESS": address,
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    process_0_flags = [f"--coordinator_address={address}", "--num_processes=2", "--process_id=0"]
    processes = [
        subprocess.Popen(
            [*command, *flags, *process_0_flags],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ),
        subprocess.Popen(
            [*command, *flags],
            cwd=REPO,
            env=process_1_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ),
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=400)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index, process in enumerate(processes):
        assert process.returncode == 0, f"process {index}:\n{outputs[index][-4000:]}"
    # Process 0 reports; process 1 computed the same numbers silently.
    assert "seed 0: resuming from step 4" in outputs[0] and "results:" in outputs[0]
    assert "resuming" not in outputs[1] and "results:" not in outputs[1]

    for seed in (0, 1):
        assert_same_run(workdir, reference, seed)
        # Every record once: process 1 wrote nothing.
        records = read_jsonl(workdir / f"seed_{seed}/metrics.jsonl")
        assert len(records) == len(read_jsonl(reference / f"seed_{seed}/metrics.jsonl"))
    results = json.loads((workdir / "results.json").read_text())
    assert [r["seed"] for r in results["seeds"]] == [0, 1]
    # The tables exported after a cross-process gather have the dataset's row counts.
    manifest = json.loads((data_dir / "manifest.json").read_text())
    item = np.load(workdir / "seed_1/embeddings/embed.attention.item.npy")
    assert item.shape == (manifest["item_n"], 4)
    np.testing.assert_allclose(
        item, np.load(reference / "seed_1/embeddings/embed.attention.item.npy"), atol=2e-4
    )
