"""Checkpoints of one training run: the latest and the best (by validation AUC).

This is the only module that imports Orbax. A checkpoint holds two items: `state`, the
training-state pytree (Orbax's standard handler), and `progress`, a JSON dict with all else
needed to resume exactly (the data iterator's position, the best validation so far).

Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the
files are written in the background while training goes on; the next save, a restore and
`close` wait for a write still in flight. Each write is atomic (Orbax writes into a
temporary directory and renames it when complete; leftovers are removed on the next
start), and each kind keeps one checkpoint, the previous one being deleted only after the
new one is complete. A validation that improves on the best is saved as `best` only; the
training resumes from the newer of `latest` and `best` (`newest`), which both record the
data position and the best so far. So a process killed at any moment, a write in flight
included, leaves complete checkpoints to resume from exactly.

Sharded state and several processes: every process calls `save`/`restore` together; Orbax writes
each array shard once into one array per leaf, so a checkpoint restores under any mesh, into the
shardings of the restore target.

Arrays are written at most `SAVE_CONCURRENT_GB` at a time, which bounds the host memory a save
takes; Orbax refuses an array larger than that bound, so a state with a larger one raises it to
the largest array's size (`save_limit_gb`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"
SAVE_CONCURRENT_GB = 1  # Orbax's default (96) lets a save copy every array at once


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (corrupt, truncated, wrong shapes)."""


def save_limit_gb(state: Any) -> int:
    """GB a save may write at once: `SAVE_CONCURRENT_GB`, or the largest array of `state` in
    whole GB (10^9 bytes, Orbax's unit) when that is larger."""
    sizes = [leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes")]
    return max(SAVE_CONCURRENT_GB, math.ceil(max(sizes, default=0) / 10**9))


def _manager(directory: Path, save_gb: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True
    )
    handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_gb)}
    return ocp.CheckpointManager(
        directory, options=options, item_names=("state", "progress"), item_handlers=handlers
    )


class RunCheckpoints:
    """The `latest/<step>/` and `best/<step>/` checkpoints in `directory`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).resolve()
        self._save_gb = {which: SAVE_CONCURRENT_GB for which in (LATEST, BEST)}
        self._managers = {
            which: _manager(self.directory / which, gb) for which, gb in self._save_gb.items()
        }

    def step(self, which: str) -> int | None:
        """Step of the latest or best checkpoint, or None when there is none."""
        self.wait()
        return self._managers[which].latest_step()

    def newest(self) -> tuple[str, int] | None:
        """(kind, step) of the newest checkpoint (best on a tie), or None when there is none."""
        found = [
            (step, which == BEST)
            for which in (LATEST, BEST)
            if (step := self.step(which)) is not None
        ]
        if not found:
            return None
        step, is_best = max(found)
        return (BEST if is_best else LATEST), step

    def save(self, which: str, step: int, state: Any, progress: dict) -> None:
        """Start saving `state` (pytree of arrays) and `progress` (JSON dict) as step `step`
        of `which`; returns when the arrays are off the devices. A checkpoint of the same
        step is replaced (a resumed run recomputes steps it had saved, bit for bit)."""
        self.wait()
        save_gb = save_limit_gb(state)
        if save_gb > self._save_gb[which]:  # an array beyond the limit: a manager that takes it
            self._managers[which].close()
            self._managers[which] = _manager(self.directory / which, save_gb)
            self._save_gb[which] = save_gb
        manager = self._managers[which]
        if step in manager.all_steps():
            manager.delete(step)
        items = ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
        )
        manager.save(step, args=items, force=True)

    def wait(self) -> None:
        """Return when no write is in flight."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def restore(self, which: str, target_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, progress) of the latest or best checkpoint (or of its `step`).

        `target_state` has the structure, shapes and dtypes of the saved state (arrays or
        ShapeDtypeStructs); the restored arrays get the shardings of its leaves, whatever mesh
        wrote them. CheckpointError in one line naming the checkpoint and what is wrong.
        """
        step = self.step(which) if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory / which}")
        path = self.directory / which / str(step)
        damaged = damaged_files(path)
        if damaged:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {', '.join(damaged)} "
                f"{'is' if len(damaged) == 1 else 'are'} missing or truncated; {self._advice()}"
            )
        items = ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state), progress=ocp.args.JsonRestore()
        )
        try:
            restored = self._managers[which].restore(step, args=items)
        except Exception as error:  # Orbax raises many types; all mean "unreadable"
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({_reason(error)}); {self._advice()}"
            ) from error
        if restored.progress is None or restored.state is None:
            raise CheckpointError(f"checkpoint {path} is incomplete; {self._advice()}")
        return _like(target_state, restored.state, path), dict(restored.progress)

    def _advice(self) -> str:
        return f"delete {self.directory} to train this seed again from its start"

    def close(self) -> None:
        """Wait for a write in flight, then release the managers."""
        for manager in self._managers.values():
            manager.close()


def damaged_files(checkpoint: Path) -> list[str]:
    """Files of a checkpoint (relative paths) that are missing, truncated or not valid JSON,
    found without reading any array: the metadata files must parse, and the data files of
    the saved state (Orbax's OCDBT array database) must hold the byte ranges its index
    points into. (A failed read of Orbax's concurrent restore leaves callbacks that print
    tracebacks long after the error, so a damaged checkpoint is not read at all.)"""
    import tensorstore as ts

    state_dir = checkpoint / "state"
    broken = [p for p in checkpoint.rglob("*") if _is_json(p) and not _parses(p)]
    needed: dict[Path, int] = {}

    def need(location: str) -> Path:  # "<kind>:<prefix>:<file>:<offset>:<length>"
        _, prefix, name, offset, length = location.split(":")
        path = state_dir / prefix / name
        needed[path] = max(needed.get(path, 0), int(offset) + int(length))
        return path

    def visit(node: str) -> None:
        if _short(need(node), needed):
            return
        for entry in ts.ocdbt.dump(store, node).result()["entries"]:
            for value in _strings(entry):
                if value.startswith("btreenode:"):
                    visit(value)
                elif value.startswith("value:"):
                    need(value)

    try:
        store = ts.KvStore.open(f"file://{state_dir}/").result()
        versions = ts.ocdbt.dump(store).result()["versions"]
    except (ValueError, KeyError):  # no readable manifest
        broken.append(state_dir / "manifest.ocdbt")
        versions = []
    try:
        for version in versions:
            visit(version["root"]["location"])
    except (ValueError, KeyError):  # an index node of the right size cannot be read
        pass
    broken += [path for path in needed if _short(path, needed)]
    return sorted(str(path.relative_to(checkpoint)) for path in broken)


def _is_json(path: Path) -> bool:
    """Orbax's metadata files: all but the OCDBT database's and the commit markers."""
    return (
        path.is_file()
        and path.name not in ("manifest.ocdbt", "commit_success.txt")
        and (path.parent.name != "d")
    )


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def _short(path: Path, needed: dict[Path, int]) -> bool:
    return not path.is_file() or path.stat().st_size < needed[path]


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: what TensorStore says, without its spec dump."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _like(target: Any, restored: Any, path: Path) -> Any:
    """`restored`'s leaves in `target`'s tree structure (Orbax gives named tuples, such as
    optax states, back as plain tuples with the same leaf order)."""
    target_leaves, treedef = jax.tree.flatten(target)
    leaves = jax.tree.leaves(restored)
    if len(leaves) != len(target_leaves):
        raise CheckpointError(
            f"checkpoint {path} holds {len(leaves)} arrays, the model needs {len(target_leaves)}"
        )
    for index, (have, want) in enumerate(zip(leaves, target_leaves)):
        if have.shape != want.shape or have.dtype != want.dtype:
            raise CheckpointError(
                f"checkpoint {path}: array {index} is {have.dtype}{list(have.shape)}, "
                f"the model needs {want.dtype}{list(want.shape)}"
            )
    return jax.tree.unflatten(treedef, leaves)
