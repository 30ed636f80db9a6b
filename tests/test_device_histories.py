"""Histories built on the device from spans give exactly the host pipeline's batches; more
prefetch threads keep the batch order and the resumable position."""

import types

import jax
import numpy as np
import pytest

from dare_jax.data import open_dataset, pipeline, preprocess_log
from dare_jax.data.device_histories import MAX_EVENTS, DeviceHistories
from dare_jax.data.storage import build_histories
from dare_jax.data.synthetic import write_taobao_log
from dare_jax.sharding import Partitioner


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_histories")
    write_taobao_log(root / "log.csv", 60, seed=3)
    return open_dataset(preprocess_log("taobao", root / "log.csv", root / "pre", progress=False))


def _plain_history(dataset, split, index, length):
    """Oracle: the sample's history as a Python list, left-padded to `length`."""
    row = int(dataset.array(f"{split}_row")[index])
    start = int(dataset.array("seq_offsets")[row])
    stop = start + int(dataset.array(f"{split}_pos")[index])
    events = dataset.array("seq_iid")[start:stop].tolist()[-length:]
    return [0] * (length - len(events)) + events


@pytest.mark.parametrize("length", [1, 7, 200, 1000])
def test_spans_rebuild_the_gathered_histories(dataset, length):
    rng = np.random.default_rng(length)
    partitioner = Partitioner()
    on_device = DeviceHistories(dataset, length, partitioner)
    for split in ("train", "val", "test"):
        indices = rng.integers(0, dataset.num_samples(split), size=16)
        gathered = dataset.gather(split, indices, length)
        spans = dataset.gather_spans(split, indices)
        assert spans["hist_start"].dtype == np.int64 and spans["hist_start"].shape == (16,)
        for key in ("uid", "iid", "cid", "label"):
            np.testing.assert_array_equal(spans[key], gathered[key])
        oracle = _plain_history(dataset, split, indices[3], length)
        assert gathered["hist_iid"][3].tolist() == oracle
        sequences = (dataset.array("seq_iid"), dataset.array("seq_cid"))
        host = build_histories(sequences, spans["hist_start"], spans["hist_stop"], length)
        np.testing.assert_array_equal(host[0], gathered["hist_iid"])
        np.testing.assert_array_equal(host[1], gathered["hist_cid"])
        span_batch = {**spans, "hist_start": spans["hist_start"].astype(np.int32)}
        span_batch["hist_stop"] = spans["hist_stop"].astype(np.int32)
        built = on_device(partitioner.shard_batch(span_batch, 16))
        assert set(built) == set(gathered)
        for key, value in gathered.items():
            assert built[key].dtype == value.dtype
            np.testing.assert_array_equal(np.asarray(built[key]), value)


@pytest.mark.parametrize("blind", [False, True])
def test_device_pipeline_gives_the_host_pipelines_batches(dataset, blind):
    partitioner = Partitioner()
    on_device = DeviceHistories(dataset, 20, partitioner)
    common = dict(batch_size=32, seed=1, num_epochs=2, max_length=20, blind_history=blind)
    host = pipeline.train_dataset(dataset, **common)
    device = pipeline.train_dataset(dataset, histories="device", **common)
    assert len(host) == len(device)
    for index in (0, 1, len(host) - 1):
        spans = device[index]
        assert set(spans) == {"uid", "iid", "cid", "label", "hist_start", "hist_stop"}
        assert spans["hist_start"].dtype == np.int32
        built = on_device(partitioner.shard_batch(spans, 32))
        for key, value in host[index].items():
            np.testing.assert_array_equal(np.asarray(built[key]), value)
        if blind:
            assert not np.asarray(built["hist_iid"]).any()
    host_eval = list(pipeline.eval_batches(dataset, "val", batch_size=50, max_length=20))
    device_eval = pipeline.eval_batches(
        dataset, "val", batch_size=50, max_length=20, histories="device"
    )
    for (batch, valid), (spans, device_valid) in zip(host_eval, device_eval, strict=True):
        np.testing.assert_array_equal(valid, device_valid)
        built = on_device(partitioner.shard_batch(spans, 50))
        np.testing.assert_array_equal(np.asarray(built["hist_cid"]), batch["hist_cid"])
    with pytest.raises(ValueError, match="histories='gpu'"):
        pipeline.train_dataset(dataset, histories="gpu", **common)


def test_prefetch_threads_keep_order_and_resume(dataset):
    data = pipeline.train_dataset(dataset, batch_size=16, seed=0, num_epochs=2, max_length=5)
    data = data.map(lambda batch: jax.device_put(batch))  # as the trainer maps its copy
    single = pipeline.train_iterator(data, threads=1)
    one = [next(single)["uid"] for _ in range(9)]
    many = pipeline.train_iterator(data, prefetch=8, threads=4)
    for expected in one[:4]:
        np.testing.assert_array_equal(np.asarray(next(many)["uid"]), np.asarray(expected))
    resumed = pipeline.train_iterator(data, many.get_state(), prefetch=8, threads=4)
    for expected in one[4:]:
        np.testing.assert_array_equal(np.asarray(next(resumed)["uid"]), np.asarray(expected))
    unthreaded = pipeline.train_iterator(data, prefetch=0)
    np.testing.assert_array_equal(np.asarray(next(unthreaded)["uid"]), np.asarray(one[0]))


def test_more_events_than_int32_spans_is_refused():
    huge = types.SimpleNamespace(array=lambda name: types.SimpleNamespace(shape=(MAX_EVENTS + 1,)))
    with pytest.raises(ValueError, match="data.histories = 'host'"):
        DeviceHistories(huge, 20, Partitioner())
