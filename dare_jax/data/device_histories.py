"""Histories built on the device (config `data.histories = "device"`).

The host pipeline sends each batch as uid, iid, cid, label and the span
`[hist_start, hist_stop)` of every sample's history (`Dataset.gather_spans`: six `[B]`
integer arrays) instead of two `[B, L]` arrays. `DeviceHistories` keeps `seq_iid` and
`seq_cid` replicated on every device (int32 `[E]` each: 8 bytes per stored event) and
builds the `[B, L]` histories there with the arithmetic of `storage.build_histories`, so
the model sees the same batches without the host's gather and copy of the histories.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SEQUENCE_ARRAYS = ("seq_iid", "seq_cid")
HISTORY_KEYS = ("hist_iid", "hist_cid")
SPAN_KEYS = ("hist_start", "hist_stop")
# Spans travel as int32 (JAX's default integer width): every event offset must fit.
MAX_EVENTS = 2**31 - 1


def build_histories(
    sequences: tuple[jax.Array, ...], start: jax.Array, stop: jax.Array, max_length: int
) -> tuple[jax.Array, ...]:
    """`dare_jax.data.storage.build_histories` in jax: for each sequence `[E]`, the last
    `max_length` events of `seq[start:stop]` (`start`, `stop` `[B]`) as `[B, max_length]`,
    left-padded with 0, `[:, -1]` the event just before `stop`."""
    start = start[:, None]
    flat = stop[:, None] + jnp.arange(-max_length, 0, dtype=stop.dtype)[None, :]
    valid = flat >= start  # False where the history is shorter than L: left padding
    flat = jnp.maximum(flat, start)  # any in-bounds index; masked to 0 below
    return tuple(sequence.at[flat].get(mode="clip") * valid for sequence in sequences)


def _expand(sequences: tuple[jax.Array, ...], batch: dict, max_length: int) -> dict:
    """A span batch -> the model's batch (spans replaced by `[B, L]` histories)."""
    out = {key: value for key, value in batch.items() if key not in SPAN_KEYS}
    histories = build_histories(sequences, batch["hist_start"], batch["hist_stop"], max_length)
    out.update(zip(HISTORY_KEYS, histories))
    return out


class DeviceHistories:
    """The dataset's sequence arrays on every device of `partitioner`'s mesh, and the
    jitted expansion of span batches (split on `data`) into the model's batches.
    ValueError when the dataset holds more events than int32 spans can address."""

    def __init__(self, dataset, max_length: int, partitioner) -> None:
        events = int(dataset.array(SEQUENCE_ARRAYS[0]).shape[0])
        if events > MAX_EVENTS:
            raise ValueError(f"data.histories = 'device': the dataset stores {events} events, "
                             f"more than {MAX_EVENTS} (int32 spans); use data.histories = 'host'")
        replicated = partitioner.replicated
        # make_array_from_callback places the host array on every device of the mesh,
        # across processes too (each process holds the same file).
        arrays = [np.asarray(dataset.array(name), np.int32) for name in SEQUENCE_ARRAYS]
        self.sequences = tuple(
            jax.make_array_from_callback(a.shape, replicated, a.__getitem__) for a in arrays
        )
        self.nbytes = sum(int(s.nbytes) for s in self.sequences)
        self._expand = jax.jit(
            functools.partial(_expand, max_length=int(max_length)),
            in_shardings=(replicated, partitioner.batch_sharding),
            out_shardings=partitioner.batch_sharding,
        )

    def __call__(self, batch: dict) -> dict:
        """uid, iid, cid, label, hist_start, hist_stop `[B]` (global arrays split on `data`)
        -> uid, iid, cid, label `[B]`, hist_iid, hist_cid `[B, L]` (same sharding)."""
        return self._expand(self.sequences, batch)
