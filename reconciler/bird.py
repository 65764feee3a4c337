"""BIRD's configuration as part of a reconcile run: plan, apply, drift.

The live file is `<state dir>/bird.conf`; BIRD is expected to run with `-c` that file and its
control socket at `<state dir>/bird.ctl` unless told otherwise. A change is written to a temporary
file next to it, checked with `bird -p -c`, and only then renamed over the live file, so a config
BIRD rejects never becomes live: the run fails with BIRD's message, and BIRD keeps running the
old configuration with its sessions. A valid change is loaded with `birdc configure`, which keeps
every session whose protocol block did not change.

BIRD not running (no answer on the control socket) is not an error: the file is written and
checked, the reload is skipped, and the plan says so; BIRD reads the file when it starts.
A node with no BGP address (no projectcalico.org/IPv4Address or IPv6Address annotation) has BGP
off: weft then neither writes nor removes a BIRD configuration.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from weft.model.errors import WeftError
from weft.probes import bird as probe

if TYPE_CHECKING:
    from weft.model.cluster import ClusterState

CONFIG_NAME = "bird.conf"
SOCKET_NAME = "bird.ctl"
CREATE, UPDATE, RELOAD = "create", "update", "reload"


@dataclass(frozen=True)
class BirdChange:
    """What apply_bird will do to BIRD on this node; JSON-ready through dataclasses.asdict."""
    path: str
    old: str | None          # the live file (None: there is none)
    new: str
    reload: bool             # `birdc configure` will run (BIRD answers on the socket)
    socket: str
    action: str              # create | update | reload (the file is current, BIRD runs an older one)
    note: str = ""           # for the plan: e.g. why there is no reload

    def public(self) -> dict:
        """asdict() with BGP passwords redacted: for JSON output and saved plans, which must not
        carry secrets (apply then renders the config again rather than trusting the document)."""
        data = asdict(self)
        data["old"] = _redact(self.old) if self.old is not None else None
        data["new"] = _redact(self.new)
        return data


def _redact(config: str) -> str:
    from weft.renderers.bird import redact  # the renderer (jinja2, the BGP model): only where BGP is on
    return redact(config)


def config_path(state_dir: Path) -> Path:
    return Path(state_dir) / CONFIG_NAME


def default_socket(state_dir: Path) -> str:
    return str(Path(state_dir) / SOCKET_NAME)


def desired_config(state: ClusterState, node: str, state_dir: Path, socket: str | None) -> str | None:
    """BIRD's configuration for `node`, or None when BGP is off for it (no BGP address)."""
    me = state.nodes.get(node)
    if me is None or me.bgp is None or not (me.bgp.ipv4_address or me.bgp.ipv6_address):
        return None
    from weft.renderers.bird import render_bird_config
    return render_bird_config(state, node, socket_path=socket or default_socket(state_dir))


def plan_bird(state: ClusterState, node: str, state_dir: Path, socket: str | None) -> BirdChange | None:
    """The change BIRD needs, or None when the live file is exactly what the desired state renders
    and BIRD (if running) has loaded it. None too when BGP is off for the node."""
    return plan_config(desired_config(state, node, state_dir, socket), state_dir, socket)


def plan_config(new: str | None, state_dir: Path, socket: str | None) -> BirdChange | None:
    """plan_bird for an already rendered configuration (None: BGP is off, BIRD is left alone)."""
    if new is None:
        return None
    socket = socket or default_socket(state_dir)
    path = config_path(state_dir)
    old = probe.read_live(path)
    up = probe.running(socket)
    if old == new:
        if not up or _loaded(socket, path):
            return None
        return BirdChange(str(path), old, new, True, socket, RELOAD,
                          "BIRD runs an older configuration than this file: it will be reloaded")
    note = "" if up else (f"BIRD is not running (nothing answers on {socket}): the file is written and "
                          "checked; BIRD reads it when it starts")
    return BirdChange(str(path), old, new, up, socket, CREATE if old is None else UPDATE, note)


def _loaded(socket: str, path: Path) -> bool:
    """Has BIRD read the file since it was last written? (its last reconfiguration is not older)."""
    try:
        last = probe.last_reconfiguration(socket)
    except probe.BirdCommandError:
        return True                     # BIRD went away meanwhile: nothing to reload
    if last is None:
        return False
    written = datetime.fromtimestamp(path.stat().st_mtime)
    return last >= written.replace(microsecond=written.microsecond // 1000 * 1000)   # BIRD shows ms


def check_bird(change: BirdChange) -> None:
    """Raise WeftError (BIRD's message) if BIRD would reject the new configuration: called before
    anything else of a run is applied, so a rejected config changes nothing at all."""
    if change.action == RELOAD:
        return
    path = Path(change.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.check")
    _write(staged, change.new)
    try:
        problem = probe.check_config(staged)
    finally:
        staged.unlink(missing_ok=True)
    if problem:
        raise WeftError(f"BIRD rejected the new configuration for {path}: "
                        f"{_locate(problem, str(staged), change.new)}\nThe old configuration stays live.")


def apply_bird(change: BirdChange, socket: str | None) -> list[str]:
    """Write, check, replace, reload; the commands it ran. Raises WeftError with BIRD's message
    when BIRD rejects the configuration; the old one then stays live (file and BIRD)."""
    path = Path(change.path)
    socket = socket or change.socket
    commands: list[str] = []
    if change.action != RELOAD:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.new")
        _write(staged, change.new)
        commands.append(f"bird -p -c {staged}")
        problem = probe.check_config(staged)
        if problem:
            staged.unlink(missing_ok=True)
            raise WeftError(f"BIRD rejected the new configuration for {path}: "
                            f"{_locate(problem, str(staged), change.new)}\nThe old configuration stays live.")
        os.replace(staged, path)
        _sync_dir(path.parent)
    if not probe.running(socket):
        return commands
    commands.append(f'birdc -s {socket} configure "{path}"')
    try:
        answer = probe.birdc(socket, "configure", f'"{path}"')
    except probe.BirdCommandError as exc:
        answer = str(exc)
    if "Reconfigur" not in answer:
        if change.old is not None and change.action != RELOAD:
            _write(path, change.old)     # the file again says what BIRD runs
        raise WeftError(f"BIRD refused to load {path}: {answer.strip()}\nIt keeps running its old configuration.")
    return commands


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


def _write(path: Path, text: str) -> None:
    """Write text durably, readable by root only (it may hold BGP passwords)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def format_bird_change(change: BirdChange) -> str:
    """A terraform-plan style block with the unified diff; BGP passwords redacted."""
    verb = {CREATE: "created", UPDATE: "updated in-place", RELOAD: "reloaded"}[change.action]
    symbol = {CREATE: "+", UPDATE: "~", RELOAD: "~"}[change.action]
    how = f"then `birdc -s {change.socket} configure`" if change.reload else "no reload"
    lines = [f"  # BIRD configuration {change.path} will be {verb} ({how})", f"  {symbol} bird {change.path} {{"]
    if change.note:
        lines.append(f"      # {change.note}")
    diff = difflib.unified_diff(_redact(change.old or "").splitlines(), _redact(change.new).splitlines(),
                                fromfile=f"{change.path} (live)" if change.old is not None else "/dev/null",
                                tofile=f"{change.path} (desired)", lineterm="", n=2)
    lines += [f"      {line}" for line in diff]
    return "\n".join(lines + ["    }", ""]) + "\n"


def bird_drift_items(change: BirdChange) -> list[dict]:
    """Drift items in reconciler.drift's shape: kind "bird-config", the file as name."""
    if change.action == CREATE:
        return [{"kind": "bird-config", "name": change.path, "problem": "missing"}]
    if change.action == RELOAD:
        return [{"kind": "bird-config", "name": change.path, "problem": "not loaded by BIRD"}]
    items = []
    have, want = _redact(change.old or "").splitlines(), _redact(change.new).splitlines()
    matcher = difflib.SequenceMatcher(a=have, b=want, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op != "equal":
            items += [{"kind": "bird-config", "name": change.path, "rule": r, "problem": "missing"}
                      for r in want[b0:b1]]
            items += [{"kind": "bird-config", "name": change.path, "rule": r, "problem": "unexpected"}
                      for r in have[a0:a1]]
    return items


def main(argv: list[str] | None = None) -> int:
    """`python -m reconciler.bird`: plan (and with --apply, apply) BIRD's configuration alone,
    until `weft apply` does it as part of a run. Exit 0 no change / applied, 2 changes planned
    (without --apply), 1 error."""
    from filelock import FileLock

    from weft.desired import sources
    from weft.store.statedir import default_state_dir
    parser = argparse.ArgumentParser(prog="python -m reconciler.bird", description=main.__doc__.split("\n")[0])
    parser.add_argument("--from", dest="from_dir", metavar="DIR")
    parser.add_argument("--kubeconfig")
    parser.add_argument("--node", required=True)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--socket", default=None, help="BIRD's control socket (default: <state dir>/bird.ctl)")
    parser.add_argument("--apply", action="store_true")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    state_dir = args.state_dir or Path(default_state_dir())
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(state_dir / "weft.lock"), timeout=300):     # the node lock `weft apply` holds
            state = sources.read(state_dir, args.from_dir, args.kubeconfig).state()
            change = plan_bird(state, args.node, state_dir, args.socket)
            commands = apply_bird(change, args.socket) if change and args.apply else []
    except WeftError as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps({"change": change.public() if change else None, "commands": commands}, indent=1))
    else:
        sys.stdout.write(format_bird_change(change) if change else "No changes. BIRD's configuration is current.\n")
    return 2 if change and not args.apply else 0


if __name__ == "__main__":
    sys.exit(main())
