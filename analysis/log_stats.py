"""Statistics of Taobao-format behaviour logs (SPEC.md section 5b), side by side.

    python -m analysis.log_stats FILE [FILE ...] [--json]

One column per file (Markdown table), or one JSON object per file with --json; exit code 2
on a missing or malformed file (the message names file, line, field and value).

The signal a long-sequence CTR model can find in a log: how long user histories are, how
strongly the next event follows the recent ones (category continuity, re-visits) and how
long-tailed item popularity is; the yardstick for `dare_jax.data.synthetic`.

Definitions (pv events only; each user's events in time order, stable, as the
protocol orders them):

* ``median_events_per_user`` / ``p90_events_per_user``: pv events per user, over
  every user with at least one pv event (numpy's default, linear, percentile).
* long users: users with at least ``min_events`` (210) pv events. For each, the
  last ``n_targets`` (20) events are targets; a target's history is the up to
  ``history_length`` (200) events right before it.
* ``target_category_is_last``: share of targets whose category equals the
  category of the event right before; ``target_category_in_last_10``: equals one
  of the 10 events before; ``target_category_in_history``: one of the history
  events; ``target_item_in_history``: the target item itself is in the history.
* ``median_distinct_categories_long_users``: distinct categories over all pv
  events of a long user, median over long users.
* ``top1pct_item_event_share``: share of pv events on the ceil(1 %) most viewed
  items; ``items_seen_once_share``: share of distinct items with exactly one pv event.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from dare_jax.data.raw_logs import RawLogError, read_taobao_log

# Targets processed at once in the windowed comparisons: [block, history_length] matrices.
_TARGET_BLOCK = 16_384

STATISTIC_LABELS = {
    "users": "users with pv events",
    "pv_events": "pv events",
    "items": "distinct items (pv)",
    "categories": "distinct categories (pv)",
    "median_events_per_user": "median pv events per user",
    "p90_events_per_user": "90th percentile pv events per user",
    "long_users": "users with >= 210 pv events",
    "targets": "targets (last 20 of each long user)",
    "target_category_is_last": "target category == most recent behaviour's",
    "target_category_in_last_10": "target category among last 10 behaviours",
    "target_category_in_history": "target category anywhere in 200-long history",
    "target_item_in_history": "target item in 200-long history (re-visit)",
    "median_distinct_categories_long_users": "distinct categories per long user (median)",
    "top1pct_item_event_share": "share of events on top 1% of items",
    "items_seen_once_share": "share of items seen once",
}


def time_ordered_events(
    user: np.ndarray, time: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order events ([N] raw user ids and timestamps in file order) user after user (first
    appearance), each user's in stable time order: (order [N], indices into the file-order
    arrays; user_start, user_count [U], each user's offset and event count in that order).
    """
    _, first_index, inverse = np.unique(user, return_index=True, return_inverse=True)
    rank = np.empty(len(first_index), dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(len(first_index))
    event_rank = rank[inverse]
    by_time = np.argsort(time, kind="stable")
    order = by_time[np.argsort(event_rank[by_time], kind="stable")]
    user_count = np.bincount(event_rank, minlength=len(first_index))
    user_start = np.concatenate([[0], np.cumsum(user_count)[:-1]]).astype(np.int64)
    return order, user_start, user_count


def sequence_statistics(
    user: np.ndarray, item: np.ndarray, category: np.ndarray, time: np.ndarray, *,
    min_events: int = 210, n_targets: int = 20, history_length: int = 200,
) -> dict:
    """The section-5b statistics of pv events given as [N] arrays in file order."""
    if not len(user) == len(item) == len(category) == len(time):
        raise ValueError("user, item, category and time must have the same length")
    if len(user) == 0:
        raise ValueError("no pv events: statistics are undefined")
    order, user_start, user_count = time_ordered_events(user, time)
    item, category = np.asarray(item)[order], np.asarray(category)[order]

    long_users = np.flatnonzero(user_count >= min_events)
    k = min(n_targets, min_events)
    # Target positions in the ordered arrays: the last k events of every long user.
    user_end = user_start[long_users] + user_count[long_users]
    target_pos = (user_end[:, None] - np.arange(k, 0, -1)).ravel()
    target_user_start = np.repeat(user_start[long_users], k)
    hits = {"last": 0, "last_10": 0, "history": 0, "item": 0}
    back = np.arange(1, history_length + 1)
    for lo in range(0, len(target_pos), _TARGET_BLOCK):
        pos = target_pos[lo : lo + _TARGET_BLOCK]
        earlier = pos[:, None] - back[None, :]  # [block, history_length], most recent first
        valid = earlier >= target_user_start[lo : lo + _TARGET_BLOCK, None]
        earlier = np.where(valid, earlier, pos[:, None])  # clipped; masked out below
        same_category = (category[earlier] == category[pos][:, None]) & valid
        hits["last"] += int(same_category[:, 0].sum())
        hits["last_10"] += int(same_category[:, :10].any(axis=1).sum())
        hits["history"] += int(same_category.any(axis=1).sum())
        hits["item"] += int(((item[earlier] == item[pos][:, None]) & valid).any(axis=1).sum())
    n_t = len(target_pos)

    # Distinct categories per long user: unique (user, category) pairs.
    _, category_code = np.unique(category, return_inverse=True)
    n_categories = category_code.max() + 1
    user_of_event = np.repeat(np.arange(len(user_count)), user_count)
    pairs = np.unique(user_of_event.astype(np.int64) * n_categories + category_code)
    distinct_per_user = np.bincount(pairs // n_categories, minlength=len(user_count))

    _, item_count = np.unique(item, return_counts=True)
    top = math.ceil(0.01 * len(item_count))
    top_share = np.sort(item_count)[::-1][:top].sum() / len(item)

    def share(n: int) -> float:
        return n / n_t if n_t else float("nan")

    distinct = float(np.median(distinct_per_user[long_users])) if len(long_users) else math.nan

    return {
        "users": len(user_count),
        "pv_events": len(user),
        "items": len(item_count),
        "categories": int(n_categories),
        "median_events_per_user": float(np.median(user_count)),
        "p90_events_per_user": float(np.percentile(user_count, 90)),
        "long_users": len(long_users),
        "targets": int(n_t),
        "target_category_is_last": share(hits["last"]),
        "target_category_in_last_10": share(hits["last_10"]),
        "target_category_in_history": share(hits["history"]),
        "target_item_in_history": share(hits["item"]),
        "median_distinct_categories_long_users": distinct,
        "top1pct_item_event_share": float(top_share),
        "items_seen_once_share": float(np.mean(item_count == 1)),
    }


def taobao_log_statistics(path: str | Path, *, progress: bool = False, **options) -> dict:
    """Section-5b statistics (keys of `STATISTIC_LABELS`, plus ``path``) of a Taobao
    `UserBehavior.csv`-format file; ``options``: ``min_events`` (210), ``n_targets`` (20),
    ``history_length`` (200).

    Raises FileNotFoundError, dare_jax.data.raw_logs.RawLogError (first malformed line),
    ValueError (no pv event).
    """
    log = read_taobao_log(path, progress=progress)
    if len(log.user) == 0:
        raise ValueError(f"{path}: no pv rows, statistics are undefined")
    stats = sequence_statistics(log.user, log.item, log.category, log.time, **options)
    return {**stats, "path": str(path)}


def format_statistics_table(columns: dict[str, dict]) -> str:
    """A Markdown table: one row per statistic, one column per named statistics dict."""

    def cell(value: float | int | None) -> str:
        if value is None:
            return "-"
        if isinstance(value, float) and (math.isnan(value) or not value.is_integer()):
            return f"{value:.3f}"
        return f"{int(value):,}"

    lines = ["| statistic | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, label in STATISTIC_LABELS.items():
        cells = (cell(stats.get(key)) for stats in columns.values())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.log_stats",
        description="Statistics of Taobao UserBehavior.csv-format logs (SPEC.md section 5b).",
    )
    parser.add_argument("files", nargs="+", type=Path, help="Taobao-format CSV files")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    columns = {}
    for path in args.files:
        try:
            columns[str(path)] = taobao_log_statistics(path, progress=not args.no_progress)
        except (FileNotFoundError, RawLogError, ValueError, OSError) as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.json:
        for stats in columns.values():
            print(json.dumps(stats))
    else:
        print(format_statistics_table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
