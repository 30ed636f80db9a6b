"""The official PyTorch training step and ours, timed side by side on the same batches.

Needs a checkout of the official code, outside this project (any checkout path will do):

    git clone https://github.com/thuml/DARE /tmp/official_dare

and a Python with torch and numpy (torch is not a dependency of this project):

    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy

Then, from the repository root, with this project's venv (the defaults shown: Taobao scale,
the paper's setup: d 16, top-20 soft search, TR and aux loss, batch 2048, L 200):

    python benchmarks/vs_official.py --official /tmp/official_dare \\
        --torch-python /tmp/torch/bin/python [--models dare,twin,din] \\
        [--variants row_sparse,lazy] [--batch 2048] [--length 200] [--items 4068791] \\
        [--categories 9408] [--steps 5] [--warmup 2] [--rounds 2] [--threads ALL_CORES] \\
        [--allocator both|default|hugepages] [--seed 0]

Random batches are generated once (numpy, `--seed`) into an .npz that every child loads:
uniform item ids, each item's category fixed by a random item -> category map, a third of
the rows' histories left-padded with zeros, one click in three, targets one-hot as the
official loader gives them. Each measurement is a child process pinned to the first
`--threads` cores (`sched_setaffinity`; torch also gets `set_num_threads`):

* official: `train_pytorch.get_args()` on the flags of the model's line in the checkout's
  `scripts/taobao.sh` (sizes replaced by ours), `create_model`, the normal(0, 0.01) init and
  `torch.optim.Adam` of `train()`, then one loop iteration of `train()`: forward in train
  mode (ctr + aux loss), the L2 penalty on non-bias, non-embedding parameters, backward,
  Adam step, `loss.item()`;
* ours: the step `python -m dare_jax.main --config configs/taobao.py:model=M` builds
  (`dare_jax.experiment.compile_steps`) with `optim.table_updates` = each `--variants` value;
  batches are jax arrays before timing and every timed step ends in `jax.block_until_ready`.

Children alternate (official, ours per variant, official, ...) for `--rounds` rounds per
model and allocator setting; `--allocator both` measures everything without and with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. Each child reports the median of `--steps` steps
after `--warmup` (the first includes our compilation), its first loss and a checksum of
the batches it trained on; the parent adds its peak RSS (`wait4`). Printed: the machine and
load, one markdown table per setting (medians over rounds) and, last, one JSON line with
every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from child_process import run_measured  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
OFFICIAL_NAMES = {"dare": "DARE", "twin": "twin", "din": "DIN"}  # official -model_name
SCRIPT_HEADERS = {"dare": "# DARE", "twin": "# TWIN", "din": "# DIN"}  # in scripts/taobao.sh
HUGEPAGES = "glibc.malloc.hugetlb=1"
CHECKED_KEYS = ("iid", "cid", "hist_iid", "hist_cid", "label")
TABLE_UPDATES = ("dense", "row_sparse", "lazy")  # config optim.table_updates


def make_batches(args: argparse.Namespace, path: Path) -> str:
    """Write warmup + steps batches, official layout (int64 ids, one-hot target); return
    the checksum of their contents."""
    rng = np.random.default_rng(args.seed)
    n, b, length = args.warmup + args.steps, args.batch, args.length
    category_of = rng.integers(1, args.categories, size=args.items)
    category_of[0] = 0  # padding
    iid = rng.integers(1, args.items, size=(n, b))
    hist_iid = rng.integers(1, args.items, size=(n, b, length))
    kept = rng.integers(1, length + 1, size=(n, b))  # behaviours kept in a padded row
    padded = rng.random((n, b)) < 1 / 3
    hist_iid[padded[..., None] & (np.arange(length) < (length - kept)[..., None])] = 0
    label = (rng.random((n, b)) < 1 / 3).astype(np.int64)
    arrays = {
        "uid": rng.integers(1, 1_000_000, size=(n, b)),
        "iid": iid,
        "cid": category_of[iid],
        "hist_iid": hist_iid,
        "hist_cid": category_of[hist_iid],
        "target": np.stack([label, 1 - label], axis=-1),  # [1, 0]: click (column 0)
    }
    np.savez(path, **arrays)
    checked = {**arrays, "label": label}
    return checksum(checked[k][i] for i in range(n) for k in CHECKED_KEYS)


def checksum(arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(np.asarray(array), dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def time_steps(step, batches: list, args: argparse.Namespace) -> dict:
    """Run warmup + steps steps (batch i for step i); the timed ones' median and more."""
    durations, first_loss = [], None
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = step(batch)
        durations.append(time.perf_counter() - start)
        first_loss = float(loss) if i == 0 else first_loss
    timed = durations[args.warmup :]
    median = statistics.median(timed)
    return {
        "samples_per_s": args.batch / median,
        "median_step_s": median,
        "step_s": timed,
        "first_step_s": durations[0],
        "first_loss": first_loss,
    }


def taobao_flags(checkout: str, model: str, args: argparse.Namespace) -> list[str]:
    """The flags of `model`'s line in scripts/taobao.sh, sizes replaced by ours, seed 1."""
    lines = (Path(checkout) / "scripts" / "taobao.sh").read_text().splitlines()
    words = shlex.split(lines[lines.index(SCRIPT_HEADERS[model]) + 1])
    words = words[words.index("train_pytorch.py") + 1 :]
    replaced = {
        "-max_length": args.length,
        "-item_n": args.items,
        "-cate_n": args.categories,
        "-batch_size": args.batch,
        "-long_seq_split": f"0:{args.length}",
        "-seed": 1,
    }
    for flag, value in replaced.items():
        start = stop = words.index(flag) + 1
        while stop < len(words) and not words[stop].startswith("-"):
            stop += 1
        words[start:stop] = [str(value)]
    return words


def official_child(args: argparse.Namespace, data: dict) -> dict:
    sys.path.insert(0, args.official)
    sys.argv = ["train_pytorch.py", *taobao_flags(args.official, args.model, args)]
    import torch
    import train_pytorch  # the official script (its functions; main() is not run)

    torch.set_num_threads(args.threads)
    targs = train_pytorch.get_args()
    assert targs.model_name == OFFICIAL_NAMES[args.model], targs.model_name
    train_pytorch.setup_seed(targs.seed[0])
    model = train_pytorch.create_model(targs.long_model_type, targs)
    for name, param in model.named_parameters():  # as train() initialises
        if "bias" not in name:
            torch.nn.init.normal_(param, mean=0.0, std=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=targs.learning_rate)
    model.train()
    # The dicts dataset.SeqRecDataset.__next__ yields.
    hist_tid = np.repeat([[targs.max_length - x for x in range(targs.max_length)]], args.batch, 0)
    batches = [
        {
            **{k: data[k][i] for k in ("uid", "iid", "cid", "hist_iid", "hist_cid", "target")},
            "tid": np.zeros(data["iid"][i].shape, dtype=np.int32),
            "hist_tid": hist_tid,
            "mask": np.greater(data["hist_iid"][i], 0).astype(np.float32),
        }
        for i in range(len(data["iid"]))
    ]

    def step(batch_data):  # one iteration of train()'s loop (use_aux_loss is True)
        torch.tensor(batch_data["target"], dtype=torch.int32)  # train()'s `target`
        _, loss, aux_loss = model.forward(batch_data)
        l2_penalty_loss = 0.0
        for param_name, param in model.named_parameters():
            if "bias" not in param_name and "embedding" not in param_name:
                l2_penalty_loss += torch.sum(torch.pow(param, 2))
        loss += targs.weight_decay * l2_penalty_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        aux_loss.item()
        return loss.item()

    result = time_steps(step, batches, args)
    for batch in batches:
        batch["label"] = batch["target"][:, 0]  # [1, 0] is a click
    result["batch_checksum"] = checksum(b[k] for b in batches for k in CHECKED_KEYS)
    return {**result, "flags": sys.argv[1:], "torch_threads": torch.get_num_threads()}


def ours_child(args: argparse.Namespace, data: dict) -> dict:
    import dataclasses

    import jax

    from configs import taobao
    from dare_jax import config, experiment

    spec = config.resolve(taobao.get_config(f"model={args.model}"))
    optim_spec = dataclasses.replace(spec.optim, table_updates=args.variant)
    tables = experiment.Tables(args.items, args.categories, args.items, args.categories)
    data["label"] = data["target"][..., 0]  # the dataset's int32 label: 1 is a click
    numpy_batches = [
        {k: data[k][i].astype(np.int32) for k in ("uid", *CHECKED_KEYS)}
        for i in range(len(data["iid"]))
    ]
    shapes = tuple((k, v.shape, v.dtype.str) for k, v in sorted(numpy_batches[0].items()))
    compiled = experiment.compile_steps(
        spec.model, optim_spec, spec.mesh, tables, args.length, shapes
    )
    sharding = experiment.partitioner_for(spec.mesh).batch_sharding
    batches = [jax.device_put(b, sharding) for b in numpy_batches]
    init_rng, step_rng = np.asarray(jax.random.split(jax.random.PRNGKey(spec.train.first_seed)))
    box = {"state": compiled.init_state(init_rng, numpy_batches[0], step_rng)}
    jax.block_until_ready(box["state"])

    def step(batch):
        box["state"], metrics = compiled.train_step(box["state"], batch)
        jax.block_until_ready((box["state"], metrics))
        return metrics["total"]

    result = time_steps(step, batches, args)
    result["batch_checksum"] = checksum(np.asarray(b[k]) for b in batches for k in CHECKED_KEYS)
    return {**result, "model_spec": repr(spec.model), "optim": repr(optim_spec)}


def child_main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, [int(c) for c in args.cores.split(",")])  # before torch / jax load
    with np.load(args.npz) as npz:
        data = {k: npz[k] for k in npz.files}
    result = (official_child if args.child == "official" else ours_child)(args, data)
    result.update(
        cpus=sorted(os.sched_getaffinity(0)), glibc_tunables=os.environ.get("GLIBC_TUNABLES")
    )
    Path(args.result).write_text(json.dumps(result))


def run_child(args, side: str, model: str, setting: str, cores: str, tmp: Path) -> dict:
    name = f"{setting}-{model}-{side}-{time.monotonic_ns()}"
    python = args.torch_python if side == "official" else sys.executable
    options = {
        "child": "official" if side == "official" else "ours",
        "variant": side,
        "model": model,
        "npz": tmp / "batches.npz",
        "result": tmp / f"{name}.json",
        "cores": cores,
        **{k: getattr(args, k) for k in ("official", "batch", "length", "items", "categories")},
        **{k: getattr(args, k) for k in ("steps", "warmup", "threads")},
    }
    command = [python, __file__, *(f"--{k}={v}" for k, v in options.items())]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if setting == "hugepages":
        env["GLIBC_TUNABLES"] = HUGEPAGES
    with open(tmp / f"{name}.log", "w") as log:
        measured = run_measured(command, cwd=REPO, env=env, output=log)
    if measured["exit_code"] != 0:
        print((tmp / f"{name}.log").read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"the {side} child for {model} ({setting}) failed")
    result = json.loads((tmp / f"{name}.json").read_text())
    result.update(side=side, model=model, setting=setting, wall_s=measured["wall_s"])
    result["peak_rss_bytes"] = measured["peak_rss_bytes"]
    print(
        f"  {setting:9s} {model:4s} {side:10s} {result['samples_per_s']:9,.0f} samples/s "
        f"(median step {1000 * result['median_step_s']:8.1f} ms, first loss "
        f"{result['first_loss']:.4f}, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB)",
        flush=True,
    )
    return result


def print_table(setting: str, models: list, variants: list, runs: list) -> dict:
    """Print one allocator setting's markdown table; {model: {side: median samples/s}}."""
    sides = ("official", *variants)
    tunables = HUGEPAGES if setting == "hugepages" else "unset"
    print(
        f"\nallocator {setting} (GLIBC_TUNABLES {tunables}): samples/s, medians over rounds\n\n"
        "| model | official | "
        + " | ".join(f"ours {v} | ratio" for v in variants)
        + " | peak RSS GiB, official / "
        + " / ".join(variants)
        + " |\n"
        + "|---" * (2 * len(variants) + 3)
        + "|"
    )
    summary = {}
    for model in models:
        mine = [r for r in runs if (r["setting"], r["model"]) == (setting, model)]
        row = {
            s: statistics.median(r["samples_per_s"] for r in mine if r["side"] == s) for s in sides
        }
        rss = [max(r["peak_rss_bytes"] for r in mine if r["side"] == s) / 2**30 for s in sides]
        print(
            f"| {model} | {row['official']:,.0f} | "
            + " | ".join(f"{row[v]:,.0f} | {row[v] / row['official']:.1f}x" for v in variants)
            + " | "
            + " / ".join(f"{x:.2f}" for x in rss)
            + " |"
        )
        summary[model] = row
    return summary


def machine() -> dict:
    """CPU model, core count and memory, from /proc."""
    with open("/proc/cpuinfo") as cpuinfo, open("/proc/meminfo") as meminfo:
        cpu = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        kib = [int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")]
    return {
        "cpu": cpu[0] if cpu else "unknown",
        "cores": os.cpu_count(),
        "memory_gib": round(kib[0] / 2**20, 1),
    }


def versions(torch_python: str) -> dict:
    found = {p: metadata.version(p) for p in ("jax", "jaxlib", "flax")}
    found["torch"] = subprocess.run(
        [torch_python, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of thuml/DARE")
    parser.add_argument("--torch-python", help="a Python with torch and numpy")
    parser.add_argument("--models", default="dare,twin,din")
    parser.add_argument("--variants", default="row_sparse,lazy", help="optim.table_updates values")
    for flag, default in (
        ("batch", 2048),
        ("length", 200),
        ("items", 4_068_791),
        ("categories", 9_408),
        ("steps", 5),
        ("warmup", 2),
        ("rounds", 2),
        ("threads", len(os.sched_getaffinity(0))),
        ("seed", 0),
    ):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--allocator", choices=("both", "default", "hugepages"), default="both")
    for hidden in ("child", "model", "variant", "npz", "result", "cores"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if not args.torch_python or not (Path(args.official) / "train_pytorch.py").exists():
        parser.error("--official must be a thuml/DARE checkout and --torch-python is required")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step compiles ours)")
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    if set(models) - set(OFFICIAL_NAMES) or set(variants) - set(TABLE_UPDATES):
        parser.error(f"--models from {list(OFFICIAL_NAMES)}, --variants from {TABLE_UPDATES}")
    settings = ("default", "hugepages") if args.allocator == "both" else (args.allocator,)
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.threads])
    report = {
        "machine": machine(),
        "load_before": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "versions": versions(args.torch_python),
        "threads": args.threads,
        "cores": cores,
        "official_commit": subprocess.run(
            ["git", "-C", args.official, "rev-parse", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "setup": {k: v for k, v in vars(args).items() if v is not None},
    }
    m = report["machine"]
    print(
        f"{report['date_utc']} UTC; {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"load average before {' '.join(f'{x:.2f}' for x in report['load_before'])}\n"
        f"{' '.join(f'{k} {v}' for k, v in report['versions'].items())}; threads "
        f"{args.threads} (cores {cores}); official commit {report['official_commit'][:12]}\n"
        f"batch {args.batch}, L {args.length}, items {args.items}, categories "
        f"{args.categories}; {args.steps} timed steps after {args.warmup}; {args.rounds} "
        f"round(s); allocator {', '.join(settings)}",
        flush=True,
    )
    if report["load_before"][0] >= 1.0:
        print(
            "warning: other processes are running (load average above 1): the figures will "
            "be noisy, and multi-threaded steps suffer most from descheduled threads"
        )
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        report["batch_checksum"] = make_batches(args, Path(tmp) / "batches.npz")
        for setting in settings:
            for model in models:
                for _ in range(args.rounds):
                    for side in ("official", *variants):
                        runs.append(run_child(args, side, model, setting, cores, Path(tmp)))
    report["load_after"] = os.getloadavg()
    print(f"load average after {' '.join(f'{x:.2f}' for x in report['load_after'])}")
    summary = {setting: print_table(setting, models, variants, runs) for setting in settings}
    print(json.dumps({**report, "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
