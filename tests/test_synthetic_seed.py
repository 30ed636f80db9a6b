"""data.synthetic_seed and configs/decoupling.py's log_seed= / align= keys: the driver writes
the log of the config's seed, and a run of another seed or alignment is refused on resume."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from configs import decoupling
from dare_jax import sweep, train
from dare_jax.config import ConfigError, flat, resolve
from dare_jax.data import DatasetError, preprocess
from dare_jax.data.synthetic import write_taobao_log

REPO = Path(__file__).resolve().parent.parent
SMALL = {"n_items": 3_000, "n_categories": 60, "domain_size": 20}


def _log_written_by_the_driver(tmp_path, monkeypatch, config) -> bytes:
    """The raw log prepare_dataset writes for `config` (its preprocessing stubbed out)."""

    def no_preprocessing(*args, **kwargs):
        raise ValueError("stub")

    monkeypatch.setattr(preprocess, "preprocess_log", no_preprocessing)
    config.data.raw_path = str(tmp_path / f"log_{config.data.synthetic_seed}.csv")
    config.data.dir = str(tmp_path / f"pre_{config.data.synthetic_seed}")
    with pytest.raises(DatasetError, match="preprocessing .* failed: stub"):
        preprocess.prepare_dataset(resolve(config).data)
    with open(config.data.raw_path, "rb") as fh:
        return fh.read()


def _small_decoupling_config(arg: str = ""):
    config = decoupling.get_config(arg)
    config.data.synthetic_users = 30
    config.data.synthetic_structure.update(SMALL)
    return config


def test_driver_writes_the_log_of_the_configs_seed(tmp_path, monkeypatch):
    structure = {**decoupling.STRUCTURE, **SMALL}
    for seed in (0, 101):
        config = _small_decoupling_config(f"log_seed={seed}")
        assert config.data.synthetic_seed == seed
        written = _log_written_by_the_driver(tmp_path, monkeypatch, config)
        direct = tmp_path / f"direct_{seed}.csv"
        write_taobao_log(direct, 30, seed=seed, **structure)
        assert hashlib.sha256(written).digest() == hashlib.sha256(direct.read_bytes()).digest()
    assert (tmp_path / "log_0.csv").read_bytes() != (tmp_path / "log_101.csv").read_bytes()


def test_bad_seed_is_refused_before_any_work():
    config = decoupling.get_config()
    config.data.synthetic_seed = -1
    with pytest.raises(ConfigError, match="data.synthetic_seed = -1"):
        resolve(config)


def test_other_seed_or_alignment_is_refused_on_resume():
    current = flat(resolve(decoupling.get_config("model=dare")))
    assert current["data.synthetic_seed"] == 0
    assert current["data.synthetic_structure.tier_alignment"] == 0.0
    for arg, field in (("log_seed=101", "data.synthetic_seed"), ("align=0.5", "tier_alignment")):
        other = flat(resolve(decoupling.get_config(f"model=dare,{arg}")))
        # Its own directories...
        assert other["workdir"] != current["workdir"]
        assert other["data.dir"] != current["data.dir"]
        assert other["data.raw_path"] != current["data.raw_path"]
        # ... and the same directory with another log is refused.
        other["workdir"] = current["workdir"]
        other["data.dir"], other["data.raw_path"] = current["data.dir"], current["data.raw_path"]
        other["data.name"] = current["data.name"]
        differences = train.config_differences(current, other)
        assert len(differences) == 1 and field in differences[0]


def test_decoupling_keys_name_data_and_runs():
    config = decoupling.get_config("model=twin,log_seed=102,align=0.33,seeds=3")
    assert config.workdir == "runs/decoupling_s102_a0.33/twin"
    assert config.data.raw_path == "data/decoupling_s102_a0.33/UserBehavior_synthetic.csv"
    assert config.data.dir == "data/decoupling_s102_a0.33/preprocessed"
    assert config.data.synthetic_seed == 102 and config.train.num_seeds == 3
    assert config.data.synthetic_structure.tier_alignment == pytest.approx(0.33)
    default = decoupling.get_config("model=twin,align=0,log_seed=0")
    assert default.workdir == "runs/decoupling/twin"
    assert default.data.dir == "data/decoupling/preprocessed"
    for bad in ("align=1.5", "align=x", "log_seed=-3", "log_seed="):
        with pytest.raises(ValueError, match=bad.partition("=")[0]):
            decoupling.get_config(bad)


def test_alignment_override_flag_reaches_the_locked_config():
    """--config.data.synthetic_structure.tier_alignment=0.5 (the sweep's path: a locked
    config, then the overrides) sets the declared field."""
    config = sweep.load_config(str(REPO / "configs/decoupling.py"), "model=dare", {
        "data.synthetic_structure.tier_alignment": 0.5,
        "data.synthetic_seed": 7,
    })
    assert config.data.synthetic_structure.tier_alignment == 0.5
    assert config.data.synthetic_seed == 7
