"""Running the kernel's command-line tools: the only place weft starts subprocesses for them.

A tool that prints an error but exits 0 (ipset and iptables both can) is a failure too: weft
must never believe a change landed when the kernel said otherwise.
"""
from __future__ import annotations

import subprocess
import threading

from weft.model.errors import WeftError

# Lines some tools print on stderr that are information, not failure.
_BENIGN = ("# Warning: iptables-legacy tables present", "# Warning: ip6tables-legacy tables present", "# Table `")


# How the tools say "no such chain / set" (iptables-nft 1.8.9 calls a missing chain "incompatible").
_MISSING = ("does not exist", "No chain/target/match", "is incompatible, use 'nft' tool")


class KernelCommandError(WeftError):
    """A kernel tool failed; the message carries its command line and what it said."""

    def __init__(self, message: str, said: str = ""):
        super().__init__(message)
        self.said = said

    @property
    def missing(self) -> bool:
        """The tool failed only because the chain or set asked for does not exist."""
        return any(m in self.said for m in _MISSING)


class Pending:
    """A started command; `result()` waits for it and checks what it said.

    Its output is read as it comes, in a thread: a dump larger than a pipe's buffer (ipset save
    prints megabytes) would otherwise stall until someone asks for the result.
    """

    def __init__(self, argv: list[str], proc: subprocess.Popen, stdin: str | None):
        self.argv, self.proc = argv, proc
        self._out: tuple[str, str] = ("", "")
        self._reader = threading.Thread(target=self._read, args=(stdin,), daemon=True)
        self._reader.start()

    def _read(self, stdin: str | None) -> None:
        self._out = self.proc.communicate(stdin)

    def result(self) -> str:
        self._reader.join()
        out, err = self._out
        problems = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(_BENIGN)]
        if self.proc.returncode != 0 or problems:
            said = "\n".join(problems) or out.strip() or f"exit code {self.proc.returncode}"
            shown = "; ".join(line.strip() for line in said.splitlines() if line.strip())     # one line
            raise KernelCommandError(f"{' '.join(self.argv)} failed (exit {self.proc.returncode}): {shown}", said)
        return out


class Runner:
    """Runs commands; remembers what it ran that writes to the kernel (reported by `apply`)."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.bytes_written = 0      # input fed to kernel-writing commands, for `apply` reports

    def start(self, argv: list[str], stdin: str | None = None, *, writes: bool = False) -> Pending:
        """Start `argv` without waiting: reads of the kernel can overlap other work."""
        if writes:
            self.writes.append(" ".join(argv))
            self.bytes_written += len(stdin.encode()) if stdin else 0
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except FileNotFoundError as exc:
            raise KernelCommandError(f"{argv[0]}: not installed ({exc.strerror})") from exc
        return Pending(argv, proc, stdin)

    def run(self, argv: list[str], stdin: str | None = None, *, writes: bool = False) -> str:
        return self.start(argv, stdin, writes=writes).result()
