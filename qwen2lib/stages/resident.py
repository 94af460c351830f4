"""Resident memory of a process, from Linux's /proc (``ru_maxrss`` where it is missing): the one home for the
stages' peak per build, the server's /stats and the benchmarks' memory columns.

    reset_peak(); ...; peak_bytes()        # this process's high-water mark since the reset (VmHWM)
    resident_bytes()                       # what it holds now (VmRSS)
    status_bytes("VmHWM", str(child.pid))  # another process's, polled (a child's rusage starts from its parent's)
"""
from __future__ import annotations

import resource
from pathlib import Path


def status_bytes(field: str, pid: str = "self") -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; None where /proc or the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_bytes() -> int:
    """This process's peak resident bytes since the last ``reset_peak`` (VmHWM), else since it started."""
    peak = status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """What this process holds now (VmRSS), else its peak."""
    now = status_bytes("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Start this process's high-water mark over from what it holds now (Linux >= 4.0: ``5`` into clear_refs), so a
    stage built in a long-lived notebook kernel records its own peak, not an earlier one's; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
        return True
    except OSError:
        return False
