"""Training and forward throughput (samples/s) of the models at Taobao scale.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/step_throughput.py
        [--models din twin dare eta sdim twin_v2] [--steps 5] [--warmup 2]
        [--batch 2048] [--length 200] [--item-n 4068791] [--cate-n 9408] [--dim 16]
        [--variants dense,row_sparse,lazy,frozen_embeddings,forward] [--breakdown]
        [--host-devices 2 --mesh 1,2] [--json PATH]

Random int batches (ids drawn uniformly, about 10% left padding). The model is
`TwoStageModel(ModelSpec(...))`. A training step is the driver's
(`dare_jax.steps.make_train_step`, one jitted program, state donated) with the optimizer of
`dare_jax.optim.make_optimizer(OptimSpec(table_updates=V))`, one variant per value V of
config `optim.table_updates`:

* `dense`: `dare_jax.optim.adam` (optax's Adam with PyTorch's bias corrections) on
  autodiff's dense gradient: forward + backward + a dense Adam update of ALL parameters
  (every table row, as the official PyTorch training with dense embedding gradients);
* `row_sparse` (the config's default): `dare_jax.optim.RowSparseAdam`, the same maths, the
  table gradients as looked-up rows summed into carried buffers, moments in flat
  vectorised passes;
* `lazy`: `dare_jax.optim.LazyAdam` (other maths: only the rows a batch looks up move; its
  cost should not depend on `--item-n`).

`frozen_embeddings` differentiates and updates everything except the embedding tables, to
measure what the embedding gradients and their dense Adam update cost.
`forward` is the driver's evaluation step (`dare_jax.steps.make_eval_step`: the jitted
forward pass, BatchNorm with running statistics).
`--breakdown` also times the pieces of one item table's update: the gradient as autodiff forms
it (scatter-add into a zero table) and exact alternatives (segment_sum, sorted ids), the
scatter alone, Adam's square-root-and-divide pass over the table shaped `[rows, d]` and
flat, scatter + dense Adam, `RowSparseAdam.update` and `LazyAdam.update`.
`--host-devices 2 --mesh 1,2` splits the CPU into two XLA host devices and the item tables
(with their Adam moments) by rows over them (`dare_jax.sharding.Partitioner`; the same maths):
XLA:CPU runs each device on its own thread, so the dense table update uses both cores.
Compilation and warm-up steps are excluded from the timings; each figure is the median over
`--steps` timed steps of samples per second. The first call of each variant is timed apart
with the XLA compile seconds inside it (`dare_jax.phase_timer`), and after each model the
device's memory in use and its peak so far (GPU/TPU only). `--json PATH` writes every figure
there. The machine load (1-minute load average) is printed before and after, since shared
machines skew the figures. The allocator setting (`dare_jax.huge_pages.status()`) is printed
and recorded: the figures are measured with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` on the
command line (XLA:CPU's buffers in 2 MiB pages); without it they sit in 4 KiB pages.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import statistics
import sys
import time


def _host_devices_from_argv(argv: list[str]) -> int:
    """`--host-devices N` must act before jax is imported (it sets XLA_FLAGS)."""
    for i, arg in enumerate(argv):
        if arg == "--host-devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--host-devices="):
            return int(arg.split("=", 1)[1])
    return 1


if _host_devices_from_argv(sys.argv) > 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_host_devices_from_argv(sys.argv)}"
    )

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dare_jax import huge_pages, optim, steps
from dare_jax.config import TABLE_UPDATES, OptimSpec
from dare_jax.models import ModelSpec, TableKey, TwoStageModel, loss_terms
from dare_jax.phase_timer import PhaseTimer
from dare_jax.sharding import Partitioner, padded_rows

# With a mesh, the item tables (and their Adam moments) are split by rows over `model`.
ROW_SHARDED = r"embed/.*/item"

# The config's Adam and L2 penalty (OptimSpec's defaults: the paper's).
OPTIM = OptimSpec()
WEIGHT_DECAY = OPTIM.weight_decay
LEARNING_RATE = OPTIM.lr
DRIVER_VARIANTS = TABLE_UPDATES  # "dense", "row_sparse", "lazy": optim.table_updates


def random_batch(
    rng: np.random.Generator, batch: int, length: int, item_n: int, cate_n: int
) -> dict[str, jax.Array]:
    """Uniform random ids; each row left-padded with 0 over up to 10% of its length."""
    hist_iid = rng.integers(1, item_n, size=(batch, length), dtype=np.int32)
    pad = rng.integers(0, max(1, length // 10), size=batch)
    hist_iid[np.arange(length)[None, :] < pad[:, None]] = 0
    hist_cid = np.where(hist_iid > 0, rng.integers(1, cate_n, size=(batch, length)), 0)
    return {
        "iid": jnp.asarray(rng.integers(1, item_n, size=batch, dtype=np.int32)),
        "cid": jnp.asarray(rng.integers(1, cate_n, size=batch, dtype=np.int32)),
        "hist_iid": jnp.asarray(hist_iid),
        "hist_cid": jnp.asarray(hist_cid.astype(np.int32)),
        "label": jnp.asarray(rng.integers(0, 2, size=batch, dtype=np.int32)),
    }


def model_spec(name: str, dim: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        item_embedding_dim=dim,
        category_embedding_dim=dim,
        time_embedding_dim=dim,
        use_time=name != "din",  # DIN uses no time field
        use_aux_loss=name != "sdim",  # SDIM has no attention, hence no full-attention aux head
    )


def make_frozen_embeddings_step(model, optimizer, state_shardings=None):
    """Jitted (state, batch) -> (state, loss) training all but the `frozen` params; state
    donated (and kept on its shardings)."""

    def loss_fn(trainable, frozen, batch_stats, batch):
        params = {**trainable, **frozen}
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch,
            train=True,
            mutable=["batch_stats"],
        )
        terms = loss_terms(outputs, batch["label"], params, WEIGHT_DECAY)
        return terms["total"], updates["batch_stats"]

    def step(state, batch):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["trainable"], state["frozen"], state["batch_stats"], batch
        )
        updates, opt_state = optimizer.update(grads, state["opt"], state["trainable"])
        return {
            "trainable": optax.apply_updates(state["trainable"], updates),
            "frozen": state["frozen"],
            "batch_stats": batch_stats,
            "opt": opt_state,
        }, loss

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, None))


def time_calls(
    fn, n_warmup: int, n_steps: int, cpu: list[float] | None = None, faults: list | None = None
) -> list[float]:
    """Wall seconds of each of `n_steps` calls after `n_warmup` untimed ones.

    cpu: if given, receives this process's CPU seconds (user + sys, all threads) per call,
    which the other processes on a shared machine inflate much less than the wall time;
    faults: if given, receives the minor page faults of each timed call (fresh memory).
    """
    for _ in range(n_warmup):
        jax.block_until_ready(fn())
    durations = []
    for _ in range(n_steps):
        start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        durations.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
        if faults is not None:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    return durations


def _variant_callable(model, variant: str, init_batch, batches, partitioner=None):
    """A no-argument callable running one timed unit (a train step or a forward pass)."""
    if partitioner is not None:
        batches = [jax.device_put(b, partitioner.batch_sharding) for b in batches]
    counter = itertools.count()

    def next_batch():
        return batches[next(counter) % len(batches)]

    if variant in DRIVER_VARIANTS:
        return _driver_callable(model, variant, next_batch, partitioner)
    variables = jax.jit(lambda key: model.init(key, init_batch, train=False))(jax.random.PRNGKey(0))
    # What the steps read of a state (model.init also returns the lookups' collections).
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    placement = ()
    if partitioner is not None:
        shardings = partitioner.state_shardings(variables)
        variables = jax.device_put(variables, shardings)
        placement = (shardings, partitioner.batch_sharding, partitioner.replicated)
    if variant == "forward":  # the driver's evaluation step
        forward = steps.make_eval_step(model, *placement)
        return lambda: forward(variables, next_batch())
    params = variables["params"]
    trainable = {k: v for k, v in params.items() if k != "embed"}
    frozen = {k: v for k, v in params.items() if k == "embed"}
    optimizer = optax.adam(LEARNING_RATE)
    state = {
        "trainable": trainable,
        "frozen": frozen,
        "batch_stats": variables["batch_stats"],
        "opt": optimizer.init(trainable),
    }
    shardings = None
    if partitioner is not None:
        shardings = partitioner.state_shardings(state)
        state = jax.device_put(state, shardings)
    box = {"state": state}
    step = make_frozen_embeddings_step(model, optimizer, shardings)

    def run():
        box["state"], loss = step(box["state"], next_batch())
        return loss

    return run


def _driver_callable(model, variant, next_batch, partitioner):
    """The driver's training step (`dare_jax.steps`) with the optimizer of
    `optim.table_updates = variant`: `optim.adam`, RowSparseAdam or LazyAdam."""
    optimizer = optim.make_optimizer(dataclasses.replace(OPTIM, table_updates=variant))
    batch = next_batch()
    placement = ()
    shardings = None
    if partitioner is not None:
        shardings = partitioner.state_shardings(steps.abstract_state(model, optimizer, batch))
        placement = (shardings, partitioner.batch_sharding, partitioner.replicated)
    key = jax.random.PRNGKey(0)
    state = steps.make_init_state(model, optimizer, shardings)(key, batch, key)
    step = steps.make_train_step(model, optimizer, WEIGHT_DECAY, *placement)
    box = {"state": state}

    def run():
        box["state"], metrics = step(box["state"], next_batch())
        return metrics["total"]

    return run


def embedding_update_breakdown(args: argparse.Namespace) -> None:
    """Time the pieces of one item table's update: gradient formation and dense Adam.

    Cotangent rows `[B * (L + 1), dim]` (target + history lookups) with random ids, table
    `[item_n, dim]`. All variants compute the same gradient (float sums in another order).
    """
    rng = np.random.default_rng(1)
    n_rows = args.batch * (args.length + 1)
    ids = jnp.asarray(rng.integers(0, args.item_n, size=n_rows, dtype=np.int32))
    rows = jnp.asarray(rng.normal(size=(n_rows, args.dim)).astype(np.float32))
    shape = (args.item_n, args.dim)

    def sorted_segment_sum(r, i):
        order = jnp.argsort(i)
        return jax.ops.segment_sum(r[order], i[order], shape[0], indices_are_sorted=True)

    gradient_forms = {
        "scatter-add into zeros (autodiff of the gather)": lambda r, i: (
            jnp.zeros(shape).at[i].add(r)
        ),
        "segment_sum, unsorted ids": lambda r, i: jax.ops.segment_sum(r, i, shape[0]),
        "segment_sum after sorting ids": sorted_segment_sum,
    }
    for label, form in gradient_forms.items():
        fn = jax.jit(form)
        ms = 1000 * statistics.median(time_calls(lambda fn=fn: fn(rows, ids), 1, args.steps))
        print(f"  gradient: {label:50s} {ms:8.1f} ms", flush=True)

    def report(label: str, update, state) -> None:
        """Time `state = update(state, rows, ids)` (state donated) and print it with its
        page faults and CPU time per step."""
        box = {"state": state}

        def run():
            box["state"] = update(box["state"], rows, ids)
            return box["state"]

        cpu: list[float] = []
        faults: list[int] = []
        ms = 1000 * statistics.median(time_calls(run, 1, args.steps, cpu, faults))
        print(
            f"  {label:60s} {ms:8.1f} ms ({statistics.median(faults):.0f} minor page faults "
            f"per step; CPU {1000 * statistics.median(cpu):.1f} ms)",
            flush=True,
        )

    report(
        "gradient: scatter-add into an existing table (scatter alone)",
        jax.jit(lambda t, r, i: t.at[i].add(r), donate_argnums=0),
        jnp.zeros(shape),
    )

    # Adam's square root and division: XLA:CPU emits scalar code for the loop over a
    # `[rows, d]` array but vector code over the same memory viewed 1-D (why RowSparseAdam
    # stores the table moments flat). Same values, same bytes.
    def sqrt_divide(state, r, i):
        x, y = state
        return x / (jnp.sqrt(y) + 1e-8), y

    for layout in (shape, (shape[0] * shape[1],)):
        report(
            f"x / (sqrt(y) + eps) in place on {list(layout)}",
            jax.jit(sqrt_divide, donate_argnums=0),
            (jnp.ones(layout), jnp.full(layout, 2.0)),
        )

    optimizer = optax.adam(LEARNING_RATE)

    def adam_step(state, r, i):
        table, opt_state = state
        grad = jnp.zeros(shape).at[i].add(r)
        updates, opt_state = optimizer.update(grad, opt_state, table)
        return optax.apply_updates(table, updates), opt_state

    table = jnp.zeros(shape)
    report(
        "scatter-add + dense Adam of the whole table (donated)",
        jax.jit(adam_step, donate_argnums=0),
        (table, optimizer.init(table)),
    )

    # The same gradient and Adam update, but the dense gradient is formed in a persistent
    # buffer carried in the (donated) state and zeroed in place, instead of a fresh buffer.
    def adam_step_reused(state, r, i):
        table, opt_state, scratch = state
        grad = scratch.at[:].set(0.0).at[i].add(r)
        updates, opt_state = optimizer.update(grad, opt_state, table)
        return optax.apply_updates(table, updates), opt_state, grad

    table = jnp.zeros(shape)
    report(
        "same, gradient formed in a reused donated buffer",
        jax.jit(adam_step_reused, donate_argnums=0),
        (table, optimizer.init(table), jnp.zeros(shape)),
    )

    # dare_jax.optim.RowSparseAdam: previous rows re-zeroed and new rows added in the carried
    # buffer, moments and step in flat (vectorised) passes; params, state, scratch donated.
    table = TableKey("representation", "item")
    params = {"embed": {"representation": {"item": jnp.zeros(shape)}}}
    adam = optim.RowSparseAdam(LEARNING_RATE)
    report(
        "dare_jax.optim.RowSparseAdam.update (flat passes), donated",
        jax.jit(
            lambda state, r, i: adam.update(state[0], {}, {table: [(i, r)]}, *state[1:]),
            donate_argnums=0,
            keep_unused=True,  # the step buffer is only written
        ),
        (params, adam.init(params), adam.init_scratch(params, {table: n_rows})),
    )

    # dare_jax.optim.LazyAdam: only the looked-up rows (duplicates merged through the count
    # slots, then the Adam update in chunks); params and state donated.
    lazy = optim.LazyAdam(LEARNING_RATE)
    params = {"embed": {"representation": {"item": jnp.zeros(shape)}}}
    report(
        "dare_jax.optim.LazyAdam.update (looked-up rows), donated",
        jax.jit(
            lambda state, r, i: lazy.update(state[0], {}, {table: [(i, r)]}, state[1]),
            donate_argnums=0,
        ),
        (params, lazy.init(params)),
    )


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, dict]:
    spec = model_spec(name, args.dim)
    partitioner = None
    item_rows = args.item_n
    if args.mesh != (1, 1):
        data, model_axis = args.mesh
        partitioner = Partitioner(
            data, model_axis, ROW_SHARDED, devices=jax.devices()[: data * model_axis]
        )
        item_rows = padded_rows(args.item_n, model_axis)  # never-looked-up padding rows
    model = TwoStageModel(spec, item_rows, args.cate_n, args.length)
    rng = np.random.default_rng(0)
    batches = [
        random_batch(rng, args.batch, args.length, args.item_n, args.cate_n) for _ in range(2)
    ]
    init_batch = {k: v[:8] for k, v in batches[0].items()}
    results: dict[str, dict] = {}
    for variant in args.variants:
        timer = PhaseTimer()
        with timer.phase("first_call"):  # state creation, compilation and one step
            fn = _variant_callable(model, variant, init_batch, batches, partitioner)
            jax.block_until_ready(fn())
        cpu: list[float] = []
        faults: list[int] = []
        durations = time_calls(fn, max(0, args.warmup - 1), args.steps, cpu, faults)
        median = statistics.median(durations)
        first = timer.summary()
        results[variant] = {
            "samples_per_s": args.batch / median,
            "median_step_ms": 1000 * median,
            "min_step_ms": 1000 * min(durations),
            "cpu_ms_per_step": 1000 * statistics.median(cpu),
            "page_faults_per_step": statistics.median(faults),
            "first_call_seconds": first["seconds"]["first_call"],
            "compile_seconds": first["compile_seconds"].get("first_call", 0.0),
        }
        print(
            f"  {name:5s} {variant:18s} {args.batch / median:8.0f} samples/s  "
            f"(median step {1000 * median:7.1f} ms, min {1000 * min(durations):7.1f} ms "
            f"over {len(durations)} steps; CPU {1000 * statistics.median(cpu):7.1f} ms/step; "
            f"{statistics.median(faults):.0f} page faults/step; "
            f"first call {first['seconds']['first_call']:.1f} s, of which compile "
            f"{results[variant]['compile_seconds']:.1f} s)",
            flush=True,
        )
        del fn
    memory = device_memory()
    if memory:
        results["device_memory"] = memory
        print(
            f"  {name:5s} device memory: {memory['bytes_in_use'] / 2**30:.2f} GiB in use, "
            f"peak so far {memory['peak_bytes_in_use'] / 2**30:.2f} GiB",
            flush=True,
        )
    return results


def device_memory() -> dict[str, int]:
    """Bytes in use and the peak so far on the first device ({} where not reported: CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return {key: int(stats[key]) for key in ("bytes_in_use", "peak_bytes_in_use") if key in stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="*", default=["din", "twin", "dare", "eta", "sdim", "twin_v2"]
    )
    parser.add_argument(
        "--variants",
        default="dense,row_sparse,frozen_embeddings,forward",
        help="comma-separated: dense, row_sparse, lazy (the optim.table_updates values), "
        "frozen_embeddings, forward",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the item-table update pieces"
    )
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--item-n", type=int, default=4_068_791)
    parser.add_argument("--cate-n", type=int, default=9_408)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument(
        "--host-devices",
        type=int,
        default=1,
        help="split the CPU into N XLA host devices (XLA runs each device on its own thread)",
    )
    parser.add_argument(
        "--mesh",
        default="1,1",
        help="DATA,MODEL mesh over the host devices; item tables split by rows over MODEL",
    )
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        args.mesh = tuple(int(x) for x in args.mesh.split(","))
        if len(args.mesh) != 2 or min(args.mesh) < 1:
            raise ValueError
    except ValueError:
        print(f"--mesh {args.mesh!r}: expected DATA,MODEL positive integers", file=sys.stderr)
        return 2
    if args.mesh[0] * args.mesh[1] > len(jax.devices()):
        print(
            f"--mesh {args.mesh} needs {args.mesh[0] * args.mesh[1]} devices; use --host-devices",
            file=sys.stderr,
        )
        return 2
    known = {"frozen_embeddings", "forward", *DRIVER_VARIANTS}
    unknown = set(args.variants) - known
    if unknown:
        renamed = " (optax is now dense: optim.table_updates)" if "optax" in unknown else ""
        print(f"unknown --variants entries: {sorted(unknown)}{renamed}", file=sys.stderr)
        return 2
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); "
        f"batch {args.batch}, L {args.length}, item_n {args.item_n}, cate_n {args.cate_n}, "
        f"dim {args.dim}; mesh data,model = {args.mesh} over {len(jax.devices())} device(s); "
        f"memory {huge_pages.status()}; load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    report = {
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "device": str(jax.devices()[0].device_kind),
        "memory": huge_pages.status(),
        "setup": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "load_before": os.getloadavg()[0],
        "models": {},
    }
    for name in args.models:
        report["models"][name] = benchmark_model(name, args)
        _write_json(args.json, report)
    if args.breakdown:
        print(f"item-table update pieces ({args.item_n} x {args.dim}):", flush=True)
        embedding_update_breakdown(args)
    report["load_after"] = os.getloadavg()[0]
    _write_json(args.json, report)
    print(f"load average after: {report['load_after']:.2f}")
    return 0


def _write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
