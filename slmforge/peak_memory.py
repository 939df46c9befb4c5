"""Peak memory of a measured block: CUDA's peak allocation on a GPU; on CPU the resident set's
high-water mark (VmHWM, reset through /proc/self/clear_refs), or RSS sampled every 5 ms where that
reset is not allowed. `trim_malloc` first hands freed memory back to the OS, so a model measured
after another does not reuse the first one's pages unseen. See `slmforge.benchmarking`'s docstring
for how each figure of the comparison is taken."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import threading
from pathlib import Path

import psutil
import torch


def _status_kb(field: str) -> int | None:
    """A `kB` field of /proc/self/status: psutil reads VmRSS but not the high-water mark VmHWM."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS. False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def trim_malloc() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps it otherwise, and the next
    model would reuse it without raising the RSS, hiding its cost)."""
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a block, relative to its start; `mark(name)` records the peak so far.

    GPU: CUDA peak allocated. CPU: peak RSS delta (see the module docstring). One instance per
    measured block; they do not nest (both the CUDA peak and VmHWM are process-wide).
    """

    def __init__(self, sample_interval_s: float = 0.005):
        self.cuda = torch.cuda.is_available()
        self.interval = sample_interval_s
        self.marks: dict[str, int] = {}
        self.baseline = 0
        self.method = ""
        self._hwm = False
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        trim_malloc()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "CUDA peak allocated (torch.cuda.max_memory_allocated) minus allocated at start"
            return self
        self.baseline = rss_bytes()
        self._hwm = reset_peak_rss()
        if self._hwm:
            self.method = "CPU peak RSS delta: kernel high-water mark VmHWM (reset via /proc/self/clear_refs) minus RSS at start"
        else:
            self.method = f"CPU peak RSS delta: RSS sampled every {self.interval * 1000:.0f} ms minus RSS at start"
            self._sampled = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, rss_bytes())

    def peak_bytes(self) -> int:
        """Absolute peak since the start (CUDA allocated or RSS)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._hwm:
            return max((_status_kb("VmHWM") or 0) * 1024, rss_bytes())
        self._sampled = max(self._sampled, rss_bytes())
        return self._sampled

    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes() - self.baseline)

    def mark(self, name: str) -> int:
        self.marks[name] = self.delta_bytes()
        return self.marks[name]

    def __exit__(self, *exc) -> None:
        self.marks.setdefault("end", self.delta_bytes())
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
