"""Timing and peak memory of one implementation, measured the same way for every row.

Peak memory is the high-water mark of the process's resident set (Linux VmHWM) while the
implementation runs, minus the resident set just before it started: the memory the
implementation itself needed on top of the loaded model. The mark is reset before each
measurement by writing 5 to /proc/self/clear_refs, so a baseline's peak does not leak into the
next measurement in the same process (rows run in separate processes anyway, see
benchmarks.__main__), and freed heap memory is handed back to the OS first (malloc_trim), so
memory an earlier measurement left in the allocator does not hide the next one's needs. Where the reset is unavailable, the peak counts from process start and is
flagged. On a GPU the figure is torch's peak allocated device memory over the same span.

Time is taken twice: wall clock, and the CPU time of the process. On a machine shared with other
jobs the wall clock measures the scheduler as much as the code; with one intra-op thread
(`--threads 1`) the CPU time is what the implementation costs, whatever else runs.
"""

from __future__ import annotations

import ctypes
import gc
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_free_heap() -> None:
    # Memory an earlier measurement freed stays in glibc's heap and counts as resident; the next
    # implementation would reuse it without raising the high-water mark and look free of cost.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of this process (all its threads)
    peak_mib: float | None  # extra memory over the resident set at the start
    resident_mib: float | None  # resident set (or allocated device memory) at the start
    peak_exact: bool  # False: the high-water mark could not be reset, it includes earlier work
    result: object = None


def measure(fn: Callable[[], object], device: torch.device | str = "cpu") -> Measurement:
    """Run fn once; its wall time and the peak memory it added."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
        exact = True
    else:
        _release_free_heap()
        exact = _reset_peak_rss()
        start_mem = (_status_kib("VmRSS") or 0) * 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        hwm = _status_kib("VmHWM")
        peak = None if hwm is None else hwm * 1024
    mib = float(1 << 20)
    return Measurement(
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        peak_mib=None if peak is None else max(0.0, (peak - start_mem) / mib),
        resident_mib=start_mem / mib if start_mem else None,
        peak_exact=exact,
        result=result,
    )
