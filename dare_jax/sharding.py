"""Mesh and partition rules: one code path for 1 device, N devices and several hosts.

`Partitioner` owns a `jax.make_mesh((data, model), ("data", "model"))` mesh and hands out
`NamedSharding`s: the batch is split by rows over `data`; a state leaf whose path
(`params/embed/attention/item`, `opt_state/0/mu/embed/attention/item`, ...) matches the
`row_sharded` regex is split by rows over `model` (the big tables and their Adam moments);
everything else is replicated. The training step is `jax.jit` with these as in/out
shardings, so XLA inserts the collectives and the step function is the single-device one.

Row-split tables need a row count divisible by `model`: they are padded to a multiple of
`mesh.table_rows_multiple` (`padded_rows`), a config value rather than the device count so
that a config initialises the same parameters on every mesh; padding rows are never looked
up and get no gradient or L2 penalty.

Multi-host: after `initialize_distributed` the mesh spans every process's devices, and each
process feeds only the batch rows its own devices hold (`local_rows`, `shard_batch`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"


class ShardingError(ValueError):
    """A mesh or partition-rule setting that cannot work; the message names the field."""


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None, *, auto: bool = False,
) -> bool:
    """Join a multi-process JAX run (before any other JAX call); True when one was joined.

    Arguments left as None come from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`. With no coordinator and `auto=False` this is a single-process run;
    `auto=True` lets JAX detect a managed cluster (SLURM, Open MPI, Kubernetes, Cloud TPU).
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if not (coordinator_address or auto):
        if num_processes not in (None, 1):
            raise ShardingError(f"num_processes={num_processes} needs a coordinator address "
                                "(--coordinator_address or JAX_COORDINATOR_ADDRESS)")
        return False
    # CPU-only processes need a collectives backend to all-reduce across processes; the
    # setting is ignored on GPU/TPU, which use NCCL / ICI.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def is_main_process() -> bool:
    """True on the process that writes logs, figures and results (process 0)."""
    return jax.process_index() == 0


def padded_rows(rows: int, multiple: int) -> int:
    """`rows` rounded up to a multiple of `multiple` (the row count of a row-split table)."""
    return int(math.ceil(rows / multiple) * multiple)


def path_name(path: tuple) -> str:
    """A pytree key path as slash-separated names (`params/embed/attention/item`)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class Partitioner:
    """The mesh of a run and the shardings of its state and batches.

    Args:
      data: size of the `data` axis (-1: every device not used by `model`).
      model: size of the `model` axis (-1: every device not used by `data`).
      row_sharded: regex searched in each state leaf's path; matching leaves with at least
        one dimension are split by rows over `model`. Empty: none.
      devices: the devices of the mesh (default: all devices of all processes).

    Raises ShardingError when the axis sizes do not multiply to the device count or the
    regex does not compile.
    """

    def __init__(
        self, data: int = -1, model: int = 1, row_sharded: str = "", devices: list | None = None
    ):
        devices = list(jax.devices() if devices is None else devices)
        count, data, model = len(devices), int(data), int(model)
        if data == -1 and model == -1:
            raise ShardingError("mesh.data and mesh.model cannot both be -1")
        for name, size in (("mesh.data", data), ("mesh.model", model)):
            if size == 0 or size < -1:
                raise ShardingError(f"config field {name} = {size}: expected -1 or >= 1")
        if data == -1:
            data = count // model if count % model == 0 else -1
        elif model == -1:
            model = count // data if count % data == 0 else -1
        if data < 1 or model < 1 or data * model != count:
            raise ShardingError(f"mesh.data x mesh.model must equal the {count} device(s) "
                                f"({jax.process_count()} process(es)); got data={data}, "
                                f"model={model}")
        try:
            self.rule = re.compile(row_sharded) if row_sharded else None
        except re.error as error:
            raise ShardingError(f"config field mesh.row_sharded = {row_sharded!r}: {error}")
        # Auto axes: XLA's partitioner propagates shardings inside the step, so the
        # model code needs no sharding annotations.
        auto = (jax.sharding.AxisType.Auto,) * 2
        self.mesh = jax.make_mesh((data, model), (DATA, MODEL), axis_types=auto, devices=devices)
        self.data_size, self.model_size = data, model  # the mesh's axis sizes
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA))
        self.row_sharding = NamedSharding(self.mesh, P(MODEL))

    def is_row_sharded(self, path_name: str) -> bool:
        """Whether the state leaf at `path_name` (slash-separated) is split by rows. The
        row-sparse optimizer's `scratch/touched/<table>` id lists are as long as a batch's
        lookups, not a table: always replicated."""
        if path_name.startswith("scratch/touched/"):
            return False
        return bool(self.rule and self.rule.search(path_name))

    def leaf_sharding(self, path_name: str, shape: tuple[int, ...]) -> NamedSharding:
        """The sharding of one state leaf; ShardingError when its rows cannot be split."""
        if not (self.is_row_sharded(path_name) and len(shape) >= 1):
            return self.replicated
        if shape[0] % self.model_size:
            raise ShardingError(f"{path_name} has {shape[0]} rows, not divisible by mesh.model "
                                f"= {self.model_size}; set mesh.table_rows_multiple to a "
                                "multiple of it")
        return self.row_sharding

    def state_shardings(self, abstract_state: Any) -> Any:
        """A `NamedSharding` per leaf of `abstract_state` (arrays or ShapeDtypeStructs)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: self.leaf_sharding(path_name(path), tuple(np.shape(leaf))),
            abstract_state,
        )

    def abstract(self, abstract_state: Any) -> Any:
        """`abstract_state` as ShapeDtypeStructs carrying their shardings (restore targets)."""
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            abstract_state, self.state_shardings(abstract_state),
        )

    def check_batch_size(self, batch_size: int, field: str = "train.batch_size") -> None:
        """ShardingError unless `batch_size` splits evenly over `data` and the processes."""
        quantum = math.lcm(self.data_size, jax.process_count())
        if batch_size % quantum:
            raise ShardingError(f"config field {field} = {batch_size}: must be a multiple of "
                                f"{quantum} (mesh data axis {self.data_size}, "
                                f"{jax.process_count()} process(es))")

    def local_rows(self, batch_size: int) -> tuple[int, int]:
        """[start, stop) of the global batch rows that this process's devices hold (every
        process computes the same global batch of sample indices and gathers only these)."""
        index_map = self.batch_sharding.addressable_devices_indices_map((batch_size,))
        # Devices along `model` hold the same rows: the set keeps each slice once.
        slices = sorted({(i[0].start or 0, i[0].stop or batch_size) for i in index_map.values()})
        start, stop = slices[0][0], slices[-1][1]
        if sum(b - a for a, b in slices) != stop - start:
            raise ShardingError(f"process {jax.process_index()} holds non-contiguous batch "
                                f"rows {slices}")
        return start, stop

    def shard_batch(self, local_batch: dict[str, np.ndarray], batch_size: int) -> dict:
        """This process's rows `[b, ...]` -> global arrays `[batch_size, ...]` split on `data`."""
        return {
            key: jax.make_array_from_process_local_data(
                self.batch_sharding, np.asarray(value), (batch_size, *np.shape(value)[1:])
            )
            for key, value in local_batch.items()
        }

    def replicate_fn(self):
        """A jitted identity that gathers any pytree onto every device (fully replicated),
        so that each host can read global arrays (evaluation outputs, exported tables)."""
        return jax.jit(lambda tree: tree, out_shardings=self.replicated)
