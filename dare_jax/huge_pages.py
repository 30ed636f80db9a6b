"""Whether XLA:CPU's buffers sit in 2 MiB pages (a start-up setting of glibc's allocator).

With transparent huge pages in `madvise` mode (many Linux distributions' default), glibc's
malloc, which XLA:CPU allocates every buffer with, gives 4 KiB pages unless glibc >= 2.35
reads `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` at process start. It changes speed, never
numbers. This module only reads the setting: `status()` for provenance, `hint()` at start-up.
"""

from __future__ import annotations

import os

TUNABLES = "GLIBC_TUNABLES"
HUGETLB = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugetlb_value(tunables: str | None) -> str | None:
    """The glibc.malloc.hugetlb value a GLIBC_TUNABLES string sets (None: unset)."""
    pairs = (pair.partition("=") for pair in (tunables or "").split(":"))
    values = [setting for name, _, setting in pairs if name == HUGETLB]
    return values[-1] if values else None  # the last one counts


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, stop = text.find("["), text.find("]")
    return text[start + 1 : stop] if 0 <= start < stop else None


def status() -> dict[str, str | None]:
    """The kernel's mode and glibc's hugetlb value of this process (None: unset)."""
    return {"transparent_huge_pages": thp_mode(), HUGETLB: hugetlb_value(os.environ.get(TUNABLES))}


def hint() -> str | None:
    """One line suggesting the setting where it would help (madvise mode) and is missing."""
    current = status()
    if current["transparent_huge_pages"] != "madvise" or current[HUGETLB] is not None:
        return None
    return (
        f"hint: on this CPU, start with {TUNABLES}={HUGETLB}=1 for faster training "
        "(XLA's buffers in 2 MiB pages; README, CPU section)"
    )
