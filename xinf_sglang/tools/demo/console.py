"""What ``sglite demo`` prints while it works: its own lines, waits with a progress tick, check results."""

from __future__ import annotations

import time
from collections.abc import Callable

TICK_SECONDS = 15.0


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def say(message: str) -> None:
    """One line of the demo's own output, marked so that it stands out among Xinference's and pip's."""
    print(f"[sglite demo] {message}", flush=True)


def wait_with_progress(
    done: Callable[[], bool], timeout: float, what: str, progress: Callable[[float], str]
) -> float:
    """Poll ``done`` every second until it is true; every ``TICK_SECONDS`` say ``progress(elapsed)`` so that a
    long wait (a model catalog import, a C++ build) never looks like a hang. Returns the seconds waited.

    Raises:
        DemoError: ``timeout`` seconds passed first.
    """
    started = time.monotonic()
    next_tick = started + TICK_SECONDS
    while not done():
        now = time.monotonic()
        if now - started > timeout:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        if now >= next_tick:
            say(f"  ... {progress(now - started)}")
            next_tick = now + TICK_SECONDS
        time.sleep(1)
    return time.monotonic() - started


class Checks:
    """PASS / FAIL lines for what the demo verifies, and the verdict at the end."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0

    def record(self, name: str, ok: bool, detail: str) -> None:
        """Print one check's result and remember a failure."""
        say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)

    def summary(self) -> str:
        """One line: how many checks passed, and which failed."""
        if not self.failed:
            return f"all {self.passed} checks passed"
        return f"{len(self.failed)} check(s) FAILED ({', '.join(self.failed)}); {self.passed} passed"
