"""Checkpoint save/restore round trips, best pruning and clear errors on corrupt files."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dare_jax.checkpointing import BEST, LATEST, CheckpointError, RunCheckpoints


def _state(scale: float = 1.0):
    params = {"dense": {"kernel": jnp.full((3, 4), scale)}, "embed": jnp.arange(6.0) * scale}
    return {
        "step": jnp.asarray(7, jnp.int32),
        "params": params,
        "batch_stats": {"mean": jnp.zeros(4)},
        "opt_state": optax.adam(0.01).init(params),
    }


def test_round_trip_keeps_values_structure_and_progress(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    state = _state(2.5)
    progress = {"data_iterator": {"next_index": 7}, "best_auc": 0.61, "best_step": 5}
    checkpoints.save(LATEST, 7, state, progress)
    assert checkpoints.step(LATEST) == 7 and checkpoints.step(BEST) is None
    restored, restored_progress = RunCheckpoints(tmp_path).restore(LATEST, _state(0.0))
    assert restored_progress == progress
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_keeps_only_newest_and_resaves_same_step(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(LATEST, 1, _state(1.0), {"n": 1})
    checkpoints.save(LATEST, 2, _state(2.0), {"n": 2})
    checkpoints.save(LATEST, 2, _state(3.0), {"n": 3})  # a resumed run recomputes step 2
    assert sorted(p.name for p in (tmp_path / LATEST).iterdir() if p.name.isdigit()) == ["2"]
    restored, progress = checkpoints.restore(LATEST, _state(0.0))
    assert progress == {"n": 3}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 3.0)


def test_best_is_kept_until_pruned_and_stale_bests_are_discarded(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(BEST, 150, _state(1.0), {"best_step": 150})
    checkpoints.save(BEST, 300, _state(2.0), {"best_step": 300})
    # A kill before `latest` recorded step 300: resume at 150 drops the stale best only.
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.discard_best_after(150)
    assert checkpoints.step(BEST) == 150
    restored, progress = checkpoints.restore(BEST, _state(0.0), step=150)
    assert progress == {"best_step": 150}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0))
    checkpoints.save(BEST, 450, _state(3.0), {"best_step": 450})
    checkpoints.keep_only(BEST, 450)
    assert sorted(int(p.name) for p in (tmp_path / BEST).iterdir() if p.name.isdigit()) == [450]


def test_corrupt_checkpoint_names_the_path(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(LATEST, 4, _state(), {"n": 1})
    state_dir = tmp_path / LATEST / "4" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(tmp_path / LATEST / "4")):
        RunCheckpoints(tmp_path).restore(LATEST, _state())


def test_shape_mismatch_is_reported(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(LATEST, 1, _state(), {})
    other = _state()
    other["params"]["embed"] = jnp.zeros(9)
    other["opt_state"] = optax.adam(0.01).init(other["params"])
    with pytest.raises(CheckpointError, match="cannot be restored|needs"):
        checkpoints.restore(LATEST, other)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        RunCheckpoints(tmp_path).restore(BEST, _state())


def test_copy_links_the_best_as_latest_atomically(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(LATEST, 4, _state(1.0), {"n": 4})
    checkpoints.save(BEST, 8, _state(2.0), {"n": 8})
    checkpoints.copy(BEST, LATEST, 8)
    assert checkpoints.step(LATEST) == 8
    assert sorted(p.name for p in (tmp_path / LATEST).iterdir()) == ["8"]  # 4 is gone
    restored, progress = _restore_fresh(tmp_path)
    assert progress == {"n": 8}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 2.0)
    best_files = sorted(p for p in (tmp_path / BEST / "8").rglob("*") if p.is_file())
    assert best_files
    for path in best_files:  # hard links: the data is on disk once
        linked = tmp_path / LATEST / "8" / path.relative_to(tmp_path / BEST / "8")
        assert linked.stat().st_ino == path.stat().st_ino
    # Deleting the best leaves the latest intact.
    checkpoints.save(BEST, 12, _state(3.0), {"n": 12})
    checkpoints.keep_only(BEST, 12)
    checkpoints.close()
    restored, progress = _restore_fresh(tmp_path)
    assert progress == {"n": 8}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 2.0)


def _restore_fresh(directory):
    """(state, progress) of the latest checkpoint, read by a new RunCheckpoints."""
    checkpoints = RunCheckpoints(directory)
    try:
        return checkpoints.restore(LATEST, _state(0.0))
    finally:
        checkpoints.close()


def test_copy_killed_midway_leaves_the_previous_latest(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(LATEST, 4, _state(1.0), {"n": 4})
    half = tmp_path / LATEST / ".8.link-tmp"  # what a kill during copy leaves
    half.mkdir()
    (half / "_CHECKPOINT_METADATA").write_text("{}")
    checkpoints.close()
    checkpoints = RunCheckpoints(tmp_path)
    assert not half.exists() and checkpoints.step(LATEST) == 4
    _, progress = checkpoints.restore(LATEST, _state(0.0))
    assert progress == {"n": 4}
    with pytest.raises(CheckpointError, match="no complete checkpoint to copy"):
        checkpoints.copy(BEST, LATEST, 8)
    checkpoints.close()


class _Sized:
    """A leaf with only a size (no memory behind it)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def test_save_limit_rises_to_the_largest_array():
    from dare_jax.checkpointing import SAVE_CONCURRENT_GB, save_limit_gb

    assert save_limit_gb(_state()) == SAVE_CONCURRENT_GB == 1
    # DARE's 30,171,156-row item table of the 30 M benchmark: 1,930,953,984 bytes.
    assert save_limit_gb({"table": _Sized(30_171_156 * 16 * 4), "small": _Sized(8)}) == 2
    assert save_limit_gb({"exactly": _Sized(3 * 10**9)}) == 3


@pytest.mark.slow
def test_array_larger_than_the_save_limit_round_trips(tmp_path):
    # Orbax refuses to write one array beyond save_concurrent_gb (10^9 bytes by default here):
    # the 30 M-row benchmark failed so. 10^9 + 1 bytes, then a small state again.
    big = {"table": jnp.zeros((10**9 + 1,), jnp.uint8).at[-1].set(7)}
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(LATEST, 1, big, {"n": 1})
    checkpoints.save(LATEST, 2, _state(2.0), {"n": 2})
    checkpoints.save(BEST, 3, big, {"n": 3})
    restored, progress = RunCheckpoints(tmp_path).restore(
        BEST, {"table": jax.ShapeDtypeStruct((10**9 + 1,), jnp.uint8)}
    )
    assert progress == {"n": 3}
    assert int(restored["table"][-1]) == 7 and int(restored["table"][:-1].max()) == 0
    del restored, big
    restored, progress = RunCheckpoints(tmp_path).restore(LATEST, _state(0.0))
    assert progress == {"n": 2}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 2.0)
