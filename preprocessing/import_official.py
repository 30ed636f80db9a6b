"""``python -m preprocessing.import_official --input DIR --output DIR``.

Converts the files written by the official DARE preprocessing (pickled .npy) into
this project's format, one file at a time (peak memory about one unpickled input
file, whatever the number of train files). Reading them needs pickle: only import
files you trust.
"""

import argparse
import sys
from pathlib import Path

from preprocessing._cli import run_or_exit


def main(argv: list[str] | None = None) -> int:
    from dare_jax.interop.official_data import import_official

    prog = "python -m preprocessing.import_official"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Import a directory written by the official DARE scripts (train_XXXX_N.npy, "
            "val.npy, test.npy, uid/iid/cid_mapping.npy) into a dataset directory "
            "(memory-mappable .npy + manifest.json, histories up to 200). The input "
            "files are pickles: only import files you trust."
        ),
    )
    parser.add_argument("--input", required=True, type=Path, help="official output directory")
    parser.add_argument("--output", required=True, type=Path, help="dataset directory to create")
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset name for the manifest (default: input directory name)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    return run_or_exit(
        lambda: import_official(
            args.input,
            args.output,
            dataset=args.dataset,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        ),
        prog,
    )


if __name__ == "__main__":
    sys.exit(main())
