"""dare_jax.huge_pages reads the allocator setting (it never restarts the process), hints at it
where it would help, and the setting set at launch does back glibc's memory with 2 MiB pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dare_jax import huge_pages


@pytest.mark.parametrize(
    "tunables, expected",
    [
        (None, None),
        ("", None),
        ("glibc.malloc.arena_max=2", None),
        ("glibc.malloc.hugetlb=1", "1"),
        ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "0"),
        ("glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=2", "2"),  # glibc takes the last
    ],
)
def test_hugetlb_value(tunables, expected):
    assert huge_pages.hugetlb_value(tunables) == expected


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert huge_pages.thp_mode(str(path)) == "always"
    path.write_text("garbled\n")
    assert huge_pages.thp_mode(str(path)) is None
    assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "mode, tunables, hints",
    [
        ("madvise", None, True),
        ("madvise", "glibc.malloc.hugetlb=1", False),
        ("madvise", "glibc.malloc.hugetlb=0", False),  # the user's choice stands
        ("always", None, False),  # every mapping already gets huge pages
        ("never", None, False),  # none can
        (None, None, False),  # not a THP kernel
    ],
)
def test_hint_only_where_the_setting_would_help_and_is_missing(monkeypatch, mode, tunables, hints):
    monkeypatch.setattr(huge_pages, "thp_mode", lambda: mode)
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    hint = huge_pages.hint()
    assert (hint is not None) == hints
    if hints:
        assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hint
    assert huge_pages.status() == {
        "transparent_huge_pages": mode,
        "glibc.malloc.hugetlb": huge_pages.hugetlb_value(tunables),
    }


# A child that allocates 64 MiB with glibc's malloc, as XLA:CPU does (numpy would ask for huge
# pages itself), and reports its huge pages: the launch command's setting is all it takes.
CHILD = """
import ctypes
from dare_jax import huge_pages
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
ctypes.memset(libc.malloc(size), 1, size)
huge_kib = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        huge_kib = int(line.split()[1])
print(huge_kib, huge_pages.status()["glibc.malloc.hugetlb"], flush=True)
"""


def test_the_launch_setting_gives_huge_pages():
    if huge_pages.thp_mode() != "madvise" or not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("needs Linux with transparent huge pages in madvise mode")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def child(**extra: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-c", CHILD],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        huge_kib, value = done.stdout.split()
        return int(huge_kib), value

    huge_kib, value = child(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    if huge_kib == 0:
        pytest.skip("glibc here ignores glibc.malloc.hugetlb (older than 2.35)")
    assert value == "1" and huge_kib >= 2048
    assert child() == (0, "None")  # without it: 4 KiB pages, and nothing restarts
