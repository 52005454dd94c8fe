"""Timing helpers for fgd's benchmarks (`fgd bench`, benchmarks/*.py): median wall time with the
device synchronised, peak memory, torch.compile baselines, and the name of the device timed."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

from . import cpu_capability


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, repeat: int, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device) -> tuple:
    """(peak bytes allocated above the level at the call, largest single allocation or None) of fn().

    CUDA: the caching allocator's peak statistic. CPU: the profiler's allocation events replayed in
    time order (what fn allocated through PyTorch; BLAS scratch outside it is not seen).
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start, None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = largest = 0
    for e in events:  # nbytes < 0 for a free
        level += e.nbytes()
        peak, largest = max(peak, level), max(largest, e.nbytes())
    return peak, largest


def compiled(fn, enabled: bool = True):
    """torch.compile(fn) on a fresh dynamo state, or None when not enabled (that baseline is skipped)."""
    if not enabled:
        return None
    torch._dynamo.reset()
    return torch.compile(fn)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """What a benchmark ran on: the GPU's name, or the CPU with its threads and code paths."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({cpu_model()}, {torch.get_num_threads()} threads), fgd CPU path "
            f"{cpu_capability()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
