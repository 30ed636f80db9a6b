"""Parity with the official PyTorch implementation on the reference fixtures (../shared)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, shared_path

from dare_jax.interop import check_parity

FIXTURES = ("dare", "twin", "din", "twin_4e", "twin_proj")


@pytest.mark.parametrize("variant", FIXTURES)
def test_fixture_matches_official_outputs_and_gradients(variant):
    path = shared_path("fixtures", "reference_parity", f"{variant}.npz")
    result = check_parity.check_fixture(path)
    failed = [e for e in result.entries if not e.ok]
    assert not failed, check_parity.format_result(result, check_parity.DEFAULT_RTOL)
    names = {e.name for e in result.entries}
    # Every output and every gradient of the fixture was compared.
    with np.load(path) as data:
        expected = {k[len("output/") :] for k in data.files if k.startswith("output/")}
        expected |= {k for k in data.files if k.startswith("grad/")}
    assert names == expected - {"topk_margin"}


def test_check_detects_a_wrong_weight(tmp_path):
    """A check that cannot fail is a defect: perturb one weight, expect failures."""
    source = shared_path("fixtures", "reference_parity", "twin.npz")
    with np.load(source) as data:
        entries = {k: data[k] for k in data.files}
    entries["state/main_mlp.5.bias"] = entries["state/main_mlp.5.bias"] + np.float32([0.05, 0])
    broken = tmp_path / "twin_broken.npz"
    np.savez(broken, **entries)
    result = check_parity.check_fixture(broken)
    failed = {e.name for e in result.entries if not e.ok}
    assert {"prob_train_mode", "prob_eval_mode", "loss_total"} <= failed


def test_command_line_exit_codes(tmp_path):
    fixture = shared_path("fixtures", "reference_parity", "dare.npz")
    ok = subprocess.run(
        [sys.executable, "-m", "dare_jax.interop.check_parity", str(fixture)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "max_rel" in ok.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "dare_jax.interop.check_parity", str(tmp_path / "none.npz")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "none.npz" in missing.stderr
