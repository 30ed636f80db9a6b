"""Run a command in a child process and measure it: wall time, CPU time and peak RSS.

The peak RSS is the child's kernel high-water mark from `wait4` (its own, not this
process's, and not a sampled value). Shared by the benchmark scripts of this folder.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import IO


def run_measured(
    command: list[str], *, cwd: str | Path, env: dict | None = None, output: IO | None = None
) -> dict:
    """Run `command`; {"exit_code", "wall_s", "peak_rss_bytes", "user_s", "sys_s"}.

    `output`: a file for the child's stdout and stderr (default: inherited).
    """
    started = time.perf_counter()
    stderr = None if output is None else subprocess.STDOUT
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=stderr)
    _, status, usage = os.wait4(child.pid, 0)
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "wall_s": time.perf_counter() - started,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }
