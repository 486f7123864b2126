"""Peak resident memory per stage, and handing freed memory back to the OS between stages (Linux).

The peak of a stage is the kernel's own high-water mark (`VmHWM` in /proc/self/status), reset at the stage's start by
writing 5 to /proc/self/clear_refs: exact, with no sampling thread. Where that reset is not allowed, the peak is
the process's peak so far (`ru_maxrss`), which is an upper bound.
"""
from __future__ import annotations

import ctypes
import gc
import re
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak RSS since the last `reset_peak` (or since it started)."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def children_peak_rss_bytes() -> int:
    """The largest peak RSS of any finished child process (e.g. a converter run in a subprocess)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS, so the next stage's peak starts from what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):    # not glibc: the memory is still free for this process to reuse
        pass


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), None where there is none."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
