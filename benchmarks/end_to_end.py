"""The paper's experiment end to end at Taobao size: generate, preprocess, train DARE and TWIN.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/end_to_end.py
        --root /work/scratch/e2e                             # full size (defaults)
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/end_to_end.py
        --root /tmp/e2e_small --users 3000 --rows 1200000    # rehearsal

Steps, each in a child process (with this process's environment, the allocator setting
included) so that its peak RSS is its own (`wait4`: the kernel's high-water mark), each
skipped when its output exists (rerun the command after a kill: the data is generated once,
a finished model is not trained again, an interrupted one resumes from its checkpoints
through the driver's own resume):

1. generation: `python -m preprocessing.synthetic` writes a synthetic Taobao-format log
   (`--users`, `--rows`; the defaults give an item table of >= 4 M rows and >= 5 M training
   samples: the manifest's item_n and train count are printed and checked);
2. preprocessing: `python -m preprocessing.taobao` (the paper's protocol);
3. per model (`--models`, default dare,twin) and table update (`--table-updates`, default
   row_sparse: the paper's Adam; lazy: only the looked-up rows move): `python -m
   dare_jax.main --config configs/taobao.py:model=M,seeds=1
   --config.optim.table_updates=U` with the paper's setup (2 epochs, batch 2048,
   validation and checkpoints every 150 steps, the best checkpoint tested, its tables
   exported), one seed, into `runs/<M>_<U>`.

The report splits each run's wall time with the driver's own phase timings (`timings` of
results.json and of the seed's result.json, `dare_jax/phase_timer.py`): compilation (the XLA
compile seconds of every phase), training (train steps and input waits, compilation
excluded), evaluation, checkpoints (the time the loop stalls for them, and the wait for the
last write), export, start-up (from the process's start to the driver's), data opening,
setup (model and steps), seed init (state creation or restore) and finish (provenance,
results); `other` is the wall time none of them covers. Also: the share of the wall time
outside training, training samples/s, the child's peak RSS, the size on disk of the
checkpoints and of the exported tables, and the test AUC. A run that needed several
invocations (killed and resumed) is reported for its last invocation only, and marked so.
Everything is also written to `<root>/report.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from child_process import run_measured  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
TAOBAO_ITEM_ROWS = 4_000_000
TAOBAO_TRAIN_SAMPLES = 5_000_000


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_child(command: list[str], log_path: Path) -> dict:
    """Run `command` from the repository root, output appended to `log_path`; wall seconds,
    peak RSS and CPU seconds of the child, load average before and after. Exits on failure."""
    before = load_average()
    print(f"$ {' '.join(command)}  (output: {log_path})", flush=True)
    with open(log_path, "a") as log:
        result = run_measured(command, cwd=REPO, output=log)
    if result["exit_code"] != 0:
        raise SystemExit(
            f"failed with exit code {result['exit_code']}: {' '.join(command)}; see {log_path}"
        )
    return {
        "wall_s": round(result["wall_s"], 1),
        "peak_rss_bytes": result["peak_rss_bytes"],
        "cpu_s": round(result["user_s"] + result["sys_s"], 1),
        "load_before": before,
        "load_after": load_average(),
    }


def step_once(name: str, done: bool, record: Path, command: list[str], log: Path) -> dict:
    """Run a data step unless its output exists; its measurements are kept in `record`."""
    if done and record.is_file():
        print(f"{name}: exists, skipped (measured earlier)", flush=True)
        return json.loads(record.read_text())
    measured = run_child(command, log)
    record.write_text(json.dumps(measured, indent=2) + "\n")
    return measured


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def train_model(
    model: str, updates: str, root: Path, data_dir: Path, raw: Path, extra: list[str]
) -> dict:
    """Train one seed of `model` with the table updates `updates` (or skip a finished run);
    its measurements and results."""
    name = f"{model}_{updates}"
    workdir = root / "runs" / name
    record = root / "runs" / f"{name}.bench.json"
    invocations = json.loads(record.read_text())["invocations"] if record.is_file() else []
    if not (workdir / "results.json").is_file():
        command = [
            sys.executable,
            "-m",
            "dare_jax.main",
            "--config",
            f"configs/taobao.py:model={model},seeds=1",
            f"--config.data.dir={data_dir}",
            f"--config.data.raw_path={raw}",
            f"--config.workdir={workdir}",
            f"--config.optim.table_updates={updates}",
            "--config.log.progress_bar=false",
            *extra,
        ]
        workdir.parent.mkdir(parents=True, exist_ok=True)
        invocations.append(run_child(command, root / "runs" / f"{name}.log"))
        record.write_text(json.dumps({"invocations": invocations}, indent=2) + "\n")
    else:
        print(f"{name}: finished run, skipped (measured earlier)", flush=True)
    results = json.loads((workdir / "results.json").read_text())
    seed = results["seeds"][0]
    return {
        "model": name,
        "workdir": str(workdir),
        "invocations": invocations,
        "run_timings": results.get("timings"),
        "seed_timings": seed.get("timings"),
        "steps": seed["steps"],
        "best_step": seed["best_step"],
        "test": seed["test"],
        "checkpoint_bytes": directory_bytes(workdir / f"seed_{seed['seed']}" / "checkpoints"),
        "export_bytes": directory_bytes(workdir / f"seed_{seed['seed']}" / "embeddings"),
        "commit": ((results.get("provenance") or {}).get("code") or {}).get("commit"),
    }


def phase_split(model: dict) -> dict:
    """Wall seconds of the last invocation by phase, compilation taken out of every phase."""
    seed, run = model["seed_timings"], model["run_timings"]

    def work(timings: dict, *phases: str) -> float:
        return sum(timings["seconds"].get(p, 0.0) - timings["compile_seconds"].get(p, 0.0)
                   for p in phases)

    run_compile = sum(s for p, s in run["compile_seconds"].items() if p != "seeds")
    split = {
        "training": work(seed, "train_steps", "input"),
        "compilation": sum(seed["compile_seconds"].values()) + run_compile,
        "evaluation": work(seed, "eval"),
        "checkpoints": work(seed, "checkpoint"),
        "export": work(seed, "export"),
        "startup": run["seconds"].get("startup", 0.0),
        "data": work(run, "prepare_data"),
        "setup": work(run, "setup"),
        "init": work(seed, "init"),
        # The run's "seeds" phase beyond the seed's own phases, and the results.
        "finish": work(seed, "finish") + work(run, "finish")
        + run["seconds"].get("seeds", 0.0) - seed["total_seconds"],
    }
    wall = model["invocations"][-1]["wall_s"] if model["invocations"] else None
    split["other"] = None if wall is None else wall - sum(split.values())
    split["wall"] = wall
    return split


def _child_text(measured: dict) -> str:
    return (
        f"{measured['wall_s']} s wall, {measured['cpu_s']} s CPU, peak RSS "
        f"{measured['peak_rss_bytes'] / GIB:.2f} GiB (load {measured['load_before']} -> "
        f"{measured['load_after']})"
    )


def markdown(report: dict) -> str:
    data = report["data"]
    lines = [
        f"Data: {data['users']:,} users, {data['rows']:,} rows; item_n {data['item_n']:,}, "
        f"cate_n {data['cate_n']:,}; samples train / val / test {data['train']:,} / "
        f"{data['val']:,} / {data['test']:,} (Taobao size: {data['taobao_size']})",
        f"Generation: {_child_text(data['generate'])}; "
        f"preprocessing: {_child_text(data['preprocess'])}",
        "",
        "| run | wall | training | compilation | evaluation | checkpoints | export | start-up "
        "| data | setup | init | finish | other | outside training | samples/s (training) "
        "| peak RSS | checkpoints on disk | test AUC | load before -> after |",
        "|---" * 19 + "|",
    ]
    phases = ("training", "compilation", "evaluation", "checkpoints", "export", "startup",
              "data", "setup", "init", "finish", "other")
    for model in report["models"]:
        split = model["split"]
        last = model["invocations"][-1] if model["invocations"] else {}
        resumed = " (last of several invocations)" if len(model["invocations"]) > 1 else ""
        samples = model["seed_timings"]["samples_timed"]
        wall = split["wall"]
        cells = [model["model"] + resumed, f"{wall:.0f} s" if wall else "n/a"]
        cells += [f"{split[p]:.0f} s" if split[p] is not None else "n/a" for p in phases]
        cells += [
            f"{1 - split['training'] / wall:.1%}" if wall else "n/a",
            f"{samples / split['training']:,.0f}" if split["training"] > 0 else "n/a",
            f"{last.get('peak_rss_bytes', 0) / GIB:.2f} GiB",
            f"{model['checkpoint_bytes'] / GIB:.2f} GiB",
            f"{model['test']['auc']:.5f}",
            f"{last.get('load_before', '?')} -> {last.get('load_after', '?')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Machine: {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM; code: "
        + ", ".join(f"{m['model']} at {m['commit'] or 'unknown commit'}" for m in report["models"])
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True,
                        help="folder for the log, the dataset and the runs (outside the repo)")
    # 100,000 users of about 560 rows: ~93 % have the protocol's 210 pv events (57 training
    # samples each: ~5.3 M), and 56 M rows visit ~4.4 M of the 4.5 M-item catalogue.
    parser.add_argument("--users", type=int, default=100_000, help="users of the synthetic log")
    parser.add_argument("--rows", type=int, default=56_000_000, help="rows of the synthetic log")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--models", default="dare,twin", help="comma-separated variants")
    parser.add_argument("--table-updates", default="row_sparse",
                        help="comma-separated optim.table_updates kinds (row_sparse,lazy,dense)")
    parser.add_argument("--set", action="append", default=[], metavar="--config.X=Y",
                        help="extra driver flag for every model (e.g. --set=--config.train."
                        "max_steps=300)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    raw, data_dir = root / "UserBehavior.csv", root / "preprocessed"
    generate = step_once(
        "generation",
        raw.is_file(),
        root / "generate.json",
        [sys.executable, "-m", "preprocessing.synthetic", "--output", str(raw), "--users",
         str(args.users), "--rows", str(args.rows), "--seed", str(args.seed), "--overwrite"],
        root / "generate.log",
    )
    preprocess = step_once(
        "preprocessing",
        (data_dir / "manifest.json").is_file(),
        root / "preprocess.json",
        [sys.executable, "-m", "preprocessing.taobao", "--input", str(raw), "--output",
         str(data_dir), "--overwrite", "--no-progress"],
        root / "preprocess.log",
    )
    manifest = json.loads((data_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    taobao_size = manifest["item_n"] >= TAOBAO_ITEM_ROWS and counts["train"] >= TAOBAO_TRAIN_SAMPLES
    data = {
        "users": args.users,
        "rows": args.rows,
        "item_n": manifest["item_n"],
        "cate_n": manifest["cate_n"],
        **counts,
        "taobao_size": "yes" if taobao_size else "NO (item_n >= 4 M and train >= 5 M needed)",
        "generate": generate,
        "preprocess": preprocess,
    }
    print(f"dataset: item_n {data['item_n']:,}, train samples {counts['train']:,}: "
          f"Taobao size {data['taobao_size']}", flush=True)
    models = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for updates in [u.strip() for u in args.table_updates.split(",") if u.strip()]:
            entry = train_model(model, updates, root, data_dir, raw, args.set)
            entry["split"] = phase_split(entry)
            models.append(entry)
    report = {"data": data, "models": models, "load_now": load_average()}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
