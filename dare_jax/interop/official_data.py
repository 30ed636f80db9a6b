"""Import a directory written by the official DARE preprocessing into our format.

The official scripts write ``train_XXXX_N.npy`` (several files, numbered from 0001,
N rows each), ``val.npy`` and ``test.npy``: pickled numpy object arrays whose rows are
``[uid, target_iid, target_cid, label_onehot, hist_iid (200), hist_cid (200)]``, plus
``uid_mapping.npy``, ``iid_mapping.npy`` and ``cid_mapping.npy`` (pickled dicts raw id ->
dense id).

**Security:** these files can only be read with ``allow_pickle=True``, which can run
arbitrary code from the file. Only import files you produced yourself or trust.

Storage choice: the official samples only carry 200-long windows, so each distinct
window ``(uid, hist_iid, hist_cid)`` becomes its own sequence row of exactly 200 ids
(padding zeros included) and every sample - a positive and the negatives that share
its history - points at that row with position 200. Windows are grouped by a 128-bit
polynomial hash and then compared element by element, so a hash collision can never
merge different histories (it raises instead). The manifest therefore says
``max_length = 200``: longer histories do not exist in these files. Sample order is
kept: train in file order (already shuffled by the official script), then val, test.

Memory: the importer holds every sample's two windows as int32 (1.6 kB per sample)
while it groups them, plus one official file's Python objects at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dare_jax.data import storage

WINDOW = 200
_TRAIN_RE = re.compile(r"train_(\d{4})_(\d+)\.npy")
_MAPPINGS = {"uid": "uid_mapping.npy", "iid": "iid_mapping.npy", "cid": "cid_mapping.npy"}


class OfficialDataError(ValueError):
    """An official preprocessed directory is missing files or holds unexpected content."""


def _load_pickled(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=True)  # trusted input only, see module doc
    except (OSError, ValueError, EOFError) as exc:
        raise OfficialDataError(f"{path}: cannot be read as a .npy file: {exc}") from exc


def _mapping_to_raw(path: Path) -> np.ndarray:
    """Pickled dict raw -> dense (1..G) as int64 [G + 1] array dense -> raw."""
    obj = _load_pickled(path)
    mapping = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(mapping, dict):
        raise OfficialDataError(f"{path}: expected a pickled dict, found {type(mapping).__name__}")
    raw = np.fromiter(mapping.keys(), dtype=np.int64, count=len(mapping))
    dense = np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))
    if len(mapping) and not np.array_equal(np.sort(dense), np.arange(1, len(mapping) + 1)):
        raise OfficialDataError(f"{path}: dense ids are not exactly 1..{len(mapping)}")
    out = np.zeros(len(mapping) + 1, dtype=np.int64)
    out[dense] = raw
    return out


def _rows_to_arrays(path: Path, expected_rows: int | None) -> dict[str, np.ndarray]:
    """One official sample file -> uid, iid, cid, label [N] and hist_iid, hist_cid [N, 200]."""
    data = _load_pickled(path)
    if not (isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == 6):
        shape = getattr(data, "shape", None)
        raise OfficialDataError(f"{path}: expected an object array of shape [N, 6], got {shape}")
    n = data.shape[0]
    if expected_rows is not None and n != expected_rows:
        raise OfficialDataError(f"{path}: file name says {expected_rows} rows, found {n}")
    out: dict[str, np.ndarray] = {}
    try:
        for col, name in enumerate(("uid", "iid", "cid")):
            out[name] = np.asarray(data[:, col].tolist(), dtype=np.int64)
        onehot = np.asarray(data[:, 3].tolist(), dtype=np.int64).reshape(n, -1)
        hist_iid = np.asarray(data[:, 4].tolist(), dtype=np.int64)
        hist_cid = np.asarray(data[:, 5].tolist(), dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise OfficialDataError(f"{path}: rows are not [int, int, int, [2], [200], [200]]: "
                                f"{exc}") from exc
    if onehot.shape != (n, 2) or not np.all((onehot == [1, 0]).all(1) | (onehot == [0, 1]).all(1)):
        bad = 0 if onehot.shape != (n, 2) else int(np.flatnonzero(onehot.sum(1) != 1)[0])
        raise OfficialDataError(f"{path}: row {bad}: label is not one-hot [1, 0] / [0, 1]")
    for name, hist in (("hist_iid", hist_iid), ("hist_cid", hist_cid)):
        if hist.shape != (n, WINDOW):
            raise OfficialDataError(f"{path}: {name} has shape {hist.shape}, expected "
                                    f"({n}, {WINDOW})")
    out["label"] = onehot[:, 0]
    out["hist_iid"] = hist_iid
    out["hist_cid"] = hist_cid
    for name, arr in out.items():
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise OfficialDataError(f"{path}: {name} has values outside int32 ids")
    return {k: v.astype(np.int32) for k, v in out.items()}


def _train_files(directory: Path) -> list[tuple[Path, int]]:
    found = []
    for path in directory.iterdir():
        m = _TRAIN_RE.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), path, int(m.group(2))))
    if not found:
        raise OfficialDataError(f"{directory}: no train_XXXX_N.npy file")
    found.sort()
    numbers = [f[0] for f in found]
    if numbers != list(range(1, len(found) + 1)):
        raise OfficialDataError(f"{directory}: train files are not numbered 0001..{len(found):04d}"
                                f" without gaps (found {numbers})")
    return [(p, n) for _, p, n in found]


def _window_hash(uid: np.ndarray, hist_iid: np.ndarray, hist_cid: np.ndarray) -> np.ndarray:
    """Two independent 64-bit polynomial hashes per window: uint64 [N, 2]."""
    rng = np.random.default_rng(20250127)
    coeffs = [rng.integers(1, 2**63, size=2 * WINDOW + 1, dtype=np.uint64) | np.uint64(1)
              for _ in range(2)]
    out = np.empty((uid.shape[0], 2), dtype=np.uint64)
    block = 1 << 16  # rows per block: bounds the uint64 temporaries to ~200 MB
    with np.errstate(over="ignore"):
        for lo in range(0, uid.shape[0], block):
            sl = slice(lo, lo + block)
            hi_iid = hist_iid[sl].astype(np.uint64)
            hi_cid = hist_cid[sl].astype(np.uint64)
            for k, coeff in enumerate(coeffs):
                h = uid[sl].astype(np.uint64) * coeff[0]
                h += hi_iid @ coeff[1:WINDOW + 1]
                h += hi_cid @ coeff[WINDOW + 1:]
                out[sl, k] = h
    return out


def import_official(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert an official preprocessed directory into a dataset directory.

    ``load_split(output_dir, split)`` then returns exactly the official rows (uid,
    target, label 1 = click, both 200-long histories) in the official order.

    Args:
        input_dir: directory with train_XXXX_N.npy, val.npy, test.npy, *_mapping.npy.
        output_dir: dataset directory to create (atomically).
        dataset: name recorded in the manifest (default: the input directory's name).
        overwrite: replace an existing ``output_dir``.

    Raises:
        OfficialDataError: missing or malformed input files.
        FileExistsError: ``output_dir`` exists and not ``overwrite``.
    """
    src = Path(input_dir)
    out = Path(output_dir)
    if not src.is_dir():
        raise OfficialDataError(f"official data directory not found: {src}")
    if storage.is_occupied(out) and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (use overwrite=True)")
    files: dict[str, list[tuple[Path, int | None]]] = {"train": _train_files(src)}
    for split in ("val", "test"):
        path = src / f"{split}.npy"
        if not path.is_file():
            raise OfficialDataError(f"{path} is missing")
        files[split] = [(path, None)]
    raw = {}
    for key, name in _MAPPINGS.items():
        path = src / name
        if not path.is_file():
            raise OfficialDataError(f"{path} is missing")
        raw[key] = _mapping_to_raw(path)

    all_files = [(s, p, n) for s in storage.SPLITS for p, n in files[s]]
    parts: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in storage.SPLITS}
    for split, path, n in tqdm(all_files, desc="read official files", disable=not progress,
                               leave=False):
        parts[split].append(_rows_to_arrays(path, n))
    counts = {s: sum(p["uid"].shape[0] for p in parts[s]) for s in storage.SPLITS}
    cat = {
        k: np.concatenate([p[k] for s in storage.SPLITS for p in parts[s]])
        for k in ("uid", "iid", "cid", "label", "hist_iid", "hist_cid")
    }
    del parts
    for key, name in (("uid", "uid"), ("iid", "iid"), ("cid", "cid")):
        limit = raw[key].shape[0] - 1
        ids = np.concatenate([cat[name].ravel()] + ([cat["hist_" + name].ravel()]
                                                     if name != "uid" else []))
        if ids.size and int(ids.max()) > limit:
            raise OfficialDataError(f"{src}: {name} ids exceed the {limit} ids of "
                                    f"{_MAPPINGS[key]}")

    hashes = _window_hash(cat["uid"], cat["hist_iid"], cat["hist_cid"])
    _, first, row_of_sample = np.unique(hashes, axis=0, return_index=True, return_inverse=True)
    row_of_sample = row_of_sample.ravel()
    # Rows in order of first use, so that the layout follows the sample order.
    order = np.argsort(first)
    new_row = np.empty_like(order)
    new_row[order] = np.arange(order.shape[0])
    row_of_sample = new_row[row_of_sample]
    first = first[order]
    seq_iid = cat["hist_iid"][first]
    seq_cid = cat["hist_cid"][first]
    seq_uid = cat["uid"][first]
    # Exact check: every sample's window equals its row's (guards against hash collisions).
    same = ((seq_iid[row_of_sample] == cat["hist_iid"]).all(1)
            & (seq_cid[row_of_sample] == cat["hist_cid"]).all(1)
            & (seq_uid[row_of_sample] == cat["uid"]))
    if not same.all():
        raise OfficialDataError("window hash collision; cannot import safely")
    n_rows = first.shape[0]
    arrays: dict[str, np.ndarray] = {
        "seq_iid": seq_iid.ravel(), "seq_cid": seq_cid.ravel(), "seq_uid": seq_uid,
        "seq_offsets": np.arange(n_rows + 1, dtype=np.int64) * WINDOW,
        "raw_uid": raw["uid"], "raw_iid": raw["iid"], "raw_cid": raw["cid"],
    }
    start = 0
    for split in storage.SPLITS:
        sl = slice(start, start + counts[split])
        start += counts[split]
        arrays[f"{split}_row"] = row_of_sample[sl]
        arrays[f"{split}_pos"] = np.full(counts[split], WINDOW, dtype=np.int32)
        for field in ("iid", "cid", "label", "uid"):
            arrays[f"{split}_{field}"] = cat[field][sl]
    n_items, n_cates = raw["iid"].shape[0] - 1, raw["cid"].shape[0] - 1
    manifest = {
        "dataset": dataset if dataset is not None else src.name,
        "seed": None,
        "counts": counts,
        "user_count": int(raw["uid"].shape[0] - 1),
        "item_count": int(n_items),
        "category_count": int(n_cates),
        "item_n": int(n_items + 1),
        "cate_n": int(n_cates + 1),
        "sequence_rows": int(n_rows),
        "sequence_events": int(n_rows * WINDOW),
        "min_events": 210,
        "train_target_offsets": list(range(3, 94, 5)),
        "negatives_per_positive": 2,
        "max_length": WINDOW,
        "source_files": [storage.source_entry(p) for _, p, _ in all_files]
        + [storage.source_entry(src / name) for name in _MAPPINGS.values()],
        "created_by": "dare_jax.interop.official_data.import_official",
    }
    return storage.write_dataset(out, arrays, manifest, overwrite=overwrite)
