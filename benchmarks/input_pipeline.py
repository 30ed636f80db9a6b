"""Input pipeline cost per training batch: host gathering, copies, device-built histories.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/input_pipeline.py
        [--data DIR | --users 3000] [--batch 2048] [--length 200] [--batches 30]
        [--threads 1,2,4] [--json PATH]

On a preprocessed dataset (`--data`, or a synthetic log of `--users` users generated and
preprocessed once under `data/bench/input_pipeline_<users>`), with the training loop's own
code (`dare_jax.experiment.Experiment` of `configs/taobao_synthetic.py` on that dataset, its
tables sized by the dataset: `device_batch`, `train_batches` over `dare_jax.data.pipeline`):

* per batch of shuffled training samples, medians over `--batches` batches: drawing the
  batch's sample indices (grain's per-sample shuffle, as the pipeline did before, and the
  same indices computed at once, as it does now), the host's work
  for `data.histories = "host"` (`Dataset.gather`: `[B, L]` histories) and for "device"
  (`Dataset.gather_spans`: six `[B]` columns), the copy of each batch to the device
  (`Partitioner.shard_batch`, waited for), and building the histories on the device from
  spans (`DeviceHistories`, waited for);
* the whole pipeline: batches per second that a consumer receives, ready on the device, from
  `Experiment.train_batches` with `data.prefetch_threads` = each of `--threads` (the gather,
  the copy and, for "device", the history build run in those threads; the consumer does
  nothing else, so this is the most the pipeline can feed a training loop).

Every figure is wall time; the load average is printed before and after, and the allocator
setting (`dare_jax.huge_pages.status()`; the figures are measured with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` on the command line) is printed and recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np

from configs import taobao_synthetic
from dare_jax import config, huge_pages
from dare_jax.data import pipeline
from dare_jax.data.preprocess import prepare_dataset
from dare_jax.experiment import Experiment


def experiment_for(data_dir: str, batch: int, length: int, histories: str) -> Experiment:
    """The training loop's experiment on `data_dir` at this batch shape (its steps are
    built, not compiled: nothing here runs them)."""
    cfg = taobao_synthetic.get_config()
    cfg.data.dir = data_dir
    cfg.data.synthetic_users = 0
    cfg.data.min_item_rows = cfg.data.min_category_rows = 0
    cfg.data.max_length = length
    cfg.data.histories = histories
    cfg.train.batch_size = batch
    spec = config.resolve(cfg)
    return Experiment(spec, prepare_dataset(spec.data))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compiles what it jits)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def per_batch_costs(dataset, host: Experiment, device: Experiment, args) -> dict[str, float]:
    rng = np.random.default_rng(0)
    n = dataset.num_samples("train")
    batches = [rng.permutation(n)[: args.batch] for _ in range(args.batches)]
    cursor = iter(range(10**9))

    def indices():
        return batches[next(cursor) % len(batches)]

    full = dataset.gather("train", indices(), args.length)
    spans = device.dataset.gather_spans("train", indices())
    spans = {**spans, **{k: spans[k].astype(np.int32) for k in ("hist_start", "hist_stop")}}

    def copy(experiment: Experiment, batch: dict) -> dict:  # split on `data`, on the devices
        return experiment.partitioner.shard_batch(batch, experiment.batch_size)

    on_device_spans = copy(device, spans)
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
            lambda: jax.block_until_ready(copy(host, full)), args.batches
        ),
        "copy_spans_batch_ms": median_ms(
            lambda: jax.block_until_ready(copy(device, spans)), args.batches
        ),
        "device_build_histories_ms": median_ms(
            lambda: jax.block_until_ready(device.histories(on_device_spans)),
            args.batches,
        ),
    }


def pipeline_rate(experiment: Experiment, threads: int, args) -> float:
    """Batches per second received, ready on the device, from the training iterator with
    `data.prefetch_threads = threads`."""
    spec = experiment.spec
    spec = spec.replace(
        data=dataclasses.replace(spec.data, prefetch_threads=threads),
        train=dataclasses.replace(spec.train, num_epochs=1000),  # batches enough for any run
    )
    iterator = Experiment(spec, experiment.dataset).train_batches(seed=0)
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
        cfg = taobao_synthetic.get_config()
        cfg.data.dir, cfg.data.raw_path = str(root / "pre"), str(root / "log.csv")
        cfg.data.synthetic_users = args.users
        prepare_dataset(config.resolve(cfg).data)
        data_dir = cfg.data.dir
    host = experiment_for(data_dir, args.batch, args.length, "host")
    device = experiment_for(data_dir, args.batch, args.length, "device")
    dataset = host.dataset
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); "
        f"{data_dir}: {dataset.num_samples('train')} training samples, "
        f"{dataset.array('seq_iid').shape[0]} events; batch {args.batch}, L {args.length}; "
        f"memory {huge_pages.status()}; load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    report: dict = {
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "cpus": os.cpu_count(),
        "memory": huge_pages.status(),
        "batch": args.batch,
        "length": args.length,
        "load_before": os.getloadavg()[0],
    }
    report["per_batch_ms"] = per_batch_costs(dataset, host, device, args)
    for name, ms in report["per_batch_ms"].items():
        print(f"  {name:28s} {ms:8.2f} ms per batch", flush=True)
    report["pipeline_batches_per_s"] = {}
    for experiment in (host, device):
        mode = experiment.spec.data.histories
        for threads in [int(t) for t in args.threads.split(",") if t.strip()]:
            rate = pipeline_rate(experiment, threads, args)
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
