"""Signals while a sweep runs: SIGTERM stops it like Ctrl-C; neither cuts its report short."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class _Stopped(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (workers killed, partial report kept)."""

    signal_name = "SIGTERM"


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM into an interruption while a sweep runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: FrameType | None) -> Any:
        raise _Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the partial report is written (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
