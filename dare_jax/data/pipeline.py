"""Grain input pipelines over a preprocessed dataset.

Each grain element is a whole batch: its sample indices are drawn first, then the data layer's
vectorised `gather` builds the `[B, L]` histories for all of them in one call.

- Training: the batches of `MapDataset.range(N).shuffle(seed).batch(B,
  drop_remainder=True).repeat(epochs)`: a fresh permutation per epoch (grain seeds epoch
  `e` with `seed + e`) cut into `N // B` full batches (the remainder is dropped, as in
  the paper). Element `j` is computed directly with `index_shuffle`, so it is the same
  batch whatever came before it and the iterator's state (`{"next_index": j}`) is the
  exact resume point. `shuffle=False` (config `data.shuffle`): file order in every
  epoch, as the official loader trains (its preprocessing shuffles the samples once): each
  training file of the official preprocessing (its sizes from an imported manifest's
  `train_file_rows`, else files of `OFFICIAL_FILE_ROWS`) in batches of B, the last one of
  a file partial. A partial batch is filled up to B with its own samples, and every batch
  of such an epoch carries `example_mask` `[B]` (False on the filler rows): the loss and the
  BatchNorm statistics are taken over the real rows only, as the official step does.
- Evaluation: every sample once, in file order; the last batch is filled up to the
  static batch size with its own samples, and a `valid` mask `[B]` is False on those.

Several processes: each builds the same global batches of indices and gathers only the rows its
own devices hold (`rows=(start, stop)`, from `Partitioner.local_rows`).

Histories (`histories=`): "host" builds each batch's `[B, L]` histories here; "device" sends
only each sample's history span (`gather_spans`) and `dare_jax.data.device_histories` builds
them on the device. Both give the model the same batches.
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
OFFICIAL_FILE_ROWS = 102_400  # training samples per file written by the official preprocessing


class SampleSource(Protocol):
    """What the pipelines read: a `dare_jax.data.Dataset`, or anything with its methods."""

    def num_samples(self, split: str) -> int: ...

    def gather(self, split: str, indices: np.ndarray, max_length: int = 200) -> Batch: ...

    def gather_spans(self, split: str, indices: np.ndarray) -> Batch: ...  # device histories


def shuffle_seed(seed: int) -> int:
    """A 32-bit data-order seed derived from the run seed. Grain shuffles epoch e with
    `shuffle_seed + e`; the hash keeps seed s's second epoch from being seed s+1's first."""
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
        self.source, self.split, self.max_length = source, split, max_length
        self.blind_history, self.rows, self.histories = blind_history, rows, histories

    def __call__(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, np.int64)
        if self.rows is not None:
            indices = indices[self.rows[0] : self.rows[1]]
        # The history-blind baseline: every history position is padding (empty spans).
        if self.histories == "device":
            batch = self.source.gather_spans(self.split, indices)
            start = batch["hist_start"].astype(np.int32)
            stop = start if self.blind_history else batch["hist_stop"].astype(np.int32)
            return {**batch, "hist_start": start, "hist_stop": stop}
        batch = self.source.gather(self.split, indices, self.max_length)
        if self.blind_history:
            batch = {**batch, **{key: np.zeros_like(batch[key]) for key in HISTORY_KEYS}}
        return batch


class ShuffledBatch:
    """grain map function: training batch number `j` -> its sample indices `[B]` (int64),
    those of element `j` of `MapDataset.range(num).shuffle(seed).batch(B,
    drop_remainder=True).repeat(...)`."""

    def __init__(self, num: int, batch_size: int, seed: int):
        self.num, self.batch_size, self.seed = num, batch_size, seed
        self.per_epoch = num // batch_size

    def __call__(self, j: int) -> np.ndarray:
        epoch, index_in_epoch = divmod(int(j), self.per_epoch)
        positions = index_in_epoch * self.batch_size + np.arange(self.batch_size)
        return index_shuffle(positions, self.num - 1, (self.seed + epoch) % 2**32)


def file_order_batches(source: SampleSource, batch_size: int) -> np.ndarray:
    """`[n, 2]` (start, stop) of one epoch's training batches in file order: each file of
    the official preprocessing in batches of `batch_size`, the last one of a file partial."""
    num = source.num_samples("train")
    files = getattr(source, "manifest", {}).get("train_file_rows")
    if not files:
        files = [OFFICIAL_FILE_ROWS] * (num // OFFICIAL_FILE_ROWS) + [num % OFFICIAL_FILE_ROWS]
    ends = np.cumsum([n for n in files if n])
    starts = [range(end - n, end, batch_size) for n, end in zip(files, ends) if n]
    start = np.fromiter((s for r in starts for s in r), np.int64)
    stop = np.minimum(start + batch_size, np.repeat(ends, [len(r) for r in starts]))
    return np.stack([start, stop], axis=1)


def has_partial_batches(source: SampleSource, batch_size: int, shuffle: bool) -> bool:
    """Whether the training batches carry `example_mask` (file order with a partial batch)."""
    spans = None if shuffle else file_order_batches(source, batch_size)
    return spans is not None and bool(np.any(spans[:, 1] - spans[:, 0] < batch_size))


def steps_per_epoch(source: SampleSource, batch_size: int, shuffle: bool = True) -> int:
    """Training batches per epoch: full ones (the remainder is dropped), or with `shuffle`
    off those of `file_order_batches`."""
    num = source.num_samples("train")
    if num < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the training split ({num} samples)"
        )
    return num // batch_size if shuffle else len(file_order_batches(source, batch_size))


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

    Each element holds `batch_size` samples, or only rows `[start, stop)` of that global
    batch with `rows` (this process's slice); `histories` as in the module docstring.
    `shuffle=False`: file order in every epoch (`seed` unused; see the module docstring).
    """
    per_epoch = steps_per_epoch(source, batch_size, shuffle)  # validates the batch size
    _check_rows(rows, batch_size)
    gather = _GatherBatch(source, "train", max_length, blind_history, rows, histories)
    if shuffle:
        batch_indices = ShuffledBatch(source.num_samples("train"), batch_size, shuffle_seed(seed))
        return grain.MapDataset.range(per_epoch * num_epochs).map(batch_indices).map(gather)
    spans = file_order_batches(source, batch_size)
    masked = has_partial_batches(source, batch_size, shuffle)
    take = slice(*rows) if rows is not None else slice(None)

    def element(j: int) -> Batch:
        start, stop = spans[j % per_epoch]
        batch = gather(np.resize(np.arange(start, stop), batch_size))
        if masked:  # the same keys in every batch: one compiled step
            batch["example_mask"] = (np.arange(batch_size) < stop - start)[take]
        return batch

    return grain.MapDataset.range(per_epoch * num_epochs).map(element)


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
    options = grain.ReadOptions(
        num_threads=threads if prefetch else 0, prefetch_buffer_size=prefetch
    )
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

    With `rows`, the batch holds only rows `[start, stop)` of each global batch (this
    process's slice); `valid` always covers the global batch. `histories`: see above.
    """
    num = source.num_samples(split)
    if num == 0:
        raise ValueError(f"split {split!r} has no samples")
    _check_rows(rows, batch_size)
    gather = _GatherBatch(source, split, max_length, blind_history, rows, histories)

    def element(b: int) -> tuple[Batch, np.ndarray]:
        positions = np.arange(b * batch_size, (b + 1) * batch_size)
        # Filler rows repeat the last batch's own samples.
        indices = np.resize(positions[positions < num], batch_size)
        return gather(indices), positions < num

    dataset = grain.MapDataset.range(math.ceil(num / batch_size)).map(element)
    yield from dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def _check_rows(rows: tuple[int, int] | None, batch_size: int) -> None:
    if rows is not None and not 0 <= rows[0] < rows[1] <= batch_size:
        raise ValueError(f"rows={rows}: expected 0 <= start < stop <= batch_size={batch_size}")
