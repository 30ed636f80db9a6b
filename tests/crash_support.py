"""A simulated kill in the middle of training, shared by the resume tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dare_jax.data import pipeline


class SimulatedCrash(Exception):
    """Raised in place of a real kill; tests expect it with ``pytest.raises``."""


def crashing_train_iterator(after: int) -> Callable[..., Any]:
    """A ``pipeline.train_iterator`` replacement that dies after ``after`` batches.

    Patch it in with ``monkeypatch.setattr(pipeline, "train_iterator", ...)``; it wraps the
    original iterator (captured now), so batches and checkpointable state are the real ones.
    """
    original = pipeline.train_iterator

    def make(dataset, state=None, **options):
        inner = original(dataset, state, **options)

        class Dying:
            count = 0

            def __next__(self):
                if Dying.count == after:
                    raise SimulatedCrash(f"killed after {after} batches")
                Dying.count += 1
                return next(inner)

            def get_state(self):
                return inner.get_state()

        return Dying()

    return make
