"""End-to-end driver tests on a tiny synthetic dataset: train, evaluate, checkpoint,
interrupt, resume, and the refusals on bad input."""

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import demo
from configs.base import set_path
from dare_jax import checkpointing, evaluate, experiment, steps, train
from dare_jax.config import ConfigError, flat, resolve
from dare_jax.data import open_dataset, pipeline, preprocess_log
from dare_jax.data.preprocess import prepare_dataset
from dare_jax.data.synthetic import write_taobao_log
from dare_jax.experiment import Experiment, ExperimentError
from dare_jax.models import TwoStageModel
from dare_jax.run_logging import read_jsonl
from crash_support import SimulatedCrash, crashing_train_iterator
from tiny_setup import tiny_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 300-user synthetic dataset, made the way configs/demo.py makes its data."""
    root = tmp_path_factory.mktemp("tiny_data")
    config = demo.get_config()
    config.data.synthetic_users = 300
    config.data.raw_path = str(root / "log.csv")
    config.data.dir = str(root / "pre")
    dataset = prepare_dataset(resolve(config).data)  # generates the log, then preprocesses it
    assert (root / "log.csv").is_file() and dataset.num_samples("train") > 1000
    # The same synthetic log and protocol straight from the data layer give the same data.
    direct = root / "direct"
    write_taobao_log(root / "direct.csv", 300, seed=0)
    preprocess_log("taobao", root / "direct.csv", direct, progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(
            open_dataset(direct).gather(split, np.arange(50), 20)["hist_iid"],
            dataset.gather(split, np.arange(50), 20)["hist_iid"],
        )
    return root / "pre"


def tiny_config(data_dir, workdir, arg="", **train_overrides):
    config = demo.get_config(arg)
    for dotted, value in tiny_overrides(data_dir, workdir).items():
        set_path(config, dotted, value)
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def run(config):
    """The driver on a config file's ConfigDict, as `python -m dare_jax.main` runs it."""
    return train.run(resolve(config))


def cli_flags(overrides):
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def _test_metrics(results):
    return [r["test"] for r in results["seeds"]], results["mean"]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted two-seed run of the tiny setup."""
    workdir = tmp_path_factory.mktemp("straight")
    results = run(tiny_config(tiny_data, workdir, num_seeds=2))
    return workdir, results


def test_interrupted_run_resumes_to_identical_results(tiny_data, tmp_path, monkeypatch, reference):
    straight_dir, reference = reference
    seeds = [r["seed"] for r in reference["seeds"]]
    assert seeds == [0, 1]
    # Evaluations at 4, 8 and at the end (10); the best by validation AUC is tested.
    for result in reference["seeds"]:
        assert result["steps"] == 10 and result["best_step"] in (4, 8, 10)
        assert 0.0 <= result["test"]["auc"] <= 1.0
        timings = result["timings"]
        phases = {"init", "input", "train_steps", "eval", "checkpoint", "export", "finish"}
        assert set(timings["seconds"]) == phases
        assert all(seconds > 0 for seconds in timings["seconds"].values())
        assert timings["steps_timed"] == 10
        assert timings["samples_timed"] == 10 * reference["config"]["train"]["batch_size"]
    run_phases = {"startup", "prepare_data", "setup", "seeds", "finish"}
    assert set(reference["timings"]["seconds"]) == run_phases
    # Provenance (tests/test_provenance.py checks its fields against git, hashlib and jax).
    manifest_sha = hashlib.sha256((tiny_data / "manifest.json").read_bytes()).hexdigest()
    for record in [reference["provenance"]] + [r["provenance"] for r in reference["seeds"]]:
        assert record["dataset"]["manifest_sha256"] == manifest_sha
        assert record["packages"]["jax"] == jax.__version__

    workdir = tmp_path / "interrupted"
    # Crash in seed 0 between checkpoints (after step 6; the newest is step 4) ...
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_iterator", crashing_train_iterator(6))
        with pytest.raises(SimulatedCrash):
            run(tiny_config(tiny_data, workdir, num_seeds=2))
    assert checkpointing.RunCheckpoints(workdir / "seed_0/checkpoints").newest()[1] == 4
    # ... then again in the resumed run (seed 0 finishes, seed 1 dies after 9 batches) ...
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_iterator", crashing_train_iterator(9))
        with pytest.raises(SimulatedCrash):
            run(tiny_config(tiny_data, workdir, num_seeds=2))
    assert (workdir / "seed_0/result.json").exists()
    assert not (workdir / "results.json").exists()
    resumed = run(tiny_config(tiny_data, workdir, num_seeds=2))
    assert _test_metrics(resumed) == _test_metrics(reference)
    for seed in (0, 1):
        straight = read_jsonl(straight_dir / f"seed_{seed}/metrics.jsonl")
        again = read_jsonl(workdir / f"seed_{seed}/metrics.jsonl")
        assert again == straight  # the log holds each step once, with identical values
    # Two seeds, a crash and two resumptions in this process: the step compiled once.
    trained = Experiment(resolve(tiny_config(tiny_data, workdir)), open_dataset(tiny_data))
    assert trained.train_step._cache_size() == 1
    assert trained.eval_step._cache_size() == 1
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["train"]["num_seeds"] == 2
    test_aucs = [r["test"]["auc"] for r in reference["seeds"]]
    assert results["mean"]["auc"] == pytest.approx(np.mean(test_aucs))
    assert results["std"]["auc"] == pytest.approx(np.std(test_aucs, ddof=1))
    # Every learned table is exported.
    tables = sorted(p.name for p in (workdir / "seed_0/embeddings").iterdir())
    assert any("attention" in t for t in tables) and any("representation" in t for t in tables)
    np.testing.assert_equal(
        np.load(workdir / "seed_0/embeddings" / tables[0]),
        np.load(straight_dir / "seed_0/embeddings" / tables[0]),
    )


# The command line, with a kill -9 of the process right after the save of step 8 has started:
# its arrays are off the device, its files are being written in the background.
KILLED_DURING_SAVE = """
import os, signal, sys
from absl import app
from dare_jax import checkpointing, main
real_save = checkpointing.RunCheckpoints.save

def save_then_die(self, which, step, state, progress):
    real_save(self, which, step, state, progress)
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)

checkpointing.RunCheckpoints.save = save_then_die
sys.argv = ["dare_jax.main", *sys.argv[1:]]
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.slow  # two fresh processes, each compiling the model
def test_kill_9_during_an_asynchronous_save(tiny_data, tmp_path, reference):
    """Killed while a checkpoint is being written: the next start drops the half-written
    one, resumes from the one before and ends with the uninterrupted run's numbers."""
    _, reference = reference
    workdir = tmp_path / "run"
    flags = ["--config", "configs/demo.py", *cli_flags(tiny_overrides(tiny_data, workdir))]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_DURING_SAVE, *flags], cwd=REPO, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = workdir / "seed_0/checkpoints"
    assert list(checkpoints.glob("*/8.orbax-checkpoint-tmp*")), "step 8 was not in flight"
    assert checkpointing.RunCheckpoints(checkpoints).newest()[1] == 4
    finished = subprocess.run(
        [sys.executable, "-m", "dare_jax.main", *flags], cwd=REPO, capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming from step 4" in finished.stdout
    assert not list(checkpoints.glob("*/*tmp*"))
    resumed = json.loads((workdir / "results.json").read_text())
    assert resumed["seeds"][0]["test"] == reference["seeds"][0]["test"]


def test_device_histories_threads_and_dispatch_change_no_number(tiny_data, tmp_path, reference):
    """The input-path options (histories built on the device, more prefetch threads, losses
    checked later) train on the same batches: the same losses, metrics and checkpoints."""
    straight_dir, reference = reference
    config = tiny_config(tiny_data, tmp_path / "device")
    config.data.histories = "device"
    config.data.prefetch_threads = 3
    config.train.dispatch_ahead = 3
    results = run(config)
    assert results["seeds"][0]["test"] == reference["seeds"][0]["test"]
    assert read_jsonl(tmp_path / "device/seed_0/metrics.jsonl") == read_jsonl(
        straight_dir / "seed_0/metrics.jsonl"
    )
    # None of them changes a number, so a run may resume with them changed.
    changed = flat(resolve(config))
    saved = flat(resolve(tiny_config(tiny_data, straight_dir)))
    assert train.config_differences(saved, changed) == []
    changed["data.min_item_rows"] = 10**6
    assert train.config_differences(saved, changed) == [
        "data.min_item_rows: run has 0, command has 1000000"
    ]


def test_minimum_table_rows(tiny_data):
    """`data.min_item_rows` / `min_category_rows` enlarge the tables, never shrink them."""
    dataset = open_dataset(tiny_data)
    item_n, cate_n = dataset.manifest["item_n"], dataset.manifest["cate_n"]
    config = tiny_config(tiny_data, "unused")
    config.data.min_item_rows = item_n + 1000
    config.data.min_category_rows = 2
    spec = resolve(config)
    rows = experiment.table_rows(spec, dataset.manifest)
    assert rows == (item_n + 1000, cate_n, item_n, cate_n)  # exports keep the real rows
    tables = Experiment(spec, dataset).checkpoint_template()["params"]["embed"]
    assert tables["attention"]["item"].shape == (item_n + 1000, 4)
    assert tables["attention"]["category"].shape == (cate_n, 4)


def test_analysis_restores_a_run_with_larger_tables(tiny_data, tmp_path):
    """A run trained with `data.min_item_rows` (tables beyond the dataset's ids) is restored
    for analysis with its own table sizes: the state the run exported."""
    from analysis import common

    item_n = open_dataset(tiny_data).manifest["item_n"]
    config = tiny_config(tiny_data, tmp_path / "run", max_steps=4)
    config.data.min_item_rows = item_n + 100
    run(config)
    loaded = common.load_run(tmp_path / "run")
    table = np.asarray(loaded.state["params"]["embed"]["attention"]["item"])
    assert table.shape == (item_n + 100, 4)
    exported = np.load(tmp_path / "run/seed_0/embeddings/embed.attention.item.npy")
    np.testing.assert_array_equal(table[:item_n], exported)


@pytest.mark.slow  # two fresh processes, each compiling the model
def test_kill_9_and_restart_with_the_same_command(tiny_data, tmp_path):
    """A real `kill -9` of the command-line run, then the same command again."""
    workdir = tmp_path / "killed"
    flags = cli_flags({**tiny_overrides(tiny_data, workdir), "train.max_steps": 40})
    command = [sys.executable, "-m", "dare_jax.main", "--config", "configs/demo.py", *flags]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = workdir / "seed_0/checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if any(p.name.isdigit() and int(p.name) >= 8 for p in checkpoints.glob("*/*")):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (workdir / "results.json").exists(), "the run finished before it was killed"
    finished = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming from step" in finished.stdout
    resumed = json.loads((workdir / "results.json").read_text())
    straight = run(tiny_config(tiny_data, tmp_path / "straight", max_steps=40))
    assert resumed["seeds"][0]["test"] == straight["seeds"][0]["test"]


def test_gradient_observation_exports_both_paths(tiny_data, tmp_path):
    workdir = tmp_path / "observe"
    config = tiny_config(tiny_data, workdir, arg="model=twin_observe_grad", max_steps=4)
    config.export.gradients_every_steps = 2
    run(config)
    files = sorted(p.name for p in (workdir / "seed_0/gradients").iterdir())
    assert files == ["step_00000002.npz", "step_00000004.npz"]
    cate_n = open_dataset(tiny_data).manifest["cate_n"]
    with np.load(workdir / "seed_0/gradients/step_00000004.npz") as grads:
        assert sorted(grads.files) == [
            "attention.category",
            "attention.time",
            "representation.category",
            "representation.time",
        ]
        attention, representation = grads["attention.category"], grads["representation.category"]
    assert attention.shape == representation.shape == (cate_n, 4)
    assert np.abs(attention).sum() > 0 and np.abs(representation).sum() > 0
    assert not np.allclose(attention, representation)
    # Both copies of the shared table receive the summed gradient, so they stay equal.
    tables = workdir / "seed_0/embeddings"
    np.testing.assert_array_equal(
        np.load(tables / "embed.attention.category.npy"),
        np.load(tables / "embed.representation.category.npy"),
    )


@pytest.mark.slow
def test_decoupling_config_runs_end_to_end(tmp_path):
    """configs/decoupling.py from nothing: the synthetic log with its structure, the protocol,
    training with gradient observation, the test of the best checkpoint (tiny sizes)."""
    from configs import decoupling

    config = decoupling.get_config("model=twin_observe_grad")
    overrides = tiny_overrides(tmp_path / "pre", tmp_path / "run", **{"train.max_steps": 4})
    overrides["data.synthetic_users"] = 120
    overrides["data.raw_path"] = str(tmp_path / "log.csv")
    for dotted, value in overrides.items():
        set_path(config, dotted, value)
    results = run(config)
    assert 0.0 <= results["mean"]["auc"] <= 1.0 and len(results["seeds"]) == 1
    # The log came from the config's structure (the default world has ~9,400 categories).
    manifest = open_dataset(tmp_path / "pre").manifest
    assert manifest["cate_n"] - 1 <= decoupling.STRUCTURE["n_categories"]
    assert manifest["item_n"] - 1 <= decoupling.STRUCTURE["n_items"]
    assert len(list((tmp_path / "run/seed_0/gradients").glob("step_*.npz"))) == 4
    # A structure field of an impossible value is named before anything is generated.
    config.data.synthetic_structure.p_taste = 2.0
    config.data.dir, config.data.raw_path = str(tmp_path / "pre2"), str(tmp_path / "log2.csv")
    with pytest.raises(ConfigError, match="synthetic_structure: .*p_taste"):
        resolve(config)
    assert not (tmp_path / "log2.csv").exists()


def test_train_step_compiles_once_and_is_pure(tiny_data):
    dataset = open_dataset(tiny_data)
    trainer = Experiment(resolve(tiny_config(tiny_data, "unused")), dataset)
    data = pipeline.train_dataset(dataset, batch_size=64, seed=0, num_epochs=1, max_length=20)
    # Fed as the training loop feeds them: global arrays split on the mesh's data axis.
    batches = [trainer.device_batch(data[i]) for i in range(4)]
    state = trainer.initial_state(0)
    losses = []
    for batch in batches:
        state, out = trainer.train_step(state, batch)
        losses.append(float(out["total"]))
    assert trainer.train_step._cache_size() == 1  # no recompilation between steps
    assert int(state["step"]) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # Same state and batch -> same result (pure; randomness comes from the state).
    one, _ = trainer.train_step(trainer.initial_state(0), batches[0])
    two, _ = trainer.train_step(trainer.initial_state(0), batches[0])
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other, _ = trainer.train_step(trainer.initial_state(1), batches[0])
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(one["params"])[0]),
        np.asarray(jax.tree.leaves(other["params"])[0]),
    )
    assert trainer.train_step._cache_size() == 1


def test_eval_batchnorm_modes(tiny_data):
    """Default: running statistics; official option: the batch's own statistics."""
    spec = resolve(tiny_config(tiny_data, "unused"))
    dataset = open_dataset(tiny_data)
    trainer = Experiment(spec, dataset)
    state = trainer.initial_state(0)
    data = pipeline.train_dataset(dataset, batch_size=64, seed=0, num_epochs=1, max_length=20)
    for index in range(3):
        state, _ = trainer.train_step(state, data[index])
    batch = dataset.gather("val", np.arange(64), 20)
    shifted = {**state, "batch_stats": jax.tree.map(lambda x: x + 3.0, state["batch_stats"])}
    running = np.asarray(trainer.eval_step(state, batch))
    assert running.shape == (64,)
    assert not np.allclose(running, np.asarray(trainer.eval_step(shifted, batch)))
    official_spec = spec.model.replace(eval_batchnorm_uses_batch_stats=True)
    model = TwoStageModel(official_spec, dataset.manifest["item_n"], dataset.manifest["cate_n"], 20)
    official_eval = steps.make_eval_step(model)
    official = np.asarray(official_eval(state, batch))
    np.testing.assert_allclose(official, np.asarray(official_eval(shifted, batch)), rtol=1e-6)
    assert not np.allclose(official, running)


def test_eval_batch_statistics_leave_out_the_filler_rows(tiny_data):
    """With the official BatchNorm mode, a padded last batch is normalised with the
    statistics of its valid rows only: the same probabilities as a batch of just them."""
    config = tiny_config(tiny_data, "unused")
    config.model.eval_batchnorm_uses_batch_stats = True
    config.train.eval_batch_size = 256  # the last batch is padded with filler rows
    spec = resolve(config)
    dataset = open_dataset(tiny_data)
    trainer = Experiment(spec, dataset)
    state = trainer.initial_state(0)
    # Weights of a trained model's size: unit BatchNorm scales, kernels ~N(0, 0.1) (the
    # official init, ~N(0, 0.01), makes every output nearly the same).
    def enlarge(path, x):
        name = jax.tree_util.keystr(path)
        if "batch_norm" in name and "scale" in name:
            return np.ones_like(x)
        return x * 10 if "kernel" in name else x

    state["params"] = jax.tree_util.tree_map_with_path(enlarge, state["params"])
    n_val = dataset.num_samples("val")
    last = n_val - (n_val % 256 or 256)
    assert 0 < n_val - last < 256
    got = evaluate.predict(trainer, state, "val")
    assert got["prob"].shape == (n_val,)
    # Oracle: the model on exactly the last batch's real samples (no filler, no mask).
    item_n, cate_n = dataset.manifest["item_n"], dataset.manifest["cate_n"]
    model = TwoStageModel(spec.model, item_n, cate_n, 20)
    real = dataset.gather("val", np.arange(last, n_val), 20)
    want = np.asarray(steps.make_eval_step(model)(state, real))
    np.testing.assert_allclose(got["prob"][last:], want, rtol=2e-5, atol=1e-7)
    # Without the mask the filler rows move the statistics (what the driver did before).
    padded, _ = list(pipeline.eval_batches(dataset, "val", batch_size=256, max_length=20))[-1]
    unmasked = np.asarray(trainer.eval_step(state, padded))[: n_val - last]
    assert np.max(np.abs(unmasked - want)) > 1e-3


def test_training_from_official_weights_in_file_order(tiny_data, tmp_path):
    """model.init_from: every seed starts from the given official state_dict;
    data.shuffle=False: the batches are the training file in order."""
    from dare_jax.interop import torch_weights

    config = tiny_config(tiny_data, tmp_path / "run", arg="model=twin")
    dataset = open_dataset(tiny_data)
    donor = Experiment(resolve(config), dataset).initial_state(7)
    official = torch_weights.export_state_dict(
        resolve(config).model.variant,
        {"params": donor["params"], "batch_stats": donor["batch_stats"]},
    )
    weights = tmp_path / "official.npz"
    np.savez(weights, **{f"state/{k}": v for k, v in official.items()})
    config.model.init_from = str(weights)
    config.data.shuffle = False
    trainer = Experiment(resolve(config), dataset)
    for seed in (0, 1):
        state = trainer.initial_state(seed)
        for want, got in zip(jax.tree.leaves(donor["params"]), jax.tree.leaves(state["params"])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        batch = next(trainer.train_batches(seed))
        np.testing.assert_array_equal(batch["uid"], dataset.gather("train", np.arange(64))["uid"])
    # A missing file, or weights of another shape, are refused before anything is written.
    config.model.init_from = str(tmp_path / "missing.npz")
    with pytest.raises(ExperimentError, match="model.init_from = .*missing.npz"):
        run(config)
    config.model.init_from = str(weights)
    config.model.time_embedding_dim = 8
    with pytest.raises(ExperimentError, match=r"init_from = .*shape \(2000, 4\) does not fit"):
        run(config)
    assert not (tmp_path / "run").exists()


def test_nonfinite_loss_names_the_step(tiny_data, tmp_path, monkeypatch):
    real = experiment.compile_steps

    def with_nan_at_step_3(*args):
        compiled = real(*args)

        def poisoned(state, batch):
            new_state, out = compiled.train_step(state, batch)
            if int(new_state["step"]) == 3:
                out = {**out, "total": out["total"] * float("nan")}
            return new_state, out

        return dataclasses.replace(compiled, train_step=poisoned)

    monkeypatch.setattr(experiment, "compile_steps", with_nan_at_step_3)
    with pytest.raises(FloatingPointError, match="nan at step 3"):
        run(tiny_config(tiny_data, tmp_path / "nan"))
    assert not list((tmp_path / "nan/seed_0/checkpoints").glob("*/[0-9]*"))
    with pytest.raises(FloatingPointError, match="inf at step 12"):
        steps.check_finite(float("inf"), 12)
    steps.check_finite(0.5, 1)


@pytest.mark.slow
def test_divergent_learning_rate_stops_with_a_message(tiny_data, tmp_path):
    config = tiny_config(tiny_data, tmp_path / "nan")
    config.optim.lr = 1e30
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        run(config)


def test_refuses_to_resume_with_another_config(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    run(tiny_config(tiny_data, workdir, max_steps=4))
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    changed = tiny_config(tiny_data, workdir, max_steps=4)
    changed.optim.lr = 0.005
    changed.model.top_k = 6
    with pytest.raises(train.RunError) as error:
        run(changed)
    assert "optim.lr" in str(error.value) and "model.top_k" in str(error.value)
    assert "train.batch_size" not in str(error.value)
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    assert after == before  # nothing in the run directory was touched


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.name", "transformer", "unknown model name 'transformer'"),
        ("model.top_k", 50, "top_k"),
        ("model.attention_item_embedding_dim", 3, "attention_item_embedding_dim"),
        ("train.batch_size", 0, "train.batch_size"),
        ("train.batch_size", 10**6, "batch_size=1000000"),
        ("data.histories", "gpu", "data.histories = 'gpu'"),
        ("train.dispatch_ahead", 0, "train.dispatch_ahead = 0: must be >= 1"),
    ],
)
def test_bad_config_is_named_and_writes_nothing(tiny_data, tmp_path, field, value, message):
    config = tiny_config(tiny_data, tmp_path / "run", arg="model=twin")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):  # ConfigError or ExperimentError
        run(config)
    assert not (tmp_path / "run").exists()


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "dare_jax.main", *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_missing_data_explains_the_download(tmp_path):
    result = _cli(
        "--config",
        str(REPO / "configs/taobao.py"),
        f"--config.data.raw_path={tmp_path}/UserBehavior.csv",
        f"--config.data.dir={tmp_path}/pre",
        f"--config.workdir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "tianchi.aliyun.com/dataset/649" in result.stderr
    assert "python -m preprocessing.taobao --input" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "pre").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/demo.py:model=transformer"], "unknown variant"),
        (["--config", "configs/demo.py", "--config.optim.lrr=1"], "'lrr'"),
        (["--config", "configs/missing.py"], "cannot load the --config file"),
    ],
)
def test_cli_bad_flags_are_one_message(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and message in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cli_broken_checkpoint_is_one_line(tiny_data, tmp_path, damage):
    """A checkpoint whose files were truncated (the first 64 bytes kept) or overwritten: exit
    code 2 and one line naming the checkpoint, the broken files where they can be told, and
    what to do; no traceback, not even later from Orbax's background reads."""
    workdir = tmp_path / "run"
    config = tiny_config(tiny_data, workdir)
    # A half-trained run: stop it after the first checkpoint, then break that checkpoint.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "train_iterator", crashing_train_iterator(5))
        with pytest.raises(SimulatedCrash):
            run(config)
    which, step = checkpointing.RunCheckpoints(workdir / "seed_0/checkpoints").newest()
    checkpoint = workdir / "seed_0/checkpoints" / which / str(step)
    files = sorted(p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.stat().st_size > 64)
    for path in files[:3] if damage == "truncated" else files:
        path.write_bytes(path.read_bytes()[:64] if damage == "truncated" else b"not a checkpoint")
    result = _cli("--config", "configs/demo.py", *cli_flags(tiny_overrides(tiny_data, workdir)))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("hint:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {checkpoint} ")
    assert f"delete {workdir / 'seed_0/checkpoints'} to train this seed again" in errors[0]
    if damage == "truncated":
        assert "is damaged: state/" in errors[0]
