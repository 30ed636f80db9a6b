"""Checkpoint save/restore round trips, asynchronous saves, the newest of latest and best,
and one-line errors on damaged or corrupt files."""

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
    checkpoints.wait()
    assert sorted(p.name for p in (tmp_path / LATEST).iterdir() if p.name.isdigit()) == ["2"]
    restored, progress = checkpoints.restore(LATEST, _state(0.0))
    assert progress == {"n": 3}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 3.0)


def test_each_kind_keeps_its_newest_and_resume_takes_the_newer(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    assert checkpoints.newest() is None
    checkpoints.save(BEST, 150, _state(1.0), {"best_step": 150})
    checkpoints.save(LATEST, 300, _state(2.0), {"best_step": 150})
    checkpoints.save(BEST, 450, _state(3.0), {"best_step": 450})  # replaces best 150
    checkpoints.close()
    checkpoints = RunCheckpoints(tmp_path)
    assert (checkpoints.step(LATEST), checkpoints.step(BEST)) == (300, 450)
    assert checkpoints.newest() == (BEST, 450)
    assert sorted(int(p.name) for p in (tmp_path / BEST).iterdir() if p.name.isdigit()) == [450]
    checkpoints.save(LATEST, 450, _state(4.0), {"best_step": 450})  # a tie goes to best
    assert checkpoints.newest() == (BEST, 450)
    restored, progress = checkpoints.restore(BEST, _state(0.0), step=450)
    assert progress == {"best_step": 450}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 3.0)
    checkpoints.close()


def test_save_returns_before_the_write_ends_and_restore_waits_for_it(tmp_path):
    """Asynchronous saves: training may go on (even reusing the arrays' memory) while the
    files are written; whatever reads the checkpoint waits for the write."""
    checkpoints = RunCheckpoints(tmp_path)
    state = _state(5.0)
    checkpoints.save(LATEST, 9, state, {"n": 9})
    state["params"]["embed"].delete()  # what the next (donating) training step does
    restored, progress = checkpoints.restore(LATEST, _state(0.0))
    assert progress == {"n": 9}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 5.0)
    checkpoints.close()


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_checkpoint_is_one_line_naming_its_files(tmp_path, damage):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(LATEST, 4, _state(), {"n": 1})
    checkpoints.close()
    checkpoint = tmp_path / LATEST / "4"
    data = sorted(checkpoint.rglob("d/*"))  # index nodes and the arrays' data
    assert len(data) >= 2
    for path in data[:2]:
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[:5])
        else:
            path.unlink()
    with pytest.raises(CheckpointError) as error:
        RunCheckpoints(tmp_path).restore(LATEST, _state())
    message = str(error.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"checkpoint {checkpoint} is damaged: ")
    named = message.split(" is damaged: ")[1].split(" are missing")[0].split(" is missing")[0]
    damaged = {str(path.relative_to(checkpoint)) for path in data[:2]}
    assert named and set(named.split(", ")) <= damaged  # an unreadable index hides the rest
    assert f"delete {tmp_path.resolve()} to train this seed again" in message


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
    checkpoints.close()  # saves are asynchronous: a second reader sees only finished writes
    restored, progress = RunCheckpoints(tmp_path).restore(
        BEST, {"table": jax.ShapeDtypeStruct((10**9 + 1,), jnp.uint8)}
    )
    assert progress == {"n": 3}
    assert int(restored["table"][-1]) == 7 and int(restored["table"][:-1].max()) == 0
    del restored, big
    restored, progress = RunCheckpoints(tmp_path).restore(LATEST, _state(0.0))
    assert progress == {"n": 2}
    np.testing.assert_array_equal(restored["params"]["embed"], np.arange(6.0) * 2.0)
