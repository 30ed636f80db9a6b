"""Raw log -> dataset directory: reader + protocol + storage in one call."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

from dare_jax.data import protocol, raw_logs, storage

DATASET_KINDS = ("taobao", "tmall")


def preprocess_log(
    kind: str,
    input_path: str | Path,
    output_dir: str | Path,
    seed: int = 0,
    overwrite: bool = False,
    *,
    progress: bool = True,
) -> Path:
    """Preprocess a raw Taobao or Tmall log into a dataset directory (SPEC section 2).

    Args:
        kind: 'taobao' (UserBehavior.csv) or 'tmall' (user_log_format1.csv).
        input_path: the raw CSV.
        output_dir: the dataset directory to create (atomically).
        seed: seeds the negatives and the train shuffle.
        overwrite: replace an existing ``output_dir``.

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ValueError: unknown ``kind``.
        FileNotFoundError: missing input.
        FileExistsError: ``output_dir`` exists and not ``overwrite``.
        raw_logs.RawLogError: malformed input line.
        protocol.ProtocolError: the log yields no dataset (e.g. nobody has 210 events).
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {DATASET_KINDS}")
    input_path = Path(input_path)
    output_dir = Path(output_dir)
    if storage.is_occupied(output_dir) and not overwrite:
        # Checked up front too, so a long run does not fail only at the very end.
        raise FileExistsError(f"output directory already exists: {output_dir} "
                              "(use overwrite=True / --overwrite)")
    if not input_path.is_file():
        raise FileNotFoundError(f"raw log not found: {input_path}")
    started = time.perf_counter()
    # hashlib releases the GIL, so hashing overlaps with parsing and the protocol.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(storage.sha256_file, input_path)
        # No local name for the log: build_samples holds the only reference and frees
        # each raw column as soon as it is used (peak memory matters at 100 M rows).
        result = protocol.build_samples(
            raw_logs.READERS[kind](input_path, progress=progress), seed=seed, progress=progress
        )
        sha = digest.result()
    arrays = {
        "seq_iid": result.seq_iid, "seq_cid": result.seq_cid,
        "seq_offsets": result.seq_offsets, "seq_uid": result.seq_uid,
        "raw_uid": result.raw_uid, "raw_iid": result.raw_iid, "raw_cid": result.raw_cid,
    }
    for split, samples in result.splits.items():
        for field in storage.SAMPLE_FIELDS:
            arrays[f"{split}_{field}"] = getattr(samples, field)
    n_items = int(result.raw_iid.shape[0] - 1)
    n_cates = int(result.raw_cid.shape[0] - 1)
    manifest = {
        "dataset": kind,
        "seed": int(seed),
        "counts": {split: len(s) for split, s in result.splits.items()},
        "user_count": int(result.raw_uid.shape[0] - 1),
        "item_count": n_items,
        "category_count": n_cates,
        "item_n": n_items + 1,
        "cate_n": n_cates + 1,
        "sequence_rows": int(result.seq_uid.shape[0]),
        "sequence_events": int(result.seq_iid.shape[0]),
        "min_events": protocol.MIN_EVENTS,
        "train_target_offsets": list(protocol.TRAIN_TARGET_OFFSETS),
        "negatives_per_positive": protocol.NEGATIVES_PER_POSITIVE,
        "max_length": None,  # whole sequences stored: any history length can be gathered
        "raw_rows": result.raw_rows,
        "kept_events": result.events_kept_type,
        "source_files": [storage.source_entry(input_path, sha)],
        "created_by": "dare_jax.data.preprocess_log",
        "seconds": round(time.perf_counter() - started, 2),
    }
    return storage.write_dataset(output_dir, arrays, manifest, overwrite=overwrite)
