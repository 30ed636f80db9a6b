"""Streaming, vectorised readers for the raw Taobao and Tmall behaviour logs.

pyarrow parses the CSV in blocks; only the event type the protocol uses is kept (Taobao
``pv`` rows, Tmall clicks with a 4-character ``time_stamp``), as compact numpy integer
columns in file order (int32, int64 where a value needs it), never the text of the file.

Malformed input: **stop at the first offending line** and raise :class:`RawLogError`
naming the file, the 1-based line, the field and the value. Ids are numbered by first
appearance and negatives drawn from item counts, so a skipped row would silently shift
every later id and change the samples: a corrupt download must be fixed, not papered over.
Checked: a missing or unreadable file; a wrong number of fields (an empty line counts as
one field); an id (user, item, category; Taobao timestamp; Tmall action_type) that is
empty or not a base-10 integer, on every row, kept or not; a Taobao ``behavior_type`` not
in pv, buy, cart, fav; a Tmall ``action_type`` not in 0-3, a click whose 4-character
``time_stamp`` is not numeric, or a first line that is not the header. pyarrow's own
errors (field count, integer conversion) carry no line number: the file is then re-read
in plain Python up to the first bad line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_BEHAVIOURS = ("pv", "buy", "cart", "fav")
TMALL_COLUMNS = ("user_id", "item_id", "cat_id", "seller_id", "brand_id", "time_stamp",
                 "action_type")
TMALL_ACTIONS = (0, 1, 2, 3)  # 0 click, 1 add-to-cart, 2 purchase, 3 favourite
TMALL_CLICK = 0

_BLOCK_SIZE = 16 << 20  # bytes per parsed block; large blocks amortise per-batch overhead
_INT_RE = re.compile(r"-?[0-9]+")


class RawLogError(ValueError):
    """Malformed raw log: names the file, the 1-based line, the field and the value."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line


@dataclass(frozen=True)
class EventLog:
    """Kept events of a raw log, in file order.

    Attributes:
        user, item, category: raw ids, int32 (int64 if a value does not fit), shape [N].
        time: event time, shape [N]; Unix seconds (Taobao) or the MMDD number (Tmall).
        path, rows_read: the file read and its data rows (header excluded), kept or not.
    """

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    time: np.ndarray
    path: Path
    rows_read: int

    def __len__(self) -> int:
        return int(self.user.shape[0])


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"raw log not found: {path}")
    if not path.is_file():
        raise RawLogError(path, None, "not a regular file")


def _narrow(values: np.ndarray) -> np.ndarray:
    """int64 -> int32 when every value fits (halves the memory of the kept rows)."""
    info = np.iinfo(np.int32)
    if values.size == 0 or (info.min <= int(values.min()) and int(values.max()) <= info.max):
        return values.astype(np.int32)
    return values


def _compact(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-batch chunks (int32, or int64 where needed), emptying the list."""
    if not chunks:
        return np.zeros(0, dtype=np.int32)
    out = np.concatenate(chunks)  # int64 if any chunk had to stay int64
    chunks.clear()
    return out


def _stream(
    path: Path, column_names: tuple[str, ...], column_types: dict, skip_rows: int
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """(batch, file position) of the columns in ``column_types``."""
    read = pacsv.ReadOptions(column_names=list(column_names), skip_rows=skip_rows,
                             block_size=_BLOCK_SIZE, use_threads=True)
    # Empty lines are not skipped: they become a row of empty fields and are reported.
    parse = pacsv.ParseOptions(ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(column_types=column_types, include_columns=list(column_types),
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    with pa.OSFile(str(path)) as fh:
        for batch in pacsv.open_csv(fh, read_options=read, parse_options=parse,
                                    convert_options=convert):
            # fh.tell() runs ahead of the consumer by the reader's read-ahead only.
            yield batch, fh.tell()


def _int_column(batch: pa.RecordBatch, name: str, path: Path, first_line: int) -> np.ndarray:
    col = batch.column(name)
    if col.null_count:
        idx = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise RawLogError(path, first_line + idx, f"field {name!r} is empty (value '')")
    return col.to_numpy()


# The categorical column a rescan checks: (name, parse, allowed values).
_Choice = tuple[str, Callable[[str], object], tuple]


def _scan_for_error(path: Path, columns: tuple[str, ...], ints: tuple[str, ...],
                    has_header: bool, choice: _Choice) -> None:
    """Re-read the file in plain Python and raise RawLogError at the first bad line."""
    choice_name, parse, allowed = choice
    choice_pos = columns.index(choice_name)
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if has_header and lineno == 1:
                continue
            line = raw.rstrip("\r\n")
            fields = line.split(",")
            if len(fields) != len(columns):
                raise RawLogError(path, lineno, f"expected {len(columns)} comma-separated fields, "
                                  f"found {len(fields)} (line {line[:120]!r})")
            for name in ints:
                value = fields[columns.index(name)]
                if not _INT_RE.fullmatch(value):
                    problem = "is not an integer"
                elif not -(2**63) <= int(value) < 2**63:
                    problem = "out of int64 range"
                else:
                    continue
                raise RawLogError(path, lineno, f"field {name!r} {problem} (value {value!r})")
            if parse(fields[choice_pos]) not in allowed:
                raise RawLogError(path, lineno, f"unknown {choice_name} {fields[choice_pos]!r}")


def _read_events(
    path: Path, columns: tuple[str, ...], ints: tuple[str, ...], text: str, *,
    has_header: bool, choice: _Choice, keep_rows: Callable[..., tuple], progress: bool,
) -> EventLog:
    """Stream the ``ints`` (int64, checked on every batch) and dictionary-encoded ``text``
    columns of ``path`` and collect the rows that ``keep_rows(batch, {int column: values},
    file line of the batch's first row)`` keeps: (user, item, category, time) arrays; it
    raises RawLogError on a bad value. If pyarrow cannot parse the file, a line-by-line
    rescan names the first bad line."""
    types = {**dict.fromkeys(ints, pa.int64()), text: pa.dictionary(pa.int32(), pa.string())}
    skip_rows = 1 if has_header else 0
    chunks: tuple[list[np.ndarray], ...] = ([], [], [], [])  # user, item, category, time
    rows = 0
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"read {path.name}", disable=not progress, leave=False)
    try:
        batches = _stream(path, columns, types, skip_rows)
        while True:
            try:
                batch, position = next(batches)
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                _scan_for_error(path, columns, ints, has_header, choice)
                raise RawLogError(path, None, f"unreadable CSV: {exc}") from exc
            first_line = rows + 1 + skip_rows  # the header, if any, is line 1
            cols = {k: _int_column(batch, k, path, first_line) for k in ints}
            for chunk, kept in zip(chunks, keep_rows(batch, cols, first_line)):
                chunk.append(_narrow(kept))
            rows += batch.num_rows
            bar.update(max(0, position - bar.n))
    finally:
        bar.close()
    return EventLog(*(_compact(chunk) for chunk in chunks), path, rows)


def read_taobao_log(path: str | Path, *, progress: bool = True) -> EventLog:
    """Read Taobao ``UserBehavior.csv`` (no header) and keep its ``pv`` rows: raw
    user/item/category ids and Unix-second timestamps, [N_pv] each, in file order.

    Raises FileNotFoundError (missing file) or RawLogError (the first malformed line).
    """
    path = Path(path)
    _check_file(path)
    ints = ("user_id", "item_id", "category_id", "timestamp")

    def keep_pv(batch: pa.RecordBatch, cols: dict, first_line: int) -> tuple[np.ndarray, ...]:
        beh = batch.column("behavior_type")
        words, codes = beh.dictionary.to_pylist(), beh.indices.to_numpy()
        known = np.array([w in TAOBAO_BEHAVIOURS for w in words], dtype=bool)
        if not known.all():
            bad = int(np.flatnonzero(~known[codes])[0])
            raise RawLogError(path, first_line + bad, f"unknown behavior_type "
                              f"{words[codes[bad]]!r} (expected one of {TAOBAO_BEHAVIOURS})")
        keep = np.array([w == "pv" for w in words], dtype=bool)[codes]
        return tuple(cols[k][keep] for k in ints)

    return _read_events(
        path, TAOBAO_COLUMNS, ints, "behavior_type", has_header=False,
        choice=("behavior_type", str, TAOBAO_BEHAVIOURS), keep_rows=keep_pv, progress=progress,
    )


def read_tmall_log(path: str | Path, *, progress: bool = True) -> EventLog:
    """Read Tmall ``user_log_format1.csv`` (with header) and keep its clicks: raw
    user/item/category ids and the MMDD time as an integer (``"0829"`` -> 829), [N_click]
    each, in file order. Kept rows: ``action_type == 0`` and a ``time_stamp`` of exactly 4
    characters (the official filter; every row of the real file qualifies).

    Raises FileNotFoundError (missing file) or RawLogError (wrong header or the first
    malformed line).
    """
    path = Path(path)
    _check_file(path)
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        header = fh.readline().rstrip("\r\n")
    if tuple(header.split(",")) != TMALL_COLUMNS:
        raise RawLogError(path, 1, f"expected header {','.join(TMALL_COLUMNS)!r}, "
                          f"found {header[:120]!r}")

    def keep_clicks(batch: pa.RecordBatch, cols: dict, first_line: int) -> tuple[np.ndarray, ...]:
        action = cols["action_type"]
        bad = ~np.isin(action, TMALL_ACTIONS)
        if bad.any():
            idx = int(np.flatnonzero(bad)[0])
            raise RawLogError(path, first_line + idx, f"unknown action_type {int(action[idx])} "
                              f"(expected one of {TMALL_ACTIONS})")
        ts = batch.column("time_stamp")
        words, codes = ts.dictionary.to_pylist(), ts.indices.to_numpy()
        # Per dictionary entry: usable (4 characters) and its MMDD number.
        four = np.array([len(w) == 4 for w in words], dtype=bool)
        numeric = np.array([len(w) == 4 and w.isascii() and w.isdigit() for w in words])
        values = np.array([int(w) if ok else -1 for w, ok in zip(words, numeric)], np.int64)
        keep = (action == TMALL_CLICK) & four[codes]
        broken = keep & ~numeric[codes]
        if broken.any():
            idx = int(np.flatnonzero(broken)[0])
            raise RawLogError(path, first_line + idx, "field 'time_stamp' is not a 4-digit MMDD "
                              f"(value {words[codes[idx]]!r})")
        mmdd = values[codes[keep]]
        return cols["user_id"][keep], cols["item_id"][keep], cols["cat_id"][keep], mmdd

    return _read_events(
        path, TMALL_COLUMNS, ("user_id", "item_id", "cat_id", "action_type"), "time_stamp",
        has_header=True, choice=("action_type", int, TMALL_ACTIONS),
        keep_rows=keep_clicks, progress=progress,
    )


READERS: dict[str, Callable[..., EventLog]] = {"taobao": read_taobao_log, "tmall": read_tmall_log}
