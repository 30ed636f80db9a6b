"""Import of the official preprocessed (pickled) files into our format."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dare_jax.data import load_split, open_dataset, preprocess_log
from dare_jax.interop.official_data import OfficialDataError, import_official
from tests.conftest import shared_path

RAW = {"taobao": ("data", "taobao", "UserBehavior_head_84k.csv"),
       "tmall": ("data", "tmall", "user_log_format1_head_75k.csv")}
SPLITS = ("train", "val", "test")


def official_arrays(directory: Path, split: str) -> dict[str, np.ndarray]:
    """The official rows of a split as plain arrays, read independently of the importer."""
    files = sorted(directory.glob("train_*_*.npy")) if split == "train" else [
        directory / f"{split}.npy"]
    rows = [r for f in files for r in np.load(f, allow_pickle=True)]  # trusted fixture
    return {
        "uid": np.array([r[0] for r in rows]), "iid": np.array([r[1] for r in rows]),
        "cid": np.array([r[2] for r in rows]),
        "label": np.array([1 if list(r[3]) == [1, 0] else 0 for r in rows]),
        "hist_iid": np.array([r[4] for r in rows]), "hist_cid": np.array([r[5] for r in rows]),
    }


@pytest.fixture(scope="module", params=["taobao", "tmall"])
def imported(request, tmp_path_factory):
    kind = request.param
    src = shared_path("fixtures", "official_preprocessed", kind)
    out = import_official(src, tmp_path_factory.mktemp(kind) / "imp", dataset=kind,
                          progress=False)
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
                flat = np.concatenate([d["uid"][m, None], d["iid"][m, None], d["cid"][m, None],
                                       d["hist_iid"][m], d["hist_cid"][m]], axis=1)
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
