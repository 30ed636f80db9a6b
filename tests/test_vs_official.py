"""benchmarks/vs_official.py at a tiny scale: the official step and ours on the same batches.

Needs a checkout of the official code (github.com/thuml/DARE) and a Python with torch:
$DARE_OFFICIAL_CHECKOUT and $DARE_TORCH_PYTHON, or /work/official_dare and
/work/torchenv/bin/python where they exist. Skipped without them (CI has neither).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECKOUT = Path(os.environ.get("DARE_OFFICIAL_CHECKOUT", "/work/official_dare"))
TORCH_PYTHON = Path(os.environ.get("DARE_TORCH_PYTHON", "/work/torchenv/bin/python"))
MODELS = ("dare", "twin")
VARIANTS = ("row_sparse", "lazy")


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHECKOUT / "train_pytorch.py").exists() or not TORCH_PYTHON.exists(),
    reason="needs an official DARE checkout and a torch Python (DARE_OFFICIAL_CHECKOUT, "
    "DARE_TORCH_PYTHON)",
)
def test_official_and_ours_train_on_the_same_batches():
    command = [
        sys.executable, "benchmarks/vs_official.py", "--official", str(CHECKOUT),
        "--torch-python", str(TORCH_PYTHON), "--batch", "32", "--length", "20",
        "--items", "1000", "--categories", "50", "--steps", "2", "--warmup", "1",
        "--rounds", "1", "--models", ",".join(MODELS), "--variants", ",".join(VARIANTS),
        "--allocator", "default",
    ]  # fmt: skip
    done = subprocess.run(
        command, check=False, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    runs = {(r["model"], r["side"]): r for r in report["runs"]}
    assert set(runs) == {(m, s) for m in MODELS for s in ("official", *VARIANTS)}
    for (model, side), run in runs.items():
        assert run["samples_per_s"] > 0, (model, side)
        assert math.isfinite(run["first_loss"]), (model, side)
        # Every child trained on exactly the batches the parent generated.
        assert run["batch_checksum"] == report["batch_checksum"], (model, side)
        assert run["glibc_tunables"] is None
    for model in MODELS:
        official = runs[model, "official"]
        expected = {"dare": "DARE", "twin": "twin"}[model]
        assert official["flags"][official["flags"].index("-model_name") + 1] == expected
        for variant in VARIANTS:  # our side ran the driver's model and optimizer asked for
            assert f"name='{model}'" in runs[model, variant]["model_spec"]
            assert f"table_updates='{variant}'" in runs[model, variant]["optim"]
        # Our variants start from the same weights: the same first loss (before any update).
        first = [runs[model, v]["first_loss"] for v in VARIANTS]
        assert math.isclose(min(first), max(first), rel_tol=1e-6), first
        for side in ("official", *VARIANTS):
            assert report["summary"]["default"][model][side] > 0
