"""The tiny training setup shared by the driver and sharding tests (10 steps of batch 64,
evaluations at steps 4, 8 and 10) as dotted config fields, also usable as --config.* flags."""

from __future__ import annotations

from pathlib import Path


def tiny_overrides(data_dir, workdir, **extra) -> dict:
    """Dotted config overrides of the tiny setup; `extra` adds or replaces fields."""
    return {
        "data.dir": str(data_dir),
        "data.raw_path": str(Path(data_dir).parent / "missing.csv"),
        "data.synthetic_users": 0,
        "data.max_length": 20,
        "model.item_embedding_dim": 4,
        "model.category_embedding_dim": 4,
        "model.time_embedding_dim": 4,
        "model.top_k": 5,
        "train.batch_size": 64,
        "train.eval_batch_size": 512,
        "train.eval_every_steps": 4,
        "train.max_steps": 10,
        "train.num_seeds": 1,
        "log.every_steps": 2,
        "log.progress_bar": False,
        "log.tensorboard": False,
        "workdir": str(workdir),
        **extra,
    }
