"""Where a run's time and memory go: ``Timer`` sums wall time per stage and records the memory
snapshot at each stage's end (host peak so far and now, device peak so far) with how much the
stage raised each peak."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Dict, Optional

import torch


class Timer:
    """Wall time per stage (summed over repeated entries) and the memory snapshot at each stage's
    end (host RSS peak so far and now, device peak so far) with how much the stage raised each
    peak (``*_rise``, summed over its entries): the stage with the rise made the peak."""

    def __init__(self):
        self.stages: Dict[str, float] = {}
        self.memory: Dict[str, Dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        before = memory_now_gb()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - t, 2)
            self.memory[name] = memory_rise(before, memory_now_gb(), self.memory.get(name))


def host_peak_kib() -> int:
    """This process's peak resident memory (KiB): /proc's VmHWM, which starts afresh at exec. Linux's
    ru_maxrss does not: a process started by one that had grown to 16 GB reported 16 GB for a 1B
    model's whole run (bench_scale building an 8B model, then running a 1B one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_now_gb() -> Dict[str, float]:
    """Host RSS now and at its peak so far, device allocator peak so far (GB): a stage's snapshot."""
    out = {"host_peak_gb": round(host_peak_kib() / 2 ** 20, 2)}
    try:
        with open("/proc/self/statm") as f:
            out["host_now_gb"] = round(int(f.read().split()[1]) * resource.getpagesize() / 2 ** 30, 2)
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["device_peak_gb"] = round(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2 ** 30, 2)
    return out


def memory_rise(before: Dict[str, float], after: Dict[str, float],
                earlier: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """``after`` (a ``memory_now_gb`` snapshot) with how much each peak rose since ``before``, plus
    the rises ``earlier`` recorded (a stage entered again): the part with the rise made the peak."""
    for k in ("host_peak_gb", "device_peak_gb"):
        if k in after:
            after[k + "_rise"] = round((earlier or {}).get(k + "_rise", 0.0) + after[k] - before.get(k, 0.0), 2)
    return after


def peak_memory_mb(device: torch.device) -> Dict[str, float]:
    out = {"host_rss_peak_mb": round(host_peak_kib() / 1024, 1)}
    if device.type == "cuda":
        out["device_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out
