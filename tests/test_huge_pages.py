"""dare_jax.huge_pages: when the entry points restart with glibc's huge-page tunable, and that
the restart keeps the process, its arguments and its environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dare_jax import huge_pages

REPO = Path(__file__).resolve().parent.parent
GLIBC = (2, 36)


@pytest.mark.parametrize(
    "current, expected",
    [
        (None, "glibc.malloc.hugetlb=1"),
        ("", "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", None),  # the user's choice stands
        ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", None),
    ],
)
def test_tunable_is_added_once_and_never_overrides_the_user(current, expected):
    assert huge_pages.tunables_with_huge_pages(current) == expected


@pytest.mark.parametrize(
    "environ, mode, glibc, restarts",
    [
        ({}, "madvise", GLIBC, True),
        ({"DARE_JAX_HUGE_PAGES": "0"}, "madvise", GLIBC, False),  # opted out
        ({"DARE_JAX_HUGE_PAGES": "1"}, "madvise", GLIBC, True),
        ({}, "always", GLIBC, False),  # every mapping already gets huge pages
        ({}, "never", GLIBC, False),  # none can
        ({}, None, GLIBC, False),  # no THP file: not a THP kernel
        ({}, "madvise", (2, 31), False),  # glibc without the tunable
        ({}, "madvise", None, False),  # musl
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", GLIBC, False),  # restarted
    ],
)
def test_restart_rules(environ, mode, glibc, restarts):
    new = huge_pages.huge_pages_environment({"PATH": "/bin", **environ}, mode, glibc)
    if not restarts:
        assert new is None
        return
    assert new == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert huge_pages.thp_mode(str(path)) == "always"
    path.write_text("garbled\n")
    assert huge_pages.thp_mode(str(path)) is None
    assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


# A child that prints its pid and tunables, restarts, and measures its huge pages: the line
# before the restart must come out twice (once per start), the one after once.
CHILD = """
import os, sys
import numpy as np
from dare_jax import huge_pages
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
huge_pages.restart_with_huge_pages()
big = np.ones(64 << 20, np.uint8)  # 64 MiB from glibc's malloc
huge_kib = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        huge_kib = int(line.split()[1])
print("after", os.getpid(), huge_kib, huge_pages.status(), flush=True)
"""


def test_restart_keeps_pid_arguments_and_environment_and_gives_huge_pages():
    version = huge_pages._glibc_version()
    if huge_pages.thp_mode() != "madvise" or version is None or version < huge_pages.MIN_GLIBC:
        pytest.skip("needs Linux with glibc >= 2.35 and transparent huge pages in madvise mode")
    env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DARE_JAX_HUGE_PAGES")
    }
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "--flag", "value"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line.split(" ", 3) for line in done.stdout.splitlines()]
    assert [line[0] for line in lines] == ["start", "start", "after"]
    pids = {line[1] for line in lines}
    assert len(pids) == 1  # execve: the same process
    assert lines[0][2] == "None" and lines[1][2] == "glibc.malloc.hugetlb=1"
    assert lines[0][3] == lines[1][3] == "['--flag', 'value']"
    huge_kib, status = lines[2][2], lines[2][3]
    assert int(huge_kib) >= 2048, "no 2 MiB page backs the 64 MiB array"
    assert "'glibc.malloc.hugetlb': '1'" in status

    # Opted out: one start, no tunable.
    opted_out = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**env, "DARE_JAX_HUGE_PAGES": "0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert [line.split()[0] for line in opted_out.stdout.splitlines()] == ["start", "after"]
    assert opted_out.stdout.splitlines()[0].split()[2] == "None"
