"""Write a synthetic Taobao-format log.

    python -m preprocessing.synthetic --output data/synthetic/UserBehavior.csv --users 20000 \\
        [--rows N] [--seed 0] [--overwrite] [--set p_revisit=0.2 ...]

Prints a JSON summary (rows, users, items, categories, path). Exit code 2 on bad input
(invalid numbers, an existing output without --overwrite, an unknown --set option).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from dare_jax.data.synthetic import LogStructure, write_taobao_log

PROG = "python -m preprocessing.synthetic"


def _parse_setting(text: str) -> tuple[str, object]:
    """``name=value`` -> (name, value typed like the LogStructure field)."""
    name, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(LogStructure)}
    if not sep or name not in fields:
        known = ", ".join(sorted(fields))
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of: {known}")
    default = getattr(LogStructure(), name)
    try:
        if isinstance(default, tuple):
            return name, tuple(float(v) for v in value.split(","))
        if isinstance(default, int):
            return name, int(value)
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: not a number: {value!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Write a synthetic log in the Taobao UserBehavior.csv format (no header; "
            "user_id,item_id,category_id,behavior_type,timestamp), deterministic from the "
            "seed, written atomically. See dare_jax/data/synthetic.py for the structure."
        ),
    )
    parser.add_argument("--output", required=True, type=Path, help="CSV file to write")
    parser.add_argument("--users", required=True, type=_positive_int, help="number of users")
    parser.add_argument(
        "--rows",
        type=_positive_int,
        default=None,
        help="total rows (exact); default: log-normal lengths, median ~330 rows per user",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        type=_parse_setting,
        metavar="NAME=VALUE",
        help="override a LogStructure field (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with code 2 on malformed arguments
    output: Path = args.output
    if output.is_dir():
        parser.exit(2, f"{PROG}: error: --output {output} is a directory, expected a file\n")
    if output.exists() and not args.overwrite:
        parser.exit(2, f"{PROG}: error: {output} exists; pass --overwrite to replace it\n")
    if args.rows is not None and args.rows < args.users:
        parser.exit(
            2,
            f"{PROG}: error: --rows {args.rows} < --users {args.users} "
            "(every user needs at least one row)\n",
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        summary = write_taobao_log(
            output,
            args.users,
            seed=args.seed,
            target_rows=args.rows,
            progress=False if args.no_progress else None,
            **dict(args.settings),
        )
    except (ValueError, TypeError, OSError) as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{PROG}: interrupted; {output} was not written\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
