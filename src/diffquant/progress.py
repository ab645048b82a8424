"""Progress reporting for long loops, decoupled from any UI.

Library code calls :func:`track`; by default progress is logged every 25%. The CLI installs a
``rich`` reporter with :func:`set_reporter`, so the core never imports a UI toolkit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

logger = logging.getLogger(__name__)


class ProgressHandle(Protocol):
    """A running progress bar."""

    def advance(self, amount: int = 1) -> None:
        """Advance by ``amount`` units."""


class Reporter(Protocol):
    """Creates progress handles; implemented by the CLI with rich."""

    def start(self, description: str, total: int) -> ProgressHandle:
        """Start a bar of ``total`` units."""

    def stop(self, handle: ProgressHandle) -> None:
        """Finish a bar."""


class _LogHandle:
    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.done, self._next = description, max(total, 1), 0, 0.25
        self._lock = threading.Lock()  # side-by-side sampling batches advance one bar from several threads

    def advance(self, amount: int = 1) -> None:
        with self._lock:
            self.done += amount
            if self.done / self.total >= self._next:
                logger.info("%s: %d/%d", self.description, self.done, self.total)
                while self._next <= self.done / self.total:
                    self._next += 0.25


class LogReporter:
    """Default reporter: a log line at every quarter of the work."""

    def start(self, description: str, total: int) -> ProgressHandle:
        """Start a logged bar."""
        return _LogHandle(description, total)

    def stop(self, handle: ProgressHandle) -> None:
        """Nothing to clean up for logged bars."""


_lock = threading.Lock()
_reporter: Reporter = LogReporter()


def set_reporter(reporter: Reporter | None) -> None:
    """Install ``reporter`` process-wide (None restores the logging reporter)."""
    global _reporter
    with _lock:
        _reporter = reporter or LogReporter()


@contextmanager
def track(description: str, total: int) -> Iterator[ProgressHandle]:
    """Report progress of a loop of ``total`` units under ``description``."""
    handle = _reporter.start(description, total)
    try:
        yield handle
    finally:
        _reporter.stop(handle)
