"""Print the SPEC section-5b statistics of Taobao-format logs, side by side.

    python -m preprocessing.log_stats FILE [FILE ...] [--json]

One column per file (Markdown table), or one JSON object per file with --json.
Exit code 2 on a missing or malformed file (the message names file, line, field, value).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dare_jax.data.log_stats import format_statistics_table, taobao_log_statistics
from dare_jax.data.raw_logs import RawLogError

PROG = "python -m preprocessing.log_stats"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
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
            parser.exit(2, f"{PROG}: error: {exc}\n")
    if args.json:
        for stats in columns.values():
            print(json.dumps(stats))
    else:
        print(format_statistics_table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
