"""This process's memory as Linux reports it, without importing torch or Lightning: the benchmarks' memory probes
measure a baseline after their imports, and a heavier import here would move it."""

from __future__ import annotations

from pathlib import Path


def proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None
