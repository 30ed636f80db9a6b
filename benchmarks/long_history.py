"""Training-step throughput and memory for long histories: DIN, TWIN, DARE, ETA, SDIM, TWIN-V2.

    python benchmarks/long_history.py [--lengths 200 1000 10000] [--batch 128] [--steps 3]
        [--warmup 1] [--item-n 100000] [--cate-n 10000] [--dim 16] [--chunk 1000]
        [--models din twin twin_chunked dare dare_chunked eta sdim twin_v2] [--bf16]

Rows: din / twin / dare process the whole `[B, L, D]` history at once; twin_chunked /
dare_chunked / eta / sdim / twin_v2 process it in chunks of `--chunk` positions (model config
`search_chunk`; no chunking when L <= chunk). `--bf16` adds chunked TWIN with bfloat16 search
scores. A step is forward + backward + a dense Adam update of every parameter (optax.adam),
jit-compiled, state donated; random ids, about 10% left padding. Item and
category tables are smaller than Taobao's (default 100,000 x 10,000 rows instead of
4,068,791 x 9,408) so that the dense table update does not drown the history cost on a
small machine; time table: max(2000, L + 1) rows.

Figures per (model, L): median samples/s over `--steps` timed steps (compilation and warm-up
excluded), and XLA's compiled memory of the step: `temp` = temporaries (everything the step
allocates besides its inputs and outputs: activations kept for the backward pass, gradients
before the update) and `args` = inputs (state + batch). `temp` is what grows with L.
The 1-minute load average is printed before and after (shared machines skew timings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dare_jax import huge_pages  # noqa: E402

huge_pages.restart_with_huge_pages()  # before jax starts: what the driver runs with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dare_jax.models import build_model, default_model_config, loss_terms  # noqa: E402

MODELS = ("din", "twin", "twin_chunked", "dare", "dare_chunked", "eta", "sdim", "twin_v2")


def model_and_config(row: str, length: int, args: argparse.Namespace):
    """(module, config) of benchmark row `row` at history length `length`."""
    cfg = default_model_config()
    name = row.removesuffix("_bf16").removesuffix("_chunked")
    cfg.name = name
    cfg.item_embedding_dim = cfg.category_embedding_dim = cfg.time_embedding_dim = args.dim
    cfg.time_table_size = max(2000, length + 1)
    if name == "din":
        cfg.use_time = False
    if name == "sdim":
        cfg.use_aux_loss = False  # SDIM has no attention, hence no full-attention aux head
    if row not in ("din", "twin", "dare"):
        cfg.search_chunk = args.chunk if length > args.chunk else 0
    if row.endswith("_bf16"):
        cfg.score_dtype = "bfloat16"
    return build_model(cfg, args.item_n, args.cate_n, length), cfg


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
    model, _ = model_and_config(row, length, args)
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, args.batch, length, args) for _ in range(2)]
    variables = jax.jit(lambda key: model.init(key, batches[0], train=False))(
        jax.random.PRNGKey(0)
    )
    optimizer = optax.adam(0.01)

    def step(state, batch):
        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                batch, train=True, mutable=["batch_stats"],
            )
            return loss_terms(outputs, batch["label"], params, 1e-6)["total"], updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        changes, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], changes)
        return {"params": params, "batch_stats": updates["batch_stats"], "opt": opt}, loss

    state = {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt": optimizer.init(variables["params"]),
    }
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batches[0]).compile()
    memory = compiled.memory_analysis()
    durations = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, loss = compiled(state, batches[i % 2])
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
    args = parser.parse_args(argv)
    if min(args.lengths) < 20 or args.batch < 2 or args.steps < 1 or args.chunk < 1:
        parser.error("need lengths >= 20 (top-k 20), batch >= 2, steps >= 1, chunk >= 1")
    rows = list(args.models) + (["twin_chunked_bf16"] if args.bf16 else [])
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; load average "
          f"{os.getloadavg()[0]:.2f}; batch {args.batch}, item_n {args.item_n}, "
          f"cate_n {args.cate_n}, dim {args.dim}, chunk {args.chunk}", flush=True)
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
