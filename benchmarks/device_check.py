"""The stages of `benchmarks/device_check.sh`, under one time budget, every figure in one JSON.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/device_check.py --mode gpu|tiny
        --out DIR --site DIR [--budget S] [--stages S1,S2,...]

Started by `benchmarks/device_check.sh` after the offline install of the carried wheels into
`--site` (its environment variable STAGES becomes `--stages`: a second run can measure only
what the first one skipped); every stage inherits the allocator setting of its command line,
which the `environment` stage records. Stages (one that would start with too little of the
budget left is skipped and says so; one that runs past its share is stopped), run in the
order of `STAGES`, most important first:

1. `environment`: the package versions and where they were imported from (the carried ones
   from `--site`, JAX from the machine), the devices, the allocator's huge-page setting
   (`dare_jax.huge_pages.status()`); on `gpu`, JAX must see a GPU.
2. `parity_full_precision`: `python -m dare_jax.interop.check_parity .device/fixtures/*.npz`
   with `JAX_DEFAULT_MATMUL_PRECISION=highest` (must pass).
3. `loop_dare`, then the same for TWIN and DIN: `benchmarks/training_loop.py`, the whole
   training loop (`python -m dare_jax.main --config configs/taobao_synthetic.py`) with the
   histories built on the host and on the device (`data.histories`).
4. `step_dare` (and TWIN, DIN): `benchmarks/step_throughput.py`, the driver's training step
   with `optim.table_updates` = `row_sparse` (the default, RowSparseAdam) and `dense`
   (`optim.adam` on autodiff's gradients), and the evaluation step, with compile seconds and
   device memory.
5. `input_pipeline`: `benchmarks/input_pipeline.py` on the loop's dataset (host costs per
   batch, batches/s the pipeline delivers with 1 to 8 threads).
6. `parity_default_precision`: the parity check at the GPU's default matmul precision
   (reported, not required; skipped on the CPU, whose default is full float32).

`--mode tiny` runs the same stages on the CPU at a tiny scale (the CPU rehearsal). Writes
`device_check.json` to `--out` after every stage and prints a summary table at the end;
exits 0 only if parity at full precision passed and no stage that ran failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / ".device/fixtures"
MODELS = ("dare", "twin", "din")
# Every stage after `environment`, in the order they run (most important first).
STAGES = (
    "parity_full_precision",
    "loop_dare",
    "step_dare",
    "input_pipeline",
    "loop_twin",
    "step_twin",
    "loop_din",
    "step_din",
    "parity_default_precision",
)
TARGET_DARE_LOOP = 500_000  # samples/s, issue 11: DARE's whole loop on one H200
TARGET_LOOP_OVER_STEP = 1.5  # the whole loop within 1.5x of the bare step


@dataclasses.dataclass(frozen=True)
class Scale:
    """Arguments of each benchmark at one scale; `caps`: each stage's most seconds."""

    step: tuple[str, ...]
    loop: tuple[str, ...]
    input_pipeline: tuple[str, ...]
    caps: dict[str, float]


SCALES = {
    # Taobao scale: step_throughput's and configs/taobao_synthetic.py's defaults.
    "gpu": Scale(
        step=("--steps", "20", "--warmup", "3"),
        loop=("--steps", "300"),
        input_pipeline=("--batches", "50", "--threads", "1,2,4,8"),
        caps={"environment": 60, "parity": 100, "loop": 150, "step": 75, "input": 45},
    ),
    "tiny": Scale(
        step=(
            "--item-n", "20000", "--cate-n", "500", "--batch", "128", "--length", "20",
            "--steps", "2", "--warmup", "1",
        ),
        loop=(
            "--steps", "8",
            "--set", "data.synthetic_users=300", "--set", "data.min_item_rows=200000",
            "--set", "train.batch_size=64", "--set", "train.eval_batch_size=512",
            "--set", "data.max_length=20",
        ),
        input_pipeline=(
            "--batch", "64", "--length", "20", "--batches", "5", "--threads", "1,2",
        ),
        caps={"environment": 120, "parity": 300, "loop": 300, "step": 240, "input": 120},
    ),
}  # fmt: skip

CARRIED_MODULES = ("grain", "ml_collections", "tensorboardX", "array_record", "portpicker")
MACHINE_MODULES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy")
# Run as `python -c ENVIRONMENT SITE RESULT`; writes the environment as JSON to RESULT.
ENVIRONMENT = f"""
import importlib, importlib.metadata as md, json, os, sys
import jax
site, result = sys.argv[1], sys.argv[2]
packages = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "optax",
            "orbax-checkpoint", "numpy", "pyarrow", "tensorstore", "protobuf", "etils",
            "absl-py", "tqdm", "grain", "ml_collections", "array_record", "portpicker",
            "tensorboardX"]
versions = {{}}
for name in packages:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
files = {{name: importlib.import_module(name).__file__
         for name in {CARRIED_MODULES + MACHINE_MODULES!r}}}
misplaced = [name for name in {CARRIED_MODULES!r} if not files[name].startswith(site)]
misplaced += [name for name in {MACHINE_MODULES!r} if site and files[name].startswith(site)]
for name in ("dare_jax.train", "dare_jax.interop.check_parity", "configs.taobao_synthetic"):
    importlib.import_module(name)
from dare_jax import huge_pages
devices = jax.devices()
report = {{
    "python": sys.version.split()[0],
    "versions": versions,
    "imported_from": files,
    "misplaced": misplaced,
    "backend": jax.default_backend(),
    "devices": [f"{{d.platform}}:{{d.device_kind}}" for d in devices],
    "device_memory_limit_bytes": (devices[0].memory_stats() or {{}}).get("bytes_limit"),
    "memory": huge_pages.status(),
}}
open(result, "w").write(json.dumps(report))
print(json.dumps(report, indent=1))
"""


class Budget:
    """The seconds left of `total` since it was created."""

    def __init__(self, total: float) -> None:
        self.total, self.start = total, time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)


def run_stage(command: list[str], timeout: float, env: dict | None = None) -> tuple[str, float]:
    """Run `command` (its output goes to ours), killing its whole process group after
    `timeout` seconds; ("ok" | "failed (exit N)" | "timeout", seconds)."""
    shown = [arg if len(arg) < 200 else "<script>" for arg in command]
    print(f"$ {' '.join(shown)}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True
    )
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return f"timeout ({timeout:.0f} s)", time.monotonic() - started
    status = "ok" if code == 0 else f"failed (exit {code})"
    return status, time.monotonic() - started


class Check:
    """The stages and the JSON summary they fill."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.mode, self.scale = args.mode, SCALES[args.mode]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.site = args.site
        self.budget = Budget(args.budget)
        self.scratch = Path(tempfile.mkdtemp(prefix="dare_device_check_"))
        self.data_dir = self.scratch / "data"
        self.report: dict = {
            "mode": args.mode,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_seconds": args.budget,
            "source": _source(),
            "stages": {},
        }

    def save(self) -> None:
        (self.out / "device_check.json").write_text(json.dumps(self.report, indent=1))

    def stage(self, name: str, cap_key: str, command: list[str], env=None, result=None) -> None:
        """Run one stage if the budget allows; record its status, seconds and result (the
        JSON file `result` that the command wrote, when given)."""
        cap = self.scale.caps[cap_key]
        left = self.budget.left()
        print(f"\n== {name} (up to {min(cap, left):.0f} s; {left:.0f} s of the budget left, "
              f"{time.strftime('%H:%M:%S', time.gmtime())} UTC)", flush=True)
        if left < min(30.0, cap):
            self.report["stages"][name] = {"status": "skipped: out of time"}
            print("skipped: out of time", flush=True)
            self.save()
            return
        status, seconds = run_stage(command, min(cap, left), env)
        entry: dict = {"status": status, "seconds": round(seconds, 1)}
        if result is not None and Path(result).is_file():
            entry["result"] = json.loads(Path(result).read_text())
        self.report["stages"][name] = entry
        print(f"-- {name}: {status} in {seconds:.1f} s", flush=True)
        self.save()

    def environment(self) -> None:
        result = self.scratch / "environment.json"
        command = [sys.executable, "-c", ENVIRONMENT, self.site, str(result)]
        self.stage("environment", "environment", command, result=result)
        env = self.report["stages"]["environment"]
        found = env.get("result", {})
        if found.get("misplaced"):
            env["status"] = (
                f"failed: {found['misplaced']} not imported from where expected (carried "
                f"packages from the wheels in {self.site}, the rest from the machine)"
            )
        if self.mode == "gpu" and found and found.get("backend") != "gpu":
            env["status"] = "failed: JAX sees no GPU"
        if self.mode == "gpu":
            query = "name,memory.total,driver_version,clocks.max.sm"
            try:
                smi = subprocess.run(
                    ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                )
                env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            except OSError as error:
                env["nvidia_smi"] = str(error)
            print(env["nvidia_smi"], flush=True)
        self.save()

    def parity(self, name: str, precision: str | None) -> None:
        fixtures = sorted(str(p) for p in FIXTURES.glob("*.npz"))
        env = {"JAX_DEFAULT_MATMUL_PRECISION": precision} if precision else {}
        if not precision:
            os.environ.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
        command = [sys.executable, "-m", "dare_jax.interop.check_parity", *fixtures]
        if not fixtures:
            self.report["stages"][name] = {"status": f"failed: no fixtures in {FIXTURES}"}
            return
        self.stage(name, "parity", command, env=env)

    def loop(self, model: str) -> None:
        result = self.scratch / f"loop_{model}.json"
        command = [
            sys.executable, "benchmarks/training_loop.py", "--models", model,
            "--histories", "host,device", "--workdir", str(self.scratch / "runs"),
            "--compile-cache", str(self.scratch / "xla_cache"), "--json", str(result),
            "--set", f"data.dir={self.data_dir / 'preprocessed'}",
            "--set", f"data.raw_path={self.data_dir / 'UserBehavior_synthetic.csv'}",
            *self.scale.loop,
        ]  # fmt: skip
        self.stage(f"loop_{model}", "loop", command, result=result)
        shutil.rmtree(self.scratch / "runs", ignore_errors=True)  # GBs of checkpoints

    def step(self, model: str) -> None:
        result = self.scratch / f"step_{model}.json"
        command = [
            sys.executable, "benchmarks/step_throughput.py", "--models", model,
            "--variants", "row_sparse,dense,forward", "--json", str(result), *self.scale.step,
        ]  # fmt: skip
        self.stage(f"step_{model}", "step", command, result=result)

    def input_pipeline(self) -> None:
        result = self.scratch / "input_pipeline.json"
        if not (self.data_dir / "preprocessed/manifest.json").is_file():
            self.report["stages"]["input_pipeline"] = {"status": "skipped: no dataset"}
            return
        command = [
            sys.executable, "benchmarks/input_pipeline.py", "--data",
            str(self.data_dir / "preprocessed"), "--json", str(result),
            *self.scale.input_pipeline,
        ]  # fmt: skip
        self.stage("input_pipeline", "input", command, result=result)

    def run(self, selected: list[str]) -> int:
        self.environment()
        if self.report["stages"]["environment"]["status"] != "ok":
            return self.finish()
        stages = {
            "parity_full_precision": lambda: self.parity("parity_full_precision", "highest"),
            "input_pipeline": self.input_pipeline,
            "parity_default_precision": self.parity_default,
            **{f"loop_{m}": lambda m=m: self.loop(m) for m in MODELS},
            **{f"step_{m}": lambda m=m: self.step(m) for m in MODELS},
        }
        for name in STAGES:
            if name in selected:
                stages[name]()
        return self.finish()

    def parity_default(self) -> None:
        if self.mode == "gpu":
            self.parity("parity_default_precision", None)
            stage = self.report["stages"]["parity_default_precision"]
            if stage["status"].startswith("failed (exit 1)"):  # reported, not required
                stage["status"] = "ok: reported exit 1 (entries beyond 1e-4, or an error: log)"
                self.save()
        else:
            self.report["stages"]["parity_default_precision"] = {
                "status": "skipped: the CPU's default matmul precision is full float32"
            }

    def finish(self) -> int:
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.report["summary"] = summarize(self.report)
        self.report["seconds"] = round(self.budget.total - self.budget.left(), 1)
        self.save()
        print_summary(self.report)
        stages = self.report["stages"]
        failed = [n for n, s in stages.items() if not s["status"].startswith(("ok", "skipped"))]
        parity = stages.get("parity_full_precision", {"status": "ok"})["status"]  # if not run
        return 0 if parity == "ok" and not failed else 1


def _source() -> dict:
    source = {}
    prepared = REPO / ".device/source.json"
    if prepared.is_file():
        source["prepared"] = json.loads(prepared.read_text())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True)
        source["commit"] = head.stdout.decode().strip() or None
    except OSError:
        source["commit"] = None
    return source


def summarize(report: dict) -> dict:
    """The headline figures and the issue's targets (GPU only)."""
    stages = report["stages"]
    summary: dict = {
        "parity_full_precision": stages.get("parity_full_precision", {}).get("status"),
        "parity_default_precision": stages.get("parity_default_precision", {}).get("status"),
        "models": {},
    }
    for model in MODELS:
        figures: dict = {}
        step = stages.get(f"step_{model}", {}).get("result", {}).get("models", {}).get(model, {})
        for variant in ("row_sparse", "dense", "forward"):
            if variant in step:
                figures[f"step_{variant}_samples_per_s"] = round(step[variant]["samples_per_s"])
                figures[f"step_{variant}_compile_seconds"] = step[variant]["compile_seconds"]
        if "device_memory" in step:
            figures["step_device_peak_bytes"] = step["device_memory"]["peak_bytes_in_use"]
        for run in stages.get(f"loop_{model}", {}).get("result", {}).get("runs", []):
            if "error" in run:
                figures[f"loop_{run['histories']}_error"] = run["error"]
                continue
            prefix = f"loop_{run['histories']}"
            for key in ("steps_samples_per_s", "loop_samples_per_s", "run_samples_per_s"):
                figures[f"{prefix}_{key}"] = run[key]
            figures[f"{prefix}_compile_seconds"] = run["compile_seconds_total"]
            figures[f"{prefix}_device_peak_bytes"] = run.get("device_peak_bytes")
        summary["models"][model] = figures
    dare = summary["models"]["dare"]
    loops = [dare.get(f"loop_{h}_loop_samples_per_s") for h in ("host", "device")]
    best = max((x for x in loops if x), default=None)
    step = dare.get("step_row_sparse_samples_per_s")
    if report["mode"] == "gpu" and best:
        summary["targets"] = {
            "dare_loop_samples_per_s": best,
            "dare_loop_at_least_500k": best >= TARGET_DARE_LOOP,
            "dare_step_over_loop": round(step / best, 2) if step else None,
            "dare_loop_within_1.5x_of_step": bool(step) and step / best <= TARGET_LOOP_OVER_STEP,
        }
    return summary


def print_summary(report: dict) -> None:
    print("\n== summary (samples/s; compile seconds excluded)")
    for name, stage in report["stages"].items():
        print(f"  {name:28s} {stage['status']}  {stage.get('seconds', '')}")
    header = ("model", "step", "step dense", "forward", "loop host", "loop device",
              "run host", "run device")  # fmt: skip
    print("  " + " ".join(f"{h:>11s}" for h in header))
    for model, f in report["summary"]["models"].items():
        cells = [f.get(k) for k in (
            "step_row_sparse_samples_per_s", "step_dense_samples_per_s",
            "step_forward_samples_per_s", "loop_host_loop_samples_per_s",
            "loop_device_loop_samples_per_s", "loop_host_run_samples_per_s",
            "loop_device_run_samples_per_s")]  # fmt: skip
        print("  " + f"{model:>11s} " + " ".join(
            f"{c:11.0f}" if isinstance(c, (int, float)) else f"{'-':>11s}" for c in cells))
    if "targets" in report["summary"]:
        print(f"  targets: {json.dumps(report['summary']['targets'])}")
    print(f"  total {report['seconds']} s; every figure: device_check.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(SCALES), default="gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--site", default="", help="where the carried wheels were installed")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for every stage")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}"
    )
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(STAGES))
    if unknown:
        parser.error(f"unknown --stages {unknown}; known: {', '.join(STAGES)}")
    return Check(args).run(selected)


if __name__ == "__main__":
    sys.exit(main())
