"""Import a directory written by the official DARE preprocessing into our format.

The official scripts write ``train_XXXX_N.npy`` (numbered from 0001, N rows each), ``val.npy``
and ``test.npy``, pickled object arrays of rows ``[uid, target_iid, target_cid, label_onehot,
hist_iid (200), hist_cid (200)]``, and ``{uid,iid,cid}_mapping.npy`` (pickled dicts raw id ->
dense id).

**Security:** these files can only be read with ``allow_pickle=True``, which can run
arbitrary code from the file. Only import files you produced yourself or trust.

Each distinct window ``(uid, hist_iid, hist_cid)`` becomes one sequence row of exactly 200 ids
(padding zeros included), numbered in order of first use; every sample points at its row with
position 200 (``max_length = 200``). Samples keep their order: train in file order (already
shuffled by the official script), then val, test.

Files are read one at a time, converted to int32 and appended to the output ``.npy`` files
(header fixed at the end), so memory does not grow with their number: one file's Python objects,
the largest mapping dict, plus 28 bytes per distinct window. Windows are matched across files by
128-bit hashes (two independent 64-bit polynomial hashes), then compared element by element with
their row (earlier files' rows read back from the output), so a hash collision raises instead of
merging different histories.
"""

from __future__ import annotations

import pickle
import re
import shutil
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from dare_jax.data import storage

WINDOW = 200
_TRAIN_RE = re.compile(r"train_(\d{4})_(\d+)\.npy")
_MAPPINGS = {"uid": "uid_mapping.npy", "iid": "iid_mapping.npy", "cid": "cid_mapping.npy"}
# Official sample columns in file order: name, width (None: one int per row).
_COLUMNS = (("uid", None), ("iid", None), ("cid", None), ("label", 2),
            ("hist_iid", WINDOW), ("hist_cid", WINDOW))
_INT32_MAX = int(np.iinfo(np.int32).max)
# Rows of stored windows read back per memory map while verifying: bounds the mapped
# pages (counted as resident memory) to 2 x 8192 x 800 bytes.
_READBACK_ROWS = 8192
_CONVERT_ROWS = 8192  # rows of an official file converted to int64 at a time
_HEADER_BYTES = 128  # multiple of 64: the array data stays aligned for memory maps


class OfficialDataError(ValueError):
    """An official preprocessed directory is missing files or holds unexpected content."""


def _load_pickled(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=True)  # trusted input only, see module doc
    except MemoryError:
        raise
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise OfficialDataError(f"{path}: cannot be read as a .npy file: {exc}") from exc
    except Exception as exc:  # a corrupt pickle can fail with almost any exception type
        message = f"corrupt pickled .npy file: {type(exc).__name__}: {exc}"
        raise OfficialDataError(f"{path}: {message}") from exc


def _mapping_to_raw(path: Path) -> np.ndarray:
    """Pickled dict raw -> dense (1..G) as int64 [G + 1] array dense -> raw."""
    obj = _load_pickled(path)
    mapping = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(mapping, dict):
        raise OfficialDataError(f"{path}: expected a pickled dict, found {type(mapping).__name__}")
    n = len(mapping)
    if n > _INT32_MAX:
        raise OfficialDataError(f"{path}: {n} ids do not fit int32 dense ids")
    raw = np.fromiter(mapping.keys(), dtype=np.int64, count=n)
    dense = np.fromiter(mapping.values(), dtype=np.int64, count=n)
    if n and not np.array_equal(np.sort(dense), np.arange(1, n + 1)):
        raise OfficialDataError(f"{path}: dense ids are not exactly 1..{n}")
    out = np.zeros(n + 1, dtype=np.int64)
    out[dense] = raw
    return out


def _int_chunks(
    path: Path, column: np.ndarray, name: str, width: int | None
) -> Iterator[tuple[int, np.ndarray]]:
    """Object column of ints or int lists -> (first row, int64 [rows] or [rows, width]),
    ``_CONVERT_ROWS`` rows at a time so that the int64 temporaries stay small."""
    for lo in range(0, column.shape[0], _CONVERT_ROWS):
        part = column[lo : lo + _CONVERT_ROWS]
        want = (part.shape[0],) if width is None else (part.shape[0], width)
        try:
            values = np.asarray(part.tolist(), dtype=np.int64)
            problem = None if values.shape == want else f"shape {values.shape}, expected {want}"
        except (ValueError, TypeError, OverflowError) as exc:
            problem = str(exc)
        if problem is not None:
            bad = _first_bad_row(part, width)
            where = f"row {lo + bad}: " if bad is not None else f"rows {lo}..: "
            kind = "an integer" if width is None else f"a list of {width} integers"
            raise OfficialDataError(f"{path}: {where}{name} is not {kind} ({problem})")
        yield lo, values


def _first_bad_row(column: np.ndarray, width: int | None) -> int | None:
    """Index of the first entry that is not an int (width None) or not ``width`` ints."""
    for i, value in enumerate(column):
        if width is None:
            if not isinstance(value, (int, np.integer)):
                return i
        elif not isinstance(value, (list, tuple, np.ndarray)) or len(value) != width:
            return i
    return None


def _rows_to_arrays(
    path: Path, expected_rows: int | None, limits: dict[str, int]
) -> dict[str, np.ndarray]:
    """One official sample file -> int32 uid, iid, cid, label [N], hist_iid, hist_cid [N, 200].

    ``limits`` gives the largest valid dense id of 'uid', 'iid' and 'cid' (mapping sizes).
    Each column's Python objects are released once it is converted.
    """
    data = _load_pickled(path)
    if not (isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == 6):
        shape = getattr(data, "shape", None)
        raise OfficialDataError(f"{path}: expected an object array of shape [N, 6], got {shape}")
    n = data.shape[0]
    if expected_rows is not None and n != expected_rows:
        raise OfficialDataError(f"{path}: file name says {expected_rows} rows, found {n}")
    out: dict[str, np.ndarray] = {}
    for col, (name, width) in enumerate(_COLUMNS):
        key = name.removeprefix("hist_")
        values = np.empty((n, WINDOW) if width == WINDOW else (n,), dtype=np.int32)
        for lo, part in _int_chunks(path, data[:, col], name, width):
            if name == "label":
                ok = (part == [1, 0]).all(1) | (part == [0, 1]).all(1)
                if not ok.all():
                    bad = int(np.flatnonzero(~ok)[0])
                    raise OfficialDataError(f"{path}: row {lo + bad}: label "
                                            f"{part[bad].tolist()} is not one-hot [1, 0] / [0, 1]")
                part = part[:, 0]
            elif part.size and (part.min() < 0 or part.max() > limits[key]):
                wrong = ((part < 0) | (part > limits[key])).reshape(part.shape[0], -1)
                bad = lo + int(np.flatnonzero(wrong.any(1))[0])
                raise OfficialDataError(f"{path}: row {bad}: {name} has ids outside "
                                        f"0..{limits[key]} (the ids of {_MAPPINGS[key]})")
            values[lo : lo + part.shape[0]] = part
        data[:, col] = None  # frees this column's lists and ints before the next one
        out[name] = values
    return out


def _train_files(directory: Path) -> list[tuple[Path, int]]:
    found = sorted(
        (int(m.group(1)), path, int(m.group(2)))
        for path in directory.iterdir()
        if (m := _TRAIN_RE.fullmatch(path.name))
    )
    if not found:
        raise OfficialDataError(f"{directory}: no train_XXXX_N.npy file")
    numbers = [f[0] for f in found]
    if numbers != list(range(1, len(found) + 1)):
        raise OfficialDataError(f"{directory}: train files are not numbered 0001..{len(found):04d}"
                                f" without gaps (found {numbers})")
    return [(p, n) for _, p, n in found]


@cache
def _hash_coefficients() -> tuple[np.ndarray, np.ndarray]:
    """Two fixed odd uint64 [2 * WINDOW + 1] coefficient vectors (uid, iids, cids)."""
    rng = np.random.default_rng(20250127)
    return tuple(
        rng.integers(1, 2**63, size=2 * WINDOW + 1, dtype=np.uint64) | np.uint64(1)
        for _ in range(2)
    )


def _window_hash(uid: np.ndarray, hist_iid: np.ndarray, hist_cid: np.ndarray) -> np.ndarray:
    """Two independent 64-bit polynomial hashes per window: uint64 [N, 2]."""
    out = np.empty((uid.shape[0], 2), dtype=np.uint64)
    block = 1 << 16  # rows per block: bounds the uint64 temporaries to ~200 MB
    with np.errstate(over="ignore"):
        for lo in range(0, uid.shape[0], block):
            sl = slice(lo, lo + block)
            hi_iid = hist_iid[sl].astype(np.uint64)
            hi_cid = hist_cid[sl].astype(np.uint64)
            for k, coeff in enumerate(_hash_coefficients()):
                h = uid[sl].astype(np.uint64) * coeff[0] + hi_iid @ coeff[1 : WINDOW + 1]
                out[sl, k] = h + hi_cid @ coeff[WINDOW + 1 :]
    return out


class WindowTable:
    """Map 128-bit window hashes to row numbers, rows numbered in order of insertion.

    Kept as three parallel arrays sorted by the first 64-bit half (8 + 8 + 8 bytes per
    window); equal first halves (a 64-bit collision) are told apart by the second half.
    """

    def __init__(self) -> None:
        self._h1, self._h2 = np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
        self._row = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._row.shape[0])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key (uint64 [K, 2]) or -1 if absent: int64 [K]."""
        q1, q2 = keys[:, 0], keys[:, 1]
        lo = np.searchsorted(self._h1, q1, side="left")
        hi = np.searchsorted(self._h1, q1, side="right")
        found = np.full(keys.shape[0], -1, dtype=np.int64)
        single = (hi - lo) == 1
        at = lo[single]
        match = self._h2[at] == q2[single]
        found[np.flatnonzero(single)[match]] = self._row[at[match]]
        for k in np.flatnonzero((hi - lo) > 1):  # 64-bit collisions: practically never
            same = np.flatnonzero(self._h2[lo[k] : hi[k]] == q2[k])
            if same.size:
                found[k] = self._row[lo[k] + same[0]]
        return found

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Insert keys (uint64 [K, 2], absent and distinct); returns their new rows int64 [K]."""
        rows = np.arange(len(self), len(self) + keys.shape[0], dtype=np.int64)
        order = np.argsort(keys[:, 0], kind="stable")  # np.insert keeps ties in this order
        pos = np.searchsorted(self._h1, keys[order, 0])
        self._h1 = np.insert(self._h1, pos, keys[order, 0])
        self._h2 = np.insert(self._h2, pos, keys[order, 1])
        self._row = np.insert(self._row, pos, rows[order])
        return rows


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """A .npy version 1.0 header for a 1-D C-order array of ``n`` elements, always
    ``_HEADER_BYTES`` long (space padding), so that it can be rewritten in place."""
    text = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({n},), }}"
    body = text.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")
    assert len(header) == _HEADER_BYTES, text
    return header


class _NpyAppender:
    """A 1-D ``.npy`` file written in pieces; the header gets the final length on close."""

    def __init__(self, path: Path, dtype: type) -> None:
        self.path, self.dtype, self.size = path, np.dtype(dtype), 0
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._fh.write(_npy_header(self.dtype, 0))

    def append(self, values: np.ndarray) -> None:
        arr = np.ascontiguousarray(values, dtype=self.dtype).ravel()
        self._fh.write(memoryview(arr).cast("B"))
        self.size += arr.size

    def read_rows(self, rows: np.ndarray, width: int) -> np.ndarray:
        """Rows ``rows`` (int [K]) of the data written so far seen as [size / width, width]."""
        self._fh.flush()
        out = np.empty((rows.shape[0], width), dtype=self.dtype)
        # A fresh map per block: pages touched through a map count as resident memory.
        shape = (self.size // width, width)
        for lo in range(0, rows.shape[0], _READBACK_ROWS):
            stored = np.memmap(self.path, self.dtype, mode="r", offset=_HEADER_BYTES, shape=shape)
            out[lo : lo + _READBACK_ROWS] = stored[rows[lo : lo + _READBACK_ROWS]]
            del stored
        return out

    def close(self) -> tuple[int, ...]:
        self._fh.seek(0)
        self._fh.write(_npy_header(self.dtype, self.size))
        self._fh.close()
        return (self.size,)

    def discard(self) -> None:
        self._fh.close()


def _same_windows(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """bool [K]: whether windows a[k] and b[k] (uid [K], hist_iid, hist_cid [K, 200]) match."""
    return (a[0] == b[0]) & (a[1] == b[1]).all(1) & (a[2] == b[2]).all(1)


def _array_dtype(name: str) -> type:
    return np.int64 if name == "seq_offsets" or name.startswith("raw_") else np.int32


class _StreamingImport:
    """State of one import: output writers, the window table and the row uids."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        names = ["seq_iid", "seq_cid"]
        names += [f"{s}_{f}" for s in storage.SPLITS for f in storage.SAMPLE_FIELDS]
        self.writers = {n: _NpyAppender(tmp / f"{n}.npy", _array_dtype(n)) for n in names}
        self.table = WindowTable()
        self.row_uid = np.empty(0, dtype=np.int32)  # the uid of each row

    def add_file(self, path: Path, split: str, cols: dict[str, np.ndarray]) -> None:
        """Append one file's samples (int32 arrays from ``_rows_to_arrays``)."""
        windows = uid, hist_iid, hist_cid = cols["uid"], cols["hist_iid"], cols["hist_cid"]
        hashes = _window_hash(uid, hist_iid, hist_cid)
        _, first, local = np.unique(hashes, axis=0, return_index=True, return_inverse=True)
        # Local windows renumbered in order of first use in the file.
        order = np.argsort(first)
        local, first = np.argsort(order)[local.ravel()], first[order]
        # Exact check inside the file: each sample equals its window's first sample.
        same = _same_windows(windows, [w[first[local]] for w in windows])
        if not same.all():
            raise OfficialDataError(f"{path}: row {int(np.flatnonzero(~same)[0])}: window hash "
                                    "collision; cannot import safely")
        keys = hashes[first]
        row = self.table.lookup(keys)
        old = np.flatnonzero(row >= 0)
        if old.size:  # exact check against the rows stored from earlier files
            old_rows, at = row[old], first[old]
            stored = [self.writers[f"seq_{k}"].read_rows(old_rows, WINDOW) for k in ("iid", "cid")]
            same = _same_windows([self.row_uid[old_rows], *stored], [w[at] for w in windows])
            if not same.all():
                bad = int(at[np.flatnonzero(~same)[0]])
                raise OfficialDataError(f"{path}: row {bad}: window hash collision with an "
                                        "earlier file; cannot import safely")
        new = np.flatnonzero(row < 0)  # ascending: first-use order
        row[new] = self.table.add(keys[new])
        at = first[new]
        self.writers["seq_iid"].append(hist_iid[at])
        self.writers["seq_cid"].append(hist_cid[at])
        self.row_uid = np.concatenate([self.row_uid, uid[at].astype(np.int32)])
        sample_row = row[local]
        if sample_row.size and int(sample_row.max()) > _INT32_MAX:
            raise OfficialDataError(f"{path}: more than {_INT32_MAX} distinct windows")
        fields = {"row": sample_row, "pos": np.full(uid.shape[0], WINDOW, dtype=np.int32),
                  "iid": cols["iid"], "cid": cols["cid"], "label": cols["label"], "uid": uid}
        for field, values in fields.items():
            self.writers[f"{split}_{field}"].append(values)

    def finish(self, raw: dict[str, np.ndarray]) -> dict[str, list[int]]:
        """Close the streamed files, write the small arrays; name -> shape."""
        shapes = {name: list(w.close()) for name, w in self.writers.items()}
        small = {
            "seq_uid": self.row_uid,
            "seq_offsets": np.arange(len(self.table) + 1, dtype=np.int64) * WINDOW,
            **{f"raw_{key}": raw[key] for key in ("uid", "iid", "cid")},
        }
        for name, arr in small.items():
            arr = np.ascontiguousarray(arr, dtype=_array_dtype(name))
            np.save(self.tmp / f"{name}.npy", arr, allow_pickle=False)
            shapes[name] = list(arr.shape)
        return shapes

    def discard(self) -> None:
        for w in self.writers.values():
            w.discard()


def import_official(
    input_dir: str | Path, output_dir: str | Path, *, dataset: str | None = None,
    overwrite: bool = False, progress: bool = True,
) -> Path:
    """Convert the official directory ``input_dir`` (train_XXXX_N.npy, val.npy, test.npy,
    *_mapping.npy) into the dataset directory ``output_dir``, file by file; ``load_split``
    then returns exactly the official rows (uid, target, label 1 = click, both histories) in
    the official order. The output is written to a temporary sibling directory and moved
    into place only when complete; ``dataset`` is the name in its manifest (default: the
    input directory's name); ``progress`` shows a bar over the input files.

    Raises OfficialDataError on missing or malformed input files (naming the file, and the
    row at fault), FileExistsError when ``output_dir`` exists and not ``overwrite``.
    """
    src, out = Path(input_dir), Path(output_dir)
    if not src.is_dir():
        raise OfficialDataError(f"official data directory not found: {src}")
    if storage.is_occupied(out) and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (use overwrite=True)")
    all_files = [("train", p, n) for p, n in _train_files(src)]
    all_files += [(split, src / f"{split}.npy", None) for split in ("val", "test")]
    mapping_files = [src / name for name in _MAPPINGS.values()]
    for path in [p for _, p, _ in all_files[-2:]] + mapping_files:
        if not path.is_file():
            raise OfficialDataError(f"{path} is missing")

    tmp = storage.temp_sibling_dir(out)
    # Inputs' sha256 for the manifest, in a thread (hashlib releases the GIL), each file just
    # before the main thread unpickles it, so that both reads share the page cache.
    hasher = ThreadPoolExecutor(max_workers=1)
    digests: dict[Path, Future[str]] = {}
    state: _StreamingImport | None = None
    try:
        raw = {}
        for key, path in zip(_MAPPINGS, mapping_files, strict=True):
            digests[path] = hasher.submit(storage.sha256_file, path)
            raw[key] = _mapping_to_raw(path)
        limits = {key: int(arr.shape[0] - 1) for key, arr in raw.items()}
        state = _StreamingImport(tmp)
        counts = dict.fromkeys(storage.SPLITS, 0)
        for split, path, n in tqdm(
            all_files, desc="import official files", unit="file", disable=not progress, leave=False
        ):
            digests[path] = hasher.submit(storage.sha256_file, path)
            cols = _rows_to_arrays(path, n, limits)
            state.add_file(path, split, cols)
            counts[split] += int(cols["uid"].shape[0])
            del cols
        shapes = state.finish(raw)
        n_rows = shapes["seq_uid"][0]
        n_items, n_cates = limits["iid"], limits["cid"]
        manifest = {
            "dataset": dataset if dataset is not None else src.name, "seed": None,
            "counts": counts, "user_count": limits["uid"],
            "item_count": n_items, "category_count": n_cates,
            "item_n": n_items + 1, "cate_n": n_cates + 1,
            "sequence_rows": int(n_rows), "sequence_events": int(n_rows * WINDOW),
            "min_events": 210, "train_target_offsets": list(range(3, 94, 5)),
            "negatives_per_positive": 2, "max_length": WINDOW,
            # The official loader batches each training file on its own (`dare_jax.data.pipeline`).
            "train_file_rows": [n for split, _, n in all_files if split == "train"],
            "source_files": [
                storage.source_entry(p, digests[p].result())
                for p in [p for _, p, _ in all_files] + mapping_files
            ],
            "created_by": "dare_jax.interop.official_data.import_official",
            "format": storage.FORMAT_NAME,
            "protocol_version": storage.PROTOCOL_VERSION,
            "arrays": {name: shapes[name] for name in storage.array_names()},
        }
        # The manifest is written last: a directory without it is never a complete dataset.
        storage.write_manifest_file(tmp, manifest)
        if storage.is_occupied(out) and not overwrite:  # appeared while we were importing
            raise FileExistsError(f"output directory already exists: {out} (use overwrite=True)")
        storage.move_into_place(tmp, out)
    except BaseException:
        if state is not None:
            state.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)
    return out
