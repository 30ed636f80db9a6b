"""Shared test fixtures.

`../shared/` (real data samples and reference fixtures) sits beside the
repository on developer and CI machines but not in a user's fresh clone, so
every test that reads it goes through `shared_dir` and skips cleanly when it
is absent. `DARE_SHARED_DIR` points elsewhere if needed.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_root() -> Path:
    return Path(os.environ.get("DARE_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = _shared_root()
    if not root.is_dir():
        pytest.skip(f"shared data folder not found at {root}")
    return root


def shared_path(*parts: str) -> Path:
    """Path under ../shared/, or skip the calling test if it does not exist."""
    path = _shared_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared file not found: {path}")
    return path
