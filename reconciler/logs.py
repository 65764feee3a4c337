"""What a run tells its operator while it works: one line per event on stderr.

`--log-format json` writes each event as one JSON object on one line (journald stores it as the
message; `journalctl -u weft-reconcile -o cat | jq` reads it back), with the fields a log
pipeline groups by: time, level, run id, node, command, phase, message and the event's counts.
Text, the default, is for a person at a terminal. stdout stays the command's result (plan text
or JSON), so logs never mix into what a pipeline parses.

The run id is systemd's INVOCATION_ID when a unit started the run (so the journal's own
`_SYSTEMD_INVOCATION_ID` and weft's run id match), else a random one.

Standard library only, and nothing is imported until an event is written.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")


def add_arguments(parser) -> None:
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="events on stderr: text (default) or json, one object per line (journald)")


def new_run_id() -> str:
    invocation = os.environ.get("INVOCATION_ID", "")
    if len(invocation) == 32 and all(c in "0123456789abcdef" for c in invocation):
        return invocation
    return os.urandom(16).hex()


class EventLog:
    """The events of one run. `event("apply", "applied", chains=3, ipsets=1)`."""

    def __init__(self, fmt: str = "text", *, node: str = "", command: str = "", run_id: str | None = None,
                 stream: TextIO | None = None, clock=time.time):
        if fmt not in FORMATS:
            raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
        self.fmt, self.node, self.command = fmt, node, command
        self.run_id = run_id or new_run_id()
        self._stream, self._clock = stream, clock

    def event(self, phase: str, message: str = "", *, level: str = "info", **fields: Any) -> None:
        """One event of phase `phase`; `fields` are its counts and details (JSON values)."""
        if level not in LEVELS:
            raise ValueError(f"log level {level!r}: one of {', '.join(LEVELS)}")
        stream = self._stream or sys.stderr
        stream.write(self.format(phase, message, level, fields))
        stream.flush()

    def error(self, phase: str, message: str, **fields: Any) -> None:
        self.event(phase, message, level="error", **fields)

    def format(self, phase: str, message: str, level: str, fields: dict[str, Any]) -> str:
        now = self._clock()
        if self.fmt == "json":
            import json
            record = {"ts": _rfc3339(now), "level": level, "run_id": self.run_id, "node": self.node,
                      "command": self.command, "phase": phase, "msg": message}
            record.update((k, v) for k, v in fields.items() if k not in record)
            # ensure_ascii: a stray control character or newline in a value can never split the line.
            return json.dumps(record, default=str, ensure_ascii=True, separators=(",", ":")) + "\n"
        details = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        prefix = f"weft {self.command} [{self.node}] {phase}"
        text = " ".join(p for p in (f"{prefix}:", _text(message) if message else "", details) if p)
        return ("" if level == "info" else f"{level.upper()}: ") + text + "\n"


def _rfc3339(t: float) -> str:
    whole = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((t - whole) * 1000):03d}Z"


def _text(value: Any) -> str:
    """A value on one line of text: control characters (newlines) escaped."""
    text = str(value)
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        text = text.encode("unicode_escape").decode("ascii")
    return text
