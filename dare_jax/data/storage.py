"""Compact on-disk dataset format: ``.npy`` arrays + ``manifest.json``, no pickle.

Layout of a dataset directory::

    manifest.json
    seq_iid.npy, seq_cid.npy    int32 [E]      every sequence row, concatenated, stored once
    seq_offsets.npy             int64 [R + 1]  row r = seq_*[offsets[r]:offsets[r + 1]]
    seq_uid.npy                 int32 [R]      dense user id of each row
    {split}_row.npy             int32 [S]      sequence row of each sample
    {split}_pos.npy             int32 [S]      target position: history = row[:pos]
    {split}_iid.npy, _cid.npy   int32 [S]      target item / category
    {split}_label.npy           int32 [S]      1 = click, 0 = no click
    {split}_uid.npy             int32 [S]      dense user id
    raw_uid.npy, raw_iid.npy, raw_cid.npy   int64 [count + 1]   raw id of each dense id

Histories are not materialised: :meth:`Dataset.gather` builds them for any
``max_length`` with one vectorised gather over the memory-mapped sequence arrays.
Offsets are int64 so the format has no 2**31-event limit.
Writes are atomic: everything goes into a temporary sibling directory, ``os.replace``-d
into place once the manifest (written last) is complete, so an interrupted write never
looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
FORMAT_NAME = "dare-jax-ctr"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
SAMPLE_FIELDS = ("row", "pos", "iid", "cid", "label", "uid")
SEQUENCE_FIELDS = ("seq_iid", "seq_cid", "seq_offsets", "seq_uid")
ID_FIELDS = ("raw_uid", "raw_iid", "raw_cid")
REQUIRED_KEYS = (
    "format", "protocol_version", "dataset", "counts", "user_count", "item_count",
    "category_count", "item_n", "cate_n", "max_length", "arrays",
)


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete, corrupt or of another version."""


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_entry(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Manifest record of an input file: name, size in bytes, sha256."""
    path = Path(path)
    return {"name": path.name, "size": path.stat().st_size,
            "sha256": sha256 if sha256 is not None else sha256_file(path)}


def is_occupied(path: Path) -> bool:
    """True if ``path`` exists and is not an empty directory (an empty one is reused)."""
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def _expected_dtype(name: str) -> type:
    return np.int64 if name == "seq_offsets" or name in ID_FIELDS else np.int32


def write_dataset(
    output_dir: str | Path, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any], *,
    overwrite: bool = False,
) -> Path:
    """Write ``arrays`` (name -> array) and ``manifest`` atomically to ``output_dir``.

    ``arrays`` must hold every name of :func:`array_names`; dtypes are enforced
    (int64 for offsets and raw ids, int32 otherwise). The manifest gains ``format``,
    ``protocol_version`` and ``arrays`` (name -> shape). FileExistsError if
    ``output_dir`` exists (and is not an empty directory) and ``overwrite`` is False.
    """
    out = Path(output_dir)
    if is_occupied(out) and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (use overwrite=True)")
    missing = [n for n in array_names() if n not in arrays]
    if missing:
        raise ValueError(f"missing arrays: {missing}")
    tmp = temp_sibling_dir(out)
    try:
        shapes = {}
        for name in array_names():
            arr = np.ascontiguousarray(arrays[name], dtype=_expected_dtype(name))
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
            shapes[name] = list(arr.shape)
        write_manifest_file(tmp, {**manifest, "format": FORMAT_NAME,
                                  "protocol_version": PROTOCOL_VERSION, "arrays": shapes})
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def temp_sibling_dir(out: Path) -> Path:
    """Create (with ``out``'s parents) an empty hidden directory next to ``out``: on the
    same filesystem, so the final :func:`move_into_place` is an atomic ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def write_manifest_file(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``directory/manifest.json`` and fsync it (callers write it last)."""
    with open(directory / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def move_into_place(tmp: Path, out: Path) -> None:
    """``os.replace`` the finished directory ``tmp`` onto ``out``. An empty ``out`` is
    removed; a non-empty one is moved aside first (``os.replace`` cannot replace a
    non-empty directory) and deleted only after ``tmp`` is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "d")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def array_names() -> list[str]:
    """Every array file of a dataset directory (without ``.npy``)."""
    samples = [f"{split}_{field}" for split in SPLITS for field in SAMPLE_FIELDS]
    return [*SEQUENCE_FIELDS, *ID_FIELDS, *samples]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and validate ``manifest.json``; DatasetError with the reason otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"dataset directory not found: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path} is missing: not a dataset, or an interrupted write")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DatasetError(f"{path}: missing keys {missing}")
    if manifest["format"] != FORMAT_NAME:
        raise DatasetError(f"{path}: format {manifest['format']!r}, expected {FORMAT_NAME!r}")
    if manifest["protocol_version"] != PROTOCOL_VERSION:
        raise DatasetError(f"{path}: protocol version {manifest['protocol_version']}, this "
                           f"code reads version {PROTOCOL_VERSION}; re-run the preprocessing")
    return manifest


def load_arrays(directory: str | Path, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Memory-map every array and check it against the manifest's shapes and dtypes."""
    directory = Path(directory)
    shapes = manifest["arrays"]
    out = {}
    for name in array_names():
        path = directory / f"{name}.npy"
        if not path.is_file():
            raise DatasetError(f"{path} is missing")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DatasetError(f"{path} is not a readable .npy array: {exc}") from exc
        if arr.dtype != _expected_dtype(name):
            raise DatasetError(f"{path}: dtype {arr.dtype}, expected {_expected_dtype(name)}")
        if name not in shapes or list(arr.shape) != list(shapes[name]):
            raise DatasetError(f"{path}: shape {arr.shape}, manifest says {shapes.get(name)}")
        out[name] = arr
    n_rows, n_offsets = out["seq_uid"].shape[0], out["seq_offsets"].shape[0]
    if n_offsets != n_rows + 1:
        raise DatasetError(f"{directory}: seq_offsets has {n_offsets} entries for {n_rows} rows")
    if int(out["seq_offsets"][-1]) != out["seq_iid"].shape[0]:
        raise DatasetError(f"{directory}: seq_offsets end does not match seq_iid length")
    for split in SPLITS:
        sizes = {out[f"{split}_{f}"].shape[0] for f in SAMPLE_FIELDS}
        if len(sizes) != 1 or sizes.pop() != manifest["counts"][split]:
            raise DatasetError(f"{directory}: {split} arrays disagree with manifest counts")
    return out


class Dataset:
    """A memory-mapped dataset directory (see the module docstring for the layout)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest: dict[str, Any] = read_manifest(self.directory)
        self._arrays = load_arrays(self.directory, self.manifest)
        self._max_length = self.manifest["max_length"]  # None: whole sequences stored

    def num_samples(self, split: str) -> int:
        """Number of samples of ``split`` ('train', 'val' or 'test')."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return int(self._arrays[f"{split}_label"].shape[0])

    def array(self, name: str) -> np.ndarray:
        """A stored array by file name (memory-mapped, read-only)."""
        return self._arrays[name]

    def gather(
        self, split: str, indices: np.ndarray | list[int] | slice, max_length: int = 200
    ) -> dict[str, np.ndarray]:
        """Samples ``indices`` of ``split`` with histories of ``max_length``: uid, iid, cid,
        label int32 [B]; hist_iid, hist_cid int32 [B, max_length], left-padded with 0,
        ``[:, -1]`` the most recent behaviour before the target."""
        if not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if self._max_length is not None and max_length > self._max_length:
            raise ValueError(f"this dataset stores histories of at most {self._max_length} "
                             f"behaviours (manifest max_length); got max_length={max_length}")
        batch = self.gather_spans(split, indices)
        start, stop = batch.pop("hist_start"), batch.pop("hist_stop")
        sequences = (self._arrays["seq_iid"], self._arrays["seq_cid"])
        batch["hist_iid"], batch["hist_cid"] = build_histories(sequences, start, stop, max_length)
        return batch

    def gather_spans(
        self, split: str, indices: np.ndarray | list[int] | slice
    ) -> dict[str, np.ndarray]:
        """Samples ``indices`` of ``split`` with each history as a span of the sequence
        arrays (for a device that holds ``seq_iid`` / ``seq_cid``): uid, iid, cid, label
        int32 [B]; hist_start, hist_stop int64 [B], the whole history before the target
        being ``seq_*[hist_start:hist_stop]`` (:func:`build_histories` keeps its last L)."""
        a = self._arrays
        n = self.num_samples(split)  # checks the split
        if isinstance(indices, slice):
            idx = np.arange(n)[indices]
        else:
            idx = np.asarray(indices)
            if idx.dtype.kind not in "iu":
                raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
            if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise IndexError(f"sample index out of range for {split} split of {n} samples")
        batch = {k: np.asarray(a[f"{split}_{k}"][idx]) for k in ("uid", "iid", "cid", "label")}
        start = np.asarray(a["seq_offsets"][np.asarray(a[f"{split}_row"][idx])])
        stop = start + np.asarray(a[f"{split}_pos"][idx])  # exclusive
        return {**batch, "hist_start": start, "hist_stop": stop}


def build_histories(
    sequences: tuple[np.ndarray, ...], start: np.ndarray, stop: np.ndarray, max_length: int
) -> tuple[np.ndarray, ...]:
    """The last ``max_length`` events of ``seq[start:stop]`` (``start``, ``stop`` [B]) for
    each sequence array: [B, max_length] each, left-padded with 0 where the span is shorter,
    ``[:, -1]`` the event just before ``stop``. ``device_histories.build_histories`` is the
    same arithmetic in jax; this one works in place (a second ``[B, L]`` array costs more
    than the gather: page faults).
    """
    start = np.asarray(start)[:, None]
    flat = np.asarray(stop)[:, None] + np.arange(-max_length, 0, dtype=np.int64)[None, :]
    valid = flat >= start  # False where the history is shorter than L: left padding
    np.maximum(flat, start, out=flat)  # any in-bounds index; masked to 0 below
    histories = tuple(np.take(sequence, flat) for sequence in sequences)
    for history in histories:
        history *= valid
    return histories


def open_dataset(directory: str | Path) -> Dataset:
    """Open a dataset directory: validate the manifest and memory-map the arrays."""
    return Dataset(directory)


def load_split(directory: str | Path, split: str, max_length: int = 200) -> dict[str, np.ndarray]:
    """The whole ``split`` of a dataset as in-memory arrays (see :meth:`Dataset.gather`)."""
    return open_dataset(directory).gather(split, slice(None), max_length=max_length)
