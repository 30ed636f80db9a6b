"""Checkpoints of one training run: the latest and the best (by validation AUC).

This is the only module that imports Orbax. A checkpoint holds two items:

- `state`: the training state pytree (step, params, batch_stats, opt_state),
  saved with Orbax's standard pytree handler;
- `progress`: a JSON dict with everything else needed to resume exactly: the
  data iterator's state (epoch and position), the best validation AUC so far
  and its step, and the training-loop bookkeeping.

Sharded state and several processes: the state's arrays may be split over a
device mesh that spans processes. Every process calls `save`/`restore`
together; Orbax writes each array shard once (from the process that holds it)
into one tensorstore array per leaf, and process 0 writes the JSON item. The
files hold whole logical arrays, not per-device pieces, so a checkpoint
restores under any mesh: `restore` reads into the shardings carried by
`target_state` (ShapeDtypeStructs from `Partitioner.abstract`), reading on each
process only the rows its devices hold.

Saves are synchronous and atomic (Orbax writes to a temporary directory and
renames it when complete), so a process killed at any moment leaves either the
previous checkpoint or the new one, never a half-written one that restore
would pick up; leftover temporary directories are removed on the next start.

A step that is both the best and the latest is written once: `copy` makes the
latest a hard-linked copy of the best (checkpoint files are never modified once
written), also atomic. Arrays are written at most `SAVE_CONCURRENT_GB` at a time,
which bounds the host memory a save of Taobao-sized tables takes on top of the state
(end-to-end benchmark, `benchmarks/README.md`); Orbax refuses an array larger than that
bound, so a state with a larger one (a 30 M-row item table is 1.9 GB) raises it to the
largest array's size, rounded up to whole GB (`save_limit_gb`).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"
SAVE_CONCURRENT_GB = 1  # Orbax's default (96) lets a save copy every array at once
_LINK_TMP = ".link-tmp"  # suffix of a copy being assembled (removed if left by a kill)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (corrupt, truncated, wrong shapes)."""


def save_limit_gb(state: Any) -> int:
    """GB a save may write at once: `SAVE_CONCURRENT_GB`, or the largest array of `state` in
    whole GB (10^9 bytes, Orbax's unit) when that is larger."""
    largest = max((leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes")),
                  default=0)
    return max(SAVE_CONCURRENT_GB, math.ceil(largest / 10**9))


def _manager(
    directory: Path, max_to_keep: int | None, save_gb: int = SAVE_CONCURRENT_GB
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_gb)}
    return ocp.CheckpointManager(
        directory, options=options, item_names=("state", "progress"), item_handlers=handlers
    )


def _like(target: Any, restored: Any, path: Path) -> Any:
    """`restored`'s leaves in `target`'s tree structure.

    Orbax gives named tuples (optax states) back as plain tuples; the leaf
    order is the same, so the target's structure is re-applied.
    """
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


class RunCheckpoints:
    """The `latest/` and `best/` checkpoint managers of one run directory.

    Args:
      directory: folder that holds `latest/<step>/` and `best/<step>/`.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).resolve()
        for stale in self.directory.glob(f"*/.*{_LINK_TMP}"):  # a copy killed midway
            shutil.rmtree(stale, ignore_errors=True)
        # `latest` drops its previous checkpoint once a new one is complete. `best` keeps
        # everything until `keep_only` prunes it, which the loop calls only after the
        # matching `latest` checkpoint is saved: until then a resume may need the older best.
        self._keep = {LATEST: 1, BEST: None}
        self._save_gb = {which: SAVE_CONCURRENT_GB for which in self._keep}
        self._managers = {
            which: _manager(self.directory / which, keep) for which, keep in self._keep.items()
        }

    def step(self, which: str = LATEST) -> int | None:
        """Step of the newest latest or best checkpoint, or None when there is none."""
        return self._managers[which].latest_step()

    def save(self, which: str, step: int, state: Any, progress: dict) -> None:
        """Save `state` (pytree of arrays) and `progress` (JSON dict) as step `step`.

        An existing checkpoint with the same step is replaced: after a resume
        the run recomputes steps it had already saved, bit for bit.
        """
        save_gb = save_limit_gb(state)
        if save_gb > self._save_gb[which]:  # an array beyond the limit: a manager that takes it
            self._managers[which].close()
            self._managers[which] = _manager(self.directory / which, self._keep[which], save_gb)
            self._save_gb[which] = save_gb
        manager = self._managers[which]
        if step in manager.all_steps():
            manager.delete(step)
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
            ),
            force=True,
        )
        manager.wait_until_finished()

    def copy(self, source: str, target: str, step: int) -> None:
        """Make step `step` of `source` ("best" or "latest") a checkpoint of `target` too,
        without writing it again: its files are hard-linked (copied where links fail)
        into a temporary directory renamed into place. `latest` then keeps only that step.
        Every process calls it; process 0 links (the files of all processes are there once
        a save has returned)."""
        source_dir = self.directory / source / str(step)
        target_dir = self.directory / target / str(step)
        if jax.process_index() == 0:
            if not (source_dir / "_CHECKPOINT_METADATA").is_file():
                raise CheckpointError(f"no complete checkpoint to copy at {source_dir}")
            tmp = target_dir.with_name(f".{step}{_LINK_TMP}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source_dir, tmp, copy_function=_link_or_copy)
            shutil.rmtree(target_dir, ignore_errors=True)  # a resumed run redoes a step
            os.replace(tmp, target_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dare_jax.checkpoint_copy_{step}")
        self._managers[target].reload()
        if target == LATEST:
            self.keep_only(LATEST, step)

    def restore(self, which: str, target_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, progress) of the latest or best checkpoint.

        Args:
          which: "latest" or "best".
          target_state: a pytree with the structure, shapes and dtypes of the
            saved state (for example a freshly initialised state); the
            shardings of its leaves (arrays or ShapeDtypeStructs) are the ones
            the restored arrays get, whatever mesh wrote the checkpoint.
          step: a given step instead of the newest one.

        Raises:
          CheckpointError: there is no checkpoint, or it cannot be read or does
            not match `target_state`; the message names the directory.
        """
        manager = self._managers[which]
        step = manager.latest_step() if step is None else step
        path = self.directory / which / str(step)
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory / which}")
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target_state), progress=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:  # Orbax raises many types; all mean "unreadable".
            raise CheckpointError(
                f"checkpoint {path} cannot be restored ({type(error).__name__}: {error}); "
                "delete it (or the whole run directory) to start again"
            ) from error
        if restored.progress is None or restored.state is None:
            raise CheckpointError(f"checkpoint {path} is incomplete")
        return _like(target_state, restored.state, path), dict(restored.progress)

    def discard_best_after(self, step: int) -> None:
        """Delete best checkpoints newer than `step`.

        A run killed between saving a new best and saving the latest resumes
        from the older latest checkpoint; it will recompute (and re-save) the
        newer best, so the stale one must not win meanwhile.
        """
        manager = self._managers[BEST]
        for saved in manager.all_steps():
            if saved > step:
                manager.delete(saved)
        manager.reload()

    def keep_only(self, which: str, step: int) -> None:
        """Delete every checkpoint of `which` except step `step`."""
        manager = self._managers[which]
        for saved in manager.all_steps():
            if saved != step:
                manager.delete(saved)
        manager.reload()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)
