"""Training parity over many steps: `dare_jax.interop.check_trajectory` on the three shared
official training trajectories (DARE, TWIN, DIN: 38 steps of Adam from the official initial
weights over the official preprocessing of the real Taobao sample, file order).

The default run checks DARE with the driver's default (row-sparse) Adam in float32; the other
runs (~1 minute each on 2 cores) are in the slow pass. TWIN in float32 is held to its first two
steps only: see `test_twin_float32_follows_the_official_run_until_it_decorrelates`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dare_jax.interop import check_trajectory
from dare_jax.interop.official_data import import_official
from tests.conftest import shared_path


def _fixture(name: str):
    return shared_path("fixtures", "reference_trajectory", f"{name}.npz")


@pytest.fixture(scope="module")
def official_data(tmp_path_factory):
    """Our import of the official preprocessing the fixtures were trained on."""
    source = shared_path("fixtures", "official_preprocessed", "taobao")
    return import_official(source, tmp_path_factory.mktemp("official") / "taobao", progress=False)


def _required_steps(name: str) -> int:
    with np.load(_fixture(name)) as data:
        meta = json.loads(str(data["meta_json"]))
    return int(meta["steps_where_reference_f32_within_1e4th_of_f64"])


def _check(name, data, optimizer, float64=False):
    result = check_trajectory.check_fixture(_fixture(name), data, optimizer, float64)
    print(check_trajectory.format_result(result))
    assert len(result.steps) == 38 and [t.mode for t in result.tests] == [
        "batch_stats",
        "running_stats",
    ]
    return result


@pytest.mark.parametrize(
    "name, optimizer",
    [
        ("dare", "row_sparse"),
        pytest.param("dare", "dense", marks=pytest.mark.slow),
        pytest.param("din", "row_sparse", marks=pytest.mark.slow),
        pytest.param("din", "dense", marks=pytest.mark.slow),
    ],
)
def test_float32_training_follows_the_official_run(official_data, name, optimizer):
    result = _check(name, official_data, optimizer)
    assert result.required_steps == _required_steps(name)
    assert result.ok, check_trajectory.format_result(result)
    # Test AUCs are reported, not judged (the runs decorrelate after the required steps).
    assert all(0 < t.auc < 1 and not t.required for t in result.tests)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["row_sparse", "dense"])
def test_twin_float32_follows_the_official_run_until_it_decorrelates(official_data, optimizer):
    """TWIN's fixture asks for 4 steps, but the official float32 run itself has left the
    float64 one by step 2 (its step-2 L2 is 3.9e-5 off: Adam normalises float noise in
    gradients of ~1e-10, e.g. the target time row, into steps of ~1e-2 lr, and top-k
    selections flip at step 1). Of ten equally valid float32 runs of ours (the rows of every
    batch permuted: the same maths, other rounding) one meets the rule at steps 2 and 3; the
    official run is one such draw (ours: err/tol 1.19 and 7.85 at steps 2 and 3). The float64
    run matches every step to 1e-14 (below). This test holds the steps before that point."""
    result = _check("twin", official_data, optimizer)
    assert result.required_steps == _required_steps("twin") == 4
    assert all(s.ok for s in result.steps[:2])


@pytest.mark.parametrize(
    "name, optimizer",
    [
        ("dare", "row_sparse"),  # in the default pass: a top-k model, every step to 1e-9
        *[
            pytest.param(name, optimizer, marks=pytest.mark.slow)
            for name in ("dare", "twin", "din")
            for optimizer in ("row_sparse", "dense")
            if (name, optimizer) != ("dare", "row_sparse")
        ],
    ],
)
def test_float64_training_is_the_official_float64_run(official_data, name, optimizer):
    """Without float32 rounding every one of the 38 steps, and the final test predictions in
    both BatchNorm modes, equal the official float64 run's to 1e-9 relative."""
    result = _check(name, official_data, optimizer, float64=True)
    assert result.required_steps == 38
    assert result.ok, check_trajectory.format_result(result)
    assert all(t.required and t.ok for t in result.tests)
    for t in result.tests:
        assert t.auc == pytest.approx(t.auc_f64, abs=1e-12)


def _optax_float32_bias_correction(decay, count, dtype):
    """optax.adam's: `1 - decay**count` in float32 (decay rounded first)."""
    import jax.numpy as jnp

    decay = jnp.asarray(decay, jnp.float32)
    return (1 - decay ** jnp.asarray(count).astype(jnp.float32)).astype(dtype)


def _epsilon_inside_the_root(m, v, bc1, bc2, eps):
    import jax.numpy as jnp

    return (m / bc1.astype(m.dtype)) / jnp.sqrt(v / bc2.astype(v.dtype) + eps)


@pytest.mark.parametrize(
    "function, wrong",
    [
        ("bias_correction", _optax_float32_bias_correction),
        ("adam_direction", _epsilon_inside_the_root),
    ],
)
def test_the_check_fails_a_wrong_optimizer(official_data, monkeypatch, function, wrong):
    """Adam with optax's float32 bias correction, or with eps inside the square root: near
    misses the official run's first steps expose in float64."""
    from dare_jax import experiment, optim

    experiment.compile_steps.cache_clear()  # steps traced with the real optimizer
    try:
        with monkeypatch.context() as patch:
            patch.setattr(optim, function, wrong)
            result = check_trajectory.check_fixture(
                _fixture("dare"), official_data, "row_sparse", float64=True, steps=6
            )
    finally:
        experiment.compile_steps.cache_clear()  # nor keep steps traced with the wrong one
    print(check_trajectory.format_result(result))
    assert not result.ok and result.steps[0].ok  # step 0 is before any update
    assert not all(s.ok for s in result.steps[1:])


def test_cli_refuses_data_of_another_preprocessing(tmp_path, capsys):
    other = tmp_path / "other"
    np.savez(tmp_path / "not_a_trajectory.npz", x=np.zeros(3))
    assert check_trajectory.main([str(_fixture("dare")), "--data", str(other)]) == 2
    assert "cannot check" in capsys.readouterr().err
    bad = tmp_path / "not_a_trajectory.npz"
    assert check_trajectory.main([str(bad), "--data", str(other)]) == 2
    assert "not a training-trajectory fixture" in capsys.readouterr().err


def test_a_partial_batch_trains_as_its_real_rows(tmp_path):
    """The official loader ends each Tmall-sample epoch at batch 234 with a 216-sample batch
    (5,130 = 21 x 234 + 216). In file order the driver trains it filled up to 234 with its
    own samples and masked: the same losses and update as a step on the 216 real rows."""
    import jax

    from dare_jax import steps
    from dare_jax.config import DataSpec, ExperimentSpec, OptimSpec, TrainSpec
    from dare_jax.data import open_dataset
    from dare_jax.experiment import Experiment
    from dare_jax.models import ModelSpec

    source = shared_path("fixtures", "official_preprocessed", "tmall")
    data = import_official(source, tmp_path / "tmall", progress=False)
    spec = ExperimentSpec(
        data=DataSpec(kind="tmall", dir=str(data), shuffle=False),
        model=ModelSpec(name="twin"),
        optim=OptimSpec(table_updates="dense"),
        train=TrainSpec(batch_size=234, num_epochs=1, num_seeds=1),
    )
    experiment = Experiment(spec, open_dataset(data))
    assert (experiment.steps_per_epoch, experiment.masked_batches) == (22, True)
    batches = list(experiment.train_batches(0))
    partial = batches[-1]
    mask = np.asarray(partial["example_mask"])
    assert mask.sum() == 216 and not mask[216:].any()
    real = {k: np.asarray(v)[:216] for k, v in partial.items() if k != "example_mask"}
    # In float64: Adam's first step normalises float32 noise in tiny gradients into lr-sized
    # steps, so float32 rounding of the two sums would show; float64's does not.
    with jax.enable_x64(True):
        state = jax.tree.map(_widen, experiment.initial_state(0))
        step = steps.make_train_step(experiment.model, experiment.optimizer, 1e-6)  # any shape
        masked_state, masked_out = step(jax.tree.map(np.array, state), partial)
        real_state, real_out = step(jax.tree.map(np.array, state), real)
    for key in ("total", "ctr", "aux", "l2"):
        np.testing.assert_allclose(masked_out[key], real_out[key], rtol=1e-12)
    for got, want in zip(jax.tree.leaves(masked_state), jax.tree.leaves(real_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-15)


def _widen(x):
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
