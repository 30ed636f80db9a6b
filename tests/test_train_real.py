"""The Taobao and Tmall configs end to end on the real ~80-user samples in ../shared.

The run directory starts with only the raw CSV configured: the driver
preprocesses it first, trains a few steps of the paper's model (d=16, L=200,
top-20) and tests the best-validation checkpoint on every test sample.
"""

import importlib
import json

import pytest

from dare_jax import train
from dare_jax.config import resolve
from dare_jax.run_logging import read_jsonl
from tests.conftest import shared_path

SAMPLES = {
    "taobao": ("data", "taobao", "UserBehavior_head_84k.csv"),
    "tmall": ("data", "tmall", "user_log_format1_head_75k.csv"),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_paper_config_runs_on_the_real_sample(name, tmp_path):
    raw = shared_path(*SAMPLES[name])
    config = importlib.import_module(f"configs.{name}").get_config("seeds=1,steps=6")
    config.data.raw_path = str(raw)
    config.data.dir = str(tmp_path / "preprocessed")
    config.workdir = str(tmp_path / "run")
    config.train.batch_size = 512
    config.train.eval_every_steps = 3
    config.log.progress_bar = False
    results = train.run(resolve(config))

    manifest = json.loads((tmp_path / "preprocessed/manifest.json").read_text())
    test = results["seeds"][0]["test"]
    # Every test sample is evaluated (3 per user: the positive and its 2 negatives).
    assert test["num_samples"] == manifest["counts"]["test"] == 3 * test["gauc_users"]
    assert 0.0 <= test["auc"] <= 1.0 and test["log_loss"] > 0
    assert results["seeds"][0]["best_step"] in (3, 6)
    records = read_jsonl(tmp_path / "run/seed_0/metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    assert (tmp_path / "run/results.json").exists()
    assert list((tmp_path / "run/seed_0/tensorboard").glob("events.out.tfevents.*"))
