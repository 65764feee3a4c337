"""Running the kernel's command-line tools: the only place weft starts subprocesses for them.

A tool that prints an error but exits 0 (ipset and iptables both can) is a failure too: weft
must never believe a change landed when the kernel said otherwise.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from desired.errors import WeftError

# Lines some tools print on stderr that are information, not failure.
_BENIGN = ("# Warning: iptables-legacy tables present", "# Table `")


class KernelCommandError(WeftError):
    """A kernel tool failed; the message carries its command line and what it said."""


@dataclass
class Runner:
    """Runs commands; remembers what it ran that writes to the kernel (reported by `apply`)."""
    writes: list[str] = field(default_factory=list)
    bytes_written: int = 0          # input fed to kernel-writing commands, for `apply` reports

    def run(self, argv: list[str], stdin: str | None = None, *, writes: bool = False) -> str:
        if writes:
            self.writes.append(" ".join(argv))
            self.bytes_written += len(stdin.encode()) if stdin else 0
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise KernelCommandError(f"{argv[0]}: not installed ({exc.strerror})") from exc
        problems = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(_BENIGN)]
        if proc.returncode != 0 or problems:
            said = "\n".join(problems) or proc.stdout.strip() or f"exit code {proc.returncode}"
            raise KernelCommandError(f"{' '.join(argv)} failed (exit {proc.returncode}): {said}")
        return proc.stdout
