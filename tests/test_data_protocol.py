"""The SPEC section 2 protocol against an independent plain-Python recomputation,
the official preprocessed fixtures, and a popularity test of the negatives."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from dare_jax.data import load_split, open_dataset, preprocess_log
from tests.conftest import shared_path

TAOBAO = ("data", "taobao", "UserBehavior_head_84k.csv")
TMALL = ("data", "tmall", "user_log_format1_head_75k.csv")
OFFICIAL = ("fixtures", "official_preprocessed")
EXPECTED_COUNTS = {"taobao": (4446, 234, 234), "tmall": (5130, 270, 270)}


# ----------------------------------------------------------------------------- oracle


def oracle(path: Path, kind: str) -> dict:
    """The protocol written the slow, obvious way: dicts, lists, one loop per row."""
    per_user: dict[int, list[tuple[int, int, int]]] = {}
    with open(path) as fh:
        lines = fh.read().splitlines()
    if kind == "tmall":
        lines = lines[1:]
    for line in lines:
        f = line.split(",")
        if kind == "taobao":
            if f[3] != "pv":
                continue
            uid, iid, cid, ts = int(f[0]), int(f[1]), int(f[2]), int(f[4])
        else:
            if int(f[6]) != 0 or len(f[5]) != 4:
                continue
            uid, iid, cid, ts = int(f[0]), int(f[1]), int(f[2]), int(f[5])
        per_user.setdefault(uid, []).append((ts, iid, cid))
    for events in per_user.values():
        events.sort(key=lambda e: e[0])  # list.sort is stable: ties keep file order
    umap: dict[int, int] = {}
    imap: dict[int, int] = {}
    cmap: dict[int, int] = {}
    item_cat: dict[int, int] = {}
    item_count: Counter = Counter()
    seqs: dict[int, list[tuple[int, int]]] = {}
    for uid, events in per_user.items():
        u = umap.setdefault(uid, len(umap) + 1)
        seq = []
        for _, iid, cid in events:
            i = imap.setdefault(iid, len(imap) + 1)
            c = cmap.setdefault(cid, len(cmap) + 1)
            item_cat[i] = c  # the last one seen wins
            item_count[i] += 1
            seq.append((i, c))
        seqs[u] = seq

    positives = {"train": [], "val": [], "test": []}
    touched = {}
    for u, seq in seqs.items():
        if len(seq) < 210:
            continue
        touched[u] = {i for i, _ in seq}
        t = len(seq)
        targets = {"train": [t - j for j in range(3, 94, 5)], "val": [t - 2], "test": [t - 1]}
        for split, ends in targets.items():
            for end in ends:
                hi = tuple([0] * (200 - len(seq[:end][-200:])) + [e[0] for e in seq[:end][-200:]])
                hc = tuple([0] * (200 - len(seq[:end][-200:])) + [e[1] for e in seq[:end][-200:]])
                positives[split].append((u, seq[end][0], seq[end][1], hi, hc))
    return {"umap": umap, "imap": imap, "cmap": cmap, "item_cat": item_cat,
            "item_count": item_count, "positives": positives, "touched": touched}


def rows_of(batch: dict[str, np.ndarray], label: int) -> list[tuple]:
    m = batch["label"] == label
    return [
        (int(u), int(i), int(c), tuple(hi.tolist()), tuple(hc.tolist()))
        for u, i, c, hi, hc in zip(batch["uid"][m], batch["iid"][m], batch["cid"][m],
                                   batch["hist_iid"][m], batch["hist_cid"][m])
    ]


def official_rows(path: Path) -> list[tuple]:
    data = np.load(path, allow_pickle=True)  # trusted test fixture
    return [(int(r[0]), int(r[1]), int(r[2]), tuple(r[3]), tuple(r[4]), tuple(r[5]))
            for r in data]


def official_split(kind: str, split: str) -> list[tuple]:
    directory = shared_path(*OFFICIAL, kind)
    if split == "train":
        rows = []
        for f in sorted(directory.glob("train_*_*.npy")):
            rows += official_rows(f)
        return rows
    return official_rows(directory / f"{split}.npy")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["taobao", "tmall"])
def case(request, tmp_path_factory):
    kind = request.param
    raw = shared_path(*(TAOBAO if kind == "taobao" else TMALL))
    out = preprocess_log(kind, raw, tmp_path_factory.mktemp(kind) / "ds", seed=0,
                         progress=False)
    return kind, raw, out, oracle(raw, kind)


# ----------------------------------------------------------------------------- tests


def test_ids_equal_oracle_and_official_mappings(case):
    kind, _, out, ref = case
    ds = open_dataset(out)
    for name, key in (("raw_uid", "umap"), ("raw_iid", "imap"), ("raw_cid", "cmap")):
        raw = np.asarray(ds.array(name))
        assert raw[0] == 0
        assert raw[1:].tolist() == list(ref[key]), name  # oracle: dict insertion order
        mapping = np.load(shared_path(*OFFICIAL, kind, f"{name[4:]}_mapping.npy"),
                          allow_pickle=True).item()
        assert {int(r): d for d, r in enumerate(raw[1:].tolist(), start=1)} == mapping, name
    m = ds.manifest
    assert m["item_n"] == len(ref["imap"]) + 1 and m["cate_n"] == len(ref["cmap"]) + 1
    assert m["user_count"] == len(ref["umap"])


def test_counts_and_positive_samples_equal_oracle(case):
    kind, _, out, ref = case
    ds = open_dataset(out)
    counts = tuple(ds.num_samples(s) for s in ("train", "val", "test"))
    assert counts == EXPECTED_COUNTS[kind]
    for split in ("train", "val", "test"):
        got = rows_of(load_split(out, split), 1)
        want = ref["positives"][split]
        if split == "train":  # shuffled: compare as multisets
            assert sorted(got) == sorted(want)
        else:  # user order, as in the official files
            assert got == want


def test_negatives_untouched_with_item_category_and_shared_history(case):
    kind, _, out, ref = case
    for split in ("train", "val", "test"):
        batch = load_split(out, split)
        neg = rows_of(batch, 0)
        pos = rows_of(batch, 1)
        assert len(neg) == 2 * len(pos)
        for u, i, c, _, _ in neg:
            assert i not in ref["touched"][u]
            assert c == ref["item_cat"][i]
        # every positive's (user, history) is shared by exactly two negatives
        pos_hist = Counter((u, hi, hc) for u, _, _, hi, hc in pos)
        neg_hist = Counter((u, hi, hc) for u, _, _, hi, hc in neg)
        assert neg_hist == Counter({k: 2 * v for k, v in pos_hist.items()})
        if split != "train":  # unshuffled: positive, negative, negative
            assert batch["label"].tolist() == [1, 0, 0] * (len(batch["label"]) // 3)


def test_positive_samples_equal_official_files(case):
    kind, _, out, ref = case
    for split in ("train", "val", "test"):
        official = official_split(kind, split)
        off_pos = [(u, i, c, hi, hc) for u, i, c, lab, hi, hc in official if lab == (1, 0)]
        ours = rows_of(load_split(out, split), 1)
        if split == "train":
            assert sorted(ours) == sorted(off_pos)
        else:
            assert ours == off_pos
        # The official negatives obey the same rules, which pins down subtle points
        # (e.g. which category wins for items seen with two).
        for u, i, c, lab, _, _ in official:
            if lab == (0, 1):
                assert i not in ref["touched"][u] and c == ref["item_cat"][i]


def test_seed_changes_only_negatives_and_shuffle(case, tmp_path):
    kind, raw, out, _ = case
    other = preprocess_log(kind, raw, tmp_path / "s1", seed=1, progress=False)
    for split in ("val", "test"):
        a, b = load_split(out, split), load_split(other, split)
        pos = a["label"] == 1
        for k in a:
            np.testing.assert_array_equal(a[k][pos], b[k][pos])
        assert not np.array_equal(a["iid"], b["iid"])
    a, b = load_split(out, "train"), load_split(other, "train")
    assert sorted(rows_of(a, 1)) == sorted(rows_of(b, 1))
    assert not np.array_equal(a["iid"], b["iid"])


def test_train_split_is_shuffled(case):
    _, _, out, _ = case
    uid = load_split(out, "train")["uid"]
    # unshuffled, all 57 samples of a user are adjacent; shuffled, hardly any are
    assert np.mean(uid[1:] == uid[:-1]) < 0.2


def test_negatives_follow_item_popularity(tmp_path):
    """Chi-square of drawn negatives against the exact rejection-sampling law."""
    from dare_jax.data.synthetic import write_taobao_log

    log = tmp_path / "synth.csv"
    write_taobao_log(log, n_users=1500, seed=3, target_rows=450_000, progress=False)
    out = preprocess_log("taobao", log, tmp_path / "ds", seed=5, progress=False)
    ds = open_dataset(out)
    seq_iid = np.asarray(ds.array("seq_iid"))
    offsets = np.asarray(ds.array("seq_offsets"))
    # popularity over the whole pv log, recomputed here from the raw file
    raw_to_dense = {int(r): d for d, r in enumerate(np.asarray(ds.array("raw_iid")).tolist())}
    count = np.zeros(len(raw_to_dense), dtype=np.float64)
    with open(log) as fh:
        for line in fh:
            f = line.split(",")
            if f[3] == "pv":
                count[raw_to_dense[int(f[1])]] += 1
    total = count.sum()
    expected = np.zeros_like(count)
    observed = np.zeros_like(count)
    for split in ("train", "val", "test"):
        row = np.asarray(ds.array(f"{split}_row"))
        iid = np.asarray(ds.array(f"{split}_iid"))
        label = np.asarray(ds.array(f"{split}_label"))
        neg_rows = Counter(row[label == 0].tolist())
        np.add.at(observed, iid[label == 0], 1)
        for r, n_neg in neg_rows.items():
            touched = np.unique(seq_iid[offsets[r]:offsets[r + 1]])
            p = count.copy()
            p[touched] = 0
            expected += n_neg * p / (total - count[touched].sum())
    # Bin items by expected count so every bin expects >= 20 draws.
    order = np.argsort(-expected)
    bins = np.zeros_like(expected, dtype=np.int64)
    acc, b = 0.0, 0
    for i in order:
        if expected[i] == 0:
            break
        bins[i] = b
        acc += expected[i]
        if acc >= 20:
            acc, b = 0.0, b + 1
    n_bins = b + 1
    obs_b = np.bincount(bins[expected > 0], weights=observed[expected > 0], minlength=n_bins)
    exp_b = np.bincount(bins[expected > 0], weights=expected[expected > 0], minlength=n_bins)
    assert observed[expected == 0].sum() == 0  # never a touched or zero-count item
    assert n_bins > 50
    p_value = stats.chisquare(obs_b, exp_b * obs_b.sum() / exp_b.sum()).pvalue
    assert p_value > 1e-3, p_value
    # and a uniform draw would have been rejected by the same test
    uniform = (expected > 0) / (expected > 0).sum() * observed.sum()
    uni_b = np.bincount(bins[expected > 0], weights=uniform[expected > 0], minlength=n_bins)
    assert stats.chisquare(obs_b, uni_b * obs_b.sum() / uni_b.sum()).pvalue < 1e-6
