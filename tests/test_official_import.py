"""Import of the official preprocessed (pickled) files into our format."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from dare_jax.data import load_split, open_dataset, preprocess_log
from dare_jax.interop.official_data import OfficialDataError, import_official
from tests.conftest import shared_path

RAW = {
    "taobao": ("data", "taobao", "UserBehavior_head_84k.csv"),
    "tmall": ("data", "tmall", "user_log_format1_head_75k.csv"),
}
SPLITS = ("train", "val", "test")


def official_arrays(directory: Path, split: str) -> dict[str, np.ndarray]:
    """The official rows of a split as plain arrays, read independently of the importer."""
    files = (
        sorted(directory.glob("train_*_*.npy"))
        if split == "train"
        else [directory / f"{split}.npy"]
    )
    rows = [r for f in files for r in np.load(f, allow_pickle=True)]  # trusted fixture
    return {
        "uid": np.array([r[0] for r in rows]),
        "iid": np.array([r[1] for r in rows]),
        "cid": np.array([r[2] for r in rows]),
        "label": np.array([1 if list(r[3]) == [1, 0] else 0 for r in rows]),
        "hist_iid": np.array([r[4] for r in rows]),
        "hist_cid": np.array([r[5] for r in rows]),
    }


@pytest.fixture(scope="module", params=["taobao", "tmall"])
def imported(request, tmp_path_factory):
    kind = request.param
    src = shared_path("fixtures", "official_preprocessed", kind)
    out = import_official(src, tmp_path_factory.mktemp(kind) / "imp", dataset=kind, progress=False)
    return kind, src, out


def test_load_split_returns_the_official_rows(imported):
    _, src, out = imported
    for split in SPLITS:
        got = load_split(out, split)
        want = official_arrays(src, split)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{split} {k}")
            assert got[k].dtype == np.int32


def test_manifest_and_mappings(imported):
    kind, src, out = imported
    ds = open_dataset(out)
    m = ds.manifest
    assert m["max_length"] == 200 and m["dataset"] == kind
    iid_map = np.load(src / "iid_mapping.npy", allow_pickle=True).item()
    cid_map = np.load(src / "cid_mapping.npy", allow_pickle=True).item()
    assert m["item_n"] == len(iid_map) + 1 and m["cate_n"] == len(cid_map) + 1
    raw_iid = np.asarray(ds.array("raw_iid"))
    assert all(raw_iid[d] == r for r, d in iid_map.items())
    with pytest.raises(ValueError, match="at most 200"):
        ds.gather("val", [0], max_length=201)
    short = ds.gather("val", [0, 1], max_length=20)
    np.testing.assert_array_equal(short["hist_iid"], load_split(out, "val")["hist_iid"][:2, -20:])
    # one stored window per positive, shared by its negatives
    assert m["sequence_rows"] <= sum(m["counts"].values()) // 3 + 1
    assert {e["name"] for e in m["source_files"]} >= {"val.npy", "test.npy", "iid_mapping.npy"}


def test_import_equals_own_preprocessing_apart_from_negatives(imported, tmp_path):
    kind, _, out = imported
    ours = preprocess_log(kind, shared_path(*RAW[kind]), tmp_path / "ours", progress=False)
    assert open_dataset(ours).manifest["item_n"] == open_dataset(out).manifest["item_n"]
    for name in ("raw_uid", "raw_iid", "raw_cid"):
        np.testing.assert_array_equal(np.load(ours / f"{name}.npy"), np.load(out / f"{name}.npy"))
    for split in SPLITS:
        a, b = load_split(out, split), load_split(ours, split)
        assert a["label"].shape == b["label"].shape
        if split != "train":  # same order: per user, positive then its two negatives
            np.testing.assert_array_equal(a["label"], b["label"])
            pos = a["label"] == 1
            for k in a:
                np.testing.assert_array_equal(a[k][pos], b[k][pos], err_msg=f"{split} {k}")
            for k in ("uid", "hist_iid", "hist_cid"):  # negatives share the positive's history
                np.testing.assert_array_equal(a[k], b[k])
        else:  # both shuffled, differently: compare the positive rows as sets

            def rows(d):
                m = d["label"] == 1
                flat = np.concatenate(
                    [
                        d["uid"][m, None],
                        d["iid"][m, None],
                        d["cid"][m, None],
                        d["hist_iid"][m],
                        d["hist_cid"][m],
                    ],
                    axis=1,
                )
                return flat[np.lexsort(flat.T[::-1])]

            np.testing.assert_array_equal(rows(a), rows(b))


def test_import_errors(tmp_path):
    src = shared_path("fixtures", "official_preprocessed", "taobao")
    with pytest.raises(OfficialDataError, match="not found"):
        import_official(tmp_path / "none", tmp_path / "o")
    partial = tmp_path / "partial"
    shutil.copytree(src, partial)
    (partial / "val.npy").unlink()
    with pytest.raises(OfficialDataError, match="val.npy is missing"):
        import_official(partial, tmp_path / "o", progress=False)
    renamed = tmp_path / "renamed"
    shutil.copytree(src, renamed)
    train = next(renamed.glob("train_*"))
    train.rename(renamed / "train_0001_17.npy")
    with pytest.raises(OfficialDataError, match="file name says 17 rows"):
        import_official(renamed, tmp_path / "o", progress=False)
    gap = tmp_path / "gap"
    shutil.copytree(src, gap)
    next(gap.glob("train_*")).rename(gap / "train_0002_4446.npy")
    with pytest.raises(OfficialDataError, match="numbered"):
        import_official(gap, tmp_path / "o", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    data = np.load(broken / "test.npy", allow_pickle=True)
    data[1, 4] = data[1, 4][:150]
    np.save(broken / "test.npy", data, allow_pickle=True)
    with pytest.raises(OfficialDataError, match="test.npy"):
        import_official(broken, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    out = import_official(src, tmp_path / "ok", progress=False)
    with pytest.raises(FileExistsError):
        import_official(src, out, progress=False)


# --- several train files (streaming import), written from a synthetic dataset ----------

FILE_ROWS = 500  # train rows per official file here (the official scripts use 102,400)


def official_object_rows(got: dict[str, np.ndarray]) -> np.ndarray:
    """Samples as an official object array [N, 6]: uid, iid, cid, one-hot, 2 x list(200)."""
    n = got["uid"].shape[0]
    rows = np.empty((n, 6), dtype=object)
    for i in range(n):
        rows[i, 0], rows[i, 1], rows[i, 2] = (int(got[k][i]) for k in ("uid", "iid", "cid"))
        rows[i, 3] = [1, 0] if got["label"][i] == 1 else [0, 1]
        rows[i, 4] = got["hist_iid"][i].tolist()
        rows[i, 5] = got["hist_cid"][i].tolist()
    return rows


def write_official_dir(ds_dir: Path, out: Path, file_rows: int) -> dict[str, dict]:
    """Write ``ds_dir``'s samples in the official layout; returns the rows written per split."""
    ds = open_dataset(ds_dir)
    out.mkdir()
    written = {}
    for split in SPLITS:
        got = ds.gather(split, slice(None))
        written[split] = got
        rows = official_object_rows(got)
        if split == "train":
            for k, lo in enumerate(range(0, rows.shape[0], file_rows), start=1):
                part = rows[lo : lo + file_rows]
                np.save(out / f"train_{k:04d}_{part.shape[0]}.npy", part, allow_pickle=True)
        else:
            np.save(out / f"{split}.npy", rows, allow_pickle=True)
    for key in ("uid", "iid", "cid"):
        raw = np.asarray(ds.array(f"raw_{key}"))
        mapping = {int(r): d for d, r in enumerate(raw.tolist()) if d > 0}
        np.save(out / f"{key}_mapping.npy", mapping, allow_pickle=True)  # a pickled dict
    return written


@pytest.fixture(scope="module")
def multi_file(tmp_path_factory):
    from dare_jax.data.synthetic import write_taobao_log

    base = tmp_path_factory.mktemp("multi")
    write_taobao_log(base / "log.csv", n_users=30, seed=3)
    ds_dir = preprocess_log("taobao", base / "log.csv", base / "ds", progress=False)
    written = write_official_dir(ds_dir, base / "official", FILE_ROWS)
    single = write_official_dir(ds_dir, base / "official_one_file", 10**9)
    return base / "official", base / "official_one_file", written, single


def test_several_train_files_import_to_the_rows_written(multi_file, tmp_path):
    src, _, written, _ = multi_file
    n_train = written["train"]["uid"].shape[0]
    n_files = len(list(src.glob("train_*.npy")))
    assert n_files == -(-n_train // FILE_ROWS) >= 3
    out = import_official(src, tmp_path / "imp", progress=False)
    for split in SPLITS:
        got = load_split(out, split)
        for k, want in written[split].items():
            np.testing.assert_array_equal(got[k], want, err_msg=f"{split} {k}")
    # Independent recount of distinct windows (uid, hist_iid, hist_cid) in plain Python.
    windows = {}
    for split in SPLITS:
        w = written[split]
        for i in range(w["uid"].shape[0]):
            key = (int(w["uid"][i]), w["hist_iid"][i].tobytes(), w["hist_cid"][i].tobytes())
            windows.setdefault(key, len(windows))
    m = open_dataset(out).manifest
    assert m["sequence_rows"] == len(windows)
    assert m["counts"] == {s: int(written[s]["uid"].shape[0]) for s in SPLITS}
    # Rows are numbered in order of first use, and shared across files: the shuffle puts
    # a positive and its negatives in different files, which must not duplicate rows.
    rows = np.concatenate([np.load(out / f"{s}_row.npy") for s in SPLITS])
    expected = []
    for split in SPLITS:
        w = written[split]
        for i in range(w["uid"].shape[0]):
            expected.append(
                windows[(int(w["uid"][i]), w["hist_iid"][i].tobytes(), w["hist_cid"][i].tobytes())]
            )
    np.testing.assert_array_equal(rows, expected)
    train_rows = rows[:n_train]
    file_of = np.arange(n_train) // FILE_ROWS
    spans = [np.unique(file_of[train_rows == r]).size for r in np.unique(train_rows)]
    assert max(spans) >= 2
    assert {e["name"] for e in m["source_files"]} >= {f.name for f in src.glob("train_*.npy")}


def test_several_files_equal_one_file(multi_file, tmp_path):
    src, one, _, _ = multi_file
    a = import_official(src, tmp_path / "a", progress=False)
    b = import_official(one, tmp_path / "b", progress=False)
    from dare_jax.data.storage import array_names

    for name in array_names():
        np.testing.assert_array_equal(
            np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy"), err_msg=name
        )


def test_corrupt_or_truncated_train_file_is_named(multi_file, tmp_path):
    src, _, _, _ = multi_file
    second = sorted(src.glob("train_*.npy"))[1]
    cases = {
        "truncated": lambda b: b[: len(b) // 2],
        "garbage": lambda b: b[:128] + b"\xff" * 32 + b[160:],  # the pickle stream's start
        "header": lambda b: b"not a npy file" + b[14:],
    }
    for case, damage in cases.items():
        bad = tmp_path / case
        shutil.copytree(src, bad)
        target = bad / second.name
        target.write_bytes(damage(target.read_bytes()))
        with pytest.raises(OfficialDataError, match=re.escape(str(target))):
            import_official(bad, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_bad_rows_are_named(multi_file, tmp_path):
    src, _, _, _ = multi_file
    third = sorted(src.glob("train_*.npy"))[2]
    data = np.load(third, allow_pickle=True)  # trusted: written by the fixture
    for field, col, value, message in (
        ("label", 3, [1, 1], "row 7: label [1, 1] is not one-hot"),
        ("item", 1, 10**7, "row 7: iid has ids outside"),
        ("hist", 5, [0] * 199 + [-1], "row 7: hist_cid has ids outside"),
        ("short", 4, [1] * 150, "row 7: hist_iid is not a list of 200"),
        ("uid list", 0, [3], "row 7: uid is not an integer"),
    ):
        bad = tmp_path / field
        shutil.copytree(src, bad)
        broken = data.copy()
        broken[7, col] = value
        np.save(bad / third.name, broken, allow_pickle=True)
        with pytest.raises(OfficialDataError, match=re.escape(f"{bad / third.name}: {message}")):
            import_official(bad, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_reports_a_corrupt_file_without_traceback(multi_file, tmp_path, capsys):
    from preprocessing.import_official import main

    src, _, _, _ = multi_file
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    target = sorted(bad.glob("train_*.npy"))[1]
    target.write_bytes(target.read_bytes()[:1000])
    assert main(["--input", str(bad), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "Traceback" not in err
    assert main(["--input", str(src), "--output", str(tmp_path / "o"), "--no-progress"]) == 0
    assert open_dataset(tmp_path / "o").manifest["dataset"] == src.name


def test_hash_collisions_never_merge_windows(multi_file, tmp_path, monkeypatch):
    from dare_jax.interop import official_data

    src, _, _, _ = multi_file
    # Same key for every window of a file: caught inside the file.
    monkeypatch.setattr(
        official_data, "_window_hash", lambda uid, *_: np.zeros((uid.shape[0], 2), dtype=np.uint64)
    )
    with pytest.raises(OfficialDataError, match="train_0001_.*collision"):
        import_official(src, tmp_path / "o", progress=False)
    # Keys distinct inside a file but repeated by the next file: caught against the rows
    # stored from the earlier file.
    monkeypatch.setattr(
        official_data,
        "_window_hash",
        lambda uid, *_: np.repeat(np.arange(uid.shape[0], dtype=np.uint64)[:, None], 2, axis=1),
    )
    with pytest.raises(OfficialDataError, match="train_0002_.*collision with an earlier file"):
        import_official(src, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_window_table_separates_64_bit_collisions():
    from dare_jax.interop.official_data import WindowTable

    table = WindowTable()
    keys = np.array([[5, 1], [5, 2], [3, 9]], dtype=np.uint64)
    np.testing.assert_array_equal(table.lookup(keys), [-1, -1, -1])
    np.testing.assert_array_equal(table.add(keys), [0, 1, 2])
    query = np.array([[5, 2], [5, 3], [3, 9], [7, 1], [5, 1]], dtype=np.uint64)
    np.testing.assert_array_equal(table.lookup(query), [1, -1, 2, -1, 0])
    np.testing.assert_array_equal(table.add(query[[1, 3]]), [3, 4])
    np.testing.assert_array_equal(table.lookup(query), [1, 3, 2, 4, 0])
    assert len(table) == 5
