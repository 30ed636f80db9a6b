"""The tiny training setup shared by the driver and sharding tests (10 steps of batch 64,
evaluations at steps 4, 8 and 10) as dotted config fields, also usable as --config.* flags;
random id batches for the optimizer tests."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np


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


def random_batch(rng: np.random.Generator, b: int, length: int, item_n: int, cate_n: int):
    """A training batch of random ids `[b]` / `[b, length]`: two padding positions (id 0) per
    history and an id shared by three examples' histories."""
    hist = rng.integers(1, item_n, size=(b, length)).astype(np.int32)
    hist[:, :2] = 0
    hist[0, 5] = hist[1, 7] = hist[2, 2]  # duplicate ids across examples
    return {
        "iid": jnp.asarray(rng.integers(1, item_n, size=b), jnp.int32),
        "cid": jnp.asarray(rng.integers(1, cate_n, size=b), jnp.int32),
        "hist_iid": jnp.asarray(hist),
        "hist_cid": jnp.asarray(np.where(hist > 0, rng.integers(1, cate_n, hist.shape), 0)),
        "label": jnp.asarray(rng.integers(0, 2, size=b), jnp.int32),
    }
