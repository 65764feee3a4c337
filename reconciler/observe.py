"""What a run reports about itself while it works: phase timings (metrics) and events (logs).

The reconcile run (reconciler.run) marks its phases through one Observer; the `weft` command
gives it the run's RunMetrics (`--metrics-file`) and EventLog (`--log-format json`), or neither.
Standard library only: nothing is measured or written unless asked for.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from weft.reconciler.logs import EventLog
from weft.reconciler.metrics import RunMetrics


class Observer:
    def __init__(self, metrics: RunMetrics | None = None, log: EventLog | None = None):
        self.metrics, self.log = metrics, log

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time phase `name` (a phase timed twice adds up) and log its end with its duration."""
        start = time.monotonic()
        failed = True
        try:
            yield
            failed = False
        finally:
            seconds = time.monotonic() - start
            if self.metrics is not None:
                self.metrics.phases[name] = self.metrics.phases.get(name, 0.0) + seconds
            if self.log is not None:
                self.log.event(name, "failed" if failed else "done", level="error" if failed else "info",
                               seconds=round(seconds, 4))

    def event(self, phase: str, message: str = "", **fields: Any) -> None:
        if self.log is not None:
            self.log.event(phase, message, **fields)

    def warning(self, message: str, phase: str = "read") -> None:
        """A warning for the operator: an event of the log when there is one (so JSON logs stay
        all JSON), else a `weft: warning:` line on stderr."""
        if self.log is not None:
            self.log.event(phase, message, level="warning")
        else:
            import sys
            print(f"weft: warning: {message}", file=sys.stderr)


QUIET = Observer()
