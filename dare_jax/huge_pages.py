"""Transparent huge pages for XLA:CPU's buffers: a start-up setting of glibc's allocator.

On the CPU, XLA allocates every buffer (tables, Adam moments, each step's temporaries) with
glibc's malloc. On Linux with transparent huge pages in `madvise` mode (the default of many
distributions), that memory comes in 4 KiB pages, so a training step pays one page fault per
4 KiB of fresh temporaries (DARE at Taobao size: ~50,000 faults per step) and one TLB miss
per random table row it reads or writes. glibc >= 2.35 asks the kernel for 2 MiB pages for its
own mappings when the tunable `glibc.malloc.hugetlb=1` is set; measured on the 2-core
development machine (benchmarks/README.md, "Huge pages"), a DARE step's page faults fell from
~52,000 to ~500 and its lazy training step ran 1.3 to 1.6 times faster (4 M to 30 M item
rows).

glibc reads GLIBC_TUNABLES only when a process starts, so `restart_with_huge_pages()`
re-executes the current command once (same PID, same arguments) with the tunable added. It is
called first thing by the command-line entry points (the driver, the sweep, the benchmarks),
never on import: a notebook or another program embedding dare_jax keeps its allocator (start
its Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` to get the same). It does nothing
when huge pages would change nothing or cannot be had: not Linux with glibc >= 2.35,
transparent huge pages `always` (already on) or `never` (off), a hugetlb tunable already set
(the user's choice stands), or DARE_JAX_HUGE_PAGES=0 (the opt-out). Numbers are unchanged:
only where the buffers live changes. The cost: memory is committed in 2 MiB steps, so a
buffer's resident size rounds up (the benchmarks report peak RSS with it on).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = "GLIBC_TUNABLES"
HUGETLB = "glibc.malloc.hugetlb"
OPT_OUT = "DARE_JAX_HUGE_PAGES"  # "0": leave the allocator as it is
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def hugetlb_value(tunables: str | None) -> str | None:
    """The value GLIBC_TUNABLES `tunables` (colon-separated name=value pairs, possibly empty)
    gives glibc.malloc.hugetlb; None when it sets none."""
    value = None
    for pair in (tunables or "").split(":"):
        name, _, setting = pair.partition("=")
        if name == HUGETLB:
            value = setting
    return value


def tunables_with_huge_pages(current: str | None) -> str | None:
    """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added to `current`; None when `current`
    already sets hugetlb."""
    if hugetlb_value(current) is not None:
        return None
    return ":".join([pair for pair in (current or "").split(":") if pair] + [f"{HUGETLB}=1"])


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, stop = text.find("["), text.find("]")
    return text[start + 1 : stop] if 0 <= start < stop else None


def _glibc_version() -> tuple[int, ...] | None:
    libc, version = platform.libc_ver()
    if libc != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def huge_pages_environment(
    environ: Mapping[str, str], mode: str | None, glibc: tuple[int, ...] | None
) -> dict[str, str] | None:
    """The environment to restart with, or None to carry on as is (the rules above)."""
    if environ.get(OPT_OUT) == "0" or mode != "madvise" or glibc is None or glibc < MIN_GLIBC:
        return None
    tunables = tunables_with_huge_pages(environ.get(TUNABLES))
    if tunables is None:
        return None
    return {**environ, TUNABLES: tunables}


def restart_with_huge_pages() -> None:
    """Re-execute this command with glibc's huge-page tunable when it helps (module
    docstring); returns only when no restart is needed."""
    if not sys.platform.startswith("linux"):
        return
    environ = huge_pages_environment(os.environ, thp_mode(), _glibc_version())
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        # argv[0] = sys.executable: the restarted interpreter then finds itself (and its
        # virtual environment) at the same path even if it was started through a PATH shim.
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def status() -> dict[str, str | None]:
    """What this process runs with, for reports: the kernel's mode and glibc's hugetlb value
    (None: unset). Huge pages back malloc's memory when the mode is "always", or "madvise"
    with hugetlb 1."""
    tunables = os.environ.get(TUNABLES)
    return {"transparent_huge_pages": thp_mode(), HUGETLB: hugetlb_value(tunables)}
