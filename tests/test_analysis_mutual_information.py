"""Ground-truth mutual information: the vectorised counts against a plain-Python recount,
the MI formula against scikit-learn, the lookup, and the command line."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from analysis_support import tiny_data
from conftest import REPO_ROOT, shared_path
from sklearn.metrics import mutual_info_score

from analysis.mutual_information import (
    GroundTruthMI,
    binary_mutual_information,
    count_ground_truth,
)
from dare_jax.data import open_dataset, preprocess_log


def plain_python_recount(dataset, split, length, targets=None):
    """Loop over every behaviour of every sample, as the official script does."""
    samples, clicks, count, positive = {}, {}, {}, {}
    data = dataset.gather(split, np.arange(dataset.num_samples(split)), length)
    for i in range(len(data["cid"])):
        target, label = int(data["cid"][i]), int(data["label"][i])
        if targets is not None and target not in targets:
            continue
        samples[target] = samples.get(target, 0) + 1
        clicks[target] = clicks.get(target, 0) + label
        for j in range(length):
            category = int(data["hist_cid"][i][j])
            if category == 0:
                continue
            cell = (target, category, length - j)
            count[cell] = count.get(cell, 0) + 1
            positive[cell] = positive.get(cell, 0) + label
    return samples, clicks, count, positive


def plain_mi(n, n1, total, total1):
    mi = 0.0
    for joint, x, y in (
        (n1, n, total1),
        (n - n1, n, total - total1),
        (total1 - n1, total - n, total1),
        (total - total1 - n + n1, total - n, total - total1),
    ):
        if joint > 0:
            mi += joint / total * math.log(joint * total / (x * y))
    return mi


def assert_matches_recount(truth, dataset, split, length, targets=None):
    samples, clicks, count, positive = plain_python_recount(dataset, split, length, targets)
    target, category, position = truth.decode()
    got = {
        (int(t), int(c), int(p)): (int(n), int(n1))
        for t, c, p, n, n1 in zip(target, category, position, truth.count, truth.clicks)
    }
    assert got == {cell: (count[cell], positive[cell]) for cell in count}
    for t, n in samples.items():
        assert truth.samples[t] == n and truth.clicks_total[t] == clicks[t]
    mi = dict(zip(got, truth.mi))
    for cell in list(count)[:2000]:
        t = cell[0]
        assert mi[cell] == pytest.approx(
            plain_mi(count[cell], positive[cell], samples[t], clicks[t]), abs=1e-12
        )


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return open_dataset(tiny_data(tmp_path_factory.getbasetemp() / "analysis_runs"))


def test_vectorised_counts_equal_plain_python_recount(small_dataset):
    truth = count_ground_truth(
        small_dataset, split="val", max_length=25, chunk_size=97, progress=False
    )
    assert_matches_recount(truth, small_dataset, "val", 25)


def test_target_category_restriction(small_dataset):
    targets = {int(c) for c in np.asarray(small_dataset.array("test_cid"))[:40]}
    truth = count_ground_truth(
        small_dataset,
        split="test",
        max_length=12,
        target_categories=sorted(targets),
        progress=False,
    )
    assert_matches_recount(truth, small_dataset, "test", 12, targets)


@pytest.mark.parametrize(
    ("kind", "parts"),
    [
        ("taobao", ("data", "taobao", "UserBehavior_head_84k.csv")),
        ("tmall", ("data", "tmall", "user_log_format1_head_75k.csv")),
    ],
)
def test_counts_on_the_real_samples(kind, parts, tmp_path):
    raw = shared_path(*parts)
    preprocess_log(kind, raw, tmp_path / "pre", progress=False)
    dataset = open_dataset(tmp_path / "pre")
    truth = count_ground_truth(dataset, split="val", max_length=50, progress=False)
    assert_matches_recount(truth, dataset, "val", 50)


def test_binary_mutual_information_equals_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.random(300) < rng.random()
        y = (rng.random(300) < 0.3) | (x & (rng.random(300) < 0.4))
        got = binary_mutual_information(x.sum(), (x & y).sum(), len(x), y.sum())
        assert got == pytest.approx(mutual_info_score(x, y), abs=1e-12)
    assert binary_mutual_information(0, 0, 10, 4) == 0.0  # X never 1: no information


def test_lookup_padding_and_unseen_cells():
    length, cate_n = 3, 5
    # One observed cell: target 2, category 4, relative position 1 (the most recent).
    keys = np.array([(2 * cate_n + 4) * length + 0])
    truth = GroundTruthMI(
        keys,
        np.array([3]),
        np.array([3]),
        np.array([0, 0, 6, 0, 0]),
        np.array([0, 0, 3, 0, 0]),
        length,
        cate_n,
    )
    got = truth.lookup(np.array([2, 2]), np.array([[0, 1, 4], [4, 4, 1]]))
    expected_mi = plain_mi(3, 3, 6, 3)
    assert np.isnan(got[0, 0])
    assert got[0, 1] == 0.0 and got[0, 2] == pytest.approx(expected_mi)
    assert got[1].tolist() == [0.0, 0.0, 0.0]  # category 4 only informative at position 1
    assert truth.matrix(2, [4, 1]).tolist() == [[expected_mi, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_cli_writes_files_and_refuses_missing_data(small_dataset, tmp_path):
    out = tmp_path / "mi"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis.mutual_information",
            "--data-dir",
            str(small_dataset.directory),
            "--out",
            str(out),
            "--max-length",
            "20",
            "--targets",
            "2",
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for name in ("ground_truth_mi.json", "ground_truth_mi.npz", "ground_truth_mi.png"):
        assert (out / name).stat().st_size > 0
    loaded = GroundTruthMI.load(out / "ground_truth_mi.npz")
    assert loaded.length == 20
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis.mutual_information",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "nowhere" in bad.stderr and "Traceback" not in bad.stderr
    assert Path(out / "ground_truth_mi.npz").exists()
