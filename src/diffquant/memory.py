"""Peak memory of a block of work: the process's resident set on the CPU, torch's allocations on a GPU.

:class:`PeakMemory` measures one stage. On the CPU a background thread samples the resident set
size (RSS, from ``/proc/self/statm``; psutil elsewhere) every ``interval`` seconds and at both
ends of the block: the peak is the largest sample, so a spike shorter than the interval can be
missed. The process-wide ``ru_maxrss`` cannot serve, since it never comes down between stages.
On a CUDA device it also reads ``torch.cuda.max_memory_allocated`` after resetting the peak at the
start (exact for torch's allocations; the CUDA context and other libraries are not counted).
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes (0 when no source is available)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


@dataclass(frozen=True)
class MemoryUse:
    """What :class:`PeakMemory` measured for one block."""

    peak_rss_bytes: int
    start_rss_bytes: int
    end_rss_bytes: int
    peak_cuda_bytes: int | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (summary.json)."""
        return asdict(self)


class PeakMemory:
    """Context manager measuring the peak RSS (sampled) and, on a CUDA device, torch's peak allocation.

    Example:
        >>> with PeakMemory() as peak:
        ...     work()
        >>> peak.result.peak_rss_bytes
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.01) -> None:
        """Measure on ``device`` (CUDA peak only for a CUDA device), sampling RSS every ``interval`` seconds."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.result: MemoryUse | None = None
        self._peak = 0
        self._start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss())

    def __enter__(self) -> PeakMemory:
        """Start sampling (and reset the CUDA peak)."""
        self._start = self._peak = current_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, name="diffquant-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Stop sampling and record the result."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end = current_rss()
        cuda = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        method = f"RSS sampled every {self.interval * 1000:g} ms" + (
            ", torch.cuda.max_memory_allocated" if cuda is not None else ""
        )
        self.result = MemoryUse(max(self._peak, end), self._start, end, cuda, method)
