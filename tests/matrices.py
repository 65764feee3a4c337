"""Expected connectivity matrices for the lab cluster, written by hand from the Kubernetes
NetworkPolicy semantics.

A matrix maps (source pod key, destination pod key, protocol, port) to True (a connection was
established: TCP handshake completed, or a UDP reply came back) or False. Expectations are
written as the semantics are stated in the Kubernetes documentation:

- a pod that no policy selects for Ingress admits everything; once any policy selects it for
  Ingress it is *isolated* for ingress and admits only what some rule of those policies admits
  (the union). Egress likewise;
- a connection works iff the source's egress allows it AND the destination's ingress allows it;
  replies to an allowed connection always pass;
- a pod talking to its own address never leaves its network namespace: always connected.

So an expectation reads::

    Expect().isolate_ingress("x/a").allow_ingress(dst="x/a", src="x/b")

"x/a is isolated for ingress and admits x/b on every port". Nothing here reads weft's code.

`reference_matrix` is a second, independent derivation (a tiny policy evaluator that reads the
scenario YAML). The tests use it only to cross-check the hand-written tables against each other,
never as the expectation itself.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest
import yaml

# --- The base cluster (playbooks/example/cluster.yaml), as its contract states it. -------------

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
POD_KEYS = tuple(f"{ns}/{pod}" for ns in NAMESPACES for pod in POD_NAMES)
POD_IPS = {
    f"{ns}/{pod}": f"198.18.1.{10 * (i + 1) + j + 1}"
    for i, ns in enumerate(NAMESPACES)
    for j, pod in enumerate(POD_NAMES)
}
# Every pod is dual-stack: its IPv6 address ends in the same digits (x/a: 198.18.1.11, 2001:db8:1::11).
POD_IPS6 = {key: "2001:db8:1::" + ip.rsplit(".", 1)[1] for key, ip in POD_IPS.items()}
FAMILIES = (4, 6)
POD_LABELS = {key: {"pod": key.split("/")[1]} for key in POD_KEYS}
NAMESPACE_LABELS = {ns: {"ns": ns, "kubernetes.io/metadata.name": ns} for ns in NAMESPACES}
# Every pod: (name, protocol, port) of its container ports.
CONTAINER_PORTS = (
    ("serve-80-tcp", "tcp", 80),
    ("serve-80-udp", "udp", 80),
    ("serve-81-tcp", "tcp", 81),
    ("serve-81-udp", "udp", 81),
)
PROBES = (("tcp", 80), ("tcp", 81), ("udp", 80), ("udp", 81))

Cell = tuple[str, str, str, int]
Matrix = Mapping[Cell, bool]


# --- Readable pod and port patterns. ------------------------------------------------------------

def pods(pattern: str | Iterable[str]) -> tuple[str, ...]:
    """Pod keys matching "ns/pod", "ns/*", "*/pod" or "*" (or a list of those), in lab order."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    chosen: set[str] = set()
    for p in patterns:
        if p == "*":
            p = "*/*"
        ns, _, name = p.partition("/")
        if not name or (ns != "*" and ns not in NAMESPACES) or (name != "*" and name not in POD_NAMES):
            raise ValueError(f"not a lab pod pattern: {p!r}")
        chosen.update(k for k in POD_KEYS
                      if ns in ("*", k.split("/")[0]) and name in ("*", k.split("/")[1]))
    return tuple(k for k in POD_KEYS if k in chosen)


def probes(spec: str | Iterable[str] = "*") -> tuple[tuple[str, int], ...]:
    """Probes matching "tcp/80", "udp/*", "*/81" or "*" (or a list of those), in probe order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    chosen: set[tuple[str, int]] = set()
    for s in specs:
        if s == "*":
            s = "*/*"
        proto, _, port = s.partition("/")
        if proto not in ("*", "tcp", "udp") or not port or (port != "*" and not port.isdigit()):
            raise ValueError(f"not a probe pattern: {s!r}")
        chosen.update((pr, po) for pr, po in PROBES
                      if proto in ("*", pr) and port in ("*", str(po)))
    if not chosen:
        raise ValueError(f"{spec!r} matches no probe")
    return tuple(p for p in PROBES if p in chosen)


# --- Hand-written expectations. ---------------------------------------------------------------

class Expect:
    """A connectivity truth table, built from isolation and allow statements.

    Start: nothing isolated, everything connected. `isolate_*` marks pods some policy selects for
    that direction; `allow_*` adds what the rules of those policies admit. Allowing for a pod that
    is not isolated is refused: it would mean nothing, so it is a mistake in the test.
    """

    def __init__(self) -> None:
        self._isolated = {"ingress": set(), "egress": set()}
        self._allowed = {"ingress": set(), "egress": set()}

    def isolate_ingress(self, of: str | Iterable[str]) -> Expect:
        self._isolated["ingress"].update(pods(of))
        return self

    def isolate_egress(self, of: str | Iterable[str]) -> Expect:
        self._isolated["egress"].update(pods(of))
        return self

    def allow_ingress(self, *, dst, src="*", ports="*") -> Expect:
        """Destination pods `dst` admit sources `src` on `ports`."""
        return self._allow("ingress", pods(src), pods(dst), probes(ports), pods(dst))

    def allow_egress(self, *, src, dst="*", ports="*") -> Expect:
        """Source pods `src` may reach destinations `dst` on `ports`."""
        return self._allow("egress", pods(src), pods(dst), probes(ports), pods(src))

    def _allow(self, direction, srcs, dsts, ports, subjects) -> Expect:
        loose = [p for p in subjects if p not in self._isolated[direction]]
        if loose:
            raise ValueError(f"allow_{direction} for {loose}, which are not isolated for {direction}")
        self._allowed[direction].update((s, d, pr, po) for s in srcs for d in dsts for pr, po in ports)
        return self

    def connected(self, src: str, dst: str, proto: str, port: int) -> bool:
        if src == dst:
            return True
        cell = (src, dst, proto, port)
        egress_ok = src not in self._isolated["egress"] or cell in self._allowed["egress"]
        ingress_ok = dst not in self._isolated["ingress"] or cell in self._allowed["ingress"]
        return egress_ok and ingress_ok

    def matrix(self) -> dict[Cell, bool]:
        return {(s, d, pr, po): self.connected(s, d, pr, po)
                for s in POD_KEYS for d in POD_KEYS for pr, po in PROBES}


def all_open() -> dict[Cell, bool]:
    return Expect().matrix()


# --- Comparing and printing. --------------------------------------------------------------------

def diff(expected: Matrix, observed: Matrix) -> list[str]:
    """One line per cell that differs (or is missing on one side), in lab order."""
    lines = []
    for cell in sorted(set(expected) | set(observed), key=_cell_order):
        e, o = expected.get(cell), observed.get(cell)
        if e != o:
            src, dst, proto, port = cell
            lines.append(f"{src} -> {dst} {proto}/{port}: expected {_word(e)}, observed {_word(o)}")
    return lines


def format_table(matrix: Matrix) -> str:
    """A compact table: rows are sources, columns destinations; each cell shows the probes
    tcp/80 tcp/81 udp/80 udp/81 in that order, "T"/"U" connected, "." blocked, "?" not probed."""
    keys = [k for k in POD_KEYS if any(c[0] == k or c[1] == k for c in matrix)] or list(POD_KEYS)
    lines = ["src\\dst " + " ".join(f"{k:>5}" for k in keys)]
    for s in keys:
        cells = []
        for d in keys:
            chars = ""
            for proto, port in PROBES:
                v = matrix.get((s, d, proto, port))
                chars += "?" if v is None else (proto[0].upper() if v else ".")
            cells.append(f"{chars:>5}")
        lines.append(f"{s:>7} " + " ".join(cells))
    return "\n".join(lines)


def _word(v):
    return {True: "connected", False: "blocked", None: "missing"}[v]


def _cell_order(cell):
    src, dst, proto, port = cell
    return (_index(POD_KEYS, src), _index(POD_KEYS, dst), _index(PROBES, (proto, port)), cell)


def _index(seq, item):
    return seq.index(item) if item in seq else len(seq)


# --- An independent reference evaluator (cross-check only). -------------------------------------

def reference_matrix(policies: Iterable[Mapping], relabel: Mapping[str, Mapping] = {},
                     family: int = 4) -> dict[Cell, bool]:
    """The matrix the Kubernetes semantics give for `policies` (NetworkPolicy dicts) on the lab
    cluster (with `relabel`, see `write_source`), over the pods' addresses of `family`. Written
    apart from the hand tables so the two can catch each other's mistakes."""
    policies = [p for p in policies if p]
    pod_labels, ns_labels = labels_after(relabel)
    selected = {"ingress": set(), "egress": set()}
    allowed = {"ingress": set(), "egress": set()}
    for pol in policies:
        ns = pol["metadata"]["namespace"]
        spec = pol.get("spec") or {}
        types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))
        subjects = [k for k in POD_KEYS
                    if k.split("/")[0] == ns and _selects(spec.get("podSelector") or {}, pod_labels[k])]
        for ptype, direction, section, peer_key in (("Ingress", "ingress", "ingress", "from"),
                                                    ("Egress", "egress", "egress", "to")):
            if ptype not in types:
                continue
            selected[direction].update(subjects)
            for rule in spec.get(section) or []:
                peers = rule.get(peer_key)
                others = POD_KEYS if not peers else [
                    k for k in POD_KEYS if any(_peer_matches(peer, ns, k, pod_labels, ns_labels, family)
                                              for peer in peers)]
                for subject in subjects:
                    for other in others:
                        src, dst = (other, subject) if direction == "ingress" else (subject, other)
                        for proto, port in PROBES:
                            if _ports_match(rule.get("ports"), proto, port):
                                allowed[direction].add((src, dst, proto, port))
    out = {}
    for s in POD_KEYS:
        for d in POD_KEYS:
            for proto, port in PROBES:
                cell = (s, d, proto, port)
                out[cell] = s == d or (
                    (s not in selected["egress"] or cell in allowed["egress"])
                    and (d not in selected["ingress"] or cell in allowed["ingress"]))
    return out


def _selects(selector: Mapping, labels: Mapping) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        has, value = key in labels, labels.get(key)
        if op == "In":
            ok = has and value in values
        elif op == "NotIn":
            ok = not has or value not in values
        elif op == "Exists":
            ok = has
        elif op == "DoesNotExist":
            ok = not has
        else:
            raise ValueError(f"operator {op!r}")
        if not ok:
            return False
    return True


def labels_after(relabel: Mapping[str, Mapping]) -> tuple[dict, dict]:
    """Pod and namespace labels of the lab cluster once `relabel` is applied."""
    pod_labels, ns_labels = dict(POD_LABELS), dict(NAMESPACE_LABELS)
    for target, labels in relabel.items():
        kind, _, name = target.partition(" ")
        if kind == "pod":
            pod_labels[name] = dict(labels)
        elif kind == "namespace":
            ns_labels[name] = {**labels, "kubernetes.io/metadata.name": name}
        else:
            raise ValueError(f"relabel target {target!r}: 'pod ns/name' or 'namespace name'")
    return pod_labels, ns_labels


def _peer_matches(peer: Mapping, policy_ns: str, pod: str, pod_labels, ns_labels, family: int = 4) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address((POD_IPS6 if family == 6 else POD_IPS)[pod])
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or [])
    pod_ns = pod.split("/")[0]
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"] or {}, ns_labels[pod_ns]):
            return False
    elif pod_ns != policy_ns:
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"] or {}, pod_labels[pod])


def _ports_match(ports, proto: str, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        want_proto = (p.get("protocol") or "TCP").lower()
        if want_proto != proto:
            continue
        value = p.get("port")
        if value is None:
            return True
        if isinstance(value, str):
            if any(n == value and pr == proto and po == port for n, pr, po in CONTAINER_PORTS):
                return True
        elif value <= port <= p.get("endPort", value):
            return True
    return False


# --- Running weft in a lab node and reading the node's kernel state (shared by the lab tests). ---

REPO = Path(__file__).resolve().parents[1]
BASE_CLUSTER = REPO / "playbooks" / "example" / "cluster.yaml"
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
NODE = "lab-node"


def require_lab() -> None:
    """Skip unless this process can build a lab node (root: namespaces, iptables)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces and programs iptables")


def write_source(directory: Path, *policy_files: Path, texts: Mapping[str, str] = {},
                 relabel: Mapping[str, Mapping] = {}) -> Path:
    """A --from directory: the base cluster, the given policy files, and extra files by text.

    `relabel` replaces the labels of cluster objects: {"pod x/c": {"pod": "b"}, "namespace y":
    {"ns": "x"}} (a namespace keeps its automatic kubernetes.io/metadata.name label).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if relabel:
        docs = [d for d in yaml.safe_load_all(BASE_CLUSTER.read_text()) if d]
        left = dict(relabel)
        for doc in docs:
            meta = doc["metadata"]
            target = (f"pod {meta.get('namespace')}/{meta['name']}" if doc["kind"] == "Pod"
                      else f"namespace {meta['name']}" if doc["kind"] == "Namespace" else None)
            if target in left:
                meta["labels"] = dict(left.pop(target))
        if left:
            raise ValueError(f"relabel: no such objects {sorted(left)}")
        (directory / "cluster.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    else:
        shutil.copy(BASE_CLUSTER, directory / "cluster.yaml")
    for i, path in enumerate(policy_files):
        shutil.copy(path, directory / f"policies-{i}-{path.name}")
    for name, text in texts.items():
        (directory / name).write_text(text)
    return directory


def weft(lab, argv: Sequence[str], source: Path, state: Path, timeout: float = 120):
    """Run `weft <argv...>` inside the lab's node namespace, as the node's reconcile job would."""
    command = list(argv[:1])
    rest = list(argv[1:])
    return lab.node_run([sys.executable, "-m", "weft.reconciler.cli", *command, "--from", str(source),
                         "--node", NODE, "--state-dir", str(state), *rest], timeout=timeout)


def describe(done) -> str:
    return (f"`{' '.join(map(str, done.args))}` exited {done.returncode}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")


def kernel_state(lab) -> dict[str, str]:
    """Both iptables backends of both families and the ipsets of the node, normalised (comments
    and counters)."""
    out = {}
    for tool in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
        done = lab.node_run([tool], check=True)
        out[tool] = normalise_iptables(done.stdout)
    out["ipset save"] = normalise_ipset(lab.node_run(["ipset", "save"], check=True).stdout)
    return out


def normalise_iptables(text: str) -> str:
    """Drop the dated header/footer comments and zero the packet counters."""
    lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
             if not line.startswith("#")]
    return "\n".join(lines) + ("\n" if lines else "")


def normalise_ipset(text: str) -> str:
    lines = [re.sub(r" packets \d+ bytes \d+", "", line) for line in text.splitlines()]
    return "\n".join(line for line in lines if line) + ("\n" if lines else "")


_WEFT_IPTABLES = re.compile(r"^:weft-|^-A weft-|\s-[jg] weft-|--match-set weft-")
_WEFT_IPSET = re.compile(r"^(create|add) weft-")


def without_weft(state: Mapping[str, str]) -> dict[str, str]:
    """The state minus what weft owns: its chains, the rules in them, rules jumping to them or
    matching its sets, its ipsets; then minus tables left with nothing but empty built-in chains
    (a backend creates a table on first use; an empty table is not state anyone owns)."""
    out = {}
    for name, text in state.items():
        pattern = _WEFT_IPSET if name.startswith("ipset") else _WEFT_IPTABLES
        kept = [line for line in text.splitlines() if not pattern.search(line)]
        if not name.startswith("ipset"):
            kept = _drop_empty_tables(kept)
        out[name] = "\n".join(kept) + ("\n" if kept else "")
    return out


def _drop_empty_tables(lines: list[str]) -> list[str]:
    out, table = [], []
    for line in lines:
        table.append(line)
        if line == "COMMIT":
            body = table[1:-1]
            empty = all(re.fullmatch(r":[A-Z]+ ACCEPT \[0:0\]", x) for x in body)
            if not empty:
                out.extend(table)
            table = []
    return out + table


def weft_leftovers(state: Mapping[str, str]) -> list[str]:
    """Lines of the state that weft owns (should be none after `apply --destroy`)."""
    left = []
    for name, text in state.items():
        pattern = _WEFT_IPSET if name.startswith("ipset") else _WEFT_IPTABLES
        left += [f"{name}: {line}" for line in text.splitlines()
                 if pattern.search(line) or (not name.startswith("ipset") and "weft-" in line)]
    return left


def state_diff(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    """A unified diff per source, empty when identical."""
    parts = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name, ""), after.get(name, "")
        if a != b:
            parts.append("".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                                      f"{name} before", f"{name} after")))
    return "\n".join(parts)


def is_no_op(report: Mapping) -> bool:
    """An `apply --output json` report of a run that changed nothing."""
    summary = report.get("summary") or {}
    return report.get("commands") == [] and all(summary.get(k) == 0 for k in ("add", "change", "destroy"))
