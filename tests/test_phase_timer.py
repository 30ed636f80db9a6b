"""PhaseTimer: wall seconds per phase and XLA compile seconds attributed to the phase
that triggered the compilation."""

import time

import jax
import jax.numpy as jnp
import pytest

from dare_jax.phase_timer import PhaseTimer, peak_memory


def test_phases_add_up_and_compiles_are_attributed():
    timer = PhaseTimer()
    with timer.phase("sleep"):
        time.sleep(0.05)
    with timer.phase("sleep"):
        time.sleep(0.05)
    # A function never seen before compiles on its first call, inside "compile_here".
    fresh = jax.jit(lambda x: jnp.tanh(x) * 3.0 + jnp.float32(time.time() % 1))
    with timer.phase("compile_here"):
        fresh(jnp.ones(7)).block_until_ready()
    with timer.phase("cached"):
        fresh(jnp.ones(7)).block_until_ready()  # the same shapes: no compilation
    summary = timer.summary()
    assert 0.1 <= summary["seconds"]["sleep"] < 1.0
    assert summary["compile_seconds"]["compile_here"] > 0
    assert summary["compile_seconds"]["compile_here"] <= summary["seconds"]["compile_here"]
    assert "cached" not in summary["compile_seconds"]
    assert "sleep" not in summary["compile_seconds"]
    assert summary["total_seconds"] == pytest.approx(sum(summary["seconds"].values()), abs=0.01)
    # A compilation outside any phase of this timer is not counted by it.
    jax.jit(lambda x: x - 1.5)(jnp.ones(3)).block_until_ready()
    assert timer.summary()["compile_seconds"] == summary["compile_seconds"]


def test_phases_do_not_nest():
    timer = PhaseTimer()
    with timer.phase("outer"):
        with pytest.raises(RuntimeError, match="inside phase 'outer'"):
            with timer.phase("inner"):
                pass


def test_peak_memory_reports_this_process():
    memory = peak_memory()
    assert memory["peak_rss_bytes"] > 50 * 2**20  # at least what JAX itself holds
