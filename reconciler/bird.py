"""BIRD's configuration as a resource of `weft plan / apply / drift`.

The live file is `<state dir>/bird.conf` (read and written through the state dir's checks: never
through a symbolic link, mode 0600 as it may hold BGP passwords); BIRD is expected to run with
`-c` that file and its control socket at `<state dir>/bird.ctl` unless told otherwise, and logs
to `<state dir>/bird.log` unless told otherwise (`--bird-log`).

  plan    the desired text is rendered; a changed one is checked with `bird -p` (a configuration
          BIRD would reject fails the plan, exit 1: nothing of the run is applied);
  apply   the new text is written next to the live file, checked again, renamed over it, and
          loaded with `birdc configure`, which keeps every session whose protocol did not change;
          BIRD's reconfiguration time is then recorded (`bird-loaded.json`);
  drift   the unredacted live and desired texts are compared (an edited password line is drift),
          and a reconfiguration BIRD made that weft did not (another file loaded, a restart) is
          reported: BIRD's last reconfiguration time differs from the one recorded.

BIRD not running (no answer on the control socket) is not an error: the file is written and
checked, the reload is skipped, and the plan says so; BIRD reads the file when it starts. A node
with no BGP address has BGP off: weft then neither writes nor removes a BIRD configuration (the
resource is not part of its runs). Saved plans and JSON carry the text with passwords redacted.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from weft.model.errors import WeftError
from weft.probes import bird as probe
from weft.probes.runner import Runner
from weft.reconciler.diff import line_items
from weft.reconciler.resource import (
    Action,
    BirdWrite,
    DriftItem,
    Phase,
    ProbeSession,
    Problem,
    Resource,
    Step,
)
from weft.store.statedir import CorruptState, StateDir, sync_dir

if TYPE_CHECKING:
    from pathlib import Path

    from weft.model.cluster import ClusterState
    from weft.reconciler.rendered import RenderedNode

CONFIG_NAME = "bird.conf"
SOCKET_NAME = "bird.ctl"
LOG_NAME = "bird.log"
# BIRD keeps times on its monotonic clock and shows them as wall-clock times converted when
# printed, so one instant reads differently from one `show status` to the next (by a millisecond
# idle, by tens of milliseconds on a loaded machine). Times closer than this are the same instant.
BIRD_TIME_JITTER = timedelta(milliseconds=250)
LOADED_NAME = "bird-loaded.json"     # BIRD's reconfiguration time after the last configure weft issued
STAGED_NAME = f".{CONFIG_NAME}.new"
CHECKED_NAME = f".{CONFIG_NAME}.check"


@dataclass(frozen=True)
class BirdState:
    path: str
    text: str | None                 # the live file, unredacted (None: there is none)
    running: bool
    reconfigured: str | None = None  # BIRD's last reconfiguration (ISO time), when it runs
    recorded: str | None = None      # the one weft recorded after its last configure
    written: float | None = None     # the live file's mtime


@dataclass(frozen=True)
class BirdChange:
    """What apply will do to BIRD on this node."""
    path: str
    old: str | None                  # the live file (None: there is none)
    new: str
    reload: bool                     # `birdc configure` will run (BIRD answers on the socket)
    socket: str
    action: Action                   # create | update | reload (the file is current, BIRD runs another)
    note: str = ""                   # for the plan: why there is no reload, who reconfigured BIRD

    def public(self) -> dict[str, Any]:
        """asdict() with BGP passwords redacted: for JSON output and saved plans, which must not
        carry secrets (nor a digest of them)."""
        data = asdict(self)
        data["old"] = _redact(self.old) if self.old is not None else None
        data["new"] = _redact(self.new)
        return data


def _redact(config: str) -> str:
    from weft.renderers.bird import redact  # the renderer (jinja2, the BGP model): only where BGP is on
    return redact(config)


def default_socket(state_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(state_dir), SOCKET_NAME)


def default_log(state_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(state_dir), LOG_NAME)


def desired_config(state: ClusterState, node: str, state_dir: str | os.PathLike[str], socket: str | None,
                   log: str | None = None) -> str | None:
    """BIRD's configuration for `node`, or None when BGP is off for it (no BGP address)."""
    me = state.nodes.get(node)
    if me is None or me.bgp is None or not (me.bgp.ipv4_address or me.bgp.ipv6_address):
        return None
    from weft.renderers.bird import render_bird_config
    return render_bird_config(state, node, socket_path=socket or default_socket(state_dir),
                              log_target=log or default_log(state_dir))


class Bird(Resource[BirdState, BirdChange]):
    """BIRD's configuration on this node (a resource only where BGP is on)."""
    name = "bird"

    def __init__(self, state_dir: StateDir, socket: str | None = None, runner: Runner | None = None) -> None:
        self.state_dir = state_dir
        self.socket = socket or default_socket(state_dir.path)
        self.path = state_dir.file(CONFIG_NAME)
        self.runner = runner

    def start_probe(self, session: ProbeSession) -> Callable[[], BirdState]:
        return self.probe

    def probe(self) -> BirdState:
        text = probe.read_live(self.state_dir, CONFIG_NAME)
        written = os.stat(self.path).st_mtime if text is not None else None
        if not probe.running(self.socket):
            return BirdState(self.path, text, False, written=written)
        try:
            last = probe.last_reconfiguration(self.socket)
        except probe.BirdCommandError:
            return BirdState(self.path, text, False, written=written)   # BIRD went away meanwhile
        return BirdState(self.path, text, True, last.isoformat() if last else None, self._recorded(), written)

    def _recorded(self) -> str | None:
        try:
            data = self.state_dir.read_json(LOADED_NAME, 4096)
        except CorruptState:
            return None
        value = data.get("reconfigured") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    def want(self, node: RenderedNode) -> BirdState:
        return BirdState(self.path, node.bird_config, False)

    def diff(self, want: BirdState, have: BirdState, earlier: Mapping[str, tuple[Any, ...]]) -> tuple[BirdChange, ...]:
        new = want.text
        if new is None:
            return ()
        if have.text == new:
            if not have.running:
                return ()
            problem = _not_loaded(have)
            if problem is None:
                return ()
            return (BirdChange(self.path, have.text, new, True, self.socket, Action.RELOAD, problem),)
        note = "" if have.running else (f"BIRD is not running (nothing answers on {self.socket}): the file is "
                                        "written and checked; BIRD reads it when it starts")
        return (BirdChange(self.path, have.text, new, have.running, self.socket,
                           Action.CREATE if have.text is None else Action.UPDATE, note),)

    def check(self, changes: tuple[BirdChange, ...]) -> None:
        """`bird -p` on the candidate: a configuration BIRD would reject stops the run here."""
        for change in changes:
            if change.action is Action.RELOAD:
                continue
            self.state_dir.replace(CHECKED_NAME, change.new)
            try:
                problem = probe.check_config(self.state_dir.file(CHECKED_NAME))
            finally:
                self.state_dir.remove(CHECKED_NAME)
            if problem:
                raise WeftError(_rejected(self.path, problem, self.state_dir.file(CHECKED_NAME), change.new))

    def describe(self, change: BirdChange) -> list[str]:
        return format_bird_change(change).rstrip("\n").split("\n") + [""]

    def to_json(self, change: BirdChange) -> tuple[str, dict[str, Any]]:
        return self.name, change.public()

    def steps(self, changes: tuple[BirdChange, ...], phase: Phase) -> list[Step]:
        if phase is not Phase.GROW:
            return []
        return [Step(BirdWrite(CONFIG_NAME, None if c.action is Action.RELOAD else c.new, c.socket, c.old),
                     f"BIRD configuration {c.path}") for c in changes]

    def start_verify(self, have: BirdState, changes: tuple[BirdChange, ...],
                     session: ProbeSession) -> Callable[[], tuple[BirdChange, ...]]:
        def finish() -> tuple[BirdChange, ...]:
            now = probe.read_live(self.state_dir, CONFIG_NAME)
            return tuple(BirdChange(c.path, now, c.new, c.reload, c.socket, Action.UPDATE)
                         for c in changes if now != c.new)
        return finish

    def drift_items(self, change: BirdChange) -> list[DriftItem]:
        return bird_drift_items(change)

    def settle(self, have: BirdState) -> None:
        """BIRD runs weft's current file, read at its start after weft wrote it, and nothing is
        recorded yet (weft wrote the file while BIRD was down): record BIRD's reconfiguration
        time, so that any later one weft does not make is seen."""
        if have.running and have.recorded is None and have.reconfigured and _read_after_write(have):
            self.state_dir.replace(LOADED_NAME, _record(have.reconfigured))

    def load(self, write: BirdWrite, runner: Runner) -> None:
        """Apply one BirdWrite: write, check, replace, reload, record. WeftError (BIRD's message)
        when BIRD rejects the configuration; the old one then stays live (file and BIRD)."""
        live = self.state_dir.file(write.name)
        if write.text is not None:
            staged = self.state_dir.file(STAGED_NAME)
            self.state_dir.replace(STAGED_NAME, write.text)
            runner.writes.append(f"bird -p -c {staged}")
            try:
                problem = probe.check_config(staged)
            except BaseException:
                self.state_dir.remove(STAGED_NAME)
                raise
            if problem:
                self.state_dir.remove(STAGED_NAME)
                raise WeftError(_rejected(live, problem, staged, write.text))
            os.replace(staged, live)                 # a link at `live` is replaced, never followed
            sync_dir(self.state_dir.path)
        if not probe.running(write.socket):
            return
        runner.writes.append(f'birdc -s {write.socket} configure "{live}"')
        try:
            answer = probe.birdc(write.socket, "configure", f'"{live}"')
        except probe.BirdCommandError as exc:
            answer = str(exc)
        if "Reconfigur" not in answer:
            if write.old is not None and write.text is not None:
                self.state_dir.replace(write.name, write.old)     # the file again says what BIRD runs
            raise WeftError(f"BIRD refused to load {live}: {_one_line(answer)}; it keeps running its old "
                            "configuration")
        last = probe.last_reconfiguration(write.socket)
        if last is not None:
            self.state_dir.replace(LOADED_NAME, _record(last.isoformat()))


def _record(reconfigured: str) -> str:
    import json
    return json.dumps({"format": 1, "reconfigured": reconfigured}) + "\n"


def _read_after_write(have: BirdState) -> bool:
    """Has BIRD (re)read its configuration since the live file was last written?"""
    if have.reconfigured is None or have.written is None:
        return False
    return datetime.fromisoformat(have.reconfigured) >= datetime.fromtimestamp(have.written) - BIRD_TIME_JITTER


def same_instant(shown: str | datetime | None, recorded: str | datetime | None) -> bool:
    """Two of BIRD's printed times for one instant (BIRD_TIME_JITTER); an unknown time is no instant."""
    try:
        a = datetime.fromisoformat(shown) if isinstance(shown, str) else shown
        b = datetime.fromisoformat(recorded) if isinstance(recorded, str) else recorded
    except ValueError:
        return False
    return a is not None and b is not None and abs(a - b) < BIRD_TIME_JITTER


def _not_loaded(have: BirdState) -> str | None:
    """Why BIRD is not known to run the live file (None: it is)."""
    if have.recorded is not None:
        if have.reconfigured is not None and same_instant(have.reconfigured, have.recorded):
            return None
        return (f"BIRD runs a configuration weft did not load (BIRD reconfigured at {have.reconfigured}, weft "
                f"loaded {os.path.basename(have.path)} at {have.recorded}): it will be reloaded")
    if _read_after_write(have):
        return None
    return "BIRD runs an older configuration than this file: it will be reloaded"


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _rejected(path: str, problem: str, staged: str, text: str) -> str:
    return (f"BIRD rejected the new configuration for {path}: {_one_line(_locate(problem, staged, text))}; "
            "the old configuration stays live")


def _locate(problem: str, staged: str, text: str) -> str:
    """BIRD's message with its file:line:column replaced by the protocol and the object behind it."""
    match = re.match(re.escape(staged) + r":(\d+):\d+\s*(.*)", problem, re.DOTALL)
    if not match:
        return problem.replace(staged, "the new file")
    number, message = int(match.group(1)), match.group(2)
    lines = text.splitlines()[:number]
    where = f"line {number}"
    block = next((ln for ln in reversed(lines) if ln.startswith(("protocol ", "filter ", "function "))), None)
    if block:
        words = block.split()
        where += f", in {words[0]} {words[2] if words[0] == 'protocol' and len(words) > 2 else words[1]}"
        origin = lines[lines.index(block) - 1] if lines.index(block) > 0 else ""
        if origin.startswith("# BGPPeer ") or origin.startswith("# node-to-node"):
            where += f" ({origin[2:]})"
    return f"{where}: {message}"


# ---- the BIRD step on its own (tests, the BGP benchmark) ---------------------------------------

def plan_bird(state: ClusterState, node: str, state_dir: str | Path, socket: str | None,
              log: str | None = None) -> BirdChange | None:
    """The change BIRD needs, or None when the live file is exactly what the desired state renders
    and BIRD (if running) has loaded it. None too when BGP is off for the node."""
    new = desired_config(state, node, state_dir, socket, log)
    if new is None:
        return None
    resource = Bird(StateDir(state_dir), socket)
    changes = resource.diff(BirdState(resource.path, new, False), resource.probe(), {})
    return changes[0] if changes else None


def apply_bird(change: BirdChange, state_dir: str | Path, runner: Runner | None = None) -> list[str]:
    """Check and apply one BirdChange alone; the commands it ran."""
    runner = runner or Runner()
    resource = Bird(StateDir(state_dir), change.socket)
    for step in resource.steps((change,), Phase.GROW):
        assert isinstance(step.write, BirdWrite)
        resource.load(step.write, runner)
    return runner.writes


def format_bird_change(change: BirdChange) -> str:
    """A terraform-plan style block with the unified diff; BGP passwords redacted."""
    how = f"then `birdc -s {change.socket} configure`" if change.reload else "no reload"
    lines = [f"  # BIRD configuration {change.path} will be {change.action.verb} ({how})",
             f"  {'+' if change.action is Action.CREATE else '~'} bird {change.path} {{"]
    if change.note:
        lines.append(f"      # {change.note}")
    old, new = _redact(change.old or "").splitlines(), _redact(change.new).splitlines()
    diff = difflib.unified_diff(old, new, fromfile=f"{change.path} (live)" if change.old is not None else "/dev/null",
                                tofile=f"{change.path} (desired)", lineterm="", n=2)
    lines += [f"      {line}" for line in diff]
    if change.old is not None and change.old != change.new and old == new:
        lines.append("      # a line holding a secret (redacted here) differs")
    return "\n".join(lines + ["    }", ""]) + "\n"


def bird_drift_items(change: BirdChange) -> list[DriftItem]:
    """Drift items: kind "bird-config", the file as name. The unredacted texts are compared; the
    lines are named redacted."""
    if change.action is Action.CREATE:
        return [{"kind": "bird-config", "name": change.path, "problem": Problem.MISSING.value}]
    if change.action is Action.RELOAD:
        problem = Problem.NOT_LOADED.value if change.note.startswith("BIRD runs an older") else \
            "loaded by someone else"
        return [{"kind": "bird-config", "name": change.path, "problem": problem, "rule": change.note}]
    items = line_items("bird-config", change.path, _redact(change.old or "").splitlines(),
                       _redact(change.new).splitlines())
    if not items:           # the texts differ in a line that holds a secret
        items = [{"kind": "bird-config", "name": change.path, "problem": Problem.CHANGED.value,
                  "rule": "a line holding a secret (redacted here) differs"}]
    return items
