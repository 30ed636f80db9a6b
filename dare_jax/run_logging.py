"""Run outputs: JSON-lines metrics, TensorBoard events, atomic JSON files.

A run resumed from its checkpoint at step s recomputes every later step, so both logs first
forget what was logged after s: the JSON-lines file keeps the records with step <= s (and
drops a torn last line of a killed process); TensorBoard is opened with `purge_step=s + 1`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """numpy / jax scalars and arrays, tuples, NaN -> plain JSON (NaN and inf become null)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path`; readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(to_jsonable(data), indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The complete records of a JSON-lines file (a torn last line is skipped)."""
    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Append-only JSON-lines log at `path`: one record per event, e.g. {"step": 150, ...}.
    `resume_step`: keep only the records with step <= resume_step, test records excepted
    (None: start a new file)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Test records are written once, at the very end: a resumed run writes them again.
            kept = [r for r in read_jsonl(self.path)
                    if int(r.get("step", 0)) <= resume_step and r.get("split") != "test"]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")  # noqa: SIM115 (open for the whole run; see close)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(to_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """tensorboardX scalars (no TensorFlow needed); a no-op when disabled."""

    def __init__(self, logdir: str | Path, enabled: bool, resume_step: int | None = None):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(logdir), purge_step=purge, flush_secs=30)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
