"""The training loop of one experiment (all its seeds).

`run(spec)` prepares the data (preprocessing the raw log on first use), refuses a run
directory made with a different config, trains every seed with `train_seed` and writes
`results.json` (per-seed and mean/std test metrics plus the full config).

Run directory (`spec.workdir`):

    config.json                 the flattened config (`dare_jax.config.flat`)
    results.json                written when every seed has finished
    seed_<s>/metrics.jsonl      train loss every log.every_steps, val metrics every eval
    seed_<s>/tensorboard/       the same as TensorBoard scalars
    seed_<s>/checkpoints/{latest,best}/<step>/
    seed_<s>/embeddings/*.npy   every learned table of the best checkpoint
    seed_<s>/gradients/step_<n>.npz   (export.gradients) per-path table gradients
    seed_<s>/result.json        the seed's best step, best validation and test metrics

A seed killed at any point and restarted with the same command resumes from its latest
checkpoint (state, data iterator position, best so far) and ends with exactly the metrics of an
uninterrupted run. The same loop runs on one device, on a mesh of many, and across processes:
every process computes the same numbers, only process 0 writes logs, exports and JSON, and
checkpoints are written by all processes together. A run may resume on another mesh
(`RESUMABLE_FIELDS`); its numbers then agree to float tolerance.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import psutil
from tqdm import tqdm

from dare_jax import checkpointing, config, provenance, run_logging, sharding, steps
from dare_jax.evaluate import evaluate, export_embeddings, export_gradients
from dare_jax.experiment import Experiment
from dare_jax.phase_timer import PhaseTimer, peak_memory

# Config fields that may change between a run and its resumption: they change no number.
RESUMABLE_FIELDS = (
    "workdir",
    "log.progress_bar",
    "mesh.data",
    "mesh.model",
    "data.histories",
    "data.prefetch_threads",
    "train.dispatch_ahead",
)
METRIC_NAMES = ("auc", "gauc", "category_auc", "log_loss", "accuracy")


class RunError(ValueError):
    """The run directory cannot take this run; the message says why."""


def run(spec: config.ExperimentSpec) -> dict:
    """Train and test every seed of `spec`; returns (and writes) results.json's content."""
    from dare_jax.data.preprocess import prepare_dataset

    if not spec.workdir:
        raise RunError("config field workdir is empty")
    workdir = Path(spec.workdir)
    flat = config.flat(spec)
    check_resumable(workdir, flat)
    timer = PhaseTimer()
    # Interpreter start-up and imports, when this process was started to run this.
    timer.seconds["startup"] = time.time() - psutil.Process().create_time()
    with timer.phase("prepare_data"):
        if jax.process_count() > 1:  # process 0 prepares the data once, the others open it
            from jax.experimental import multihost_utils

            if sharding.is_main_process():
                prepare_dataset(spec.data)
            multihost_utils.sync_global_devices("dare_jax.prepare_dataset")
        dataset = prepare_dataset(spec.data)
    with timer.phase("setup"):
        experiment = Experiment(spec, dataset)
        if sharding.is_main_process() and not (workdir / "config.json").exists():
            run_logging.write_json_atomic(workdir / "config.json", flat)
    first = spec.train.first_seed
    with timer.phase("seeds"):  # each seed has its own timings
        results = [
            train_seed(experiment, seed, workdir / f"seed_{seed}")
            for seed in range(first, first + spec.train.num_seeds)
        ]
    with timer.phase("finish"):
        out = {
            "dataset": spec.data.name,
            "variant": spec.variant,
            "seeds": results,
            **summarize(results),
            "std_note": "sample standard deviation over seeds (ddof=1)",
            "gauc_weighting": "per-user AUC weighted by the user's sample count; one-class "
            "users skipped (category_auc likewise per target category)",
            "provenance": provenance.collect(dataset.directory),
            "config": config.to_dict(spec),
        }
    out["timings"] = timer.summary()
    if sharding.is_main_process():
        run_logging.write_json_atomic(workdir / "results.json", out)
    return out


def check_resumable(workdir: Path, flat: dict[str, Any]) -> None:
    """RunError when `workdir` holds a run of another config (resumable fields aside)."""
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    differences = config_differences(json.loads(saved_path.read_text()), flat)
    if differences:
        raise RunError(
            f"{workdir} holds a run with a different config; refusing to resume into it. "
            "Differences:\n  "
            + "\n  ".join(differences)
            + "\nUse another --config.workdir, or delete the directory to start over."
        )


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields (but `RESUMABLE_FIELDS`) in which two flattened configs differ, as text."""
    return [
        f"{key}: run has {saved.get(key, '<absent>')!r}, command has "
        f"{current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if key not in RESUMABLE_FIELDS
        and saved.get(key, "<absent>") != current.get(key, "<absent>")
    ]


def summarize(results: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of each test metric."""
    summary: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for name in METRIC_NAMES:
        values = np.array([r["test"][name] for r in results], dtype=np.float64)
        summary["mean"][name] = float(values.mean())
        summary["std"][name] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary


def train_seed(experiment: Experiment, seed: int, seed_dir: Path) -> dict:
    """Train one seed to the end (resuming if it has a checkpoint); returns its result."""
    if (seed_dir / "result.json").exists():
        return json.loads((seed_dir / "result.json").read_text())
    spec, timer = experiment.spec, PhaseTimer()
    with timer.phase("init"):
        checkpoints = SeedCheckpoints(experiment, seed_dir / "checkpoints")
        state, progress = checkpoints.resume(seed)
        first_step = int(state["step"])
        log = SeedLog(seed_dir, experiment, seed, first_step)
        batches = experiment.train_batches(seed, progress.data_iterator)
    with checkpoints:
        state = train_steps(experiment, state, batches, progress, checkpoints, log, timer)
        step = experiment.total_steps
        if progress.best_step != step:  # else the best is the state in memory
            del state  # before the restore allocates the best one
            with timer.phase("checkpoint"):
                state = checkpoints.restore_best(progress.best_step)
        with timer.phase("eval"):
            test = evaluate(experiment, state, "test")
        log.test(step, progress.best_step, test)
        if spec.export.embeddings:
            with timer.phase("export"):
                export_embeddings(experiment, state["params"], seed_dir / "embeddings")
        with timer.phase("checkpoint"):
            checkpoints.wait()  # for the last checkpoint still being written
    with timer.phase("finish"):
        result = {
            "seed": seed,
            "steps": step,
            "best_step": progress.best_step,
            "val": progress.best_val,
            "test": test,
            "provenance": provenance.collect(experiment.dataset.directory),
        }
    # This invocation's (a resumed seed: the resumed part only).
    result["timings"] = {**timer.summary(), "steps_timed": step - first_step, **peak_memory()}
    result["timings"]["samples_timed"] = (step - first_step) * experiment.batch_size
    if sharding.is_main_process():
        run_logging.write_json_atomic(seed_dir / "result.json", result)
    return result


def train_steps(experiment, state, batches, progress, checkpoints, log, timer) -> dict:
    """The training loop from `state` to the last step: validation, checkpoints and logs on
    their steps (`progress` is updated in place); returns the last state."""
    spec, step = experiment.spec, int(state["step"])
    losses = LossCheck(spec.train.dispatch_ahead)
    with log.bar:
        while step < experiment.total_steps:
            with timer.phase("input"):
                batch = next(batches)
            with timer.phase("train_steps"):  # logging waits for the step: its time too
                state, out = experiment.train_step(state, batch)
                step += 1
                losses.push(step, out["total"])
                if step % spec.log.every_steps == 0:
                    losses_now = {k: float(v) for k, v in out.items() if k != "observed"}
                    log.train(step, losses_now)
            log.bar.update(experiment.batch_size)
            if spec.export.gradients and step % spec.export.gradients_every_steps == 0:
                with timer.phase("export"):
                    directory = log.seed_dir / "gradients"
                    export_gradients(out["observed"], step, directory, experiment.tables)
            if step % spec.train.eval_every_steps == 0 or step == experiment.total_steps:
                with timer.phase("train_steps"):
                    losses.check_all()
                with timer.phase("eval"):
                    val = evaluate(experiment, state, "val")
                improved = progress.record(step, val, batches.get_state())
                log.val(step, val, progress)
                with timer.phase("checkpoint"):
                    checkpoints.save(step, state, progress, improved)
    return state


@dataclasses.dataclass
class Progress:
    """What a checkpoint holds besides the state, to resume exactly: the data iterator's
    position and the best validation so far."""

    data_iterator: dict | None = None
    best_auc: float | None = None
    best_step: int | None = None
    best_val: dict | None = None

    def record(self, step: int, val: dict, data_iterator: dict) -> bool:
        """Note a validation at `step` (the iterator at that point); True for a new best. A
        NaN AUC (one class only) never beats a number; it is kept as None, as in JSON."""
        auc = val["auc"] if math.isfinite(val["auc"]) else None
        improved = self.best_step is None or (
            auc is not None and (self.best_auc is None or auc > self.best_auc)
        )
        if improved:
            self.best_auc, self.best_step, self.best_val = auc, step, val
        self.data_iterator = data_iterator
        return improved


class SeedCheckpoints:
    """A seed's checkpoints: every validation saves the state, as `best` when it improves on
    the best so far, else as `latest`; a seed resumes from the newer of the two
    (`dare_jax.checkpointing`), so a kill at any point loses no more than the steps since."""

    def __init__(self, experiment: Experiment, directory: Path):
        self.experiment = experiment
        self.checkpoints = checkpointing.RunCheckpoints(directory)

    def resume(self, seed: int) -> tuple[dict, Progress]:
        """The newest checkpoint's state and progress, or the seed's fresh state."""
        newest = self.checkpoints.newest()
        if newest is None:
            return self.experiment.initial_state(seed), Progress()
        state, progress = self.experiment.restore(self.checkpoints, newest[0])
        if sharding.is_main_process():
            print(f"seed {seed}: resuming from step {newest[1]}", flush=True)
        return state, Progress(**progress)

    def save(self, step: int, state: dict, progress: Progress, improved: bool) -> None:
        which = checkpointing.BEST if improved else checkpointing.LATEST
        saved = run_logging.to_jsonable(dataclasses.asdict(progress))
        self.experiment.save(self.checkpoints, which, step, state, saved)

    def restore_best(self, step: int) -> dict:
        return self.experiment.restore(self.checkpoints, checkpointing.BEST, step=step)[0]

    def wait(self) -> None:
        self.checkpoints.wait()

    def __enter__(self) -> SeedCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.checkpoints.close()  # a failed seed too: the last save it started completes


class LossCheck:
    """Each step's loss is checked `ahead` steps after it was dispatched, so the host queues
    that many steps on the device instead of waiting for each; a NaN or infinite loss
    still stops the run naming its step (FloatingPointError)."""

    def __init__(self, ahead: int):
        self.ahead, self.pending = ahead, collections.deque()

    def push(self, step: int, loss: jax.Array) -> None:
        self.pending.append((step, loss))
        self._check(self.ahead)

    def check_all(self) -> None:
        self._check(0)

    def _check(self, keep: int) -> None:
        while len(self.pending) > keep:
            step, loss = self.pending.popleft()
            steps.check_finite(float(loss), step)


class SeedLog:
    """A seed's metrics.jsonl, TensorBoard events, progress bar and console lines; silent on
    processes other than 0. A resumed seed (`step` > 0) forgets what was logged after it."""

    def __init__(self, seed_dir: Path, experiment: Experiment, seed: int, step: int):
        self.main, self.spec, self.seed_dir = sharding.is_main_process(), experiment.spec, seed_dir
        self.seed = seed
        if self.main:
            resumed = step or None
            self.jsonl = run_logging.MetricsLog(seed_dir / "metrics.jsonl", resumed)
            self.board = run_logging.TensorBoard(
                seed_dir / "tensorboard", self.spec.log.tensorboard, resumed
            )
        b = experiment.batch_size
        self.bar = tqdm(
            total=experiment.total_steps * b,
            initial=step * b,
            unit="sample",
            unit_scale=True,
            desc=f"seed {seed}",
            dynamic_ncols=True,
            disable=not (self.spec.log.progress_bar and self.main),
        )

    def _write(self, split: str, step: int, values: dict, **extra: Any) -> None:
        if self.main:
            self.jsonl.write({"step": step, "split": split, **extra, **values})
            self.board.scalars(split, values, extra.get("best_step", step))

    def train(self, step: int, losses: dict) -> None:
        self._write("train", step, losses)
        self.bar.set_postfix(step=step, loss=f"{losses['total']:.4f}")

    def val(self, step: int, val: dict, progress: Progress) -> None:
        self._write("val", step, val)
        best = "nan" if progress.best_auc is None else f"{progress.best_auc:.5f}"
        if self.main:
            self.bar.write(
                f"seed {self.seed} step {step}: val auc {val['auc']:.5f} "
                f"(best {best} at step {progress.best_step})"
            )

    def test(self, step: int, best_step: int, test: dict) -> None:
        self.bar.close()
        self._write("test", step, test, best_step=best_step)
        if self.main:
            self.jsonl.close()
            self.board.close()
