"""What a speed figure was measured on, and whether the machine stayed the benchmark's while it ran.

``cpu_record()`` names the CPU and the instruction sets the peers' kernels choose between (llama.cpp's native
build decodes through AMX tiles and VNNI where the CPU has them; the same build elsewhere takes slower paths), so
a row can be told apart from one measured on another host. ``LoadWatch`` measures, over a run, how much CPU time
processes other than this one (and its children, e.g. llama.cpp) took, steal time from other virtual machines
included: with OpenMP and llama.cpp threads pinned to every core, a core taken for a moment stalls every parallel
region, so such a run's figures are not the code's. A run whose others' share passes ``BUSY_CORES`` (or that
started with a load average above ``BUSY_LOAD``) is UNRELIABLE, and its targets are not judged.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
BUSY_CORES = 0.25  # other processes' average CPU use, in cores, past which a run is not the benchmark's alone
BUSY_LOAD = 0.5  # load average before the run past which it starts on a busy machine


def cpu_record(cpuinfo: str | None = None) -> dict:
    """{"model", "flags" (those of ``FLAGS`` present), "missing", "cores", "kernel"} from /proc/cpuinfo."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    lines = cpuinfo.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    have = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    return {"model": model or platform.machine(), "flags": [f for f in FLAGS if f in have],
            "missing": [f for f in FLAGS if f not in have], "cores": os.cpu_count(), "kernel": platform.release()}


def describe_cpu(record: dict) -> str:
    """One line: model, cores, and the instruction sets present and absent."""
    absent = f"; no {' / '.join(record['missing'])}" if record["missing"] else ""
    return f"{record['model']}, {record['cores']} cores; {' '.join(record['flags']) or 'none of ' + ' '.join(FLAGS)}{absent}"


def busy_jiffies(stat: str) -> int:
    """Non-idle CPU time of all cores from /proc/stat's first line: user nice system irq softirq steal."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def own_cpu_seconds() -> float:
    """CPU time of this process and of its children that were waited for (llama.cpp runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def others_cores(busy_before: int, busy_after: int, own_before: float, own_after: float, wall_s: float,
                 hz: int) -> float:
    """Average cores other processes (and other VMs, through steal) used over ``wall_s`` seconds."""
    others_s = (busy_after - busy_before) / hz - (own_after - own_before)
    return max(0.0, others_s / max(wall_s, 1e-9))


@dataclass
class LoadWatch:
    """Watches one run: ``start()`` before, ``stop()`` after; then ``reliable`` and ``why``."""

    load_before: float = 0.0
    others: float = 0.0
    wall_s: float = 0.0
    _marks: tuple = field(default=(), repr=False)

    def start(self) -> "LoadWatch":
        self.load_before = os.getloadavg()[0]
        self._marks = (busy_jiffies(Path("/proc/stat").read_text()), own_cpu_seconds(), time.perf_counter())
        return self

    def stop(self) -> "LoadWatch":
        busy, own, t0 = self._marks
        self.wall_s = time.perf_counter() - t0
        self.others = others_cores(busy, busy_jiffies(Path("/proc/stat").read_text()), own, own_cpu_seconds(),
                                   self.wall_s, os.sysconf("SC_CLK_TCK"))
        return self

    @property
    def reliable(self) -> bool:
        return self.load_before <= BUSY_LOAD and self.others <= BUSY_CORES

    @property
    def why(self) -> str:
        return (f"load average {self.load_before:.2f} at the start (idle: <= {BUSY_LOAD}); other processes used "
                f"{self.others:.2f} cores on average over {self.wall_s:.0f} s (idle: <= {BUSY_CORES})")

    def as_dict(self) -> dict:
        return {"load_before": self.load_before, "others_cores": self.others, "wall_s": self.wall_s,
                "reliable": self.reliable}


def verdict(passed: bool, watch: LoadWatch | None) -> str:
    """PASS / FAIL for a target, or UNRELIABLE when the machine was not the run's alone."""
    if watch is not None and not watch.reliable:
        return "UNRELIABLE"
    return "PASS" if passed else "FAIL"
