"""Predictions, metrics and exports of a trained state (every process calls them together;
only process 0 writes files)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np

from dare_jax import metrics, sharding
from dare_jax.data import pipeline
from dare_jax.experiment import Experiment, Tables

COLUMNS = ("label", "uid", "cid")


def predict(experiment: Experiment, state: dict, split: str) -> dict[str, np.ndarray]:
    """Click probability of every sample of `split` in file order, with its columns:
    {"prob" (float64), "label", "uid", "cid"} `[N]`, the same on every process. The eval
    batch (`train.eval_batch_size`, rounded up to a multiple of the data axis and process
    count) is padded at the end; its `example_mask` keeps the filler rows out of BatchNorm's
    batch statistics (`model.eval_batchnorm_uses_batch_stats`)."""
    spec, dataset, partitioner = experiment.spec, experiment.dataset, experiment.partitioner
    batch_size = min(spec.train.eval_batch_size, dataset.num_samples(split))
    quantum = math.lcm(partitioner.data_size, jax.process_count())
    batch_size = math.ceil(batch_size / quantum) * quantum
    rows = partitioner.local_rows(batch_size)
    outputs = []
    for batch, valid in pipeline.eval_batches(
        dataset,
        split,
        batch_size=batch_size,
        max_length=spec.data.max_length,
        blind_history=spec.data.blind_history,
        rows=rows,
        histories=spec.data.histories,
    ):
        columns = {key: batch[key] for key in COLUMNS}  # this process's rows, on the host
        batch = {**batch, "example_mask": valid[rows[0] : rows[1]]}
        batch = experiment.device_batch(batch, batch_size)
        if jax.process_count() > 1:  # every process needs every row's columns
            columns = experiment.replicate({key: batch[key] for key in COLUMNS})
        outputs.append((experiment.eval_step(state, batch), columns, valid))  # fetched later
    out = {"prob": np.concatenate([np.asarray(p, np.float64)[v] for p, _, v in outputs])}
    for key in COLUMNS:
        out[key] = np.concatenate([np.asarray(c[key])[v] for _, c, v in outputs])
    return out


def evaluate(experiment: Experiment, state: dict, split: str) -> dict:
    """`dare_jax.metrics.ctr_metrics` of `state` over every sample of `split`."""
    out = predict(experiment, state, split)
    return metrics.ctr_metrics(out["label"], out["prob"], out["uid"], out["cid"])


def export_embeddings(experiment: Experiment, params, directory: Path) -> list[str]:
    """Every embedding table (a 2-D leaf under `embed`) as `<path>.npy`, without the rows no
    id reaches (padding of row-sharded tables, `data.min_*_rows`)."""
    tables = {
        _name(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if "embed" in _name(path).lower() and np.ndim(leaf) == 2
    }
    tables = experiment.replicate(tables)
    if sharding.is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            np.save(directory / f"{name}.npy", _real_rows(name, table, experiment.tables))
    return list(tables)


def export_gradients(observed, step: int, directory: Path, tables: Tables) -> None:
    """The observed per-path table gradients of one step as step_<n>.npz."""
    if not sharding.is_main_process():
        return
    directory.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_flatten_with_path(observed)[0]
    named = {_name(path).replace("/", "."): leaf for path, leaf in leaves}
    arrays = {name: _real_rows(name, leaf, tables) for name, leaf in named.items()}
    np.savez(directory / f"step_{step:08d}.npz", **arrays)


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _real_rows(name: str, array, tables: Tables) -> np.ndarray:
    """`array` without the rows beyond the dataset's ids of an item/category table."""
    array = np.asarray(array)
    real = {"item": tables.real_item, "category": tables.real_category}
    field = name.rsplit(".", 1)[-1]
    return array[: real[field]] if field in real and array.ndim == 2 else array
