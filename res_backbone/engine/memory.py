"""Resident memory of the running process: the current value (to watch for growth) and the peak."""
from __future__ import annotations

import os
import resource
import sys
from typing import Dict, Optional

_MIB = 1024.0 * 1024.0


def _maxrss_mib(who: int) -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    value = resource.getrusage(who).ru_maxrss
    return value / _MIB if sys.platform == "darwin" else value / 1024.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage(RUSAGE_SELF).ru_maxrss``)."""
    return round(_maxrss_mib(resource.RUSAGE_SELF), 1)


def peak_rss_report() -> Dict[str, float]:
    """``{"peak_rss_mib": this process, "peak_rss_children_mib": the largest child already waited for}``.

    The children's figure is the kernel's maximum over terminated children (DataLoader workers once
    shut down, helper processes), not a sum, and a forked child starts with its parent's pages counted
    as its own, so the two figures must not be added: the second is an upper bound for one worker.
    """
    return {"peak_rss_mib": peak_rss_mib(),
            "peak_rss_children_mib": round(_maxrss_mib(resource.RUSAGE_CHILDREN), 1)}


def rss_mib(pid: Optional[int] = None) -> float:
    """Current resident set size of process ``pid`` (default: this one) in MiB, from ``/proc``.

    Raises:
        OSError: no ``/proc`` (not Linux) or no such process.
    """
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / _MIB
