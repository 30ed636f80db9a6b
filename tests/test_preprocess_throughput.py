"""benchmarks/preprocess_throughput.py: the fitted log shape, the official script's scratch
layout and sample counts (with a stand-in official script), and, where a checkout of the
official code exists ($DARE_OFFICIAL_CHECKOUT or /work/official_dare), both
implementations on one tiny log."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKOUT = Path(os.environ.get("DARE_OFFICIAL_CHECKOUT", "/work/official_dare"))

# Stands in for preprocess/taobao_v4.py: same relative paths, same output names, and the
# n_* lines it prints; N_VAL_PRINTED lets a test make it misreport.
FAKE_OFFICIAL = """
import numpy as np
assert open('../data/taobao/UserBehavior.csv').read().startswith('1,2,3,pv,')
rows = [[1, 2, 3, [1, 0], [0] * 200, [0] * 200]] * 6
np.save('../data/taobao/train_0001_4.npy', np.asarray(rows[:4], dtype=object))
np.save('../data/taobao/train_0002_2.npy', np.asarray(rows[:2], dtype=object))
np.save('../data/taobao/val.npy', np.asarray(rows[:3], dtype=object))
np.save('../data/taobao/test.npy', np.asarray(rows[:3], dtype=object))
print('n_user: 5\\nn_item: 7\\nn_cate: 2\\nn_train: 6\\nn_val: N_VAL_PRINTED\\nn_test: 3')
"""


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module("preprocess_throughput")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _fake_checkout(root: Path, n_val_printed: int) -> Path:
    (root / "preprocess").mkdir(parents=True)
    script = FAKE_OFFICIAL.replace("N_VAL_PRINTED", str(n_val_printed))
    (root / "preprocess" / "taobao_v4.py").write_text(script)
    return root


def test_length_sigma_is_fitted_to_the_real_sample(bench):
    # p90 / median of a log-normal is exp(1.2816 sigma): 205 / 69 -> sigma = 0.85.
    assert bench.FITTED_LENGTH_SIGMA == pytest.approx(math.log(205 / 69) / 1.2816, rel=1e-4)
    assert bench.FITTED_LENGTH_SIGMA == pytest.approx(0.85, abs=0.001)


def test_official_runs_in_a_scratch_layout_and_its_counts_are_read(bench, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("1,2,3,pv,1511539200\n")
    checkout = _fake_checkout(tmp_path / "checkout", n_val_printed=3)
    result, counts, scratch = bench.run_official(
        checkout, sys.executable, log, tmp_path / "scratch", keep=False
    )
    assert result["exit_code"] == 0 and result["wall_s"] > 0
    assert {k: counts[k] for k in ("train", "val", "test", "train_files")} == {
        "train": 6, "val": 3, "test": 3, "train_files": 2,
    }  # fmt: skip
    assert (counts["user_count"], counts["item_count"], counts["category_count"]) == (5, 7, 2)
    assert not scratch.exists()  # deleted without keep
    assert log.is_file()  # the log itself is only linked, never touched


def test_official_count_disagreeing_with_its_printout_is_an_error(bench, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("1,2,3,pv,1511539200\n")
    checkout = _fake_checkout(tmp_path / "checkout", n_val_printed=4)
    with pytest.raises(SystemExit, match="official val: files hold 3 samples, it printed n_val: 4"):
        bench.run_official(checkout, sys.executable, log, tmp_path / "scratch", keep=False)


def test_scratch_inside_the_repository_is_refused(bench, tmp_path):
    checkout = _fake_checkout(tmp_path / "checkout", n_val_printed=3)
    with pytest.raises(SystemExit, match="outside the repository"):
        bench.official_layout(checkout, tmp_path / "log.csv", REPO / "data")


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHECKOUT / "preprocess" / "taobao_v4.py").exists(),
    reason="needs a checkout of the official code (DARE_OFFICIAL_CHECKOUT)",
)
def test_official_and_ours_build_the_same_samples(tmp_path):
    command = [
        sys.executable, "benchmarks/preprocess_throughput.py", "--rows", "30000",
        "--official", str(CHECKOUT), "--cache-dir", str(tmp_path / "cache"),
        "--scratch-dir", str(tmp_path / "scratch"),
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same users, items, categories and samples per split" in done.stdout
    assert "| official (preprocess/taobao_v4.py) |" in done.stdout
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch deleted
