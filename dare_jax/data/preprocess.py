"""Raw log -> dataset directory: reader + protocol + storage in one call."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

from dare_jax.data import protocol, raw_logs, storage

DATASET_KINDS = ("taobao", "tmall")


def preprocess_log(
    kind: str, input_path: str | Path, output_dir: str | Path, seed: int = 0,
    overwrite: bool = False, *, progress: bool = True,
) -> Path:
    """Preprocess the raw CSV of ``kind`` 'taobao' (UserBehavior.csv) or 'tmall'
    (user_log_format1.csv) into the dataset directory ``output_dir`` (SPEC section 2),
    written atomically; ``seed`` seeds the negatives and the train shuffle. Returns
    ``output_dir`` as a Path.

    Raises ValueError (unknown ``kind``), FileNotFoundError (missing input),
    FileExistsError (``output_dir`` exists and not ``overwrite``), raw_logs.RawLogError
    (malformed input line), protocol.ProtocolError (the log yields no dataset, e.g.
    nobody has 210 events).
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {DATASET_KINDS}")
    input_path, output_dir = Path(input_path), Path(output_dir)
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
        result = protocol.build_samples(raw_logs.READERS[kind](input_path, progress=progress),
                                        seed=seed, progress=progress)
        sha = digest.result()
    arrays = {name: getattr(result, name) for name in storage.SEQUENCE_FIELDS + storage.ID_FIELDS}
    for split, samples in result.splits.items():
        arrays.update({f"{split}_{f}": getattr(samples, f) for f in storage.SAMPLE_FIELDS})
    n_items, n_cates = int(result.raw_iid.shape[0] - 1), int(result.raw_cid.shape[0] - 1)
    manifest = {
        "dataset": kind, "seed": int(seed),
        "counts": {split: len(s) for split, s in result.splits.items()},
        "user_count": int(result.raw_uid.shape[0] - 1),
        "item_count": n_items, "category_count": n_cates,
        "item_n": n_items + 1, "cate_n": n_cates + 1,
        "sequence_rows": int(result.seq_uid.shape[0]),
        "sequence_events": int(result.seq_iid.shape[0]),
        "min_events": protocol.MIN_EVENTS,
        "train_target_offsets": list(protocol.TRAIN_TARGET_OFFSETS),
        "negatives_per_positive": protocol.NEGATIVES_PER_POSITIVE,
        "max_length": None,  # whole sequences stored: any history length can be gathered
        "raw_rows": result.raw_rows, "kept_events": result.events_kept_type,
        "source_files": [storage.source_entry(input_path, sha)],
        "created_by": "dare_jax.data.preprocess_log",
        "seconds": round(time.perf_counter() - started, 2),
    }
    return storage.write_dataset(output_dir, arrays, manifest, overwrite=overwrite)


DOWNLOADS = {  # kind -> (file to download, from where, the command that preprocesses it)
    "taobao": ("UserBehavior.csv", "https://tianchi.aliyun.com/dataset/649",
               "python -m preprocessing.taobao --input {raw} --output {dir}"),
    "tmall": ("user_log_format1.csv (inside data_format1.zip)",
              "https://tianchi.aliyun.com/dataset/42",
              "python -m preprocessing.tmall --input {raw} --output {dir}"),
}


def prepare_dataset(data) -> storage.Dataset:
    """The dataset of a `DataSpec` (`dare_jax.config`): `data.dir` opened; when it is not
    there yet, `data.raw_path` preprocessed into it first (and, for a synthetic config,
    generated before that). DatasetError with download instructions when neither exists,
    or naming what else is wrong."""
    data_dir, raw_path = Path(data.dir), Path(data.raw_path)
    if not (data_dir / storage.MANIFEST).exists():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise storage.DatasetError(
                f"{data_dir} exists but holds no manifest.json: not a dataset "
                "directory (remove it, or point --config.data.dir elsewhere)")
        if data.synthetic_users > 0 and not raw_path.exists():
            from dare_jax.data.synthetic import write_taobao_log

            raw_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"generating a synthetic Taobao log ({data.synthetic_users} users) at "
                  f"{raw_path}", flush=True)
            write_taobao_log(raw_path, data.synthetic_users, seed=data.synthetic_seed,
                             target_rows=data.synthetic_rows or None, **data.structure)
        if not raw_path.is_file():
            name, url, command = DOWNLOADS[data.kind]
            raise storage.DatasetError(
                f"no preprocessed dataset at {data_dir} and no raw log at {raw_path}.\n"
                f"  1. download {name} from {url}\n"
                f"  2. save it as {raw_path} (or pass --config.data.raw_path=...)\n"
                f"  3. run this command again (it preprocesses first), or preprocess now:\n"
                f"     {command.format(raw=raw_path, dir=data_dir)}"
            )
        print(f"preprocessing {raw_path} into {data_dir} (once)", flush=True)
        try:
            preprocess_log(data.kind, raw_path, data_dir, seed=data.preprocess_seed)
        except (ValueError, OSError) as error:
            raise storage.DatasetError(f"preprocessing {raw_path} failed: {error}") from error
    try:
        return storage.open_dataset(data_dir)
    except (OSError, ValueError) as error:
        raise storage.DatasetError(f"cannot open the dataset {data_dir}: {error}") from error
