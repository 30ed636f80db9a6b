"""What produced a result: code version, library versions, devices and dataset checksum.

`collect(data_dir)` returns the JSON-ready record that `dare_jax.train.run` puts under
"provenance" in `results.json` (and each seed's `result.json`):

    code:     commit (git HEAD of the checkout that holds this `dare_jax` package), dirty
              (`git status --porcelain` lists changes), changed_files (how many), error
              (why commit is null: git missing, not a git checkout, ...)
    python, machine, packages: {jax, jaxlib, flax, optax, orbax-checkpoint: version or null}
    devices:  platform, device_kind, device_count, local_device_count, process_count
    memory:   transparent_huge_pages (kernel mode), glibc.malloc.hugetlb (allocator tunable,
              null: unset): whether XLA:CPU's buffers sat in huge pages (`dare_jax.huge_pages`),
              which changes CPU speed, not numbers
    dataset:  dir, manifest_sha256 (what `sha256sum DIR/manifest.json` prints),
              source_sha256 (the raw log checksums the manifest records)

Nothing here raises: a field that cannot be found is null and says why, because a missing
git binary must never stop a training run.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dare_jax import huge_pages

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
_PACKAGE_ROOT = Path(__file__).resolve().parent  # the dare_jax folder


def _git(code_dir: Path, *args: str) -> str:
    """stdout of `git -C code_dir ARGS`; RuntimeError with git's message on failure."""
    try:
        command = ["git", "-C", str(code_dir), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"git failed: {error}") from error
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"git {args[0]} failed: {message}")
    return done.stdout


def code_version(package_dir: str | Path = _PACKAGE_ROOT) -> dict[str, Any]:
    """{"commit", "dirty", "changed_files", "error"} of the code in `package_dir` (default:
    this dare_jax package). The commit is read only when the enclosing git checkout holds
    `package_dir` at its top level (an installed copy inside some other repository's virtual
    environment is not that repository's code)."""
    package_dir = Path(package_dir).resolve()
    record: dict[str, Any] = dict.fromkeys(("commit", "dirty", "changed_files", "error"))
    if shutil.which("git") is None:
        return {**record, "error": "git not found on PATH"}
    try:
        top = Path(_git(package_dir, "rev-parse", "--show-toplevel").strip()).resolve()
        if top / package_dir.name != package_dir:
            return {**record, "error": f"{package_dir} is not at the top of the git checkout {top}"}
        record["commit"] = _git(package_dir, "rev-parse", "HEAD").strip()
        changes = [line for line in _git(top, "status", "--porcelain").splitlines() if line]
    except RuntimeError as error:
        not_checkout = "not a git repository" in str(error)
        record["error"] = f"not a git checkout: {package_dir}" if not_checkout else str(error)
        return record
    record.update(dirty=bool(changes), changed_files=len(changes))
    return record


def package_versions() -> dict[str, str | None]:
    """Installed versions of the numerical stack (null when a package is absent)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def device_info() -> dict[str, Any]:
    """Kind and counts of the JAX devices this process computes on."""
    import jax

    first = jax.devices()[0]
    return {"platform": first.platform, "device_kind": first.device_kind,
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count()}


def dataset_checksum(data_dir: str | Path) -> dict[str, Any]:
    """{"dir", "manifest_sha256", "source_sha256", "error"} of a preprocessed dataset."""
    from dare_jax.data.storage import MANIFEST, sha256_file

    manifest_path = Path(data_dir) / MANIFEST
    record: dict[str, Any] = {"dir": str(Path(data_dir).resolve()), "manifest_sha256": None,
                              "source_sha256": None, "error": None}
    if not manifest_path.is_file():
        record["error"] = f"{manifest_path} not found"
        return record
    record["manifest_sha256"] = sha256_file(manifest_path)
    try:
        sources = json.loads(manifest_path.read_text()).get("source_files") or []
        record["source_sha256"] = [entry.get("sha256") for entry in sources]
    except (ValueError, AttributeError) as error:  # the file's checksum still identifies it
        record["error"] = f"{manifest_path}: no readable source_files ({error})"
    return record


def collect(data_dir: str | Path | None) -> dict[str, Any]:
    """The full provenance record (see the module docstring); `data_dir` None: no dataset."""
    return {
        "code": code_version(), "python": platform.python_version(),
        "packages": package_versions(), "devices": device_info(), "machine": platform.machine(),
        "memory": huge_pages.status(),
        "dataset": None if data_dir is None else dataset_checksum(data_dir),
    }
