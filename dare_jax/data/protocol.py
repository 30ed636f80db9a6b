"""The Taobao/Tmall sample protocol of SPEC section 2, vectorised with numpy: sorts and
segment maths, no per-row or per-user Python loop.

Input: the kept events of a raw log in file order (:class:`~dare_jax.data.raw_logs.EventLog`).
Output: :class:`ProtocolResult`: each long user's event sequence stored once plus, per split,
samples that point into it (sequence row, position of the target). Steps:

1. users are numbered densely from 1 by first appearance in the file;
2. events are ordered by (user number, time), stably (the Tmall official pre-sort; the
   real Taobao file is already in that order);
3. items and categories are numbered densely from 1 by first appearance in that
   ordered stream (the official ids: the official Taobao script numbers in file order);
4. item popularity = event count over the whole ordered log (all users, before the
   filter); an item's category is the one of its *last* event in the ordered stream
   (the official ``iid_2_cid`` dict is overwritten row by row);
5. users with fewer than ``min_events`` (210) events are dropped;
6. targets per kept user with events e_1..e_T: train e_{T+1-j}, j = 3, 8, ..., 93;
   validation e_{T-1}; test e_T; the history is everything before the target;
7. each positive gets ``negatives_per_positive`` (2) items drawn proportional to
   popularity, redrawing any item the user ever touched (future included);
8. per split the samples are ordered user by user, each positive followed by its
   negatives (the official order); the train split is then permuted once with the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from dare_jax.data.raw_logs import EventLog

MIN_EVENTS = 210
TRAIN_TARGET_OFFSETS = tuple(range(3, 94, 5))  # j: target e_{T+1-j}; 19 values
NEGATIVES_PER_POSITIVE = 2
SPLITS = ("train", "val", "test")
_MAX_REDRAW_ROUNDS = 100_000


class ProtocolError(ValueError):
    """The log cannot produce a dataset (e.g. nobody survives the 210-event filter)."""


@dataclass(frozen=True)
class DenseIds:
    """Dense numbering of a raw id column.

    Attributes:
        dense: int32 [N], 1-based dense id of every element.
        raw: int64 [G + 1], raw id of each dense id (``raw[0] = 0`` is padding).
        last_index: int64 [G + 1], index of each dense id's last occurrence (``[0] = -1``).
    """

    dense: np.ndarray
    raw: np.ndarray
    last_index: np.ndarray

    @property
    def count(self) -> int:
        return int(self.raw.shape[0] - 1)


@dataclass(frozen=True)
class SplitSamples:
    """Samples of one split, all int32 [S]: history = ``seq[row][:pos]``, target iid/cid."""

    row: np.ndarray
    pos: np.ndarray
    iid: np.ndarray
    cid: np.ndarray
    label: np.ndarray
    uid: np.ndarray

    def __len__(self) -> int:
        return int(self.row.shape[0])


@dataclass(frozen=True)
class ProtocolResult:
    """Everything the storage layer writes.

    Attributes:
        seq_iid, seq_cid: int32 [E], concatenated event sequences of the kept users.
        seq_offsets: int64 [R + 1], row r is ``seq_*[seq_offsets[r]:seq_offsets[r + 1]]``.
        seq_uid: int32 [R], dense user id of each row.
        splits: split name -> SplitSamples.
        raw_uid, raw_iid, raw_cid: int64 [count + 1], raw id of each dense id.
        item_count: int64 [n_items + 1], popularity used for the negatives.
        item_category: int32 [n_items + 1], the (last seen) category of each item.
        events_kept_type: kept (pv / click) events of the log; raw_rows: rows of the file.
    """

    seq_iid: np.ndarray
    seq_cid: np.ndarray
    seq_offsets: np.ndarray
    seq_uid: np.ndarray
    splits: dict[str, SplitSamples]
    raw_uid: np.ndarray
    raw_iid: np.ndarray
    raw_cid: np.ndarray
    item_count: np.ndarray
    item_category: np.ndarray
    events_kept_type: int
    raw_rows: int


def _stable_sort_with_index(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, their original indices), ties in index order. values: int [N].

    When the value range and N fit in 31 bits, one int64 key (value - min, index) sorts
    several times faster than ``argsort``, stable by construction, with int32 indices
    (memory is the limit at 100 M rows).
    """
    n, lo = values.shape[0], int(values.min())
    if int(values.max()) - lo < 2**31 and n < 2**31:
        key = (values.astype(np.int64) - lo) << 32
        del values  # the caller passes a temporary: free it before the sort
        key |= np.arange(n, dtype=np.int64)
        key.sort()
        index = key.astype(np.int32)  # low 32 bits = the index (< 2**31)
        key >>= 32
        key += lo
        return key, index
    index = np.argsort(values, kind="stable")
    return values[index], index


def dense_ids_by_first_appearance(values: np.ndarray) -> DenseIds:
    """Number the distinct values of ``values`` [N] 1..G in order of first appearance.

    Runs of equal consecutive values are collapsed first (the real logs are grouped
    by user, so the user column shrinks ~100x), then the run heads are sorted once;
    the first/last run of each distinct value are the ends of its sorted segment.
    """
    n = values.shape[0]
    if n == 0:
        return DenseIds(np.zeros(0, np.int32), np.zeros(1, np.int64), np.full(1, -1, np.int64))
    small = np.int32 if n < 2**31 else np.int64
    run_start = np.empty(n, dtype=bool)
    run_start[0] = True
    np.not_equal(values[1:], values[:-1], out=run_start[1:])
    run_starts = np.flatnonzero(run_start).astype(small)  # [R]
    del run_start
    run_len = np.diff(np.append(run_starts, small(n))).astype(small)
    heads_sorted, run_of_sorted = _stable_sort_with_index(values[run_starts])
    r = run_starts.shape[0]
    is_start = np.empty(r, dtype=bool)
    is_start[0] = True
    np.not_equal(heads_sorted[1:], heads_sorted[:-1], out=is_start[1:])
    group_starts = np.flatnonzero(is_start)  # [G] in value order
    group_values = heads_sorted[group_starts]
    del heads_sorted
    first_run = run_of_sorted[group_starts]  # stable sort: segment start = earliest run
    last_run = run_of_sorted[np.append(group_starts[1:], r) - 1]
    groups = group_starts.shape[0]
    rank = np.empty(groups, dtype=np.int32)  # group (value order) -> dense id
    rank[np.argsort(first_run)] = np.arange(1, groups + 1, dtype=np.int32)
    head_dense = np.empty(r, dtype=np.int32)
    head_dense[run_of_sorted] = rank[np.cumsum(is_start, dtype=small) - 1]
    del run_of_sorted, is_start
    raw = np.zeros(groups + 1, dtype=np.int64)
    raw[rank] = group_values
    last_index = np.full(groups + 1, -1, dtype=np.int64)
    last_index[rank] = run_starts[last_run].astype(np.int64) + run_len[last_run] - 1
    return DenseIds(np.repeat(head_dense, run_len), raw, last_index)


def order_events(user_dense: np.ndarray, time: np.ndarray) -> np.ndarray | None:
    """Stable order by (user, time) of int [N] columns (users numbered by first appearance):
    the permutation, or None if already ordered."""
    if user_dense.shape[0] == 0:
        return None
    t_min = int(time.min())
    span = int(time.max()) - t_min + 1
    if (int(user_dense.max()) + 1) * span < 2**62:
        # One int64 key keeps the sort single-pass; timsort is O(N) on sorted runs.
        key = user_dense.astype(np.int64) * span + (time.astype(np.int64) - t_min)
        return None if bool(np.all(key[1:] >= key[:-1])) else np.argsort(key, kind="stable")
    return np.lexsort((time, user_dense))


def _check_feasible(
    seq_iid: np.ndarray, seq_offsets: np.ndarray, item_count: np.ndarray
) -> np.ndarray:
    """Sorted unique (row, item) keys of every kept user's touched items; ProtocolError if
    some user touched every item that has a nonzero count (no valid negative exists)."""
    n_rows = seq_offsets.shape[0] - 1
    stride = np.int64(item_count.shape[0])
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(seq_offsets))
    keys = np.unique(rows * stride + seq_iid)
    del rows
    mass = np.bincount(keys // stride, weights=item_count[keys % stride], minlength=n_rows)
    full = np.flatnonzero(mass >= float(item_count.sum()))
    if full.size:
        raise ProtocolError(f"sequence row {int(full[0])} has touched every item of the log; "
                            "no negative item can be drawn for it")
    return keys


def draw_negatives(
    rng: np.random.Generator, rows: np.ndarray, item_count: np.ndarray, touched_keys: np.ndarray
) -> np.ndarray:
    """Draw one item per entry of ``rows`` [M], proportional to ``item_count``: int32 [M].
    An item the row's user ever touched (``row * len(item_count) + item`` in the sorted
    ``touched_keys``) is redrawn; only the rejected entries are redrawn each round."""
    cum = np.cumsum(item_count)
    total = int(cum[-1])
    stride = np.int64(item_count.shape[0])
    out = np.empty(rows.shape[0], dtype=np.int32)
    todo = np.arange(rows.shape[0])
    for _ in range(_MAX_REDRAW_ROUNDS):
        if todo.size == 0:
            return out
        ticket = rng.integers(0, total, size=todo.size, dtype=np.int64)
        cand = np.searchsorted(cum, ticket, side="right")
        key = rows[todo].astype(np.int64) * stride + cand
        pos = np.searchsorted(touched_keys, key)
        pos[pos == touched_keys.shape[0]] = 0
        hit = touched_keys[pos] == key
        out[todo[~hit]] = cand[~hit]
        todo = todo[hit]
    raise ProtocolError(f"negative sampling did not converge for {todo.size} samples")


def _split_samples(
    positions: np.ndarray, seq_iid: np.ndarray, seq_cid: np.ndarray, seq_offsets: np.ndarray,
    seq_uid: np.ndarray, negatives: np.ndarray, item_category: np.ndarray,
) -> SplitSamples:
    """Samples in the official order: per row, per positive: positive then K negatives.

    positions: [R, P] position of each positive in its row; negatives: [R, P, K] item ids.
    """
    n_rows, per_row, k = negatives.shape
    row = np.repeat(np.arange(n_rows, dtype=np.int32), per_row * (1 + k))
    pos = np.repeat(positions.astype(np.int32).ravel(), 1 + k)
    target = seq_offsets[:-1, None] + positions  # [R, P]
    iid = np.concatenate([seq_iid[target][..., None], negatives], axis=2, dtype=np.int32)
    cid = np.concatenate([seq_cid[target][..., None], item_category[negatives]], axis=2,
                         dtype=np.int32)
    label = np.tile(np.arange(1 + k) == 0, n_rows * per_row).astype(np.int32)
    return SplitSamples(row, pos, iid.ravel(), cid.ravel(), label, seq_uid[row])


def _listing(numbers: list[int]) -> str:
    """[5, 4, 3] -> '5, 4 and 3'."""
    words = [f"{n:,}" for n in numbers]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def build_samples(
    log: EventLog, *, seed: int = 0, min_events: int = MIN_EVENTS,
    negatives_per_positive: int = NEGATIVES_PER_POSITIVE, progress: bool = True,
) -> ProtocolResult:
    """Run the whole protocol on ``log``, the kept events in file order (from
    ``read_taobao_log`` / ``read_tmall_log``). ``seed`` seeds the negative draws and the
    single global train shuffle; users with fewer than ``min_events`` kept events are
    dropped (210 in the paper); ``negatives_per_positive`` is 2 in the paper.

    Raises ProtocolError: no event, no user with ``min_events`` events, or a user for
    whom no negative exists.
    """
    if min_events < max(TRAIN_TARGET_OFFSETS) + 1:
        raise ValueError(f"min_events must be > {max(TRAIN_TARGET_OFFSETS)}, got {min_events}")
    if len(log) == 0:
        raise ProtocolError(f"{log.path}: no event of the kept type (pv / click) in the file")
    steps = tqdm(total=6, desc="protocol", disable=not progress, leave=False)

    # Take the columns and drop the log object, so each raw column can be freed as soon
    # as it has been used (peak memory is what limits the 100 M-row Taobao log).
    source, n_kept, raw_rows = log.path, len(log), log.rows_read
    user_raw, item_raw, cate_raw, time = log.user, log.item, log.category, log.time
    del log
    users = dense_ids_by_first_appearance(user_raw)
    del user_raw
    perm = order_events(users.dense, time)
    del time
    steps.update()
    user_dense, raw_uid = users.dense, users.raw
    del users
    if perm is not None:  # one column at a time: each old one is freed before the next
        user_dense = user_dense[perm]
        item_raw = item_raw[perm]
        cate_raw = cate_raw[perm]
    del perm
    items = dense_ids_by_first_appearance(item_raw)
    del item_raw
    cates = dense_ids_by_first_appearance(cate_raw)
    del cate_raw
    steps.update()

    item_count = np.bincount(items.dense, minlength=items.count + 1).astype(np.int64)
    item_category = np.zeros(items.count + 1, dtype=np.int32)
    item_category[1:] = cates.dense[items.last_index[1:]]

    # The ordered stream is grouped by user in dense-id order, so counts are offsets.
    user_len = np.bincount(user_dense, minlength=raw_uid.shape[0])[1:]  # [U]
    del user_dense
    keep_user = user_len >= min_events
    if not keep_user.any():
        closest = np.sort(user_len)[::-1][:5].tolist()
        raise ProtocolError(f"{source}: no user has at least {min_events} kept events, so the "
                            f"dataset would be empty (nothing written); the {len(closest)} "
                            f"longest of the {len(user_len)} users' histories have "
                            f"{_listing(closest)} events")
    event_keep = np.repeat(keep_user, user_len)
    seq_iid = items.dense[event_keep]
    seq_cid = cates.dense[event_keep]
    del event_keep
    kept_len = user_len[keep_user].astype(np.int64)
    seq_offsets = np.cumsum(np.append(np.int64(0), kept_len))
    seq_uid = (np.flatnonzero(keep_user) + 1).astype(np.int32)
    steps.update()

    touched = _check_feasible(seq_iid, seq_offsets, item_count)
    steps.update()

    rng = np.random.default_rng(seed)
    t = kept_len[:, None]
    split_positions = {  # [R, P] target positions, in SPLITS order
        "train": t - np.asarray(TRAIN_TARGET_OFFSETS, dtype=np.int64)[None, :],
        "val": t - 2, "test": t - 1,
    }
    splits: dict[str, SplitSamples] = {}
    for name, positions in split_positions.items():
        shape = (*positions.shape, negatives_per_positive)
        rows = np.repeat(np.arange(shape[0], dtype=np.int64), shape[1] * shape[2])
        neg = draw_negatives(rng, rows, item_count, touched).reshape(shape)
        splits[name] = _split_samples(positions, seq_iid, seq_cid, seq_offsets, seq_uid, neg,
                                      item_category)
    del touched
    steps.update()

    shuffle = rng.permutation(len(splits["train"]))
    splits["train"] = SplitSamples(**{k: v[shuffle] for k, v in vars(splits["train"]).items()})
    steps.update()
    steps.close()
    return ProtocolResult(
        seq_iid=seq_iid, seq_cid=seq_cid, seq_offsets=seq_offsets, seq_uid=seq_uid,
        splits=splits, raw_uid=raw_uid, raw_iid=items.raw, raw_cid=cates.raw,
        item_count=item_count, item_category=item_category, events_kept_type=n_kept,
        raw_rows=raw_rows,
    )
