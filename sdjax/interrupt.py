"""SIGINT / SIGTERM that stop a run between compiled calls and never in the middle of a write.

`handle_signals()` (used by the CLI's `main`) makes both signals raise `Interrupted` (a
KeyboardInterrupt carrying the signal number) in the main thread. A compiled JAX call cannot
be stopped half-way, so the exception arrives when the current call returns to Python: a
generate call is bounded by `sdjax.pipeline.request.Limits` (steps, pixels, batch size), so that is seconds
for ordinary requests. Inside `critical()` (an image file and its manifest record) the
signal is held and raised when the block ends, so a stopped run leaves every image with its
record, or neither. Exit status: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_held = 0
_pending: int | None = None


def _handler(signum, frame):
    global _pending
    if _held:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals(signals=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """While active (main thread only; elsewhere a no-op), the signals raise `Interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block is done, then raise the held one."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


__all__ = ["Interrupted", "critical", "handle_signals"]
