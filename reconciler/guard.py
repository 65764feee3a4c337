"""The write guard: every kernel write of an apply is checked against what weft owns, before any
of them runs, whatever produced it.

weft renders everything it writes, but a write's text passes through many hands (a renderer, a
cache, a diff); this is the last look, at the one place writes are executed (reconciler.apply).
What weft may write:

  iptables-restore  and ip6tables-restore (the IPv6 family's: the same rules) only with
                    --noflush; only `weft-*` chains (filter, and for the next waves
                    nat/raw/mangle) declared, filled, flushed and deleted; their rules jump only to
                    `weft-*` chains or standard targets and match only `weft-*` sets; built-in
                    chains only through the documented hook rules: FORWARD -> weft-FORWARD,
                    INPUT -> weft-INPUT and OUTPUT -> weft-OUTPUT, nat POSTROUTING ->
                    weft-nat-outgoing, mangle PREROUTING -> weft-PREROUTING, raw PREROUTING
                    -> weft-PREROUTING and raw OUTPUT -> weft-OUTPUT, inserted at the top;
                    weft's own rules deleted. No policy, no rename, no other built-ins.
                    NOTRACK only in the raw table.
                    MASQUERADE and SNAT only in natOutgoing's rules (nat weft-nat-outgoing: from
                    weft-masq-pools, not to weft-all-pools; weft-masq6-/all6-pools in ip6tables';
                    TCP/UDP to a port range, SNAT to one IPv4 address).
  ipset restore     only `weft-*` sets created (known types, inet/inet6, sizes within bounds),
                    filled, emptied, swapped with another weft set of the same type and family
                    (a resize), and destroyed; every member valid for its set's type and family.
  routes            only weft's route protocol (201): host routes (/32, /128) through `weft*`
                    interfaces, or block-sized blackholes.
  sysctls           only an allowlist of settings (forwarding, rp_filter, accept_ra, proxy_arp,
                    proxy_ndp) on `weft*` interfaces, values 0-2: never a path built from other text.
  BIRD              only its configuration file in the state dir.
  eBPF              only under the node's pin directory (/sys/fs/bpf/weft/<node key>): programs
                    compiled into its progs-<build> directory, keys of its reconciled maps
                    (maps-<layout>/endpoints|classifiers|verdicts|ports|services|backends) of the
                    model's types, tc
                    filters on `weft*` interfaces, pins removed only there.

A refused write is a WeftError naming what was refused; nothing of that apply runs.
"""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from weft.model import bpf as bpfmodel
from weft.model.errors import WeftError
from weft.model.names import HOST_IFACE_PREFIX, ROUTE_PROTOCOL
from weft.reconciler.resource import BirdWrite, BpfWrite, Restore, RouteWrite, Step, SysctlWrite, Write

PREFIX = "weft-"
WEFT_TABLES = ("filter", "nat", "raw", "mangle")
HOOKS = {("filter", "FORWARD"): "weft-FORWARD", ("filter", "INPUT"): "weft-INPUT",
         ("filter", "OUTPUT"): "weft-OUTPUT",      # OUTPUT: only on a node with Calico host endpoints
         ("nat", "POSTROUTING"): "weft-nat-outgoing",          # only while some pool has natOutgoing
         ("mangle", "PREROUTING"): "weft-PREROUTING",          # only while preDNAT policies apply here
         ("raw", "PREROUTING"): "weft-PREROUTING", ("raw", "OUTPUT"): "weft-OUTPUT"}    # doNotTrack's
_NOTRACK = " -j NOTRACK"
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "REJECT", "MARK", "LOG", "NFLOG", "CONNMARK"})
IPTABLES_RESTORE = re.compile(r"^ip6?tables-(nft|legacy)-restore$")
SET_TYPES = frozenset({"hash:ip", "hash:net", "hash:ip,port", "hash:net,port"})
SYSCTLS = frozenset({"forwarding", "rp_filter", "accept_ra", "proxy_arp", "proxy_ndp"})
BIRD_CONFIG = "bird.conf"

_CHAIN = re.compile(r"^weft-[A-Za-z0-9_.:-]{1,23}$")                 # iptables allows 28 characters
_SET = re.compile(r"^weft-[A-Za-z0-9_.:-]{1,26}$")                   # ipset allows 31
_IFACE = re.compile(rf"^{HOST_IFACE_PREFIX}[0-9a-z]{{1,11}}$")       # a kernel name: 15 at most
_SYSCTL = re.compile(r"^net/ipv([46])/conf/([^/]+)/([^/]+)$")
_HOOK_RULE = re.compile(r'^-I (\S+) (\d{1,3}) -m comment --comment "weft:[A-Za-z0-9_-]{1,32}" -j (\S+)$')
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_V4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
# The only rules with a target other than STANDARD_TARGETS: natOutgoing's (renderers.natoutgoing).
_PORTS = r"[1-9]\d{0,4}-[1-9]\d{0,4}"
_MASQUERADE_RULE = re.compile(r"^-A weft-nat-outgoing (?:-p (?:tcp|udp) )?"
                              r'-m comment --comment "weft:[A-Za-z0-9_-]{1,32}" '
                              r"-m set --match-set weft-masq(6?)-pools src -m set ! --match-set weft-all\1-pools dst "
                              rf"-j (?:MASQUERADE(?: --to-ports {_PORTS})?|SNAT --to-source {_V4}(?::{_PORTS})?)"
                              r"(?: --random-fully)?$")
_PORT = r"(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3}|0)"
_PROTO = r"(?:tcp|udp|sctp|udplite)"
_MEMBER_V4 = {
    "hash:ip": re.compile(rf"^{_V4}$"),
    "hash:net": re.compile(rf"^{_V4}(?:/(?:3[0-2]|[12]?\d))?$"),
    "hash:ip,port": re.compile(rf"^{_V4},{_PROTO}:{_PORT}$"),
    "hash:net,port": re.compile(rf"^{_V4}(?:/(?:3[0-2]|[12]?\d))?,{_PROTO}:{_PORT}$"),
}
# IPv6 as ipset prints it and weft renders it (lowercase, "::" at most once, no embedded IPv4).
# A fast path only: what it does not match is judged by ipaddress (`_member_ok`).
_H = "[0-9a-f]{1,4}"
_V6 = (rf"(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,7}}:|(?:{_H}:){{1,6}}:{_H}|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}"
       rf"|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
       rf"|{_H}:(?::{_H}){{1,6}}|:(?:(?::{_H}){{1,7}}|:))")
_PREFIX6 = r"(?:/(?:12[0-8]|1[01]\d|[1-9]?\d))"
_MEMBER_V6 = {
    "hash:ip": re.compile(rf"^{_V6}$"),
    "hash:net": re.compile(rf"^{_V6}{_PREFIX6}?$"),
    "hash:ip,port": re.compile(rf"^{_V6},{_PROTO}:{_PORT}$"),
    "hash:net,port": re.compile(rf"^{_V6}{_PREFIX6}?,{_PROTO}:{_PORT}$"),
}
_MEMBER = {"inet": _MEMBER_V4, "inet6": _MEMBER_V6}
# The sizes reconciler.ipsets gives sets: powers of two, from ipset's defaults up.
SET_SIZES = {"hashsize": (1024, 1 << 26), "maxelem": (65536, 1 << 27)}
_COMMANDS = frozenset({"-A", "--append", "-I", "--insert", "-D", "--delete", "-R", "--replace", "-N", "--new-chain",
                       "-X", "--delete-chain", "-F", "--flush", "-Z", "--zero", "-P", "--policy", "-E",
                       "--rename-chain", "-t", "--table", "-L", "--list", "-S", "--list-rules", "-C", "--check"})
_REFERENCES = re.compile(r" (-j|--jump|-g|--goto|--match-set)(?: (\S*)|$)")    # lines are printable: no tabs


class Refused(WeftError):
    """A write weft does not own; nothing of the apply ran."""


@dataclass(frozen=True)
class Known:
    """What the guard judges member lines against: weft's sets in the kernel (type, family)."""
    sets: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    pin_dir: str | None = None          # the node's eBPF pin directory: the only place map writes go


def check(steps: Sequence[Step], known: Known) -> None:
    """Refused (naming the step and the offending line) unless every write of `steps` is weft's."""
    for step in steps:
        for write in (step.write, step.undo):
            if write is not None:
                try:
                    check_write(write, known)
                except Refused as exc:
                    raise Refused(f"refused to write to the kernel ({step.what}): {exc}; nothing was applied") \
                        from None


def check_write(write: Write, known: Known) -> None:
    if isinstance(write, Restore):
        tool = write.argv[0] if write.argv else ""
        if IPTABLES_RESTORE.match(tool):
            if "--noflush" not in write.argv:
                raise Refused(f"{tool} without --noflush would replace every chain of the table")
            check_iptables(write.text)
        elif tuple(write.argv) == ("ipset", "restore"):
            check_ipset(write.text, known)
        else:
            raise Refused(f"{' '.join(write.argv)!r} is not a tool weft writes with")
    elif isinstance(write, RouteWrite):
        check_route(write)
    elif isinstance(write, SysctlWrite):
        check_sysctl(write)
    elif isinstance(write, BpfWrite):
        check_bpf(write, known.pin_dir)
    elif isinstance(write, BirdWrite):
        if write.name != BIRD_CONFIG:
            raise Refused(f"BIRD's configuration is {BIRD_CONFIG} in the state dir, not {write.name!r}")
    else:
        raise Refused(f"unknown kind of write {type(write).__name__}")


def _cut(line: str) -> str:
    return line if len(line) <= 160 else line[:157] + "..."


# ---- iptables ---------------------------------------------------------------------------------

def check_iptables(text: str) -> None:
    table: str | None = None
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if table is not None:
                raise Refused(f"table {line[1:]!r} opened before COMMIT of {table!r}")
            table = line[1:]
            if table not in WEFT_TABLES:
                raise Refused(f"table {table!r} is not one weft writes to: {_cut(line)!r}")
            continue
        if table is None:
            raise Refused(f"a line outside any table: {_cut(line)!r}")
        if not line.isprintable():
            raise Refused(f"a line with control characters (tabs): {_cut(line)!r}")
        if line == "COMMIT":
            table = None
            continue
        problem = _iptables_line(table, line)
        if problem:
            raise Refused(f"{problem}: {_cut(line)!r}")
    if table is not None:
        raise Refused(f"table {table!r} is not committed")


def _iptables_line(table: str, line: str) -> str | None:
    """What is wrong with one line of iptables-restore input (None: it is weft's to write)."""
    if line.startswith(":"):
        parts = line[1:].split()
        if len(parts) == 2 and parts[1] == "-" or len(parts) == 3 and parts[1] == "-" and parts[2] == "[0:0]":
            return None if _CHAIN.match(parts[0]) else "declares a chain that is not weft's"
        return "sets a built-in chain's policy, or declares a chain oddly"
    tokens = line.split()
    if len(tokens) < 2:
        return "not a rule weft writes"
    command, chain = tokens[0], tokens[1]
    if not _COMMANDS.isdisjoint(tokens[2:]):
        return "more than one command in a line"
    if _CHAIN.match(chain):
        if command in ("-X", "-F"):
            return None if len(tokens) == 2 else "deletes or flushes with extra arguments"
        if command in ("-A", "-I", "-D"):
            if table == "nat" and _MASQUERADE_RULE.match(line):
                return None
            if table == "raw" and line.endswith(_NOTRACK):          # doNotTrack's: only in the raw table
                return _rule_body(line[:-len(_NOTRACK)])
            return _rule_body(line)
        return f"{command} is not a change weft makes to its chains"
    hook = HOOKS.get((table, chain))
    if hook is None:
        return f"touches {table}/{chain}, which is not weft's"
    if command == "-I":
        match = _HOOK_RULE.match(line)
        if not match or match.group(1) != chain or match.group(3) != hook:
            return f"inserts into built-in chain {chain} a rule other than weft's hook (-j {hook})"
        return None
    if command == "-D":
        if not ('--comment "weft:' in line or f"-j {PREFIX}" in line or f"-g {PREFIX}" in line):
            return f"deletes a rule of built-in chain {chain} that is not weft's"
        return _rule_body(line)
    return f"{command} on built-in chain {chain}: weft only inserts its hook at the top and deletes its own rules"


def _rule_body(line: str) -> str | None:
    """What a rule refers to: only weft chains, standard targets and weft sets."""
    for option, name in _REFERENCES.findall(line):
        if option == "--match-set":
            if not _SET.match(name):
                return f"matches set {name!r}, which is not weft's"
        elif not (name in STANDARD_TARGETS or _CHAIN.match(name)):
            return f"jumps to {name!r}, which is neither a weft chain nor a standard target"
    return None


# ---- ipset ------------------------------------------------------------------------------------

def check_ipset(text: str, known: Known) -> None:
    """Line by line, except that a run of members of one set is matched at once by its type's
    pattern (a first run fills tens of thousands)."""
    types: dict[str, tuple[str, str]] = dict(known.sets)
    runs: dict[str, re.Pattern[str] | None] = {}
    pos, size = 0, len(text)
    while pos < size:
        end = text.find("\n", pos)
        end = size if end < 0 else end
        line = text[pos:end]
        tokens = line.split(" ")
        if len(tokens) == 3 and tokens[0] in ("add", "del") and tokens[1] in types:
            name = tokens[1]
            kind, family = types[name]
            if name not in runs:
                member = _MEMBER.get(family, {}).get(kind)
                runs[name] = None if member is None else \
                    re.compile(rf"(?:(?:add|del) {re.escape(name)} (?:{member.pattern[1:-1]})\n){{0,512}}")
            run = runs[name]
            matched = run.match(text, pos) if run is not None else None
            if matched is not None and matched.end() > pos:
                pos = matched.end()
                continue
            if not _member_ok(tokens[2], kind, family):
                raise Refused(f"not a member of a {kind} set of family {family}: {_cut(line)!r}")
        elif line:
            problem = _ipset_line(tokens, types)
            if problem:
                raise Refused(f"{problem}: {_cut(line)!r}")
        pos = end + 1


def _ipset_line(tokens: list[str], types: dict[str, tuple[str, str]]) -> str | None:
    command = tokens[0]
    name = tokens[1] if len(tokens) > 1 else ""
    if not _SET.match(name):
        return "names a set that is not weft's"
    if command == "create":
        options = dict(zip(tokens[3::2], tokens[4::2], strict=False))
        if len(tokens) < 3 or len(tokens) % 2 == 0 or len(options) != (len(tokens) - 3) // 2 \
                or not set(options) <= {"family", "hashsize", "maxelem"}:
            return "creates a set with options weft does not use"
        kind, family = tokens[2], options.get("family", "inet")
        if kind not in SET_TYPES or family not in ("inet", "inet6"):
            return f"creates a set of type {kind} family {family}, which weft does not use"
        for option, (least, most) in SET_SIZES.items():
            value = options.get(option, str(least))
            number = int(value) if value.isdigit() and len(value) <= 10 else 0
            if not (least <= number <= most and number & (number - 1) == 0):
                return f"creates a set of {option} {value[:20]}: weft sizes sets in powers of two, {least} to {most}"
        types[name] = (kind, family)
        return None
    if command == "swap":
        other = tokens[2] if len(tokens) == 3 else ""
        if not _SET.match(other):
            return "swaps with a set that is not weft's"
        if name not in types or types.get(other) != types[name]:
            return "swaps two sets that are not weft's sets of one type and family"
        return None
    if command in ("destroy", "flush"):
        return None if len(tokens) == 2 else f"{command} with extra arguments"
    if command in ("add", "del"):
        if len(tokens) != 3:
            return f"{command} with options weft does not use"
        return f"{command} to set {name}, whose type weft does not know"
    return f"{command!r} is not a change weft makes to its sets"


def _member_ok(member: str, kind: str, family: str) -> bool:
    if family == "inet":
        pattern = _MEMBER_V4.get(kind)
        return bool(pattern and pattern.match(member))
    if kind not in SET_TYPES:
        return False
    address, _, port = member.partition(",")
    try:
        net = ipaddress.ip_network(address, strict=True)
    except ValueError:
        return False
    if net.version != 6 or (kind == "hash:ip" and net.prefixlen != 128) or (kind == "hash:ip,port" and "/" in address):
        return False
    if kind.endswith(",port"):
        return bool(re.match(rf"^{_PROTO}:{_PORT}$", port))
    return not port


# ---- routes and sysctls -----------------------------------------------------------------------

def check_route(write: RouteWrite) -> None:
    if write.proto != ROUTE_PROTOCOL:
        raise Refused(f"route {write.dst} with protocol {write.proto}: weft writes and removes only its own "
                      f"(protocol {ROUTE_PROTOCOL})")
    try:
        net = ipaddress.ip_network(write.dst, strict=True)
    except ValueError:
        raise Refused(f"route to {write.dst!r}: not a network") from None
    if write.delete:
        return
    if write.type == "unicast":
        if net.prefixlen != net.max_prefixlen:
            raise Refused(f"route {write.dst}: weft routes pods' addresses only (/32, /128)")
        if write.dev is None or not _IFACE.match(write.dev):
            raise Refused(f"route {write.dst} through {write.dev!r}, which is not a weft interface")
    elif write.type == "blackhole":
        if net.prefixlen < (16 if net.version == 4 else 48) or write.dev is not None:
            raise Refused(f"blackhole {write.dst}: weft blackholes only its address blocks")
    else:
        raise Refused(f"route {write.dst} of type {write.type!r}")


def check_sysctl(write: SysctlWrite) -> None:
    match = _SYSCTL.match(write.key)
    if not match:
        raise Refused(f"sysctl {write.key!r} is not an interface setting")
    _family, iface, setting = match.groups()
    if not _IFACE.match(iface):
        raise Refused(f"sysctl {write.key!r}: {iface!r} is not a weft interface")
    if setting not in SYSCTLS:
        raise Refused(f"sysctl {write.key!r}: weft does not set {setting}")
    if write.value not in ("0", "1", "2"):
        raise Refused(f"sysctl {write.key!r} = {write.value!r}: weft writes 0, 1 or 2")


# ---- eBPF -------------------------------------------------------------------------------------

_PIN_ENTRY = re.compile(r"^(maps|progs)-[0-9a-f]{16}$")
_STAGING = re.compile(r"^staging-[0-9]{1,10}$")                     # a killed compile's (reconciler.bpf_apply)
_MAP_TYPES = {"endpoints": (str, bpfmodel.EndpointEntry), "classifiers": (bpfmodel.ClassifierKey, int),
              "verdicts": (bpfmodel.VerdictKey, bpfmodel.Verdict), "ports": (bpfmodel.PortKey, bpfmodel.Verdict),
              "services": (bpfmodel.ServiceKey, bpfmodel.ServiceEntry),
              "backends": (bpfmodel.BackendKey, bpfmodel.Backend)}
_TC_HOOKS = ("ingress", "egress")
_UPLINK = re.compile(r"^(?!lo$)[A-Za-z0-9_.@-]{1,15}$")            # an interface name (not the loopback)


def check_bpf(write: BpfWrite, pin_dir: str | None) -> None:
    """Only under the node's pin directory, only weft's maps with values of their types, only
    weft interfaces."""
    if not pin_dir:
        raise Refused(f"eBPF {write.op} of {write.path!r}: this run has no pin directory")
    root = os.path.normpath(pin_dir)
    path = os.path.normpath(write.path)
    if path != write.path.rstrip("/") or "\0" in path:
        raise Refused(f"eBPF {write.op}: {write.path!r} is not a plain path")
    parent, name = os.path.split(path)
    if write.op == "unpin":
        if path != root and not (parent == root and (_PIN_ENTRY.match(name) or _STAGING.match(name))):
            raise Refused(f"unpin {path}: weft removes only its node's pin directory {root} or a build in it")
        return
    if write.op in ("detach", "detach-uplink"):
        if path != root:
            raise Refused(f"detach with pin directory {path}, not the node's {root}")
    elif write.op in ("compile", "attach", "attach-uplink"):
        if parent != root or not name.startswith("progs-") or not _PIN_ENTRY.match(name):
            raise Refused(f"eBPF {write.op} of {path}: programs are pinned only in {root}/progs-<build>")
        if write.op == "compile":
            return
    elif write.op == "map":
        maps_dir, map_name = os.path.split(parent)[1], name
        if os.path.dirname(parent) != root or not maps_dir.startswith("maps-") or not _PIN_ENTRY.match(maps_dir):
            raise Refused(f"map write to {path}: weft writes only maps in {root}/maps-<layout>")
        if map_name not in _MAP_TYPES:
            raise Refused(f"map write to {path}: not one of weft's policy maps {sorted(_MAP_TYPES)}")
        key_type, value_type = _MAP_TYPES[map_name]
        for key, value in write.writes:
            if not isinstance(key, key_type) or not isinstance(value, value_type):
                raise Refused(f"map write to {path}: {key!r} = {value!r} is not a {map_name} entry")
            if map_name == "endpoints" and not (isinstance(key, str) and _IFACE.match(key)):
                raise Refused(f"map write to {path}: {key!r} is not a weft interface")
        for key in write.deletes:
            if not isinstance(key, key_type):
                raise Refused(f"map delete in {path}: {key!r} is not a {map_name} key")
        return
    else:
        raise Refused(f"eBPF {write.op!r} is not a change weft makes")
    if write.op.endswith("-uplink"):            # node ports: weft's filter on an interface holding a node address
        if not _UPLINK.match(write.iface) or _IFACE.match(write.iface) or write.hook not in _TC_HOOKS:
            raise Refused(f"eBPF {write.op} on {write.iface!r}/{write.hook!r}: not an uplink's tc hook")
        return
    if not _IFACE.match(write.iface) or write.hook not in _TC_HOOKS:
        raise Refused(f"eBPF {write.op} on {write.iface!r}/{write.hook!r}: weft attaches only to weft interfaces' "
                      f"tc ingress and egress hooks")
