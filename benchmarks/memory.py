"""Resident memory of this process, for the memory checks of the benchmarks and tests."""

from __future__ import annotations

import os

__all__ = ["HAS_PROC", "rss_mb"]

#: Whether ``/proc/self/statm`` exists (Linux), which :func:`rss_mb` reads.
HAS_PROC = os.path.exists("/proc/self/statm")


def rss_mb() -> float:
    """The resident set size of this process in MiB, read from ``/proc/self/statm``.

    Example:
        >>> rss_mb() > 0
        True
    """
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
