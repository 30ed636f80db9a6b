"""Efficiency (paper Section 4.4, SPEC 5.6): search time and test AUC versus the attention
embedding dimension, for DARE (whose attention tables can be narrower than its representation
tables) and TWIN.

For each run: its attention width (item + category + time attention dims, from `config.json`)
and its test AUC (mean and std over seeds, from `results.json`). Search time is measured, not
modelled: the jit-compiled first stage of the models (`dare_jax.models.search`: scaled
dot-product scores of a `[B, D]` query against `[B, L, D]` keys, split into the semantic and the
time part, then `jax.lax.top_k`) on random inputs of each attention width, median of
`repeats` timed calls after a warm-up, on the default JAX device.

Outputs (in --out): `efficiency.json` (per run: family, attention dims, AUC; per width: the
measured milliseconds per batch and the device), `efficiency.png` (AUC vs width per family;
search time vs width).

    python -m analysis.efficiency --run DARE=runs/taobao/dare --run DARE-32=runs/taobao/dare_attn8 \
        --run TWIN=runs/taobao/twin --out out/efficiency
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis import common

FIELDS = ("item", "category", "time")


def attention_dims(flat: dict, source: str = "config.json") -> dict[str, int]:
    """{field: attention width} of a run's model config (-1 means the representation width)."""
    dims = {}
    for field in FIELDS:
        key, rep_key = f"model.attention_{field}_embedding_dim", f"model.{field}_embedding_dim"
        if rep_key not in flat:
            raise common.AnalysisError(f"{source} lacks the field {rep_key}")
        value = int(flat.get(key, -1))
        dims[field] = int(flat[rep_key]) if value == -1 else value
    if not flat.get("model.use_time", True):
        dims["time"] = 0
    return dims


def measure_search_time(
    semantic_dim: int,
    time_dim: int,
    *,
    batch_size: int = 2048,
    length: int = 200,
    top_k: int = 20,
    repeats: int = 20,
    seed: int = 0,
) -> float:
    """Median wall milliseconds of one jitted search (scores + top-k) over `[B, L]` histories
    with attention vectors of `semantic_dim + time_dim` entries."""
    import jax
    import jax.numpy as jnp

    from dare_jax.models import search

    width = semantic_dim + time_dim
    split = time_dim if time_dim > 0 else None
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    query = jax.random.normal(keys[0], (batch_size, width), jnp.float32)
    behaviours = jax.random.normal(keys[1], (batch_size, length, width), jnp.float32)

    @jax.jit
    def first_stage(q, k):
        scores = search.dot_product_scores(q, k, split)
        return jax.lax.top_k(scores, top_k)

    jax.block_until_ready(first_stage(query, behaviours))  # compile + warm up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(first_stage(query, behaviours))
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000.0)


def run_summary(run_dir: str | Path) -> dict:
    """Family (model name), attention dims and test AUC (mean, std, seeds) of a finished run."""
    run_dir = Path(run_dir)
    flat = common.run_config(run_dir)
    results = common.read_json(
        run_dir / "results.json",
        "results file (results.json, written when every seed has finished)",
    )
    try:
        auc_mean, auc_std = float(results["mean"]["auc"]), float(results["std"]["auc"])
    except (KeyError, TypeError) as error:
        raise common.AnalysisError(f"{run_dir / 'results.json'} lacks mean/std auc") from error
    dims = attention_dims(flat, str(run_dir / "config.json"))
    return {
        "run_dir": str(run_dir),
        "family": str(flat.get("model.name", "?")),
        "variant": flat.get("variant"),
        "attention_dims": dims,
        "attention_width": int(sum(dims.values())),
        "representation_width": int(sum(int(flat[f"model.{f}_embedding_dim"]) for f in FIELDS)),
        "test_auc_mean": auc_mean,
        "test_auc_std": auc_std,
        "seeds": len(results.get("seeds", [])),
    }


def efficiency(
    runs: dict[str, Path],
    out_dir: str | Path,
    *,
    batch_size: int = 2048,
    length: int | None = None,
    top_k: int | None = None,
    repeats: int = 20,
    extra_widths: Sequence[int] = (),
    progress: bool = True,
) -> dict:
    """AUC and measured search time vs attention width; writes JSON + PNG.

    length / top_k default to the first run's data.max_length / model.top_k. extra_widths:
    more attention widths to time (split 2:1 semantic:time like the default dims).
    """
    import jax
    from tqdm import tqdm

    if not runs:
        raise common.AnalysisError("no run given")
    summaries = {name: run_summary(path) for name, path in runs.items()}
    first = common.run_config(next(iter(runs.values())))
    length = int(length or first.get("data.max_length", 200))
    top_k = int(top_k or first.get("model.top_k", 20))
    shapes = {
        (s["attention_dims"]["item"] + s["attention_dims"]["category"], s["attention_dims"]["time"])
        for s in summaries.values()
    }
    for width in extra_widths:
        time_dim = max(1, int(width) // 3)
        shapes.add((int(width) - time_dim, time_dim))
    timings = []
    for semantic, time_dim in tqdm(
        sorted(shapes, key=sum), desc="timing search", disable=not progress, leave=False
    ):
        ms = measure_search_time(
            semantic,
            time_dim,
            batch_size=batch_size,
            length=length,
            top_k=min(top_k, length),
            repeats=repeats,
        )
        timings.append(
            {
                "attention_width": semantic + time_dim,
                "semantic_dim": semantic,
                "time_dim": time_dim,
                "milliseconds": ms,
            }
        )
    device = jax.devices()[0]
    report = {
        "runs": summaries,
        "search_time": timings,
        "timing": {
            "batch_size": batch_size,
            "length": length,
            "top_k": top_k,
            "repeats": repeats,
            "statistic": "median",
            "device": f"{device.platform}:{device.device_kind}",
        },
    }
    fig, (left, right) = common.plt.subplots(1, 2, figsize=(10, 4))
    families = sorted({s["family"] for s in summaries.values()})
    for index, family in enumerate(families):
        members = sorted(
            (s for s in summaries.values() if s["family"] == family),
            key=lambda s: s["attention_width"],
        )
        widths = [s["attention_width"] for s in members]
        left.errorbar(
            widths,
            [s["test_auc_mean"] for s in members],
            yerr=[s["test_auc_std"] for s in members],
            marker="o",
            capsize=3,
            color=f"C{index}",
            label=family,
        )
    for name, s in summaries.items():
        left.annotate(
            name,
            (s["attention_width"], s["test_auc_mean"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    left.set(
        xlabel="attention vector width (item + category + time)",
        ylabel="test AUC",
        title="AUC vs attention width",
    )
    right.plot(
        [t["attention_width"] for t in timings], [t["milliseconds"] for t in timings], marker="o"
    )
    right.set(
        xlabel="attention vector width",
        ylabel="ms per batch (median)",
        title=f"search time, B={batch_size}, L={length}, top-{top_k}, {report['timing']['device']}",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    out_dir = Path(out_dir)
    common.save_figure(fig, out_dir / "efficiency.png")
    common.write_json(out_dir / "efficiency.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.efficiency", description=__doc__.split("\n\n")[0]
    )
    common.add_run_argument(parser, "NAME=RUN_DIR of a finished run (repeat)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--extra-widths", type=int, nargs="*", default=[])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = efficiency(
        common.parse_named_runs(args.run),
        args.out,
        batch_size=args.batch_size,
        length=args.length,
        top_k=args.top_k,
        repeats=args.repeats,
        extra_widths=args.extra_widths,
        progress=not args.no_progress,
    )
    for name, s in report["runs"].items():
        print(
            f"{name}: attention width {s['attention_width']}, test AUC "
            f"{s['test_auc_mean']:.5f} +- {s['test_auc_std']:.5f}"
        )
    for t in report["search_time"]:
        print(f"width {t['attention_width']}: {t['milliseconds']:.3f} ms per batch")
    print(f"written to {args.out}")


if __name__ == "__main__":
    raise SystemExit(common.run_cli(main))
