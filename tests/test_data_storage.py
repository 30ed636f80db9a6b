"""Storage format, gather, atomic writes, and every bad-input error of the data layer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dare_jax.data import DatasetError, load_split, open_dataset, preprocess_log, storage
from dare_jax.data.protocol import ProtocolError
from dare_jax.data.raw_logs import RawLogError, read_taobao_log, read_tmall_log
from tests.conftest import REPO_ROOT, shared_path

TAOBAO = ("data", "taobao", "UserBehavior_head_84k.csv")
TMALL_HEADER = "user_id,item_id,cat_id,seller_id,brand_id,time_stamp,action_type"


@pytest.fixture(scope="module")
def taobao_ds(tmp_path_factory) -> Path:
    return preprocess_log("taobao", shared_path(*TAOBAO), tmp_path_factory.mktemp("tb") / "ds",
                          progress=False)


def naive_history(seq: np.ndarray, pos: int, length: int) -> np.ndarray:
    part = seq[:pos][-length:] if length else seq[:0]
    return np.concatenate([np.zeros(length - part.shape[0], seq.dtype), part])


# ----------------------------------------------------------------------------- format


def test_files_are_plain_int_npy_and_manifest_is_complete(taobao_ds):
    for name in storage.array_names():
        arr = np.load(taobao_ds / f"{name}.npy", allow_pickle=False)  # no pickle needed
        assert arr.dtype in (np.int32, np.int64)
    m = json.loads((taobao_ds / "manifest.json").read_text())
    for key in ("protocol_version", "dataset", "seed", "counts", "user_count", "item_count",
                "category_count", "item_n", "cate_n", "min_events", "train_target_offsets",
                "negatives_per_positive", "source_files"):
        assert key in m, key
    src = m["source_files"][0]
    raw = shared_path(*TAOBAO)
    assert src["name"] == raw.name and src["size"] == raw.stat().st_size
    assert src["sha256"] == storage.sha256_file(raw)
    assert m["item_n"] == m["item_count"] + 1 and m["cate_n"] == m["category_count"] + 1
    # each user's sequence is stored once, whole (not only the last 200 events)
    lengths = np.diff(np.load(taobao_ds / "seq_offsets.npy"))
    assert lengths.min() >= 210 and lengths.shape[0] == m["sequence_rows"] == 78


@pytest.mark.parametrize("max_length", [1, 50, 200, 1000, 10_000])
def test_gather_matches_naive_slicing_for_any_length(taobao_ds, max_length):
    ds = open_dataset(taobao_ds)
    seq_iid, seq_cid = np.asarray(ds.array("seq_iid")), np.asarray(ds.array("seq_cid"))
    off = np.asarray(ds.array("seq_offsets"))
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        idx = rng.choice(ds.num_samples(split), size=40, replace=False)
        got = ds.gather(split, idx, max_length=max_length)
        assert got["hist_iid"].shape == (40, max_length)
        for k in ("uid", "iid", "cid", "label", "hist_iid", "hist_cid"):
            assert got[k].dtype == np.int32, k
        rows = np.asarray(ds.array(f"{split}_row"))[idx]
        pos = np.asarray(ds.array(f"{split}_pos"))[idx]
        for b in range(40):
            r = rows[b]
            np.testing.assert_array_equal(
                got["hist_iid"][b], naive_history(seq_iid[off[r]:off[r + 1]], pos[b], max_length))
            np.testing.assert_array_equal(
                got["hist_cid"][b], naive_history(seq_cid[off[r]:off[r + 1]], pos[b], max_length))


def test_load_split_equals_gather_of_everything(taobao_ds):
    ds = open_dataset(taobao_ds)
    whole = load_split(taobao_ds, "val", max_length=30)
    part = ds.gather("val", np.arange(ds.num_samples("val")), max_length=30)
    for k in whole:
        np.testing.assert_array_equal(whole[k], part[k])


def test_gather_is_fast(taobao_ds):
    ds = open_dataset(taobao_ds)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, ds.num_samples("train"), size=2048)
    ds.gather("train", idx)  # warm the page cache
    times = []
    for _ in range(20):
        t = time.perf_counter()
        ds.gather("train", idx, max_length=200)
        times.append(time.perf_counter() - t)
    # 'well under 10 ms' on an idle core; the bound leaves room for a loaded shared machine
    assert np.median(times) < 0.02, np.median(times)


def test_bad_split_and_arguments(taobao_ds):
    ds = open_dataset(taobao_ds)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ds.num_samples("dev")
    with pytest.raises(ValueError, match="unknown split"):
        ds.gather("validation", [0])
    with pytest.raises(ValueError, match="max_length"):
        ds.gather("val", [0], max_length=0)
    with pytest.raises(IndexError):
        ds.gather("val", [ds.num_samples("val")])


# ----------------------------------------------------------------------------- manifest


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_open_dataset_errors(taobao_ds, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        open_dataset(empty)
    bad = copy_dataset(taobao_ds, tmp_path / "badjson")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        open_dataset(bad)
    old = copy_dataset(taobao_ds, tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    m["protocol_version"] = 0
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="protocol version 0"):
        open_dataset(old)
    gone = copy_dataset(taobao_ds, tmp_path / "gone")
    (gone / "test_iid.npy").unlink()
    with pytest.raises(DatasetError, match="test_iid.npy is missing"):
        open_dataset(gone)
    short = copy_dataset(taobao_ds, tmp_path / "short")
    np.save(short / "val_label.npy", np.zeros(3, np.int32))
    with pytest.raises(DatasetError, match="shape"):
        open_dataset(short)


# ----------------------------------------------------------------------------- atomicity


def test_existing_output_is_refused(taobao_ds):
    with pytest.raises(FileExistsError, match="already exists"):
        preprocess_log("taobao", shared_path(*TAOBAO), taobao_ds, progress=False)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = np.save

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the write
        return real_save(*args, **kwargs)

    monkeypatch.setattr(storage.np, "save", flaky_save)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        preprocess_log("taobao", shared_path(*TAOBAO), out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary sibling was removed too


def test_interrupted_overwrite_keeps_old_dataset(taobao_ds, tmp_path, monkeypatch):
    out = copy_dataset(taobao_ds, tmp_path / "ds")
    before = (out / "manifest.json").read_text()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        preprocess_log("taobao", shared_path(*TAOBAO), out, seed=9, overwrite=True,
                       progress=False)
    assert (out / "manifest.json").read_text() == before
    open_dataset(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_existing_empty_directory_is_reused(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    preprocess_log("taobao", shared_path(*TAOBAO), out, progress=False)
    open_dataset(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        preprocess_log("taobao", shared_path(*TAOBAO), tmp_path / "other", progress=False)


def test_overwrite_replaces(taobao_ds, tmp_path):
    out = copy_dataset(taobao_ds, tmp_path / "ds")
    preprocess_log("taobao", shared_path(*TAOBAO), out, seed=4, overwrite=True, progress=False)
    assert open_dataset(out).manifest["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ----------------------------------------------------------------------------- bad input


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = "1,10,100,pv,1000\n1,11,100,buy,1001\n"


@pytest.mark.parametrize(
    "text, line, pattern",
    [
        (GOOD + "1,12,100,pv\n", 3, "expected 5 comma-separated fields, found 4"),
        (GOOD + "1,12,100,pv,5,6\n", 3, "found 6"),
        (GOOD + "1,x12,100,pv,1002\n", 3, "'item_id' is not an integer \\(value 'x12'\\)"),
        (GOOD + "1,12,1.5,pv,1002\n", 3, "'category_id' is not an integer \\(value '1.5'\\)"),
        (GOOD + "1,12,100,click,1002\n", 3, "unknown behavior_type 'click'"),
        (GOOD + "\n1,12,100,pv,1002\n", 3, "field 'user_id' is empty|found 1"),
        (GOOD + "1,,100,pv,1002\n", 3, "'item_id' is (empty|not an integer)"),
    ],
)
def test_taobao_bad_lines_name_file_line_and_value(tmp_path, text, line, pattern):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(RawLogError, match=pattern) as info:
        read_taobao_log(path, progress=False)
    assert info.value.line == line
    assert str(path) in str(info.value) and f"line {line}" in str(info.value)


def test_bad_line_far_into_a_big_file_is_located(tmp_path):
    good = "".join(f"{u},{u * 7},{u % 13},pv,{1000 + u}\n" for u in range(300_000))
    path = write(tmp_path / "big.csv", good + "5,6,oops,pv,7\n" + good)
    with pytest.raises(RawLogError, match="'category_id' is not an integer") as info:
        read_taobao_log(path, progress=False)
    assert info.value.line == 300_001
    path = write(tmp_path / "big2.csv", good + "5,6,7,view,7\n" + good)
    with pytest.raises(RawLogError, match="unknown behavior_type 'view'") as info:
        read_taobao_log(path, progress=False)
    assert info.value.line == 300_001


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="raw log not found"):
        read_taobao_log(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="raw log not found"):
        preprocess_log("tmall", tmp_path / "nope.csv", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "body, line, pattern",
    [
        ("1,2,3,4,5,0829,7\n", 2, "unknown action_type 7"),
        ("1,2,3,4,,0829,0\n1,2,3,4,5,08a9,0\n", 3, "not a 4-digit MMDD \\(value '08a9'\\)"),
        ("1,2,3,4,5,0829\n", 2, "expected 7 comma-separated fields, found 6"),
        ("1,2,c3,4,5,0829,0\n", 2, "'cat_id' is not an integer"),
    ],
)
def test_tmall_bad_lines(tmp_path, body, line, pattern):
    path = write(tmp_path / "log.csv", TMALL_HEADER + "\n" + body)
    with pytest.raises(RawLogError, match=pattern) as info:
        read_tmall_log(path, progress=False)
    assert info.value.line == line


def test_tmall_header_and_filters(tmp_path):
    with pytest.raises(RawLogError, match="line 1: expected header"):
        read_tmall_log(write(tmp_path / "h.csv", "1,2,3,4,5,0829,0\n"), progress=False)
    # brand_id may be empty; non-clicks and non-4-character time stamps are dropped;
    # clicks are returned in file order with MMDD as a number
    body = "1,2,3,4,,0829,0\n1,5,3,4,9,0829,2\n1,6,3,4,9,829,0\n2,7,8,4,9,1111,0\n"
    log = read_tmall_log(write(tmp_path / "ok.csv", TMALL_HEADER + "\n" + body), progress=False)
    assert log.user.tolist() == [1, 2] and log.item.tolist() == [2, 7]
    assert log.time.tolist() == [829, 1111] and log.rows_read == 4


def test_tmall_sort_is_stable_by_mmdd(tmp_path):
    # user 5 clicks out of time order, with a tie: ids follow (time, file order)
    body = "5,30,1,0,0,0901,0\n5,10,1,0,0,0511,0\n5,20,2,0,0,0901,0\n5,40,3,0,0,0511,0\n"
    body += "".join(f"5,{100 + k},9,0,0,1001,0\n" for k in range(210))
    body += "6,999,9,0,0,1001,0\n"  # an item user 5 never saw, so negatives exist
    out = preprocess_log("tmall", write(tmp_path / "s.csv", TMALL_HEADER + "\n" + body),
                         tmp_path / "ds", progress=False)
    raw_iid = np.load(out / "raw_iid.npy")
    assert raw_iid[1:5].tolist() == [10, 40, 30, 20]


def test_user_who_touched_every_item_is_an_error(tmp_path):
    path = write(tmp_path / "all.csv", "".join(f"1,{i % 5},1,pv,{i}\n" for i in range(250)))
    with pytest.raises(ProtocolError, match="touched every item"):
        preprocess_log("taobao", path, tmp_path / "out", progress=False)


def test_empty_result_after_filter(tmp_path):
    path = write(tmp_path / "few.csv", "".join(f"1,{i},1,pv,{i}\n" for i in range(209)))
    with pytest.raises(ProtocolError, match="no user has at least 210"):
        preprocess_log("taobao", path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    only_buys = write(tmp_path / "buys.csv", "1,2,3,buy,4\n")
    with pytest.raises(ProtocolError, match="no event of the kept type"):
        preprocess_log("taobao", only_buys, tmp_path / "out", progress=False)


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind"):
        preprocess_log("amazon", shared_path(*TAOBAO), tmp_path / "x")


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    bad = write(tmp_path / "bad.csv", GOOD + "1,zz,100,pv,1002\n")
    for args in (
        ("preprocessing.taobao", "--input", str(tmp_path / "missing.csv"), "--output",
         str(tmp_path / "o")),
        ("preprocessing.taobao", "--input", str(bad), "--output", str(tmp_path / "o")),
        ("preprocessing.tmall", "--input", str(bad), "--output", str(tmp_path / "o")),
        ("preprocessing.import_official", "--input", str(tmp_path), "--output",
         str(tmp_path / "o")),
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    proc = run_cli("preprocessing.taobao", "--input", str(bad), "--output", str(tmp_path / "o"))
    assert f"{bad}, line 3" in proc.stderr and "'zz'" in proc.stderr
    assert run_cli("preprocessing.taobao").returncode == 2  # argparse: missing arguments


def test_cli_log_without_long_users_names_the_threshold_and_the_closest_users(tmp_path):
    # Users 1..7 with 200, 150, 120, 100, 80, 60, 40 pv events (and buys that do not count).
    counts = [200, 150, 120, 100, 80, 60, 40]
    rows = [f"{u},{u * 1000 + i},{i % 9 + 1},pv,{i}\n" for u, n in enumerate(counts, 1)
            for i in range(n)]
    rows += [f"1,{50_000 + i},1,buy,{i}\n" for i in range(30)]
    log = write(tmp_path / "short.csv", "".join(rows))
    with pytest.raises(ProtocolError) as error:
        preprocess_log("taobao", log, tmp_path / "lib", progress=False)
    assert "at least 210 kept events" in str(error.value)
    assert "200, 150, 120, 100 and 80 events" in str(error.value)
    assert "of the 7 users" in str(error.value)
    proc = run_cli("preprocessing.taobao", "--input", str(log), "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "210" in proc.stderr and "200, 150, 120, 100 and 80 events" in proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "lib").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.csv"]  # no temporary left


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "ds"
    proc = run_cli("preprocessing.taobao", "--input", str(shared_path(*TAOBAO)), "--output",
                   str(out), "--seed", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert open_dataset(out).manifest["seed"] == 3
    proc = run_cli("preprocessing.taobao", "--input", str(shared_path(*TAOBAO)), "--output",
                   str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    help_text = run_cli("preprocessing.tmall", "--help").stdout
    assert "--overwrite" in help_text and "--seed" in help_text
