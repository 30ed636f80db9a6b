"""Grain input pipelines over a preprocessed dataset.

Each grain element is a whole batch: a batch of sample indices is drawn first,
then the data layer's vectorised `gather` builds the `[B, L]` histories for
all of them in one call (a per-example `__getitem__` would cost a Python call
per sample).

- Training: the batches of `MapDataset.range(N).shuffle(seed).batch(B,
  drop_remainder=True).repeat(epochs)`: grain's shuffle uses the seed `seed + epoch`
  for each epoch, and batching is done inside an epoch, so every epoch is a fresh
  permutation cut into `N // B` full batches (the remainder of each epoch is dropped,
  as in the paper). Grain computes that permutation one sample at a time (a Python
  call each, 57-230 ms per batch of 2048 on a loaded 2-core machine), so element `j`
  is computed directly, all its samples at once, with `index_shuffle` (the same
  permutation). Element `j` is the same batch whatever happened before it, so the
  iterator's state (`{"next_index": j}`) is the exact position to resume from.
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

Histories (`histories=`): "host" builds each batch's `[B, L]` histories here (the data
layer's `gather`); "device" sends only each sample's history span (`gather_spans`: six
`[B]` integer arrays) and `dare_jax.data.device_histories` builds the histories on the
device from its copy of the sequence arrays. Both give the model the same batches.

Prefetching: `train_iterator(..., threads=N)` runs the gather (and whatever is mapped
after it, such as the copy to the devices) for the next batches in N background threads.

The source is anything with `num_samples(split) -> int` and
`gather(split, indices, max_length) -> dict[str, np.ndarray]`, plus
`gather_spans(split, indices)` for device histories (see `dare_jax.data.open_dataset`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import grain
import numpy as np

from dare_jax.data.index_shuffle import index_shuffle

Batch = dict[str, np.ndarray]
HISTORY_KEYS = ("hist_iid", "hist_cid")
HISTORIES = ("host", "device")


class SampleSource(Protocol):
    def num_samples(self, split: str) -> int: ...

    def gather(self, split: str, indices: np.ndarray, max_length: int = 200) -> Batch: ...

    def gather_spans(self, split: str, indices: np.ndarray) -> Batch: ...


def shuffle_seed(seed: int) -> int:
    """A 32-bit data-order seed derived from the run seed.

    Grain shuffles epoch e with `shuffle_seed + e`; deriving the base seed
    through a hash keeps seed s's second epoch from being seed s+1's first.
    """
    return int(np.random.SeedSequence([int(seed), 0xDA7A]).generate_state(1)[0])


class _GatherBatch:
    """grain map function: index batch `[B]` -> feature batch of rows `rows` of it
    (`[stop - start]`; all rows when None), history zeroed if blind; with
    `histories="device"` the histories as int32 spans (`hist_start`, `hist_stop`)."""

    def __init__(
        self,
        source: SampleSource,
        split: str,
        max_length: int,
        blind_history: bool,
        rows: tuple[int, int] | None = None,
        histories: str = "host",
    ):
        if histories not in HISTORIES:
            raise ValueError(f"histories={histories!r}: expected one of {HISTORIES}")
        self.source, self.split = source, split
        self.max_length, self.blind_history = max_length, blind_history
        self.rows, self.histories = rows, histories

    def __call__(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, np.int64)
        if self.rows is not None:
            indices = indices[self.rows[0] : self.rows[1]]
        if self.histories == "device":
            batch = self.source.gather_spans(self.split, indices)
            start = batch["hist_start"].astype(np.int32)
            # The history-blind baseline: empty spans, i.e. every position is padding.
            stop = start if self.blind_history else batch["hist_stop"].astype(np.int32)
            return {**batch, "hist_start": start, "hist_stop": stop}
        batch = self.source.gather(self.split, indices, self.max_length)
        if self.blind_history:
            # The history-blind baseline: every history position is padding.
            batch = dict(batch)
            for key in HISTORY_KEYS:
                batch[key] = np.zeros_like(batch[key])
        return batch


class ShuffledBatch:
    """grain map function: training batch number `j` -> its sample indices `[B]` (int64),
    those of element `j` of `MapDataset.range(num).shuffle(seed).batch(B, drop_remainder
    =True).repeat(...)`, computed for the whole batch at once; `shuffle=False`: the file-order batch `j`."""

    def __init__(self, num: int, batch_size: int, seed: int, shuffle: bool = True):
        self.num, self.batch_size, self.seed, self.shuffle = num, batch_size, seed, shuffle
        self.per_epoch = num // batch_size

    def __call__(self, j: int) -> np.ndarray:
        epoch, index_in_epoch = divmod(int(j), self.per_epoch)
        positions = index_in_epoch * self.batch_size + np.arange(self.batch_size)
        if not self.shuffle:  # file order, the same in every epoch
            return positions
        return index_shuffle(positions, self.num - 1, (self.seed + epoch) % 2**32)


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
    histories: str = "host",
) -> grain.MapDataset:
    """All training batches of `num_epochs` epochs, `steps_per_epoch * num_epochs` elements.

    Each element holds `batch_size` samples, or only rows `[start, stop)` of
    that global batch with `rows` (this process's slice); `histories` as in the
    module docstring. `shuffle=False`: file
    order in every epoch (`seed` unused).
    """
    per_epoch = steps_per_epoch(source, batch_size)  # validates the batch size
    _check_rows(rows, batch_size)
    batch_indices = ShuffledBatch(
        source.num_samples("train"), batch_size, shuffle_seed(seed), shuffle
    )
    batches = grain.MapDataset.range(per_epoch * num_epochs).map(batch_indices)
    return batches.map(_GatherBatch(source, "train", max_length, blind_history, rows, histories))


def train_iterator(
    dataset: grain.MapDataset,
    state: dict[str, Any] | None = None,
    prefetch: int = 2,
    threads: int = 1,
) -> grain.DatasetIterator:
    """A checkpointable iterator; `state` is a former `iterator.get_state()`.

    `threads` background threads prepare up to `prefetch` next batches while the device
    trains (in order: element j is the same whatever the thread count); `prefetch=0`
    prepares each batch when it is asked for.
    """
    threads = threads if prefetch else 0
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
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
    histories: str = "host",
) -> Iterator[tuple[Batch, np.ndarray]]:
    """(batch, valid `[B]` bool) over every sample of `split`, in order.

    With `rows`, the batch holds only rows `[start, stop)` of each global
    batch (this process's slice); `valid` always covers the global batch.
    `histories` as in the module docstring.
    """
    num = source.num_samples(split)
    if num == 0:
        raise ValueError(f"split {split!r} has no samples")
    _check_rows(rows, batch_size)

    def indices_of(batch_index: int) -> np.ndarray:
        real = np.arange(batch_index * batch_size, min(num, (batch_index + 1) * batch_size))
        return np.resize(real, batch_size)  # repeats the batch's own samples as filler

    gather = _GatherBatch(source, split, max_length, blind_history, rows, histories)
    dataset = grain.MapDataset.range(math.ceil(num / batch_size))
    dataset = dataset.map(lambda b: (gather(indices_of(b)), _valid(b, batch_size, num)))
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    yield from dataset.to_iter_dataset(options)


def _valid(batch_index: int, batch_size: int, num: int) -> np.ndarray:
    return np.arange(batch_index * batch_size, (batch_index + 1) * batch_size) < num


def _check_rows(rows: tuple[int, int] | None, batch_size: int) -> None:
    if rows is not None and not 0 <= rows[0] < rows[1] <= batch_size:
        raise ValueError(f"rows={rows}: expected 0 <= start < stop <= batch_size={batch_size}")
