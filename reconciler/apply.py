"""Executing a change set: the restore inputs (pure) and running them (side effects).

Order, so that no rule ever refers to a set that is not there:
  1. ipset restore: create new sets, update members, put type-replaced sets aside;
  2. iptables-restore --noflush, one transaction: chains declared (flushed) and refilled,
     removed chains emptied then deleted, hook rules fixed;
  3. ipset restore: destroy sets no longer referenced.
If step 2 fails the kernel rejects the whole transaction; step 1 is then undone, so the
previous rules keep running against the previous set contents.
"""
from __future__ import annotations

from dataclasses import dataclass

from probes.backend import Backend
from probes.runner import KernelCommandError, Runner
from reconciler.diff import CREATE, DELETE, REPLACE, UPDATE, Changes
from renderers.ipsets import short_hash


def _aside(name: str) -> str:
    return f"weft-t-{short_hash('aside', name)}"


@dataclass(frozen=True)
class RestoreInputs:
    ipset_before: str
    ipset_undo: str
    iptables: str
    ipset_after: str


def restore_inputs(changes: Changes) -> RestoreInputs:
    before, undo, after = [], [], []
    for s in changes.sets:
        if s.action in (CREATE, REPLACE):
            if s.action == REPLACE:
                before.append(f"rename {s.name} {_aside(s.name)}")
            before.append(f"create {s.name} {s.type} family {s.family}")
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.append(f"destroy {s.name}")
            if s.action == REPLACE:
                undo.append(f"rename {_aside(s.name)} {s.name}")
                after.append(f"destroy {_aside(s.name)}")
        elif s.action == UPDATE:
            before.extend(f"del {s.name} {m}" for m in s.remove)
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.extend(f"del {s.name} {m}" for m in s.add)
            undo.extend(f"add {s.name} {m}" for m in s.remove)
        elif s.action == DELETE:
            after.append(f"destroy {s.name}")

    tables: dict[str, list[str]] = {}
    for table in sorted({c.table for c in changes.chains} | {h.table for h in changes.hooks}):
        lines = tables.setdefault(table, [f"*{table}"])
        written = [c for c in changes.chains if c.table == table]
        lines.extend(f":{c.name} - [0:0]" for c in written)           # declaring flushes
        for c in written:
            lines.extend(c.rules)
        for h in changes.hooks:
            if h.table != table:
                continue
            lines.extend("-D" + r[2:] for r in h.previous)               # "-A X ..." -> "-D X ..."
            lines.extend(f"-I {h.chain} {i + 1}" + r[2 + len(h.chain) + 1:] for i, r in enumerate(h.rules))
        lines.extend(f"-X {c.name}" for c in written if c.action == DELETE)
        lines.append("COMMIT")
    iptables = "".join("\n".join(lines) + "\n" for lines in tables.values())
    return RestoreInputs(_script(before), _script(reversed(undo)), iptables, _script(after))


def _script(lines) -> str:
    lines = list(lines)
    return "\n".join(lines) + "\n" if lines else ""


def execute(changes: Changes, backend: Backend, runner: Runner) -> None:
    """Apply `changes`; on failure, leave the previous rules in force and raise."""
    inputs = restore_inputs(changes)
    if inputs.ipset_before:
        runner.run(["ipset", "restore"], inputs.ipset_before, writes=True)
    if inputs.iptables:
        try:
            runner.run(backend.restore, inputs.iptables, writes=True)
        except KernelCommandError:
            if inputs.ipset_undo:
                runner.run(["ipset", "restore"], inputs.ipset_undo, writes=True)
            raise
    if inputs.ipset_after:
        runner.run(["ipset", "restore"], inputs.ipset_after, writes=True)
