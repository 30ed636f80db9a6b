"""Shared helpers of the analyses: run directories, checkpoints, model outputs, JSON and figures.

A *run directory* is what `python -m dare_jax.main` writes (see `dare_jax.train`):
`config.json` (flattened config), `results.json`, `seed_<s>/{metrics.jsonl, result.json,
checkpoints/{best,latest}/<step>/, embeddings/*.npy, gradients/step_<n>.npz}`.

Library functions raise `AnalysisError` (a ValueError) naming the file, field or value that is
wrong; `run_cli` turns it into a one-line message and exit code 2 for the command lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, never a window (headless machines, tests, CI)
import matplotlib.pyplot as plt
import numpy as np

PADDING_SCORE_LIMIT = -1e9  # model scores at or below this are masked positions (-2**32 + 1)


class AnalysisError(ValueError):
    """Missing or mismatched analysis input; the message names the file / field / value."""


# ------------------------------------------------------------------------------ files


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parsed JSON of `path`; AnalysisError if it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnalysisError(f"{path} is not valid JSON ({error})") from error


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays, tuples, NaN/inf -> plain JSON values (non-finite -> null)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON atomically (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Save a figure as PNG (dpi 120) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# -------------------------------------------------------------------------- run dirs


def parse_named_runs(items: Sequence[str]) -> dict[str, Path]:
    """`["DARE=runs/demo/dare", "runs/demo/twin"]` -> {"DARE": ..., "twin": ...}.

    A bare directory is named after its last path component. Duplicate names are refused.
    """
    runs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise AnalysisError(f"run argument {item!r}: expected NAME=RUN_DIR or RUN_DIR")
        if name in runs:
            raise AnalysisError(f"run name {name!r} given twice")
        runs[name] = Path(path)
    if not runs:
        raise AnalysisError("no run directory given")
    return runs


def add_run_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable, required ``--run NAME=RUN_DIR`` option of the multi-run commands."""
    parser.add_argument("--run", action="append", default=[], required=True, help=help_text)


def load_named_runs(
    items: Sequence[str], *, seed: int | None = None, data_dir: str | Path | None = None
) -> dict[str, LoadedRun]:
    """:func:`parse_named_runs` then :func:`load_run` each (best checkpoint), in order."""
    return {
        name: load_run(path, name=name, seed=seed, data_dir=data_dir)
        for name, path in parse_named_runs(items).items()
    }


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The flattened config (`config.json`) of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run directory not found: {run_dir}")
    return read_json(run_dir / "config.json", "run config (config.json)")


def seed_dirs(run_dir: str | Path) -> list[Path]:
    """`seed_<s>` folders of a run, by seed number."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("seed_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def seed_dir(run_dir: str | Path, seed: int | None = None) -> Path:
    """The folder of `seed` (None: the lowest seed present)."""
    run_dir = Path(run_dir)
    dirs = seed_dirs(run_dir)
    if not dirs:
        raise AnalysisError(f"{run_dir} holds no seed_<s> folder: not a trained run directory")
    if seed is None:
        return dirs[0]
    wanted = run_dir / f"seed_{seed}"
    if wanted not in dirs:
        raise AnalysisError(f"{run_dir} has no seed {seed}; it has {[p.name for p in dirs]}")
    return wanted


def resolve_data_dir(flat: dict[str, Any], run_dir: Path, data_dir: str | Path | None) -> Path:
    """The preprocessed dataset of a run: `data_dir` if given, else the run's `data.dir`.

    A relative `data.dir` is tried against the current directory, then the run's parents (the
    driver resolves it against the directory it was started from).
    """
    if data_dir is not None:
        path = Path(data_dir)
        if not (path / "manifest.json").is_file():
            raise AnalysisError(f"no dataset (manifest.json) in the given data directory {path}")
        return path
    saved = flat.get("data.dir")
    if not saved:
        raise AnalysisError(f"{run_dir / 'config.json'} has no data.dir field")
    candidates = [Path(saved)]
    if not Path(saved).is_absolute():
        candidates += [parent / saved for parent in run_dir.resolve().parents]
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate
    raise AnalysisError(
        f"the dataset of run {run_dir} (config field data.dir = {saved!r}) was not found; "
        "pass its location with --data-dir"
    )


# ------------------------------------------------------------------------ checkpoints


@dataclasses.dataclass
class LoadedRun:
    """A trained model restored from a run directory's Orbax checkpoint.

    experiment: the run's `dare_jax.experiment.Experiment` (its model, dataset, spec), on
    this process's devices; state: the training-state pytree (params, batch_stats, ...);
    config: the flattened config (`config.json`); step: the checkpoint's step; run_dir /
    seed_dir: where it came from.
    """

    name: str
    run_dir: Path
    seed_dir: Path
    config: dict[str, Any]
    experiment: Any
    state: Any
    step: int
    compiled: dict = dataclasses.field(default_factory=dict, repr=False)  # jitted appliers

    @property
    def model(self):
        return self.experiment.model

    @property
    def model_config(self):
        """The model's options (`dare_jax.models.ModelSpec`)."""
        return self.experiment.spec.model

    @property
    def dataset(self):
        return self.experiment.dataset

    @property
    def max_length(self) -> int:
        return self.experiment.spec.data.max_length

    @property
    def variant(self) -> str:
        return self.experiment.spec.variant or self.model_config.name


def open_run_dataset(flat: dict[str, Any], run_dir: Path, data_dir: str | Path | None = None):
    """The run's dataset, checked against the run (item and category counts)."""
    from dare_jax.data import DatasetError, open_dataset

    path = resolve_data_dir(flat, run_dir, data_dir)
    try:
        return open_dataset(path)
    except (DatasetError, OSError) as error:
        raise AnalysisError(f"cannot open the dataset {path}: {error}") from error


def run_spec(flat: dict[str, Any], run_dir: Path, data_dir: Path):
    """The run's `ExperimentSpec` (from its config.json), on this process's devices: the
    mesh keeps the run's table layout (row-sharded tables stay padded as trained) but spans
    whatever devices are here, and the dataset is the one found at `data_dir`."""
    from dare_jax import config

    try:
        spec = config.resolve(config.unflatten(flat))
        return spec.replace(
            data=dataclasses.replace(spec.data, dir=str(data_dir)),
            model=spec.model.replace(init_from=""),  # the checkpoint holds the weights
            mesh=dataclasses.replace(spec.mesh, data=-1, model=1),
        )
    except ValueError as error:
        raise AnalysisError(f"{run_dir / 'config.json'}: {error}") from error


def load_run(
    run_dir: str | Path,
    *,
    name: str | None = None,
    seed: int | None = None,
    which: str = "best",
    data_dir: str | Path | None = None,
) -> LoadedRun:
    """Restore a run's checkpoint (`which` = 'best', or 'latest': the newest of the run's
    checkpoints, the state its training would resume from) with its model and dataset,
    built by the driver's experiment builder from the run's config.

    Raises AnalysisError when the run directory, its config, its dataset or its checkpoint is
    missing, or the checkpoint does not match the model the config describes.
    """
    from dare_jax import checkpointing
    from dare_jax.experiment import Experiment

    run_dir = Path(run_dir)
    flat = run_config(run_dir)
    sdir = seed_dir(run_dir, seed)
    dataset = open_run_dataset(flat, run_dir, data_dir)
    spec = run_spec(flat, run_dir, dataset.directory)
    try:
        experiment = Experiment(spec, dataset)
    except ValueError as error:
        raise AnalysisError(f"run {run_dir} does not fit dataset {dataset.directory}: {error}")
    if which not in (checkpointing.BEST, checkpointing.LATEST):
        raise AnalysisError(f"checkpoint kind {which!r}: expected 'best' or 'latest'")
    checkpoints = checkpointing.RunCheckpoints(sdir / "checkpoints")
    try:
        if which == checkpointing.LATEST:  # the state training would resume from
            which = (checkpoints.newest() or (which, None))[0]
        if checkpoints.step(which) is None:
            raise AnalysisError(f"no {which} checkpoint in {sdir / 'checkpoints' / which}")
        state, _ = experiment.restore(checkpoints, which)
    except checkpointing.CheckpointError as error:
        raise AnalysisError(str(error)) from error
    finally:
        checkpoints.close()
    return LoadedRun(name or run_dir.name, run_dir, sdir, flat, experiment, state, int(state["step"]))


OUTPUT_KEYS = ("attention_scores", "representation", "prob", "topk_indices")


def _jitted_apply(run: LoadedRun, keys: tuple[str, ...]):
    """`apply(state, batch) -> {key: array}`, jit-compiled once per run and key set."""
    import jax

    cached = run.compiled.get(keys)
    if cached is not None:
        return cached
    model, batch_stats_mode = run.model, bool(run.model_config.eval_batchnorm_uses_batch_stats)

    @jax.jit
    def apply(state, batch):
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        if batch_stats_mode:
            out, _ = model.apply(variables, batch, train=False, mutable=["batch_stats"])
        else:
            out = model.apply(variables, batch, train=False)
        return {k: (out["prob"][:, 0] if k == "prob" else out[k]) for k in keys}

    run.compiled[keys] = apply
    return apply


def collect_outputs(
    run: LoadedRun,
    split: str,
    keys: Sequence[str] = ("attention_scores",),
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Model outputs on samples of `split` (all, or `indices`), with their inputs.

    Returns the gathered inputs (uid, iid, cid, label `[N]`, hist_iid, hist_cid `[N, L]`) and
    the requested outputs: attention_scores `[N, L]` (masked positions -2**32 + 1),
    representation `[N, F]` (the main-MLP input), prob `[N]` (click probability),
    topk_indices `[N, k]`. BatchNorm uses running statistics (train=False), unless the run's
    config asks for the official batch-statistics evaluation.
    """
    from tqdm import tqdm

    for key in keys:
        if key not in OUTPUT_KEYS:
            raise AnalysisError(f"model output {key!r} unknown; expected one of {OUTPUT_KEYS}")
    total = run.dataset.num_samples(split)
    if indices is None:
        indices = np.arange(total)
    indices = np.asarray(indices, np.int64)
    if indices.size == 0:
        raise AnalysisError(f"no {split} samples selected from {run.dataset.directory}")
    apply = _jitted_apply(run, tuple(keys))
    batch_size = int(min(batch_size, indices.size))
    gathered: dict[str, list[np.ndarray]] = {}
    bar = tqdm(
        total=indices.size,
        desc=f"{run.name}: {split} outputs",
        unit="sample",
        disable=not progress,
        leave=False,
    )
    for start in range(0, indices.size, batch_size):
        chunk = indices[start : start + batch_size]
        real = chunk.size
        padded = np.resize(chunk, batch_size)  # static shape: one compilation
        batch = run.dataset.gather(split, padded, run.max_length)
        outputs = apply(run.state, {k: v for k, v in batch.items() if k != "uid"})
        for name, value in list(batch.items()) + list(outputs.items()):
            gathered.setdefault(name, []).append(np.asarray(value)[:real])
        bar.update(real)
    bar.close()
    return {name: np.concatenate(parts) for name, parts in gathered.items()}


# ------------------------------------------------------------------------ plotting


def heatmap(
    ax: plt.Axes,
    matrix: np.ndarray,
    title: str,
    *,
    cmap: str = "viridis",
    row_labels: Iterable | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> None:
    """Draw `matrix [rows, cols]` (NaN cells blank) with a colour bar; column j sits at x = j + 1
    (the relative position, 1 = most recent, when columns are positions)."""
    rows, cols = matrix.shape
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        aspect="auto",
        cmap=cmap,
        interpolation="nearest",
        extent=(0.5, cols + 0.5, rows - 0.5, -0.5),
    )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if row_labels is not None:
        labels = list(row_labels)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels([str(x) for x in labels], fontsize=6)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


# ---------------------------------------------------------------------------- cli


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a command-line main; bad input -> 'error: ...' on stderr and exit code 2."""
    from dare_jax.checkpointing import CheckpointError
    from dare_jax.data import DatasetError

    try:
        main(argv)
    except (AnalysisError, DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
