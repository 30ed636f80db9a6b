"""Grain input pipelines over a preprocessed dataset.

Each grain element is a whole batch: a batch of sample indices is drawn first,
then the data layer's vectorised `gather` builds the `[B, L]` histories for
all of them in one call (a per-example `__getitem__` would cost a Python call
per sample).

- Training: `MapDataset.range(N).shuffle(seed).batch(B, drop_remainder=True)
  .repeat(epochs)`. Grain's shuffle uses the seed `seed + epoch` for each epoch,
  and batching is done inside an epoch, so every epoch is a fresh permutation
  cut into `N // B` full batches (the remainder of each epoch is dropped, as in
  the paper). Element `j` is the same batch whatever happened before it, so
  the iterator's state (`{"next_index": j}`) is the exact position to resume
  from.
  Without shuffling (`shuffle=False`, config `data.shuffle`), every epoch is the
  training file in file order, as the official code trains (its training files
  are shuffled once by its preprocessing).
- Evaluation: every sample exactly once, in file order; the last batch is
  filled up to the static batch size by repeating its own samples and comes
  with a `valid` mask `[B]` that is False on the filler rows.

Several processes (multi-host training): every process builds the same
global batches of sample indices and gathers only the rows its own devices
hold (`rows=(start, stop)`, from `Partitioner.local_rows`), so each host reads
its own slice of the data, and the global batch is the one a single process
would have read.

The source is anything with `num_samples(split) -> int` and
`gather(split, indices, max_length) -> dict[str, np.ndarray]` (see
`dare_jax.data.open_dataset`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import grain
import numpy as np

Batch = dict[str, np.ndarray]
HISTORY_KEYS = ("hist_iid", "hist_cid")


class SampleSource(Protocol):
    def num_samples(self, split: str) -> int: ...

    def gather(self, split: str, indices: np.ndarray, max_length: int = 200) -> Batch: ...


def shuffle_seed(seed: int) -> int:
    """A 32-bit data-order seed derived from the run seed.

    Grain shuffles epoch e with `shuffle_seed + e`; deriving the base seed
    through a hash keeps seed s's second epoch from being seed s+1's first.
    """
    return int(np.random.SeedSequence([int(seed), 0xDA7A]).generate_state(1)[0])


class _GatherBatch:
    """grain map function: index batch `[B]` -> feature batch of rows `rows` of it
    (`[stop - start]`; all rows when None), history zeroed if blind."""

    def __init__(
        self,
        source: SampleSource,
        split: str,
        max_length: int,
        blind_history: bool,
        rows: tuple[int, int] | None = None,
    ):
        self.source, self.split = source, split
        self.max_length, self.blind_history = max_length, blind_history
        self.rows = rows

    def __call__(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, np.int64)
        if self.rows is not None:
            indices = indices[self.rows[0] : self.rows[1]]
        batch = self.source.gather(self.split, indices, self.max_length)
        if self.blind_history:
            # The history-blind baseline: every history position is padding.
            batch = dict(batch)
            for key in HISTORY_KEYS:
                batch[key] = np.zeros_like(batch[key])
        return batch


def steps_per_epoch(source: SampleSource, batch_size: int) -> int:
    """Full training batches per epoch (the remainder is dropped)."""
    num = source.num_samples("train")
    if num < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the training split ({num} samples)"
        )
    return num // batch_size


def train_dataset(
    source: SampleSource,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int,
    max_length: int,
    blind_history: bool = False,
    rows: tuple[int, int] | None = None,
    shuffle: bool = True,
) -> grain.MapDataset:
    """All training batches of `num_epochs` epochs, `steps_per_epoch * num_epochs` elements.

    Each element holds `batch_size` samples, or only rows `[start, stop)` of
    that global batch with `rows` (this process's slice). `shuffle=False`: file
    order in every epoch (`seed` unused).
    """
    steps_per_epoch(source, batch_size)  # validates the batch size
    _check_rows(rows, batch_size)
    indices = grain.MapDataset.range(source.num_samples("train"))
    if shuffle:
        indices = indices.shuffle(seed=shuffle_seed(seed))
    batches = indices.batch(batch_size, drop_remainder=True).repeat(num_epochs)
    return batches.map(_GatherBatch(source, "train", max_length, blind_history, rows))


def train_iterator(
    dataset: grain.MapDataset, state: dict[str, Any] | None = None, prefetch: int = 2
) -> grain.DatasetIterator:
    """A checkpointable iterator; `state` is a former `iterator.get_state()`.

    One background thread gathers the next batches while the device trains.
    """
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    iterator = dataset.to_iter_dataset(options).__iter__()
    if state is not None:
        iterator.set_state(state)
    return iterator


def eval_batches(
    source: SampleSource,
    split: str,
    *,
    batch_size: int,
    max_length: int,
    blind_history: bool = False,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """(batch, valid `[B]` bool) over every sample of `split`, in order.

    With `rows`, the batch holds only rows `[start, stop)` of each global
    batch (this process's slice); `valid` always covers the global batch.
    """
    num = source.num_samples(split)
    if num == 0:
        raise ValueError(f"split {split!r} has no samples")
    _check_rows(rows, batch_size)

    def indices_of(batch_index: int) -> np.ndarray:
        real = np.arange(batch_index * batch_size, min(num, (batch_index + 1) * batch_size))
        return np.resize(real, batch_size)  # repeats the batch's own samples as filler

    gather = _GatherBatch(source, split, max_length, blind_history, rows)
    dataset = grain.MapDataset.range(math.ceil(num / batch_size))
    dataset = dataset.map(lambda b: (gather(indices_of(b)), _valid(b, batch_size, num)))
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    yield from dataset.to_iter_dataset(options)


def _valid(batch_index: int, batch_size: int, num: int) -> np.ndarray:
    return np.arange(batch_index * batch_size, (batch_index + 1) * batch_size) < num


def _check_rows(rows: tuple[int, int] | None, batch_size: int) -> None:
    if rows is not None and not 0 <= rows[0] < rows[1] <= batch_size:
        raise ValueError(f"rows={rows}: expected 0 <= start < stop <= batch_size={batch_size}")
