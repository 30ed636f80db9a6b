"""The experiment builder: specs and a dataset in; model, optimizer, shardings, initial
state, compiled steps and input pipeline out.

    spec = dare_jax.config.resolve(config)
    experiment = Experiment(spec, prepare_dataset(spec.data))
    state = experiment.initial_state(seed)
    batches = experiment.train_batches(seed)
    state, losses = experiment.train_step(state, next(batches))

The state is created directly in its shardings (`dare_jax.sharding`); the jitted steps are
shared by every `Experiment` of the same model, optimizer, mesh and shapes in a process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from dare_jax import optim, sharding, steps
from dare_jax.config import ExperimentSpec, MeshSpec, OptimSpec
from dare_jax.data import pipeline
from dare_jax.data.device_histories import DeviceHistories
from dare_jax.models import ModelSpec, TwoStageModel


class ExperimentError(ValueError):
    """The specs do not fit the dataset or the devices; the message says which field."""


class Tables(NamedTuple):
    """Rows of the model's item and category tables, and of the dataset's ids (the rest are
    rows no id reaches: `data.min_*_rows`, or padding of row-sharded tables)."""

    item: int
    category: int
    real_item: int
    real_category: int


def table_rows(spec: ExperimentSpec, manifest: dict) -> Tables:
    """The dataset's item_n and cate_n or the larger `data.min_*_rows`, padded to a multiple
    of `mesh.table_rows_multiple` when some table is row-sharded."""
    real_item, real_category = int(manifest["item_n"]), int(manifest["cate_n"])
    item = max(real_item, spec.data.min_item_rows)
    category = max(real_category, spec.data.min_category_rows)
    if spec.mesh.row_sharded:
        item = sharding.padded_rows(item, spec.mesh.table_rows_multiple)
        category = sharding.padded_rows(category, spec.mesh.table_rows_multiple)
    return Tables(item, category, real_item, real_category)


@functools.lru_cache(maxsize=8)
def partitioner_for(mesh: MeshSpec) -> sharding.Partitioner:
    """One Partitioner (mesh) per mesh spec in a process."""
    return sharding.Partitioner(mesh.data, mesh.model, mesh.row_sharded)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """What `compile_steps` builds for one model, optimizer, mesh and shapes."""

    model: TwoStageModel
    optimizer: Any
    state_shardings: Any
    init_state: Any  # (init_rng, example_batch, step_rng) -> state
    train_step: Any  # (state, batch) -> (state, losses)
    eval_step: Any  # (state, batch) -> click probability [B]
    from_checkpoint: Any  # checkpointed state -> state


@functools.lru_cache(maxsize=4)
def compile_steps(
    model_spec: ModelSpec,
    optim_spec: OptimSpec,
    mesh: MeshSpec,
    tables: Tables,
    max_length: int,
    batch_shapes: tuple[tuple[str, tuple[int, ...], str], ...],
) -> CompiledSteps:
    """The model, optimizer, state shardings (from the abstract state) and jitted steps;
    `batch_shapes`: ((key, shape, dtype), ...) of a global training batch."""
    model = TwoStageModel(model_spec, tables.item, tables.category, max_length)
    optimizer = optim.make_optimizer(optim_spec)
    partitioner = partitioner_for(mesh)
    batch = {key: jax.ShapeDtypeStruct(shape, np.dtype(d)) for key, shape, d in batch_shapes}
    shardings = partitioner.state_shardings(steps.abstract_state(model, optimizer, batch))
    placement = (shardings, partitioner.batch_sharding, partitioner.replicated)
    return CompiledSteps(
        model,
        optimizer,
        shardings,
        steps.make_init_state(model, optimizer, shardings),
        steps.make_train_step(model, optimizer, optim_spec.weight_decay, *placement),
        steps.make_eval_step(model, *placement),
        steps.make_from_checkpoint(model, optimizer, batch, shardings),
    )


class Experiment:
    """Everything built once per experiment and shared by its seeds: spec, dataset,
    partitioner, tables, model, optimizer, the jitted train_step and eval_step, batch_size,
    steps_per_epoch, total_steps, histories (the on-device history builder with
    `data.histories = "device"`, else None). ExperimentError when the specs do not fit the
    dataset or the devices."""

    def __init__(self, spec: ExperimentSpec, dataset):
        self.spec, self.dataset = spec, dataset
        self.batch_size = spec.train.batch_size
        try:
            self.partitioner = partitioner_for(spec.mesh)
            self.partitioner.check_batch_size(self.batch_size)
            shuffle = spec.data.shuffle
            self.steps_per_epoch = pipeline.steps_per_epoch(dataset, self.batch_size, shuffle)
            self.masked_batches = pipeline.has_partial_batches(dataset, self.batch_size, shuffle)
            self.histories = None
            if spec.data.histories == "device":
                self.histories = DeviceHistories(dataset, spec.data.max_length, self.partitioner)
        except ValueError as error:  # ShardingError included
            raise ExperimentError(str(error)) from error
        self.tables = table_rows(spec, dataset.manifest)
        self.total_steps = self.steps_per_epoch * spec.train.num_epochs
        if spec.train.max_steps > 0:
            self.total_steps = min(self.total_steps, spec.train.max_steps)
        batch = self.example_batch()
        shapes = tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in sorted(batch.items()))
        try:
            self._compiled = compile_steps(
                spec.model, spec.optim, spec.mesh, self.tables, spec.data.max_length, shapes
            )
        except sharding.ShardingError as error:
            raise ExperimentError(str(error)) from error
        self.model, self.optimizer = self._compiled.model, self._compiled.optimizer
        self.train_step, self.eval_step = self._compiled.train_step, self._compiled.eval_step
        self.initial_weights = self._initial_weights(batch)

    def example_batch(self) -> dict:
        """A training batch (numpy) with the keys and shapes the steps are compiled for: the
        same samples on every process (numpy inputs of a jitted function are replicated)."""
        batch = self.dataset.gather("train", np.arange(self.batch_size), self.spec.data.max_length)
        if self.masked_batches:  # file order with partial batches (dare_jax.data.pipeline)
            batch["example_mask"] = np.ones(self.batch_size, bool)
        return batch

    def _initial_weights(self, example: dict) -> dict | None:
        """`model.init_from`'s official weights as our {'params', 'batch_stats'} (numpy),
        checked against the model's shapes before anything is trained or written."""
        path = self.spec.model.init_from
        if not path:
            return None
        from dare_jax.interop import torch_weights

        template = jax.eval_shape(
            lambda batch: self.model.init(jax.random.PRNGKey(0), batch, train=False), example
        )
        try:
            state_dict = torch_weights.load_state(path)
            variables, _ = torch_weights.import_state_dict(self.model.spec, template, state_dict)
        except (OSError, ImportError, KeyError, TypeError, ValueError) as error:
            raise ExperimentError(f"config field model.init_from = {path!r}: {error}") from error
        return variables

    def initial_state(self, seed: int) -> dict:
        """The seed's fresh state, created directly in its shardings; with `model.init_from`,
        its params and BatchNorm statistics are those weights."""
        init_rng, step_rng = np.asarray(jax.random.split(jax.random.PRNGKey(seed)))
        state = self._compiled.init_state(init_rng, self.example_batch(), step_rng)
        if self.initial_weights is not None:
            for collection, values in self.initial_weights.items():
                state[collection] = jax.tree.map(_put_like, values, state[collection])
        return state

    def train_batches(self, seed: int, position: dict | None = None):
        """The seed's checkpointable iterator (`get_state()`) over the training batches on the
        devices (this process's rows, `data.shuffle` or file order), from `position` (a saved
        `get_state()`) or the start; the pipeline's prefetch threads copy them to the devices."""
        data = self.spec.data
        batches = pipeline.train_dataset(
            self.dataset,
            batch_size=self.batch_size,
            seed=seed,
            num_epochs=self.spec.train.num_epochs,
            max_length=data.max_length,
            blind_history=data.blind_history,
            rows=self.partitioner.local_rows(self.batch_size),
            shuffle=data.shuffle,
            histories=data.histories,
        ).map(self.device_batch)
        threads = data.prefetch_threads
        return pipeline.train_iterator(batches, position, prefetch=2 * threads, threads=threads)

    def device_batch(self, local_batch: dict, batch_size: int | None = None) -> dict:
        """This process's rows of a batch -> the model's global batch on the devices, split on
        `data` (histories built there from spans with `data.histories = "device"`)."""
        batch = self.partitioner.shard_batch(local_batch, batch_size or self.batch_size)
        return batch if self.histories is None else self.histories(batch)

    def checkpoint_template(self) -> dict:
        """Shapes, dtypes and shardings of the state as checkpoints hold it, uncomputed."""
        abstract = steps.abstract_state(self.model, self.optimizer, self.example_batch())
        return self.partitioner.abstract(steps.to_checkpoint(abstract))

    def restore(self, checkpoints, which: str, step: int | None = None) -> tuple[dict, dict]:
        """(state, progress) from a `latest` or `best` checkpoint of a `RunCheckpoints`."""
        saved, progress = checkpoints.restore(which, self.checkpoint_template(), step=step)
        return self._compiled.from_checkpoint(saved), progress

    def save(self, checkpoints, which: str, step: int, state: dict, progress: dict) -> None:
        checkpoints.save(which, step, steps.to_checkpoint(state), progress)

    @functools.cached_property
    def replicate(self):
        """A jitted identity that gathers any pytree onto every device (whole arrays on
        every host: evaluation outputs, exported tables)."""
        return self.partitioner.replicate_fn()


def _put_like(value: np.ndarray, like: jax.Array) -> jax.Array:
    """`value` as a global array in `like`'s sharding and dtype (from each process's shards)."""
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])
