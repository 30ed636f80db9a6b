"""dare_jax.provenance: commit and dirty state from git (and graceful without it), library
versions, devices and the dataset checksum, checked against git, hashlib and jax."""

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import jax
import pytest

from dare_jax import provenance

REPO = Path(__file__).resolve().parent.parent
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@needs_git
def test_this_checkout_commit_and_dirty_state():
    try:
        head = git(REPO, "rev-parse", "HEAD").strip()
    except subprocess.CalledProcessError:
        pytest.skip("the tests do not run from a git checkout")
    record = provenance.code_version()
    assert record["commit"] == head and record["error"] is None
    changes = [line for line in git(REPO, "status", "--porcelain").splitlines() if line]
    assert record["dirty"] == bool(changes) and record["changed_files"] == len(changes)


@needs_git
def test_commit_dirty_and_not_a_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    package = repo / "dare_jax"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
    head = git(repo, "rev-parse", "HEAD").strip()
    clean = provenance.code_version(package)
    assert clean == {"commit": head, "dirty": False, "changed_files": 0, "error": None}
    (package / "__init__.py").write_text("x = 2\n")
    (package / "new.py").write_text("")
    dirty = provenance.code_version(package)
    assert dirty["commit"] == head and dirty["dirty"] is True and dirty["changed_files"] == 2

    # A copy of the package somewhere inside another checkout is not that checkout's code.
    nested = repo / "venv" / "site-packages" / "dare_jax"
    nested.mkdir(parents=True)
    inside = provenance.code_version(nested)
    assert inside["commit"] is None and "not at the top of the git checkout" in inside["error"]

    (tmp_path / "elsewhere").mkdir()
    outside = provenance.code_version(tmp_path / "elsewhere")
    assert outside["commit"] is None and outside["dirty"] is None
    assert outside["error"].startswith("not a git checkout")

    monkeypatch.setattr(provenance.shutil, "which", lambda name: None)
    missing = provenance.code_version(package)
    assert missing["commit"] is None and missing["error"] == "git not found on PATH"


def test_versions_devices_and_dataset_checksum(tmp_path):
    manifest = {"item_n": 5, "source_files": [{"name": "log.csv", "sha256": "f" * 64}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    record = provenance.collect(tmp_path)
    json.dumps(record)  # JSON-ready
    expected = hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    assert record["dataset"]["manifest_sha256"] == expected
    assert record["dataset"]["source_sha256"] == ["f" * 64]
    assert record["dataset"]["dir"] == str(tmp_path.resolve())
    assert record["packages"]["jax"] == jax.__version__
    for name in ("jaxlib", "flax", "optax", "orbax-checkpoint"):
        assert record["packages"][name] == importlib.metadata.version(name)
    devices = record["devices"]
    assert devices["device_count"] == jax.device_count() and devices["process_count"] == 1
    assert devices["device_kind"] == jax.devices()[0].device_kind
    missing = provenance.dataset_checksum(tmp_path / "none")
    assert missing["manifest_sha256"] is None and "not found" in missing["error"]
    assert provenance.collect(None)["dataset"] is None
