"""Shared command-line plumbing: user errors become one message and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dare_jax.data.protocol import ProtocolError
from dare_jax.data.raw_logs import RawLogError
from dare_jax.data.storage import DatasetError
from dare_jax.interop.official_data import OfficialDataError

USER_ERRORS = (
    FileNotFoundError, FileExistsError, RawLogError, ProtocolError, DatasetError,
    OfficialDataError, NotADirectoryError, PermissionError,
)


def run_or_exit(action: Callable[[], Path], prog: str) -> int:
    """Run ``action``; print its result, or a one-line error (exit code 2) for bad input."""
    try:
        out = action()
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output directory was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


def raw_log_parser(prog: str, kind: str, example: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            f"Preprocess the raw {kind} log ({example}) into a dataset directory of "
            "memory-mappable int32 .npy arrays plus manifest.json (protocol of SPEC "
            "section 2: users with >= 210 events, 19 train / 1 val / 1 test positives per "
            "user, 2 popularity-drawn negatives each). The output directory is written "
            "atomically; an existing one is refused unless --overwrite."
        ),
    )
    parser.add_argument("--input", required=True, type=Path, help=f"raw {example}")
    parser.add_argument("--output", required=True, type=Path,
                        help="dataset directory to create, e.g. data/" + kind)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the negatives and the train shuffle (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def raw_log_main(kind: str, example: str, argv: list[str] | None = None) -> int:
    from dare_jax.data.preprocess import preprocess_log

    prog = f"python -m preprocessing.{kind}"
    args = raw_log_parser(prog, kind, example).parse_args(argv)
    return run_or_exit(
        lambda: preprocess_log(kind, args.input, args.output, seed=args.seed,
                               overwrite=args.overwrite, progress=not args.no_progress),
        prog,
    )
