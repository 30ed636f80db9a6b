"""Representation discriminability: the contingency MI/NMI against scikit-learn, k-means
quantisation keeps label information that a random representation lacks, trained runs."""

import json

import numpy as np
import pytest
from analysis_support import loaded_runs
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from analysis import common
from analysis.discriminability import (
    discrete_mutual_information,
    discriminability,
    quantised_information,
)


def test_discrete_mutual_information_equals_sklearn():
    rng = np.random.default_rng(1)
    for size, clusters in ((50, 3), (500, 40), (2000, 7)):
        a = rng.integers(0, clusters, size) * 3 + 5  # non-contiguous ids
        b = (rng.random(size) < 0.3).astype(int)
        b[a % 2 == 0] = 1 - b[a % 2 == 0]
        mi, nmi = discrete_mutual_information(a, b)
        assert mi == pytest.approx(mutual_info_score(a, b), abs=1e-12)
        assert nmi == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
    assert discrete_mutual_information(np.zeros(5, int), np.zeros(5, int)) == (0.0, 0.0)


def test_informative_representation_keeps_more_information():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    informative = np.column_stack([labels * 3.0 + rng.normal(0, 0.5, 600), rng.normal(size=600)])
    noise = rng.normal(size=(600, 2))
    kwargs = {"clusters": (2, 8, 10_000), "seeds": (0,), "progress": False}
    good, bad = (
        quantised_information(informative, labels, **kwargs),
        quantised_information(noise, labels, **kwargs),
    )
    assert good["k"] == [2, 8]  # 10,000 clusters > samples: dropped
    assert good["mi"].shape == (2, 1)
    assert np.all(good["mi_mean"] > 0.4) and np.all(bad["mi_mean"] < 0.05)
    with pytest.raises(common.AnalysisError, match="same samples"):
        quantised_information(noise, labels[:10], progress=False)


def test_discriminability_on_trained_runs(tmp_path_factory, tmp_path):
    runs = loaded_runs(tmp_path_factory.getbasetemp() / "analysis_runs")
    report = discriminability(runs, tmp_path, clusters=(2, 10, 50), seeds=(0,), progress=False)
    saved = json.loads((tmp_path / "discriminability.json").read_text())
    for name in ("DARE", "TWIN"):
        assert saved["runs"][name]["k"] == [2, 10, 50]
        assert saved["runs"][name]["cross_feature"] is True
        assert all(value >= 0 for value in saved["runs"][name]["mi_mean"])
    # main-MLP input: target repr, aggregate, their product (TR), each 12 wide
    assert report["runs"]["DARE"]["features"] == 36
    assert (tmp_path / "discriminability.png").stat().st_size > 0
