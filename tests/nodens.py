"""A bare node network namespace for reconcile tests, and ways to look at its kernel state.

A "node" here is only a network namespace with `lo` up: weft's rules and sets are per
namespace, so no veths or pods are needed to check what weft writes. Every namespace is named
`wtr-<pid of the test process>-<n>` and removed when its test ends, also when the test fails;
namespaces left behind by a test process that no longer exists (killed) are removed too.

Nothing here touches the root namespace: every command runs under `ip netns exec`.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PREFIX = "wtr"
NODE = "n1"
_counter = itertools.count()
_NS_NAME = re.compile(rf"^{PREFIX}-(\d+)-\d+$")


def usable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, ipset)"
    for tool in ("ip", "ipset", "iptables-nft-save", "iptables-legacy-save"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"needs {tool}"
    return None


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *argv: str, check: bool = True, stdin: str | None = None) -> str:
    """Run a command in `ns` and return its stdout (AssertionError on failure when `check`)."""
    return sh("ip", "netns", "exec", ns, *argv, check=check, stdin=stdin).stdout


def _remove_ns(name: str) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:                     # only processes our tests started in our namespace
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(50):
        if not sh("ip", "netns", "pids", name, check=False).stdout.split():
            break
        time.sleep(0.02)
    sh("ip", "netns", "del", name, check=False)


def _sweep_orphans() -> None:
    """Remove namespaces of ours whose test process is gone (it was killed before its finalizer)."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not Path(f"/proc/{match.group(1)}").exists():
            _remove_ns(name)


@contextmanager
def node_netns() -> Iterator[str]:
    """A fresh network namespace with lo up; deleted on exit whatever happened."""
    _sweep_orphans()
    name = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
    sh("ip", "netns", "add", name)
    try:
        in_ns(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        _remove_ns(name)
        assert not Path("/run/netns", name).exists(), f"namespace {name} was not removed"


@pytest.fixture
def node_ns() -> Iterator[str]:
    """Pytest fixture form of `node_netns` (assign it in a test module to use it)."""
    with node_netns() as name:
        yield name


# --- running weft ----------------------------------------------------------------------------

def weft_argv(ns: str, *args: str, state_dir: Path | str, from_dir: Path | str | None = None,
              node: str | None = NODE, backend: str | None = None) -> list[str]:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "weft.reconciler.cli", *args,
            "--state-dir", str(state_dir)]
    if from_dir is not None:
        argv += ["--from", str(from_dir)]
    if node is not None:
        argv += ["--node", node]
    if backend is not None:
        argv += ["--iptables-backend", backend]
    return argv


def run_weft(ns: str, *args: str, state_dir: Path | str, from_dir: Path | str | None = None,
             node: str | None = NODE, backend: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`weft ARGS` in namespace `ns`, from this checkout; returns the finished process."""
    argv = weft_argv(ns, *args, state_dir=state_dir, from_dir=from_dir, node=node, backend=backend)
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def start_weft(ns: str, *args: str, state_dir: Path | str, from_dir: Path | str | None = None,
               node: str | None = NODE, backend: str | None = None) -> subprocess.Popen:
    """`weft ARGS` started in the background, in a session of its own (so that it and any tool it
    runs can be killed together by process group)."""
    argv = weft_argv(ns, *args, state_dir=state_dir, from_dir=from_dir, node=node, backend=backend)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@dataclass
class WeftNode:
    """One node namespace, its state dir and backend: `weft` and kernel tools run inside it."""
    ns: str
    state_dir: Path
    backend: str | None = None          # --iptables-backend; None: weft's own choice (auto)
    node: str = NODE

    @property
    def iptables(self) -> str:
        return f"iptables-{self.backend or 'nft'}"

    def weft(self, *args: str, from_dir: Path | str | None = None, expect: int | None = 0,
             node: str | None = None) -> subprocess.CompletedProcess:
        """Run weft; assert its exit code is `expect` (unless None)."""
        proc = run_weft(self.ns, *args, state_dir=self.state_dir, from_dir=from_dir,
                        node=node or self.node, backend=self.backend)
        if expect is not None:
            assert proc.returncode == expect, f"weft {' '.join(args)}: " + describe(proc)
        return proc

    def weft_json(self, *args: str, **kwargs) -> dict:
        proc = self.weft(*args, "--output", "json", **kwargs)
        return json.loads(proc.stdout)

    def sh(self, *argv: str, check: bool = True, stdin: str | None = None) -> str:
        return in_ns(self.ns, *argv, check=check, stdin=stdin)

    def state(self, portable: bool = False) -> dict:
        return kernel_state(self.ns, portable)

    def save(self) -> str:
        return iptables_save(self.ns, self.backend or "nft")


# --- kernel state ----------------------------------------------------------------------------

_BUILTIN = ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING")
_COUNTERS = re.compile(r" \[\d+:\d+\]$")


def _is_weft_line(line: str) -> bool:
    if line.startswith(":"):
        return line[1:].startswith("weft-")
    if line.startswith("-A "):
        chain = line.split(" ", 2)[1]
        if chain.startswith("weft-"):
            return True
        if chain in _BUILTIN:
            return '--comment "weft:' in line or " -j weft-" in line or " -g weft-" in line
    return False


def split_iptables_save(text: str) -> dict[str, str]:
    """iptables-save text -> {"weft": weft's lines, "foreign": everything else}, counters and
    the Generated/Completed/Warning comment lines removed; each line keeps its table header."""
    weft, foreign = [], []
    table = ""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:]
            foreign.append(line)
            continue
        line = _COUNTERS.sub("", line)
        (weft if _is_weft_line(line) else foreign).append(f"{table}: {line}" if line != "COMMIT" else line)
    return {"weft": "\n".join(weft), "foreign": "\n".join(foreign)}


def iptables_save(ns: str, backend: str, family: int = 4) -> str:
    """The raw `iptables-<backend>-save` (ip6tables' for `family` 6) of `ns`; "" when the backend
    has no table there (legacy is only read when the namespace already has legacy tables, so
    reading never creates any)."""
    tool = "ip6tables" if family == 6 else "iptables"
    if backend == "legacy":
        names = in_ns(ns, "cat", f"/proc/net/{'ip6' if family == 6 else 'ip'}_tables_names", check=False).split()
        if not names:
            return ""
    return in_ns(ns, f"{tool}-{backend}-save")


def normalise_ipset_save(text: str, portable: bool = False) -> dict[str, str]:
    """`ipset save` -> {"weft": ..., "foreign": ...}, members sorted within each set (the order
    is the hash's, not state). `portable` drops hashsize and initval (random per created set),
    for comparing two namespaces."""
    headers: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        if parts[0] == "create":
            header = line
            if portable:
                header = re.sub(r" (hashsize|initval) \S+", "", header)
            headers[parts[1]] = header
            members.setdefault(parts[1], [])
        elif parts[0] == "add":
            members.setdefault(parts[1], []).append(line)
    out: dict[str, list[str]] = {"weft": [], "foreign": []}
    for name in sorted(headers):
        out["weft" if name.startswith("weft-") else "foreign"] += [headers[name], *sorted(members[name])]
    return {k: "\n".join(v) for k, v in out.items()}


def kernel_state(ns: str, portable: bool = False) -> dict:
    """Everything weft could have written in `ns`, weft's part and the foreign part separately:
    {"nft": {"weft", "foreign"}, "legacy": {...}, "nft6": ..., "legacy6": ..., "ipset": {...}}
    (nft6, legacy6: ip6tables)."""
    return {
        "nft": split_iptables_save(iptables_save(ns, "nft")),
        "legacy": split_iptables_save(iptables_save(ns, "legacy")),
        "nft6": split_iptables_save(iptables_save(ns, "nft", 6)),
        "legacy6": split_iptables_save(iptables_save(ns, "legacy", 6)),
        "ipset": normalise_ipset_save(in_ns(ns, "ipset", "save"), portable),
    }


def weft_part(state: dict) -> dict:
    return {k: v["weft"] for k, v in state.items()}


def weft_names(ns: str) -> list[str]:
    """Every line of iptables-save and ip6tables-save (both backends) and `ipset list -n` that
    mentions weft."""
    text = "".join(iptables_save(ns, backend, family) for backend in ("nft", "legacy") for family in (4, 6))
    text += in_ns(ns, "ipset", "list", "-n")
    return [line for line in text.splitlines() if "weft" in line]


def chain_rules(ns: str, chain: str, backend: str = "nft") -> list[str]:
    return [ln for ln in iptables_save(ns, backend).splitlines() if ln.startswith(f"-A {chain} ")]


# --- desired state as manifests ------------------------------------------------------------

def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(ns: str, name: str, ip: str, labels: dict | None = None, node: str = NODE,
        ports: tuple[tuple[str, int, str], ...] = (), ip6: str | None = None) -> dict:
    """A running pod; `ports` are (name, number, protocol) of its one container; `ip6`: its IPv6
    address too (dual-stack)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": dict(labels or {})},
        "spec": {"nodeName": node, "containers": [{
            "name": "c", "image": "registry.k8s.io/pause:3.9",
            "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}, *([{"ip": ip6}] if ip6 else [])]},
    }


def policy(ns: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def write_manifests(directory: Path, objects: list[dict]) -> Path:
    """Write `objects` as one multi-document YAML file in `directory` (created, replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):
        old.unlink()
    (directory / "state.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return directory
