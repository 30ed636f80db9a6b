"""TWIN-V2's clustering: quality and speed of the current algorithm against the previous one.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/twin_v2_clustering.py
        [--run RUN_DIR --data DATA_DIR] [--users 500] [--length 200] [--max-size 8]
        [--batch 2048] [--steps 3]

Current (`dare_jax.models.twin_v2`): balanced bisection in static blocks on an 8-dimensional
principal sketch, medians by radix select. Previous (until issue 14, kept here as the
reference): per-user bisecting 2-means on the full `[L, D]` vectors with scatter-based
segment statistics and a lexsort per level, splitting a cluster only while it has more than
`max_size` members. Both start each split from the earliest member and the member farthest
from it, with 3 Lloyd steps, and give at most `max_size` members per cluster.

Quality, on the same inputs: within-cluster sum of squares / total sum of squares over each
user's valid behaviours (lower is better; mean over users), clusters used, largest cluster,
and the agreement of the two partitions (adjusted Rand index; 1 = identical). Inputs:
Gaussian vectors (no structure), a mixture of 24 Gaussian groups per user (clear structure)
and, with --run and --data, a trained model's attention vectors `[item | category | time]`
of the test histories (the run's exported `embed.<group>.<field>.npy`, group `attention` if
present, else `shared`). Speed: the jit-compiled clustering of a `[batch, length, 48]` batch
(median of --steps calls after one warm-up; CPU = this process's user + sys time), measured
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` on the command line (the allocator setting,
`dare_jax.huge_pages.status()`, is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dare_jax import huge_pages
from dare_jax.models import twin_v2
from dare_jax.models.search import History


def current_clustering(vectors: jax.Array, valid: jax.Array, max_size: int) -> jax.Array:
    """Labels `[B, L]` of `dare_jax.models.twin_v2` (as the model runs it, per user)."""

    def one(x, v):
        history = History({"valid": v, "x": x}, lambda positions, role: positions["x"], None, 0)
        return twin_v2.balanced_bisection(twin_v2.principal_sketch(history), v, max_size, 3)

    return jax.vmap(one)(vectors, valid)


def _previous_level(x, valid, labels, parents, max_size, iterations):
    """One bisection level of the previous algorithm for one user (labels in [0, parents))."""
    length = x.shape[0]
    pos = jnp.arange(length, dtype=jnp.int32)
    seg = jnp.where(valid, labels, parents)
    sizes = jax.ops.segment_sum(valid.astype(jnp.int32), seg, parents + 1)[:parents]
    first = jax.ops.segment_min(jnp.where(valid, pos, length), seg, parents + 1)[:parents]
    own = jnp.clip(labels, 0, parents - 1)
    c0 = x[jnp.clip(first, 0, length - 1)]
    d0 = jnp.where(valid, jnp.sum((x - c0[own]) ** 2, axis=-1), -1.0)
    far_d = jax.ops.segment_max(d0, seg, parents + 1)[:parents]
    is_far = valid & (d0 == far_d[own])
    far = jax.ops.segment_min(jnp.where(is_far, pos, length), seg, parents + 1)[:parents]
    c1 = x[jnp.clip(far, 0, length - 1)]

    def lloyd(_, centres):
        c0, c1 = centres
        to_c1 = jnp.sum((x - c1[own]) ** 2, -1) < jnp.sum((x - c0[own]) ** 2, -1)
        child = jnp.where(valid, 2 * own + to_c1, 2 * parents)
        sums = jax.ops.segment_sum(x, child, 2 * parents + 1)[: 2 * parents]
        counts = jax.ops.segment_sum(valid.astype(x.dtype), child, 2 * parents + 1)[: 2 * parents]
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        keep = counts[:, None] > 0
        return jnp.where(keep[0::2], means[0::2], c0), jnp.where(keep[1::2], means[1::2], c1)

    c0, c1 = jax.lax.fori_loop(0, iterations, lloyd, (c0, c1))
    axis = c1 - c0
    proj = jnp.where(valid, jnp.sum((x - 0.5 * (c0 + c1)[own]) * axis[own], axis=-1), jnp.inf)
    order = jnp.lexsort((pos, proj, seg))
    rank = jnp.zeros(length, jnp.int32).at[order].set(pos)
    start = jnp.cumsum(sizes) - sizes
    upper = rank - start[own] >= (sizes[own] + 1) // 2
    return 2 * own + (upper & (sizes > max_size)[own]).astype(jnp.int32)


def previous_clustering(vectors: jax.Array, valid: jax.Array, max_size: int) -> jax.Array:
    """Labels `[B, L]` of the previous algorithm (padding: S)."""
    levels = twin_v2.cluster_levels(vectors.shape[1], max_size)

    def one(x, v):
        labels = jnp.zeros(v.shape, jnp.int32)
        for level in range(levels):
            labels = _previous_level(x, v, labels, 2**level, max_size, 3)
        return jnp.where(v, labels, 2**levels)

    return jax.vmap(one)(jax.lax.stop_gradient(vectors).astype(jnp.float32), valid)


ALGORITHMS = {"previous": previous_clustering, "current": current_clustering}


def dispersion_ratio(x: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> tuple[float, ...]:
    """(mean within/total sum of squares, mean clusters used, largest cluster)."""
    ratios, used, largest = [], [], 0
    for xb, lb, vb in zip(x.astype(np.float64), labels, valid):
        xv, lv = xb[vb], lb[vb]
        if len(xv) < 2:
            continue
        total = np.sum((xv - xv.mean(0)) ** 2)
        within = 0.0
        for c in np.unique(lv):
            members = xv[lv == c]
            within += np.sum((members - members.mean(0)) ** 2)
            largest = max(largest, len(members))
        ratios.append(within / total)
        used.append(len(np.unique(lv)))
    return float(np.mean(ratios)), float(np.mean(used)), largest


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same items (Hubert and Arabie)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(n):
        return n * (n - 1) / 2

    index = pairs(table).sum()
    rows, cols, total = pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum(), pairs(len(a))
    expected = rows * cols / total
    maximum = (rows + cols) / 2
    return float((index - expected) / (maximum - expected)) if maximum != expected else 1.0


def trained_vectors(run: Path, data: Path, users: int, length: int):
    """Attention vectors `[N, L, D]` and valid `[N, L]` of test histories under a run's
    exported tables."""
    from dare_jax.data import open_dataset

    tables = run / "seed_0" / "embeddings"
    group = "attention" if (tables / "embed.attention.item.npy").exists() else "shared"
    table = {f: np.load(tables / f"embed.{group}.{f}.npy") for f in ("item", "category", "time")}
    dataset = open_dataset(data)
    batch = dataset.gather("test", np.arange(users) * 3, max_length=length)  # positives
    times = np.broadcast_to(length - np.arange(length), batch["hist_iid"].shape)
    vectors = np.concatenate(
        [table["item"][batch["hist_iid"]], table["category"][batch["hist_cid"]],
         table["time"][times]],
        axis=-1,
    )
    return vectors.astype(np.float32), batch["hist_iid"] > 0


def inputs(args: argparse.Namespace):
    rng = np.random.default_rng(0)
    shape = (args.users, args.length, 48)
    valid = np.arange(args.length)[None] >= rng.integers(0, args.length // 4, (args.users, 1))
    yield "gaussian", rng.normal(size=shape).astype(np.float32), valid
    centres = rng.normal(size=(args.users, 24, 48)) * 3
    groups = rng.integers(0, 24, size=shape[:2])
    mixture = np.take_along_axis(centres, groups[..., None], 1) + rng.normal(size=shape)
    yield "mixture of 24 groups", mixture.astype(np.float32), valid
    if args.run and args.data:
        vectors, valid = trained_vectors(Path(args.run), Path(args.data), args.users, args.length)
        yield f"trained ({Path(args.run).name})", vectors, valid


def timings(args: argparse.Namespace) -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.length, 48))
    pad = jax.random.randint(jax.random.PRNGKey(1), (args.batch, 1), 0, args.length // 10)
    valid = jnp.arange(args.length)[None] >= pad
    for name, algorithm in ALGORITHMS.items():
        fn = jax.jit(lambda x, v, algorithm=algorithm: algorithm(x, v, args.max_size))
        jax.block_until_ready(fn(x, valid))
        walls, cpus = [], []
        for _ in range(args.steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(x, valid))
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
        print(f"| {name} | {args.batch} x {args.length} x 48 | "
              f"{1000 * statistics.median(walls):,.1f} | {1000 * statistics.median(cpus):,.1f} |",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory with exported embeddings")
    parser.add_argument("--data", help="the run's preprocessed dataset directory")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--max-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.length < 2 * args.max_size or args.users < 1 or args.max_size < 1:
        parser.error("need length >= 2 * max-size, users >= 1, max-size >= 1")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); "
          f"load average {os.getloadavg()[0]:.2f}; L {args.length}, max cluster size "
          f"{args.max_size} ({2 ** twin_v2.cluster_levels(args.length, args.max_size)} "
          f"clusters); memory {huge_pages.status()}", flush=True)
    print("| inputs | algorithm | within / total sum of squares | clusters used | largest "
          "| adjusted Rand vs previous |")
    print("|---|---|---|---|---|---|")
    for label, vectors, valid in inputs(args):
        labels = {
            name: np.asarray(jax.jit(algorithm, static_argnums=2)(vectors, valid, args.max_size))
            for name, algorithm in ALGORITHMS.items()
        }
        for name, lab in labels.items():
            ratio, used, largest = dispersion_ratio(vectors, lab, valid)
            agreement = np.mean([
                adjusted_rand(lab[b][valid[b]], labels["previous"][b][valid[b]])
                for b in range(len(lab)) if valid[b].sum() > 1
            ])
            print(f"| {label} | {name} | {ratio:.4f} | {used:.1f} | {largest} | "
                  f"{agreement:.3f} |", flush=True)
    print("\n| algorithm | batch | ms (median) | CPU ms |\n|---|---|---|---|")
    timings(args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
