"""Peak memory of a block of code above its starting level, for the harness and the benchmark.

CPU: the process's resident set size sampled in a background thread (ru_maxrss cannot be reset, so
it would report the peak of the whole process). glibc keeps freed memory resident for reuse, so
after a first large block every later block would measure about nothing; the freed pages are handed
back (malloc_trim) before each block starts, and each block's own peak shows. torch has no CPU
allocator counter, and tracemalloc does not see torch's allocations. GPU: torch's own allocator counter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import torch

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Return memory the C allocator keeps after frees to the system (glibc; elsewhere nothing to do)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak as a fallback)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.rss_bytes` (CPU) and `peak.cuda_bytes` (GPU, or 0).

    rss_bytes is the highest RSS seen during the block minus the RSS at its start; memory that
    the block allocates and frees between two samples (every `interval` seconds) can be missed.
    """

    def __init__(self, interval: float = 0.005, device: torch.device | str | None = None):
        self.interval = interval
        self.device = torch.device(device) if device is not None else None
        self.rss_bytes = 0
        self.cuda_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def __enter__(self) -> "PeakMemory":
        release_freed_memory()
        self._start = current_rss_bytes()
        self._peak = self._start
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss_bytes())
        self.rss_bytes = self._peak - self._start
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.cuda_bytes = torch.cuda.max_memory_allocated(self.device) - self._cuda_start

    @property
    def peak_rss_bytes(self) -> int:
        """Highest RSS of the whole process during the block (comparable between warm runs)."""
        return self._peak

    @property
    def peak_bytes(self) -> int:
        """The figure that matters on this device: CUDA allocations on a GPU, RSS otherwise."""
        return self.cuda_bytes if self._cuda else self.rss_bytes
