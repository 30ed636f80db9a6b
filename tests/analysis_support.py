"""Tiny trained runs shared by the analysis and notebook tests (trained once per process).

`tiny_runs(root)` writes a synthetic Taobao-format log, preprocesses it and trains DARE and
TWIN for a few steps with the real driver (`dare_jax.train.run`), so every analysis reads real
run directories and Orbax checkpoints. `record_gradients(...)` records real attention-path and
representation-path gradients of a TWIN model in the driver's file format.
"""

from __future__ import annotations

import functools
from pathlib import Path

MAX_LENGTH = 30
TRAIN_STEPS = 24


def tiny_config(data_dir: Path, workdir: Path, variant: str):
    from configs import demo
    from configs.base import set_path

    config = demo.get_config(f"model={variant}")
    overrides = {
        "data.dir": str(data_dir),
        "data.raw_path": str(data_dir.parent / "missing.csv"),
        "data.synthetic_users": 0,
        "data.max_length": MAX_LENGTH,
        "model.item_embedding_dim": 4,
        "model.category_embedding_dim": 4,
        "model.time_embedding_dim": 4,
        "model.top_k": 5,
        "train.batch_size": 128,
        "train.eval_batch_size": 1024,
        "train.eval_every_steps": 8,
        "train.max_steps": TRAIN_STEPS,
        "train.num_seeds": 1,
        "log.every_steps": 4,
        "log.progress_bar": False,
        "log.tensorboard": False,
        "workdir": str(workdir),
    }
    for dotted, value in overrides.items():
        set_path(config, dotted, value)
    return config


@functools.cache
def tiny_data(root: Path) -> Path:
    from dare_jax.data import preprocess_log
    from dare_jax.data.synthetic import write_taobao_log

    root.mkdir(parents=True, exist_ok=True)
    write_taobao_log(root / "log.csv", 300, seed=3)
    preprocess_log("taobao", root / "log.csv", root / "pre", progress=False)
    return root / "pre"


@functools.cache
def tiny_runs(root: Path) -> dict[str, Path]:
    """{'DARE': run dir, 'TWIN': run dir} trained on one tiny synthetic dataset."""
    from dare_jax import train
    from dare_jax.config import resolve

    data_dir = tiny_data(root)
    runs = {}
    for name, variant in (("DARE", "dare"), ("TWIN", "twin")):
        workdir = root / "runs" / variant
        train.run(resolve(tiny_config(data_dir, workdir, variant)))
        runs[name] = workdir
    return runs


@functools.cache
def loaded_runs(root: Path):
    """The tiny runs restored from their best checkpoints (analysis.common.load_run)."""
    from analysis import common

    return {name: common.load_run(path, name=name) for name, path in tiny_runs(root).items()}


def record_gradients(data_dir: Path, workdir: Path, steps: int = 6) -> Path:
    """Train `model=twin_observe_grad` (TWIN with synchronised attention/representation copies)
    for `steps` steps with the driver, which records every step's path gradients; returns the
    run's `seed_0/gradients` folder."""
    from dare_jax import train
    from dare_jax.config import resolve

    config = tiny_config(data_dir, workdir, "twin_observe_grad")
    config.train.max_steps = steps
    config.train.eval_every_steps = steps
    config.export.gradients_every_steps = 1
    train.run(resolve(config))
    return workdir / "seed_0" / "gradients"
