"""Timing and memory measurement for the benchmarks and the memory planner's checks.

Timings are taken with the variants interleaved inside each repeat, and ratios are medians
of per-round ratios, so that drift of a shared, noisy machine (other jobs, frequency
changes) hits every variant alike and ratios taken within one run stay meaningful. Memory
is the process's resident set on CPU (run with MALLOC_MMAP_THRESHOLD_ low enough that freed
tensors leave the process, so the resident peak follows live tensors) and the allocator's
peak on CUDA. "On CUDA" means this process has used CUDA (`torch.cuda.is_initialized`),
not that a GPU is visible: a CPU run on a GPU host measures the CPU.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Callable

import torch


def on_cuda() -> bool:
    """Whether this process runs work on CUDA (its CUDA context exists)."""
    return torch.cuda.is_initialized()


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call, per variant, the variants alternating within each repeat:
    sample i of every variant comes from the same round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            samples[key].append(timed(fn))
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratios(samples: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Median over rounds of each variant's time over the reference's in the same round, so
    that the machine's speed drifting between rounds cancels out of the ratio."""
    ref = samples[reference]
    return {k: statistics.median(t / r for t, r in zip(v, ref)) for k, v in samples.items()}


def resident() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Start a new peak-memory window; False where the kernel cannot reset the resident
    peak (then `peak` is the peak since the process started)."""
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak resident set size
            f.write("5")
        return True
    except OSError:
        return False


def current() -> int:
    """Bytes in use now: allocated device memory on CUDA, else resident memory."""
    if on_cuda():
        return torch.cuda.memory_allocated()
    return resident()


def peak() -> int:
    """Largest bytes in use since `reset_peak`, in the units of `current`."""
    if on_cuda():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
