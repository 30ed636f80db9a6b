"""Input pipeline cost per training batch: host gathering, copies, device-built histories.

    python benchmarks/input_pipeline.py [--data DIR | --users 3000] [--batch 2048]
        [--length 200] [--batches 30] [--threads 1,2,4] [--json PATH]

On a preprocessed dataset (`--data`, or a synthetic log of `--users` users generated and
preprocessed once under `data/bench/input_pipeline_<users>`), with the training loop's own
code (`dare_jax.train._Trainer.device_batch` mapped over `dare_jax.data.pipeline`):

* per batch of shuffled training samples, medians over `--batches` batches: drawing the
  batch's sample indices (grain's per-sample shuffle, as the pipeline did before, and the
  same indices computed at once, as it does now), the host's work
  for `data.histories = "host"` (`Dataset.gather`: `[B, L]` histories) and for "device"
  (`Dataset.gather_spans`: six `[B]` columns), the copy of each batch to the device
  (`Partitioner.shard_batch`, waited for), and building the histories on the device from
  spans (`DeviceHistories`, waited for);
* the whole pipeline: batches per second that a consumer receives, ready on the device, from
  `pipeline.train_iterator` with `data.prefetch_threads` = each of `--threads` (the gather,
  the copy and, for "device", the history build run in those threads; the consumer does
  nothing else, so this is the most the pipeline can feed a training loop).

Every figure is wall time; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import taobao_synthetic  # noqa: E402
from dare_jax import train  # noqa: E402
from dare_jax.data import pipeline  # noqa: E402


def trainer_for(data_dir: str, batch: int, length: int, histories: str) -> train._Trainer:
    """The training loop's trainer (nothing compiled yet) on `data_dir` at this batch shape."""
    config = taobao_synthetic.get_config()
    config.data.dir = data_dir
    config.data.synthetic_users = 0
    config.data.min_item_rows = config.data.min_category_rows = 0
    config.data.max_length = length
    config.data.histories = histories
    config.train.batch_size = batch
    return train._Trainer(config, train.prepare_dataset(config))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compiles what it jits)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def per_batch_costs(dataset, trainer_host, trainer_device, args) -> dict[str, float]:
    rng = np.random.default_rng(0)
    n = dataset.num_samples("train")
    batches = [rng.permutation(n)[: args.batch] for _ in range(args.batches)]
    cursor = iter(range(10**9))

    def indices():
        return batches[next(cursor) % len(batches)]

    full = dataset.gather("train", indices(), args.length)
    spans = trainer_device.dataset.gather_spans("train", indices())
    spans = {**spans, **{k: spans[k].astype(np.int32) for k in ("hist_start", "hist_stop")}}
    on_device_spans = trainer_device.shard_batch(spans)
    seed = pipeline.shuffle_seed(0)
    grains = grain.MapDataset.range(n).shuffle(seed=seed).batch(args.batch, drop_remainder=True)
    ours = pipeline.ShuffledBatch(n, args.batch, seed)
    return {
        "grain_shuffle_indices_ms": median_ms(lambda: grains[next(cursor) % 50], args.batches),
        "index_shuffle_indices_ms": median_ms(lambda: ours(next(cursor) % 50), args.batches),
        "host_gather_histories_ms": median_ms(
            lambda: dataset.gather("train", indices(), args.length), args.batches
        ),
        "host_gather_spans_ms": median_ms(
            lambda: dataset.gather_spans("train", indices()), args.batches
        ),
        "copy_histories_batch_ms": median_ms(
            lambda: jax.block_until_ready(trainer_host.shard_batch(full)), args.batches
        ),
        "copy_spans_batch_ms": median_ms(
            lambda: jax.block_until_ready(trainer_device.shard_batch(spans)), args.batches
        ),
        "device_build_histories_ms": median_ms(
            lambda: jax.block_until_ready(trainer_device.histories(on_device_spans)),
            args.batches,
        ),
    }


def pipeline_rate(trainer: train._Trainer, threads: int, args) -> float:
    """Batches per second received, ready on the device, from the training iterator."""
    data = pipeline.train_dataset(
        trainer.dataset,
        batch_size=args.batch,
        seed=0,
        num_epochs=1000,
        max_length=args.length,
        histories=trainer.config.data.histories,
    ).map(trainer.device_batch)
    iterator = pipeline.train_iterator(data, prefetch=2 * threads, threads=threads)
    for _ in range(3):  # warm-up: threads started, buffer filled, programs compiled
        jax.block_until_ready(next(iterator))
    start = time.perf_counter()
    for _ in range(args.batches):
        jax.block_until_ready(next(iterator))
    return args.batches / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a preprocessed dataset directory")
    parser.add_argument("--users", type=int, default=3000, help="synthetic users without --data")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", default="1,2,4", help="comma-separated thread counts")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    data_dir = args.data
    if data_dir is None:
        root = Path("data/bench") / f"input_pipeline_{args.users}"
        config = taobao_synthetic.get_config()
        config.data.dir, config.data.raw_path = str(root / "pre"), str(root / "log.csv")
        config.data.synthetic_users = args.users
        train.prepare_dataset(config)
        data_dir = config.data.dir
    host = trainer_for(data_dir, args.batch, args.length, "host")
    device = trainer_for(data_dir, args.batch, args.length, "device")
    dataset = host.dataset
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); "
        f"{data_dir}: {dataset.num_samples('train')} training samples, "
        f"{dataset.array('seq_iid').shape[0]} events; batch {args.batch}, L {args.length}; "
        f"load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    report: dict = {
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "cpus": os.cpu_count(),
        "batch": args.batch,
        "length": args.length,
        "load_before": os.getloadavg()[0],
    }
    report["per_batch_ms"] = per_batch_costs(dataset, host, device, args)
    for name, ms in report["per_batch_ms"].items():
        print(f"  {name:28s} {ms:8.2f} ms per batch", flush=True)
    report["pipeline_batches_per_s"] = {}
    for trainer in (host, device):
        mode = trainer.config.data.histories
        for threads in [int(t) for t in args.threads.split(",") if t.strip()]:
            rate = pipeline_rate(trainer, threads, args)
            report["pipeline_batches_per_s"][f"{mode}_threads{threads}"] = rate
            print(
                f"  pipeline, histories {mode:6s} {threads} thread(s): {rate:8.1f} batches/s "
                f"= {rate * args.batch:10.0f} samples/s",
                flush=True,
            )
    report["load_after"] = os.getloadavg()[0]
    print(f"load average after: {report['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
