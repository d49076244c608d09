"""Where and in what precision work runs, and what it costs: device and dtype resolution, memory gauges, parameter
counts.

Every stage (pruning, evaluation, recovery) asks here, so none imports another stage to borrow a helper.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Iterable

import torch

from .errors import LLMPruneError


def resolve_device(device: str | None) -> torch.device:
    """None: cuda when a GPU is present, else cpu. A device that is not here is an error naming the fix."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LLMPruneError(f"--device '{device}' is not a device: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LLMPruneError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LLMPruneError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto`: float32 on a CPU (fast there, and exact), bfloat16 on a GPU."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def elapsed(start: float, device: torch.device) -> float:
    """Seconds since `start`, after the device's queued kernels have finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def release_free_memory() -> None:
    """Hand the allocator's freed pages back to the OS (glibc's malloc_trim; a no-op elsewhere). A layer-by-layer
    run frees hundreds of MB per layer in pieces glibc keeps in its heaps; without this the streamed RSS creeps."""
    import ctypes
    import ctypes.util

    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more with its own mmap, returned to the OS when freed (glibc's
    mallopt M_MMAP_THRESHOLD; a no-op elsewhere). By default glibc raises that threshold to the largest block freed,
    up to 32 MB, and serves blocks under it from heaps it keeps: a layer's transient activations, freed and then
    allocated again a little differently, spread over more and more heap, and a streamed prune's peak creeps (on a
    0.5B model from 0.75 to 1.25 GiB over 24 layers)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_bytes() -> int:
    """The process's high-water mark of resident memory: VmHWM, its own address space's. Not ru_maxrss, which
    keeps the high-water mark of the image before exec, so a child spawned by a parent that held a model
    would report the parent's memory as its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux
        return None


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: free GPU memory, or the kernel's MemAvailable (which counts
    reclaimable page cache), else the free pages where the OS reports them; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such sysconf name here (macOS)
        return None


def parameter_count(parameters: Iterable[torch.Tensor]) -> int:
    """How many numbers the tensors hold, e.g. ``parameter_count(model.parameters())``; a tensor given twice (a
    tied embedding) counts once."""
    return sum(tensor.numel() for tensor in {id(tensor): tensor for tensor in parameters}.values())
