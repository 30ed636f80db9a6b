"""``python -m preprocessing.tmall --input user_log_format1.csv --output data/tmall``."""

import sys

from preprocessing._cli import raw_log_main


def main(argv: list[str] | None = None) -> int:
    return raw_log_main("tmall", "user_log_format1.csv", argv)


if __name__ == "__main__":
    sys.exit(main())
