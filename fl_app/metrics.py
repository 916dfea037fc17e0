"""Measurements shared by the runner and the Flower apps: client peak memory and timing."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fl_app.allocator import active_allocator, purge_mimalloc
from fl_app.bottom_effect import pool_drift, pool_swap
from fl_app.records import EvalReport


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (libkineto prints a line at every profiler start and stop)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def release_freed_memory(force: bool = False) -> bool:
    """Give freed heap pages back to the OS. Under glibc's malloc (``malloc_trim``): its dynamic mmap
    threshold rises to the largest block freed (up to 32 MiB); blocks below it then come from the heap
    and stay there when freed, so without this a SmolLM2 client at 16 x 256 held ~500 MiB of freed
    activations, direction chunks and frames. Called after each client step (a few ms). Under mimalloc
    (:mod:`fl_app.allocator`), which purges freed pages on its own after ``MIMALLOC_PURGE_DELAY``,
    ``force`` purges them now (``mi_collect``): a node's worker does after each message, so it holds
    no step's memory between rounds. False if neither allocator is there to ask."""
    if active_allocator() == "mimalloc":
        return purge_mimalloc() if force else True
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    _LIBC.malloc_trim(0)
    return True


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def resident_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Parameters, buffers, gradients and optimizer state a party keeps between steps."""
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return tensor_bytes(tensors)


@dataclass
class PeakMemory:
    """Result of :func:`track_peak_memory`: the transient peak above what was live at the start."""

    transient_bytes: int = 0


@contextlib.contextmanager
def track_peak_memory(device: torch.device | None = None) -> Iterator[PeakMemory]:
    """Peak of CPU bytes allocated *by this thread* inside the block (torch profiler memory events).

    Work a party delegates to another thread (the in-process server) is not counted, so the
    figure is the client's own. On a CUDA ``device`` the device's own transient peak (allocator
    statistics: every thread's, so a server sharing the GPU in one process is counted too) is added.
    """
    result = PeakMemory()
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        on_device = torch.cuda.memory_allocated(device)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        yield result
    finally:
        with _quiet_stderr():
            prof.stop()
    # host allocations only: a CUDA allocator's events are in the profile too, counted below from its statistics
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    result.transient_bytes = peak
    if cuda:
        torch.cuda.synchronize(device)
        result.transient_bytes += torch.cuda.max_memory_allocated(device) - on_device


def pool_eval(reports: list[EvalReport]) -> dict[str, Any]:
    """Pool per-client evaluation reports (accuracy, loss, count) into one, keeping per-client accuracy,
    the per-example outcomes, and the bottom's drift and swap evaluation where the reports carry them."""
    total = sum(r.count for r in reports)
    if not total:
        return {"accuracy": None, "loss": None, "count": 0, "per_client": []}
    pooled = {
        "accuracy": sum(r.accuracy * r.count for r in reports) / total,
        "loss": sum(r.loss * r.count for r in reports) / total,
        "count": total,
        "per_client": [r.accuracy for r in reports],
        "correct": [int(c) for r in reports for c in r.correct],  # per example, in shard order
    }
    drift, swap = pool_drift(reports), pool_swap(reports)
    if drift is not None:
        pooled["drift"] = drift
    if swap is not None:
        pooled["swap"] = swap
    return pooled


def log_to_stderr(*names: str, level: int = logging.INFO) -> None:
    """Show the named loggers' records on stderr, once, without touching the root logger (whose
    handler would print every record of Flower's own loggers a second time)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(getattr(h, "hosl", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.hosl = True
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
