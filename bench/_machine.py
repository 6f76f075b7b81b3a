"""What machine a result was measured on (recorded next to every result)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from typing import Any


def describe() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        with open("/proc/meminfo") as fh:
            mem_gib = int(fh.readline().split()[1]) / 1024 / 1024
    except OSError:
        pass
    disk = ""
    with contextlib.suppress(OSError, IndexError):
        disk = subprocess.run(
            ["df", "-h", "--output=source,fstype", "."], capture_output=True, text=True, check=False
        ).stdout.splitlines()[-1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": disk,
    }
