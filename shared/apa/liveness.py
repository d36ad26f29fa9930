"""Liveness for processes without an HTTP port (the erasure consumer, trainer workers).

The process touches a file (`APA_LIVENESS_FILE`) while it works: the consumer on every pass of its
poll loop, a worker from a heartbeat thread once it is ready. A container health check (and `apa
stack status`) reads the file's age: too old means the loop is stuck. A worker keeps beating
while it trains, so a long retrain is not mistaken for a hang (a `celery inspect ping` would be:
a solo-pool worker answers nothing while it trains).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


def touch(path: str | Path | None) -> None:
    """Mark the process alive now (no-op without a path; a failure is logged, never raised)."""
    if not path:
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a"):
            os.utime(target, None)
    except OSError as exc:
        log.warning("could not touch the liveness file %s: %s", target, exc)


class Beat:
    """Touches `path` every `every_s` seconds from a daemon thread while it runs."""

    def __init__(self, path: str | Path | None, every_s: float = 10.0) -> None:
        self.path, self.every_s = path, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def _run(self) -> None:
        touch(self.path)
        while not self._stop.wait(self.every_s):
            touch(self.path)

    def start(self) -> Beat:
        if self.path and not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> Beat:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


__all__ = ["Beat", "touch"]
