"""Streaming, vectorised readers for the raw Taobao and Tmall behaviour logs.

Both readers parse the CSV in blocks with pyarrow's streaming reader, keep only the
event type the protocol uses (Taobao ``pv`` rows, Tmall clicks with a 4-character
``time_stamp``) and return the kept rows as compact numpy integer columns, in file
order. Memory is therefore about 4 x 4 bytes per kept row (8 for columns whose values
do not fit int32), never the text of the file.

Malformed input policy: **stop at the first offending line** and raise
:class:`RawLogError` naming the file, the 1-based line number, the field and the
value. Rationale: the protocol numbers users, items and categories by first
appearance and draws negatives from item counts, so silently skipping a row would
shift every later id and change the sample set without any trace; a corrupt or
truncated download must be fixed (re-downloaded), not papered over. Checks:

- missing file / unreadable file;
- wrong number of fields on a line (an empty line counts as one field);
- an id (user, item, category; Taobao timestamp; Tmall action_type) that is empty or
  not a base-10 integer (these are checked on every row, not just the kept ones);
- Taobao ``behavior_type`` not one of ``pv``, ``buy``, ``cart``, ``fav``;
  Tmall ``action_type`` not one of 0, 1, 2, 3; a Tmall click whose 4-character
  ``time_stamp`` is not numeric; a Tmall file whose first line is not the header.

Errors found by pyarrow's parser itself (field count, integer conversion) carry no
line number, so on such an error the file is re-scanned from the start in plain
Python up to the first bad line (slow, but only on the error path).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_BEHAVIOURS = ("pv", "buy", "cart", "fav")
TMALL_COLUMNS = (
    "user_id", "item_id", "cat_id", "seller_id", "brand_id", "time_stamp", "action_type",
)
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
        path: the file read.
        rows_read: data rows in the file (header excluded), kept or not.
    """

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    time: np.ndarray
    path: Path
    rows_read: int

    def __len__(self) -> int:
        return int(self.user.shape[0])


# ----------------------------------------------------------------------------- helpers


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
    path: Path, column_names: tuple[str, ...], column_types: dict, include: list[str],
    skip_rows: int,
) -> Iterator[tuple[pa.RecordBatch, int]]:
    read = pacsv.ReadOptions(
        column_names=list(column_names), skip_rows=skip_rows, block_size=_BLOCK_SIZE,
        use_threads=True,
    )
    # Empty lines are not skipped: they become a row of empty fields and are reported.
    parse = pacsv.ParseOptions(ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(
        column_types=column_types, include_columns=include, strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    with pa.OSFile(str(path)) as fh:
        reader = pacsv.open_csv(fh, read_options=read, parse_options=parse,
                                convert_options=convert)
        for batch in reader:
            # fh.tell() runs ahead of the consumer by the reader's read-ahead only.
            yield batch, fh.tell()


def _int_column(batch: pa.RecordBatch, name: str, path: Path, first_line: int) -> np.ndarray:
    col = batch.column(name)
    if col.null_count:
        idx = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise RawLogError(path, first_line + idx, f"field {name!r} is empty (value '')")
    return col.to_numpy()


def _scan_for_error(
    path: Path, n_fields: int, int_fields: dict[str, int], header: tuple[str, ...] | None,
    extra_check: Callable[[list[str], int], None] | None = None,
) -> None:
    """Re-read the file in plain Python and raise RawLogError at the first bad line."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if header is not None and lineno == 1:
                continue
            fields = line.split(",")
            if len(fields) != n_fields:
                raise RawLogError(
                    path, lineno,
                    f"expected {n_fields} comma-separated fields, found {len(fields)} "
                    f"(line {line[:120]!r})",
                )
            for name, pos in int_fields.items():
                if not _INT_RE.fullmatch(fields[pos]):
                    raise RawLogError(
                        path, lineno, f"field {name!r} is not an integer (value {fields[pos]!r})"
                    )
                if not -(2**63) <= int(fields[pos]) < 2**63:
                    raise RawLogError(
                        path, lineno, f"field {name!r} out of int64 range (value {fields[pos]!r})"
                    )
            if extra_check is not None:
                extra_check(fields, lineno)


def _progress(path: Path, enabled: bool, desc: str) -> tqdm:
    return tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
        desc=desc, disable=not enabled, leave=False,
    )


# A reader's per-batch filter: (batch, its int columns by name, file line of its first row)
# -> the kept rows' (user, item, category, time), each [N_kept]; raises RawLogError.
_BatchFilter = Callable[
    [pa.RecordBatch, dict[str, np.ndarray], int],
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
]


def _read_events(
    path: Path,
    columns: tuple[str, ...],
    types: dict[str, pa.DataType],
    include: list[str],
    ints: dict[str, int],
    *,
    has_header: bool,
    extra_check: Callable[[list[str], int], None],
    keep_rows: _BatchFilter,
    progress: bool,
) -> EventLog:
    """Stream ``path`` batch by batch and collect the rows ``keep_rows`` keeps.

    ``ints`` maps each integer column to its field index; it is checked on every batch
    and, if pyarrow cannot parse the file, by the line-by-line rescan that names the
    first bad line.
    """
    skip_rows = 1 if has_header else 0
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("u", "i", "c", "t")}
    rows = 0
    bar = _progress(path, progress, f"read {path.name}")
    try:
        batches = _stream(path, columns, types, include, skip_rows=skip_rows)
        while True:
            try:
                batch, position = next(batches)
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                header = columns if has_header else None
                _scan_for_error(path, len(columns), ints, header, extra_check)
                raise RawLogError(path, None, f"unreadable CSV: {exc}") from exc
            first_line = rows + 1 + skip_rows  # the header, if any, is line 1
            cols = {k: _int_column(batch, k, path, first_line) for k in ints}
            for key, kept in zip(("u", "i", "c", "t"), keep_rows(batch, cols, first_line)):
                chunks[key].append(_narrow(kept))
            rows += batch.num_rows
            bar.update(max(0, position - bar.n))
    finally:
        bar.close()
    return EventLog(
        _compact(chunks["u"]), _compact(chunks["i"]), _compact(chunks["c"]),
        _compact(chunks["t"]), path, rows,
    )


# ----------------------------------------------------------------------------- Taobao


def read_taobao_log(path: str | Path, *, progress: bool = True) -> EventLog:
    """Read Taobao ``UserBehavior.csv`` (no header) and keep its ``pv`` rows.

    Returns:
        EventLog with raw user/item/category ids and Unix-second timestamps of the pv
        rows, shape [N_pv] each, in file order.

    Raises:
        FileNotFoundError: missing file.
        RawLogError: the first malformed line (see the module docstring).
    """
    path = Path(path)
    _check_file(path)
    types = {
        "user_id": pa.int64(), "item_id": pa.int64(), "category_id": pa.int64(),
        "behavior_type": pa.dictionary(pa.int32(), pa.string()), "timestamp": pa.int64(),
    }
    include = list(TAOBAO_COLUMNS)
    ints = {"user_id": 0, "item_id": 1, "category_id": 2, "timestamp": 4}

    def keep_pv(
        batch: pa.RecordBatch, cols: dict[str, np.ndarray], first_line: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = batch.num_rows
        beh = batch.column("behavior_type")
        known = pc.is_in(beh.dictionary, value_set=pa.array(TAOBAO_BEHAVIOURS)).to_numpy(
            zero_copy_only=False
        )
        codes = beh.indices.to_numpy()
        if not known.all():
            bad = np.flatnonzero(~known[codes])[0]
            value = beh.dictionary[int(codes[bad])].as_py()
            raise RawLogError(
                path, first_line + int(bad),
                f"unknown behavior_type {value!r} (expected one of {TAOBAO_BEHAVIOURS})",
            )
        pv_code = np.flatnonzero(np.asarray(beh.dictionary.to_pylist(), dtype=object) == "pv")
        keep = codes == pv_code[0] if pv_code.size else np.zeros(n, dtype=bool)
        return (
            cols["user_id"][keep], cols["item_id"][keep], cols["category_id"][keep],
            cols["timestamp"][keep],
        )

    return _read_events(
        path, TAOBAO_COLUMNS, types, include, ints, has_header=False,
        extra_check=_taobao_extra(path), keep_rows=keep_pv, progress=progress,
    )


def _taobao_extra(path: Path) -> Callable[[list[str], int], None]:
    def check(fields: list[str], lineno: int) -> None:
        if fields[3] not in TAOBAO_BEHAVIOURS:
            raise RawLogError(path, lineno, f"unknown behavior_type {fields[3]!r}")

    return check



# ----------------------------------------------------------------------------- Tmall


def read_tmall_log(path: str | Path, *, progress: bool = True) -> EventLog:
    """Read Tmall ``user_log_format1.csv`` (with header) and keep its clicks.

    Kept rows: ``action_type == 0`` and a ``time_stamp`` string of exactly 4
    characters (the official filter; every row of the real file qualifies).

    Returns:
        EventLog with raw user/item/category ids and the MMDD time as an integer
        (e.g. ``"0829"`` -> 829), shape [N_click] each, in file order.

    Raises:
        FileNotFoundError: missing file.
        RawLogError: wrong header or the first malformed line (see the module docstring).
    """
    path = Path(path)
    _check_file(path)
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        header = fh.readline().rstrip("\r\n")
    if tuple(header.split(",")) != TMALL_COLUMNS:
        raise RawLogError(
            path, 1, f"expected header {','.join(TMALL_COLUMNS)!r}, found {header[:120]!r}"
        )
    types = {
        "user_id": pa.int64(), "item_id": pa.int64(), "cat_id": pa.int64(),
        "time_stamp": pa.dictionary(pa.int32(), pa.string()), "action_type": pa.int64(),
    }
    include = ["user_id", "item_id", "cat_id", "time_stamp", "action_type"]
    ints = {"user_id": 0, "item_id": 1, "cat_id": 2, "action_type": 6}

    def keep_clicks(
        batch: pa.RecordBatch, cols: dict[str, np.ndarray], first_line: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        action = cols["action_type"]
        bad = ~np.isin(action, TMALL_ACTIONS)
        if bad.any():
            idx = int(np.flatnonzero(bad)[0])
            raise RawLogError(
                path, first_line + idx,
                f"unknown action_type {int(action[idx])} (expected one of {TMALL_ACTIONS})",
            )
        ts = batch.column("time_stamp")
        words = ts.dictionary.to_pylist()
        # Per dictionary entry: usable (4 characters) and its MMDD number.
        four = np.array([len(w) == 4 for w in words], dtype=bool)
        numeric = np.array([len(w) == 4 and w.isascii() and w.isdigit() for w in words])
        values = np.array([int(w) if ok else -1 for w, ok in zip(words, numeric)], np.int64)
        codes = ts.indices.to_numpy()
        keep = (action == TMALL_CLICK) & four[codes]
        broken = keep & ~numeric[codes]
        if broken.any():
            idx = int(np.flatnonzero(broken)[0])
            raise RawLogError(
                path, first_line + idx,
                f"field 'time_stamp' is not a 4-digit MMDD (value {words[codes[idx]]!r})",
            )
        return (
            cols["user_id"][keep], cols["item_id"][keep], cols["cat_id"][keep],
            values[codes[keep]],
        )

    return _read_events(
        path, TMALL_COLUMNS, types, include, ints, has_header=True,
        extra_check=_tmall_extra(path), keep_rows=keep_clicks, progress=progress,
    )


def _tmall_extra(path: Path) -> Callable[[list[str], int], None]:
    def check(fields: list[str], lineno: int) -> None:
        if int(fields[6]) not in TMALL_ACTIONS:
            raise RawLogError(path, lineno, f"unknown action_type {fields[6]!r}")

    return check


READERS: dict[str, Callable[..., EventLog]] = {"taobao": read_taobao_log, "tmall": read_tmall_log}
