"""Where a run's wall time goes: seconds per phase, XLA compile time, peak memory.

`PhaseTimer` adds up wall-clock seconds per named phase (`with timer.phase("eval"):`);
phases do not nest, so their seconds add up to the time they cover. The compile seconds
that JAX reports through `jax.monitoring` (tracing, lowering, backend compile) go to the
phase running at the time (a jitted function compiles on its first call), so `seconds -
compile_seconds` of a phase is the time it spent doing its work.

The host clock is honest on an accelerator only where the host waits for the device; the
training loop fetches each step's loss one step late, so at most one step's device work
can spill from a phase into the next.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

import jax

# The jax.monitoring duration events of one compilation.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_ACTIVE: list[PhaseTimer] = []
_LISTENING = False


def _on_duration(event: str, duration: float, **_: object) -> None:
    if event in COMPILE_EVENTS:
        for timer in _ACTIVE:
            timer.add_compile(duration)


class PhaseTimer:
    """Wall seconds and compile seconds per phase; `summary()` is JSON-ready."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.compile_seconds: dict[str, float] = {}
        self.current: str | None = None
        global _LISTENING
        if not _LISTENING:  # one process-wide listener; timers register themselves in _ACTIVE
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _LISTENING = True

    def add_compile(self, duration: float) -> None:
        name = self.current or "other"
        self.compile_seconds[name] = self.compile_seconds.get(name, 0.0) + duration

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (added to earlier blocks of the same name)."""
        if self.current is not None:
            raise RuntimeError(f"phase {name!r} started inside phase {self.current!r}")
        self.current = name
        _ACTIVE.append(self)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            _ACTIVE.remove(self)
            self.current = None

    def summary(self) -> dict:
        """{"seconds": {phase: s}, "compile_seconds": {phase: s}, "total_seconds": s}."""
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "compile_seconds": {k: round(v, 3) for k, v in self.compile_seconds.items()},
                "total_seconds": round(sum(self.seconds.values()), 3)}


def peak_memory() -> dict:
    """Peak resident memory of this process and, where the backend reports it (GPU/TPU),
    the peak bytes in use on the first local device; bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out
