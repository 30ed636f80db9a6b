"""Every variant and every search against the outputs, losses and gradients recorded from the
implementation before the two model classes became one (tests/recorded_outputs.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import recorded_outputs as rec

RECORDED = rec.load(Path(__file__).parent / "fixtures" / "model_outputs.npz")

CLUSTERING_DEPENDENT: set[str] = set()
# Cases of the default run; the others run in the slow pass.
DEFAULT_CASES = {
    "dare",
    "twin",
    "din",
    "twin_hard",
    "twin_proj",
    "eta",
    "sdim",
    "twin_v2_one_cluster",
    "dare_chunked",
    "twin_bf16",
}


def _cases(names):
    return [pytest.param(n, marks=() if n in DEFAULT_CASES else pytest.mark.slow) for n in names]


def assert_matches(name: str, got: dict, want: dict, rtol: float = 2e-5, atol: float = 2e-6):
    """Compare `rec.run_case` results. A sketch (a random projection of a gradient leaf) is
    compared at `rtol` relative to its norm: elementwise relative errors e_i of the leaf move
    a component by sum_i e_i g_i R_i, of the order of rtol * |g|, as is the sketch's norm."""
    assert set(got) == set(want)
    for kind in want:
        assert set(got[kind]) == set(want[kind]), (name, kind)
        for key, expected in want[kind].items():
            have = np.asarray(got[kind][key], np.float64)
            message = f"{name} {kind} {key}"
            if key == "topk_indices":
                np.testing.assert_array_equal(have, expected, err_msg=message)
            elif key.endswith(rec.SKETCH_SUFFIX):
                bound = rtol * np.linalg.norm(expected) + atol
                np.testing.assert_allclose(have, expected, rtol=0, atol=bound, err_msg=message)
            else:
                np.testing.assert_allclose(have, expected, rtol=rtol, atol=atol, err_msg=message)


def run_sketched(name: str, **overrides) -> dict:
    """`rec.run_case` of case `name` with model config overrides."""
    cfg = rec.case_config(name)
    for key, value in overrides.items():
        cfg[key] = value
    return rec.run_case(name, cfg)


def compare(name: str, got: dict, rtol: float = 2e-5, atol: float = 2e-6):
    assert_matches(name, got, RECORDED[name], rtol, atol)


@pytest.mark.parametrize("name", _cases(n for n in rec.CASES if n not in CLUSTERING_DEPENDENT))
def test_outputs_losses_and_gradients_equal_the_recorded(name):
    compare(name, run_sketched(name))
