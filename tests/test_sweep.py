"""dare_jax.sweep: a grid of variants through the real driver; a sweep killed midway resumes
and its runs give the table of an uninterrupted one; results carry their provenance; bad
grids and overrides are refused before anything is trained."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from analysis_support import tiny_data
from crash_support import SimulatedCrash, crashing_train_iterator
from tiny_setup import tiny_overrides

from analysis import table
from dare_jax import sweep
from dare_jax.checkpointing import RunCheckpoints
from dare_jax.data import pipeline

REPO = Path(__file__).resolve().parent.parent
STEPS = 6  # evaluations (and checkpoints) at steps 4 and 6


def grid_overrides(data_dir):
    overrides = tiny_overrides(data_dir, "unused", **{"train.max_steps": STEPS})
    del overrides["workdir"]  # the sweep gives each run its own
    return overrides


def configs(data_dir, out):
    return sweep.sweep_specs(
        "configs/demo.py:seeds=1", ["dare", "twin"], [4], grid_overrides(data_dir), out
    )


def tabulate(specs, table_dir):
    """What the sweep's printed `python -m analysis.table` command writes."""
    return table.write_table({Path(s.workdir).name: Path(s.workdir) for s in specs}, table_dir)


def table_without_paths(table_dir):
    """The table's numbers and labels (run directories and file paths differ between sweeps)."""
    saved = json.loads((table_dir / "table.json").read_text())
    markdown = (table_dir / "table.md").read_text().split("\n## Runs")[0]
    csv_lines = [line.rsplit(",", 4)[0] for line in (table_dir / "table.csv").read_text().split()]
    return saved["cells"], saved["rows"], saved["columns"], markdown, csv_lines


@pytest.mark.slow  # four tiny runs of two models (about 2 minutes on the shared 2 cores)
def test_killed_sweep_resumes_to_the_same_table(tmp_path_factory, tmp_path, monkeypatch, capsys):
    data_dir = tiny_data(tmp_path_factory.getbasetemp() / "analysis_runs")
    monkeypatch.chdir(REPO)  # config files are given relative to the repository
    straight = configs(data_dir, tmp_path / "straight")
    assert [Path(c.workdir).name for c in straight] == ["dare_d4", "twin_d4"]
    assert all(c.model.item_embedding_dim == 4 and c.train.num_seeds == 1 for c in straight)
    sweep.run_sweep(straight)
    reference = tabulate(straight, tmp_path / "straight/table")

    out = tmp_path / "killed"
    # Killed in the second run (twin) after its 5th batch: dare finished, twin's latest is 4.
    dying, real, made = crashing_train_iterator(5), pipeline.train_iterator, []

    def second_run_dies(dataset, state=None, **options):
        made.append(dataset)
        return (dying if len(made) == 2 else real)(dataset, state, **options)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_iterator", second_run_dies)
        with pytest.raises(SimulatedCrash):
            sweep.run_sweep(configs(data_dir, out))
    assert (out / "dare_d4/results.json").is_file() and not (out / "twin_d4/results.json").exists()
    assert RunCheckpoints(out / "twin_d4/seed_0/checkpoints").newest()[1] == 4
    finished_at = (out / "dare_d4/results.json").stat().st_mtime_ns
    capsys.readouterr()
    sweep.run_sweep(configs(data_dir, out))
    resumed = tabulate(configs(data_dir, out), out / "table")
    printed = capsys.readouterr().out
    assert "dare_d4" in printed and "finished, skipped" in printed
    assert "continuing" in printed and "resuming from step 4" in printed
    assert (out / "dare_d4/results.json").stat().st_mtime_ns == finished_at

    assert table_without_paths(out / "table") == table_without_paths(tmp_path / "straight/table")
    assert resumed["cells"] == reference["cells"]
    assert resumed["rows"] == ["DARE", "TWIN"] and resumed["columns"] == ["demo d=4"]

    # Every results.json names its code, libraries, devices and data.
    results = json.loads((out / "twin_d4/results.json").read_text())
    record = results["provenance"]
    assert set(record) == {
        "code", "python", "packages", "devices", "machine", "memory", "dataset"
    }
    assert results["seeds"][0]["provenance"]["code"] == record["code"]
    manifest = hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest()
    assert record["dataset"]["manifest_sha256"] == manifest
    if shutil.which("git"):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        )
        if head.returncode == 0:
            assert record["code"]["commit"] == head.stdout.strip()
    assert f"| twin_d4 | TWIN | demo d=4 | 0 | `{out / 'twin_d4'}` |" in (
        out / "table/table.md"
    ).read_text()


def test_grid_configs_and_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = sweep.sweep_specs(
        "configs/taobao.py:seeds=2", ["dare", "twin_hard"], [16, 64], {"optim.lr": 0.005}
    )
    assert [c.workdir for c in grid] == [
        "runs/taobao/dare_d16",
        "runs/taobao/dare_d64",
        "runs/taobao/twin_hard_d16",
        "runs/taobao/twin_hard_d64",
    ]
    assert [c.model.item_embedding_dim for c in grid] == [16, 64, 16, 64]
    assert all(c.optim.lr == 0.005 and c.train.num_seeds == 2 for c in grid)
    assert grid[2].model.soft_search is False  # the variant's own overrides apply
    assert sweep.table_command(grid, None) == (
        "python -m analysis.table --run runs/taobao/dare_d16 --run runs/taobao/dare_d64 "
        "--run runs/taobao/twin_hard_d16 --run runs/taobao/twin_hard_d64 "
        "--out runs/taobao/table"
    )
    assert sweep.table_command(grid[:1], tmp_path).endswith(f"--out {tmp_path / 'table'}")
    refusals = [
        (["dare", "nope"], None, {}, "unknown variant"),
        (["dare", "dare"], None, {}, "--models repeats"),
        (["dare"], [16, 16], {}, "--dims repeats"),
        (["dare"], None, {"workdir": "x"}, "use --out DIR"),
    ]
    with pytest.raises(sweep.SweepError, match="--dims 'x'"):
        sweep.parse_dims(["16", "x"])
    for models, dims, overrides, message in refusals:
        with pytest.raises(sweep.SweepError, match=message):
            sweep.sweep_specs("configs/taobao.py", models, dims, overrides)
    with pytest.raises(sweep.SweepError, match="already sets model="):
        sweep.sweep_specs("configs/taobao.py:model=twin", ["dare"], None, {})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "dare,nope"], "unknown variant"),
        (["--models", "dare", "--config.optim.lrr=1"], "'lrr'"),
    ],
)
def test_cli_refuses_bad_grids_before_training(args, message, tmp_path):
    command = [sys.executable, "-m", "dare_jax.sweep", "--config", "configs/taobao.py", *args,
               "--out", str(tmp_path / "out")]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
