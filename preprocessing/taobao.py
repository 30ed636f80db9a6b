"""``python -m preprocessing.taobao --input UserBehavior.csv --output data/taobao``."""

import sys

from preprocessing._cli import raw_log_main


def main(argv: list[str] | None = None) -> int:
    return raw_log_main("taobao", "UserBehavior.csv", argv)


if __name__ == "__main__":
    sys.exit(main())
