"""Compare the driver's training with the official PyTorch training, step by step.

    python -m dare_jax.interop.check_trajectory FIXTURE.npz [FIXTURE.npz ...] --data DIR
        [--optimizer both|row_sparse|dense] [--float64]

A fixture records the official code (github thuml/DARE) training one model from its official
initial weights (`init/<state_dict key>`) over an official preprocessing in file order: each
step's loss terms [total, ctr + aux, aux, l2] before its update, in float32 (`steps_f32`)
and float64 (`steps_f64`), and the final test predictions in both BatchNorm modes. DIR is
that preprocessing imported with `python -m preprocessing.import_official`.

The check trains with the driver's own experiment (`dare_jax.experiment`) on the official
run's spec (`trajectory_spec`), with the row-gradient Adam (`optim.table_updates=row_sparse`)
and the autodiff one (`dense`). A step passes when, for each term (f32, f64: official runs),

    |ours - f64| <= max(1e-5 * |f64|, 3 * |f32 - f64|)

Every step up to the fixture's `steps_where_reference_f32_within_1e4th_of_f64` must pass;
after that the official float32 run itself leaves the float64 one (top-k selections flip on
rounding), so later steps and the test AUCs are printed beside the official ones, not judged.
`--float64` trains in float64 (jax x64) and requires every step and the final test
predictions to match the official float64 run to 1e-9 relative: every step's arithmetic
(Adam, L2, BatchNorm statistics, time ids, data order) is the official one.

Exit code 0 when every fixture passes, 1 when a step fails, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dare_jax import metrics
from dare_jax.config import DataSpec, ExperimentSpec, LogSpec, MeshSpec, OptimSpec, TrainSpec
from dare_jax.data import open_dataset
from dare_jax.evaluate import predict
from dare_jax.experiment import Experiment, ExperimentError
from dare_jax.interop import torch_weights
from dare_jax.interop.check_parity import run_checks

TERMS = ("total", "ctr+aux", "aux", "l2")
RELATIVE_FLOOR = 1e-5  # float32 noise allowed on any step
REFERENCE_DRIFT_FACTOR = 3.0  # times the official float32 run's own distance from float64
FLOAT64_RTOL = 1e-9
BATCHNORM_MODES = ("batch_stats", "running_stats")
OPTIMIZERS = ("row_sparse", "dense")  # optim.table_updates: the same maths, two paths


@dataclasses.dataclass
class StepComparison:
    """One step: our terms, the official float32 and float64 terms (TERMS order)."""

    step: int
    ours: np.ndarray
    f32: np.ndarray
    f64: np.ndarray
    tolerance: np.ndarray
    required: bool

    @property
    def ratio(self) -> np.ndarray:
        """|ours - f64| / tolerance per term (<= 1 passes)."""
        return np.abs(self.ours - self.f64) / self.tolerance

    @property
    def ok(self) -> bool:
        return bool(np.all(np.isfinite(self.ours)) and np.all(self.ratio <= 1))


@dataclasses.dataclass
class TestComparison:
    """Final test predictions of one BatchNorm mode against the official ones. The official
    AUCs are `dare_jax.metrics.auc` of the official predictions; `recorded_*` are the
    fixture's `test_auc_*`, from the official evaluation code (slightly lower)."""

    mode: str
    auc: float
    auc_f32: float
    auc_f64: float
    recorded_f32: float
    recorded_f64: float
    max_abs_diff_f64: float  # max |p - p_f64| over the test samples
    required: bool
    ok: bool


@dataclasses.dataclass
class TrajectoryResult:
    path: str
    model: str
    optimizer: str
    dtype: str
    required_steps: int
    steps: list[StepComparison]
    tests: list[TestComparison]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in [*self.steps, *self.tests] if c.required)


def load_fixture(path: str | Path) -> dict[str, Any]:
    """The fixture's arrays and parsed `meta_json`; ValueError when it is not a trajectory."""
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    missing = [k for k in ("meta_json", "steps_f32", "steps_f64", "test_label") if k not in data]
    if missing:
        raise ValueError(f"{path}: no {missing} entries; not a training-trajectory fixture")
    data["meta"] = json.loads(str(data["meta_json"]))
    return data


def trajectory_spec(
    fixture_path: str | Path, meta: dict, data_dir: str | Path, table_updates: str
) -> ExperimentSpec:
    """The experiment of the official run a fixture records (model from the constructor
    kwargs, its Adam lr, L2 weight, batch size and epochs; file order, one device)."""
    model, _, _, max_length = torch_weights.config_from_official_kwargs(meta["constructor_kwargs"])
    batch_size = int(meta["batch_size"])
    return ExperimentSpec(
        # kind: only the raw-log reader depends on it; none is read here.
        data=DataSpec(
            name=f"official {meta.get('data', '')}".strip(),
            kind="taobao",
            dir=str(data_dir),
            max_length=max_length,
            shuffle=False,
        ),
        model=model.replace(init_from=str(fixture_path)),
        optim=OptimSpec(
            lr=float(meta["adam_lr"]),
            weight_decay=float(meta["weight_decay"]),
            table_updates=table_updates,
        ),
        train=TrainSpec(
            batch_size=batch_size,
            eval_batch_size=batch_size,
            num_epochs=int(meta["epochs"]),
            num_seeds=1,
        ),
        mesh=MeshSpec(data=1),
        log=LogSpec(progress_bar=False),
        variant=model.name,
    )


def check_fixture(
    path: str | Path,
    data_dir: str | Path,
    optimizer: str = "row_sparse",
    float64: bool = False,
    steps: int | None = None,
) -> TrajectoryResult:
    """Train the fixture's official run with the driver's experiment and compare (only its
    first `steps` steps, and no test predictions, when given); raises ValueError, KeyError or
    OSError on unusable input."""
    fixture = load_fixture(path)
    meta = fixture["meta"]
    spec = trajectory_spec(path, meta, data_dir, optimizer)
    dataset = open_dataset(data_dir)
    kwargs = meta["constructor_kwargs"]
    for key in ("item_n", "cate_n"):
        if int(dataset.manifest[key]) != int(kwargs[key]):
            raise ValueError(
                f"{data_dir}: {key} = {dataset.manifest[key]}, but {path} was "
                f"trained with {key} = {kwargs[key]}: not the official "
                "preprocessing it was trained on"
            )
    f32, f64 = np.asarray(fixture["steps_f32"]), np.asarray(fixture["steps_f64"])
    required = int(meta["steps_where_reference_f32_within_1e4th_of_f64"])
    with jax.enable_x64(True) if float64 else contextlib.nullcontext():
        experiment = Experiment(spec, dataset)
        if experiment.total_steps != len(f64):
            raise ValueError(
                f"{path}: {len(f64)} recorded steps, but {data_dir} gives "
                f"{experiment.total_steps} ({experiment.steps_per_epoch} batches "
                f"of {experiment.batch_size} per epoch x {spec.train.num_epochs} "
                "epochs)"
            )
        seed = int(meta.get("seed", 0))  # unused: fixed weights, file order, no dropout
        state = experiment.initial_state(seed)
        if float64:
            state = jax.tree.map(
                lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                state,
            )
        batches = experiment.train_batches(seed)
        last = experiment.total_steps if steps is None else min(steps, experiment.total_steps)
        ours = []
        for _ in range(last):
            state, out = experiment.train_step(state, next(batches))
            v = {k: np.float64(x) for k, x in jax.device_get(out).items()}
            ours.append([v["total"], v["ctr"] + v["aux"], v["aux"], v["l2"]])  # TERMS
        f32, f64 = f32[:last], f64[:last]
        if float64:
            tolerance = FLOAT64_RTOL * np.abs(f64)
        else:
            drift = REFERENCE_DRIFT_FACTOR * np.abs(f32 - f64)
            tolerance = np.maximum(RELATIVE_FLOOR * np.abs(f64), drift)
        tolerance = np.maximum(tolerance, np.finfo(np.float64).tiny)
        comparisons = [
            StepComparison(
                t, np.array(ours[t]), f32[t], f64[t], tolerance[t], float64 or t < required
            )
            for t in range(last)
        ]
        modes = BATCHNORM_MODES if steps is None else ()
        tests = [_test(fixture, spec, dataset, state, mode, float64) for mode in modes]
    return TrajectoryResult(
        str(path),
        spec.model.name,
        optimizer,
        "float64" if float64 else "float32",
        min(last, len(fixture["steps_f64"]) if float64 else required),
        comparisons,
        tests,
    )


def _test(fixture: dict, spec: ExperimentSpec, dataset, state, mode: str, float64: bool):
    """The final test click probabilities `[N]` (file order) in one BatchNorm mode against the
    official ones."""
    model = spec.model.replace(eval_batchnorm_uses_batch_stats=mode == "batch_stats")
    prob = predict(Experiment(spec.replace(model=model), dataset), state, "test")["prob"]
    ref64 = np.asarray(fixture[f"test_prob_f64/{mode}"], np.float64)
    if prob.shape != ref64.shape:
        raise ValueError(f"{ref64.shape[0]} test predictions, {spec.data.dir} has {len(prob)}")
    label, diff = np.asarray(fixture["test_label"]), float(np.max(np.abs(prob - ref64)))
    return TestComparison(
        mode,
        metrics.auc(label, prob),
        metrics.auc(label, np.asarray(fixture[f"test_prob_f32/{mode}"])),
        metrics.auc(label, ref64),
        float(fixture[f"test_auc_f32/{mode}"]),
        float(fixture[f"test_auc_f64/{mode}"]),
        diff,
        required=float64,
        ok=diff <= FLOAT64_RTOL * float(np.max(np.abs(ref64))),
    )


def format_result(result: TrajectoryResult) -> str:
    """The per-step table and the test AUCs of one run."""
    rule = (
        f"|ours - f64| <= {FLOAT64_RTOL:g} |f64|, every step"
        if result.dtype == "float64"
        else f"|ours - f64| <= max({RELATIVE_FLOOR:g} |f64|, {REFERENCE_DRIFT_FACTOR:g} "
        f"|f32 - f64|), steps 0-{result.required_steps - 1}"
    )
    lines = [
        f"== {result.path}: {result.model}, {result.optimizer} Adam, {result.dtype} (pass: {rule})",
        "   err/tol = |ours - f64| / tolerance per term (<= 1 passes); "
        "f32 drift = the official float32 run's |f32 - f64| / |f64| of the total",
        f"   {'step':>4}  {'status':<9}{'total (ours)':>14}{'total (f64)':>14}{'f32 drift':>11}"
        + "".join(f"{t:>10}" for t in TERMS),
    ]
    for s in result.steps:
        status = ("ok" if s.ok else "FAIL") if s.required else ("(ok)" if s.ok else "(differs)")
        drift = abs(s.f32[0] - s.f64[0]) / abs(s.f64[0])
        lines.append(
            f"   {s.step:>4}  {status:<9}{s.ours[0]:>14.8f}{s.f64[0]:>14.8f}{drift:>11.1e}"
            + "".join(f"{r:>10.3g}" for r in s.ratio)
        )
    lines += [
        f"   test AUC ({t.mode:13s}) ours {t.auc:.5f}   official f32 {t.auc_f32:.5f}  "
        f"f64 {t.auc_f64:.5f} (recorded {t.recorded_f32:.5f}, {t.recorded_f64:.5f})   "
        f"max |p - p_f64| {t.max_abs_diff_f64:.2e}"
        + (("  ok" if t.ok else "  FAIL") if t.required else "")
        for t in result.tests
    ]
    required = [s for s in result.steps if s.required]
    failed = [s.step for s in required if not s.ok]
    later = [s for s in result.steps if not s.required]
    lines.append(
        f"   -> {'PASS' if result.ok else 'FAIL'}: {len(required) - len(failed)}/{len(required)}"
        f" required steps within tolerance"
        + (f" (failed: {failed})" if failed else "")
        + (f"; later steps within it: {sum(s.ok for s in later)}/{len(later)}" if later else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 when every run passes, 1 otherwise, 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixtures", nargs="+", help="training-trajectory fixture .npz files")
    parser.add_argument(
        "--data",
        required=True,
        help="the official preprocessed directory, imported with preprocessing.import_official",
    )
    parser.add_argument(
        "--optimizer",
        choices=("both", *OPTIMIZERS),
        default="both",
        help="the driver's Adam path(s) to train with (default both)",
    )
    parser.add_argument(
        "--float64", action="store_true", help="train in float64; every step must match f64"
    )
    args = parser.parse_args(argv)
    optimizers = OPTIMIZERS if args.optimizer == "both" else [args.optimizer]
    jobs = ((f, args.data, o, args.float64) for f in args.fixtures for o in optimizers)
    return run_checks(
        jobs, check_fixture, format_result, (OSError, KeyError, ValueError, ExperimentError)
    )


if __name__ == "__main__":
    sys.exit(main())
