"""Peak resident memory of this process, as the benchmarks and the manifest report it.

Linux keeps getrusage's `ru_maxrss` across fork and exec, so a process started by a larger one reports its
parent's peak; `VmHWM` (/proc/self/status) belongs to the process's own address space, and writing 5 to
/proc/self/clear_refs resets it, so one stage's peak can be measured. Elsewhere `ru_maxrss` is the answer.
"""

from __future__ import annotations

import sys
from pathlib import Path

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_mib(field: str) -> float | None:
    try:
        line = next(line for line in _STATUS.read_text().splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024  # kB


def current_rss_mib() -> float | None:
    """Resident memory now (Linux), else None."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started or since `reset_peak_rss`."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def reset_peak_rss() -> bool:
    """Start a new peak from the current resident memory (Linux 4.0+); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
