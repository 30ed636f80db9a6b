"""Training-step throughput and memory for long histories: DIN, TWIN, DARE, ETA, SDIM, TWIN-V2.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/long_history.py
        [--lengths 200 1000 10000] [--batch 128] [--steps 3] [--warmup 1] [--item-n 100000]
        [--cate-n 10000] [--dim 16] [--chunk 1000] [--table-updates dense]
        [--models din twin twin_chunked dare dare_chunked eta sdim twin_v2] [--bf16]

Rows: din / twin / dare process the whole `[B, L, D]` history at once; twin_chunked /
dare_chunked / eta / sdim / twin_v2 process it in chunks of `--chunk` positions (model config
`search_chunk`; no chunking when L <= chunk). `--bf16` adds chunked TWIN with bfloat16 search
scores. A step is the driver's training step (`dare_jax.steps.make_train_step` of
`TwoStageModel(ModelSpec(...))` and `dare_jax.optim.make_optimizer(OptimSpec(...))`,
jit-compiled, state donated) with `optim.table_updates = --table-updates`, by default
`dense`: forward + backward + a dense Adam update of every parameter (`optim.adam`, optax's
Adam on autodiff's gradients); random ids, about 10% left padding. Item and
category tables are smaller than Taobao's (default 100,000 x 10,000 rows instead of
4,068,791 x 9,408) so that the dense table update does not drown the history cost on a
small machine; time table: max(2000, L + 1) rows.

Figures per (model, L): median samples/s over `--steps` timed steps (compilation and warm-up
excluded), and XLA's compiled memory of the step: `temp` = temporaries (everything the step
allocates besides its inputs and outputs: activations kept for the backward pass, gradients
before the update) and `args` = inputs (state + batch). `temp` is what grows with L.
The 1-minute load average is printed before and after (shared machines skew timings), and
the allocator setting (`dare_jax.huge_pages.status()`: the figures are measured with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` on the command line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dare_jax import huge_pages, optim, steps
from dare_jax.config import TABLE_UPDATES, OptimSpec
from dare_jax.models import ModelSpec, TwoStageModel

MODELS = ("din", "twin", "twin_chunked", "dare", "dare_chunked", "eta", "sdim", "twin_v2")


def model_spec(row: str, length: int, args: argparse.Namespace) -> ModelSpec:
    """The model options of benchmark row `row` at history length `length`."""
    name = row.removesuffix("_bf16").removesuffix("_chunked")
    chunked = row not in ("din", "twin", "dare")
    spec = ModelSpec(
        name=name,
        item_embedding_dim=args.dim,
        category_embedding_dim=args.dim,
        time_embedding_dim=args.dim,
        time_table_size=max(2000, length + 1),
        use_time=name != "din",  # DIN uses no time field
        use_aux_loss=name != "sdim",  # SDIM has no attention, hence no full-attention aux head
        search_chunk=args.chunk if chunked and length > args.chunk else 0,
        score_dtype="bfloat16" if row.endswith("_bf16") else "float32",
    )
    spec.check_history_length(length)
    return spec


def random_batch(rng: np.random.Generator, batch: int, length: int, args) -> dict:
    hist_iid = rng.integers(1, args.item_n, size=(batch, length), dtype=np.int32)
    pad = rng.integers(0, max(1, length // 10), size=batch)
    hist_iid[np.arange(length)[None, :] < pad[:, None]] = 0
    hist_cid = np.where(hist_iid > 0, rng.integers(1, args.cate_n, size=(batch, length)), 0)
    return {
        "iid": jnp.asarray(rng.integers(1, args.item_n, size=batch, dtype=np.int32)),
        "cid": jnp.asarray(rng.integers(1, args.cate_n, size=batch, dtype=np.int32)),
        "hist_iid": jnp.asarray(hist_iid),
        "hist_cid": jnp.asarray(hist_cid.astype(np.int32)),
        "label": jnp.asarray(rng.integers(0, 2, size=batch, dtype=np.int32)),
    }


def measure(row: str, length: int, args: argparse.Namespace) -> dict:
    model = TwoStageModel(model_spec(row, length, args), args.item_n, args.cate_n, length)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, args.batch, length, args) for _ in range(2)]
    optim_spec = OptimSpec(table_updates=args.table_updates)
    optimizer = optim.make_optimizer(optim_spec)
    key = jax.random.PRNGKey(0)
    state = steps.make_init_state(model, optimizer)(key, batches[0], key)
    train_step = steps.make_train_step(model, optimizer, optim_spec.weight_decay)
    compiled = train_step.lower(state, batches[0]).compile()
    memory = compiled.memory_analysis()
    durations = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i % 2])
        loss = metrics["total"]
        jax.block_until_ready(loss)
        if i >= args.warmup:
            durations.append(time.perf_counter() - start)
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"{row} L={length}: non-finite loss {float(loss)}")
    return {
        "samples_per_s": args.batch / statistics.median(durations),
        "temp_mb": memory.temp_size_in_bytes / 2**20,
        "args_mb": memory.argument_size_in_bytes / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 1000, 10_000])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--item-n", type=int, default=100_000)
    parser.add_argument("--cate-n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--bf16", action="store_true", help="also chunked TWIN, bf16 scores")
    parser.add_argument(
        "--table-updates", default="dense", choices=TABLE_UPDATES,
        help="optim.table_updates of the step (dense: optax's Adam on autodiff's gradients)",
    )
    args = parser.parse_args(argv)
    if min(args.lengths) < 20 or args.batch < 2 or args.steps < 1 or args.chunk < 1:
        parser.error("need lengths >= 20 (top-k 20), batch >= 2, steps >= 1, chunk >= 1")
    rows = list(args.models) + (["twin_chunked_bf16"] if args.bf16 else [])
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; load average "
          f"{os.getloadavg()[0]:.2f}; batch {args.batch}, item_n {args.item_n}, "
          f"cate_n {args.cate_n}, dim {args.dim}, chunk {args.chunk}, table updates "
          f"{args.table_updates}; memory {huge_pages.status()}", flush=True)
    print("| model | L | samples/s | step temp MiB | step args MiB |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        for row in rows:
            try:
                r = measure(row, length, args)
            except Exception as error:  # noqa: BLE001 - report the failing cell, keep going
                print(f"| {row} | {length} | failed: {type(error).__name__}: {error} | | |")
                continue
            print(f"| {row} | {length} | {r['samples_per_s']:,.0f} | {r['temp_mb']:,.1f} | "
                  f"{r['args_mb']:,.1f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
