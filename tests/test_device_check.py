"""The GPU check's preparation and its CPU rehearsal (benchmarks/device_*.sh)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_path

REPO = Path(__file__).resolve().parent.parent


def _carried() -> list[str]:
    lines = (REPO / "benchmarks/device_packages.txt").read_text().splitlines()
    return [line.split()[1] for line in lines if line.startswith("carry ")]


def test_carried_packages_are_pinned_run_time_requirements():
    runtime = (REPO / "requirements.txt").read_text().split("# test-only")[0]
    pinned = {line.split("==")[0].lower() for line in runtime.splitlines() if "==" in line}
    assert {"grain", "ml_collections", "tensorboardx"} <= {c.lower() for c in _carried()}
    assert {c.lower() for c in _carried()} <= pinned


def test_device_check_refuses_without_the_prepared_folder(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "benchmarks", checkout / "benchmarks")
    result = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--tiny"],
        cwd=checkout,
        env={**os.environ, "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert ".device/wheels is missing: run benchmarks/device_prepare.sh" in result.stdout
    unknown = subprocess.run(
        ["bash", str(REPO / "benchmarks/device_check.sh"), "--bogus"],
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "unknown argument" in unknown.stderr


@pytest.mark.slow  # a fresh virtual environment, parity on every fixture, 12 tiny runs
def test_prepare_then_rehearse(tmp_path):
    """`device_prepare.sh && device_check.sh --rehearse`: the device run on the CPU, from a
    copy of the checkout without ../shared, with only the device's packages plus the
    carried cp311 wheels, offline."""
    shared_path("fixtures", "reference_parity")
    env = {**os.environ, "PYTHON": sys.executable, "REHEARSAL_PYTHON": sys.executable}
    prepare = subprocess.run(
        ["bash", "benchmarks/device_prepare.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prepare.returncode == 0, prepare.stdout[-3000:] + prepare.stderr[-3000:]
    assert "all carried or on the device" in prepare.stdout
    wheels = sorted(p.name for p in (REPO / ".device/wheels").glob("*.whl"))
    assert len(wheels) == len(_carried()) and all("cp311" not in w for w in wheels)
    assert len(list((REPO / ".device/fixtures").glob("*.npz"))) == 5

    out = tmp_path / "out"
    rehearsal = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--rehearse"],
        cwd=REPO,
        env={**env, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=2400,
    )
    log = (out / "device_check.log").read_text() if (out / "device_check.log").exists() else ""
    assert rehearsal.returncode == 0, rehearsal.stdout[-4000:] + log[-4000:]
    report = json.loads((out / "device_check.json").read_text())
    stages = report["stages"]
    assert report["mode"] == "tiny"
    environment = stages["environment"]["result"]
    assert environment["backend"] == "cpu" and environment["misplaced"] == []
    assert environment["versions"]["grain"] == "0.2.18"
    assert stages["parity_full_precision"]["status"] == "ok"
    assert re.search(r"PASS: \d+/\d+ entries", log) and "FAIL" not in log
    for model in ("dare", "twin", "din"):
        figures = report["summary"]["models"][model]
        for histories in ("host", "device"):
            assert figures[f"loop_{histories}_loop_samples_per_s"] > 0, (model, figures)
        for variant in ("row_sparse", "dense", "forward"):
            assert figures[f"step_{variant}_samples_per_s"] > 0, (model, figures)
    pipeline = stages["input_pipeline"]["result"]
    assert set(pipeline["pipeline_batches_per_s"]) == {
        f"{h}_threads{t}" for h in ("host", "device") for t in (1, 2)
    }
