"""An evaluator of weft's rendered iptables chains, in Python: what the kernel's filter table
decides for one packet, given the rules and ipsets exactly as weft renders them.

It knows the subset of iptables that weft writes (-s/-d/-i/-o/-p, comment, multiport, set, mark,
conntrack; MARK, LOG, RETURN, DROP, ACCEPT, jumps and gotos) and refuses anything else, so a
rule it does not understand cannot pass silently. Written from iptables' documented semantics,
not from weft's renderers, so tests can hold the eBPF encoding against it.
"""
from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from functools import cache

from weft.model.kernel import Dataplane

PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1}


@dataclass
class Packet:
    saddr: str
    daddr: str
    proto: int
    sport: int = 0
    dport: int = 0
    in_if: str = ""
    out_if: str = ""
    ctstate: str = "NEW"
    mark: int = 0
    logged: list = field(default_factory=list)


@dataclass(frozen=True)
class ParsedRule:
    matches: tuple
    target: tuple


class Unsupported(ValueError):
    pass


@cache
def parse_rule(line: str) -> ParsedRule:
    tokens = shlex.split(line)
    if tokens[:1] != ["-A"]:
        raise Unsupported(line)
    i, matches, target = 2, [], ()
    while i < len(tokens):
        t = tokens[i]
        negate = False
        if t == "!":
            negate, i = True, i + 1
            t = tokens[i]
        if t in ("-s", "-d", "-i", "-o", "-p"):
            matches.append((t, tokens[i + 1], negate))
            i += 2
        elif t == "-m":
            module = tokens[i + 1]
            i += 2
            if module == "comment":
                i += 2
            elif module == "multiport":
                matches.append(("multiport", tokens[i], tokens[i + 1], False))
                i += 2
            elif module == "set":
                neg = False
                if tokens[i] == "!":
                    neg, i = True, i + 1
                if tokens[i] != "--match-set":
                    raise Unsupported(line)
                matches.append(("set", tokens[i + 1], tokens[i + 2], neg))
                i += 3
            elif module == "mark":
                matches.append(("mark", tokens[i + 1], False))
                i += 2
            elif module == "conntrack":
                matches.append(("ctstate", tokens[i + 1], False))
                i += 2
            else:
                raise Unsupported(f"module {module} in {line}")
        elif t in ("-j", "-g"):
            target = (t, *tokens[i + 1:])
            break
        else:
            raise Unsupported(f"{t} in {line}")
    return ParsedRule(tuple(matches), target)


@cache
def _net(text: str):
    return ipaddress.ip_network(text, strict=False)


def _addr(text: str):
    return ipaddress.ip_address(text)


class Evaluator:
    def __init__(self, dataplane: Dataplane):
        self.chains = {name: chain.rules for (table, name), chain in dataplane.chains.items() if table == "filter"}
        self.sets = dataplane.ipsets

    def run(self, chain: str, pkt: Packet, depth: int = 0) -> str:
        """"ACCEPT", "DROP" or "RETURN" (fell off the end or returned)."""
        if depth > 16:
            raise RecursionError(chain)
        for line in self.chains[chain]:
            rule = parse_rule(line)
            if not all(self._match(m, pkt) for m in rule.matches):
                continue
            kind, *args = rule.target
            if kind == "-g":
                return self.run(args[0], pkt, depth + 1)
            name = args[0]
            if name in ("ACCEPT", "DROP"):
                return name
            if name == "RETURN":
                return "RETURN"
            if name == "MARK":
                value, mask = (int(x, 16) for x in args[2].split("/"))
                pkt.mark = (pkt.mark & ~mask) ^ value
                continue
            if name == "LOG":
                pkt.logged.append(chain)
                continue
            result = self.run(name, pkt, depth + 1)
            if result in ("ACCEPT", "DROP"):
                return result
        return "RETURN"

    def _match(self, m, pkt: Packet) -> bool:
        kind = m[0]
        negate = m[-1]
        if kind == "-s":
            ok = _addr(pkt.saddr) in _net(m[1])
        elif kind == "-d":
            ok = _addr(pkt.daddr) in _net(m[1])
        elif kind in ("-i", "-o"):
            iface = pkt.in_if if kind == "-i" else pkt.out_if
            ok = iface.startswith(m[1][:-1]) if m[1].endswith("+") else iface == m[1]
        elif kind == "-p":
            ok = pkt.proto == PROTOCOLS[m[1]]
        elif kind == "multiport":
            flag, spec = m[1], m[2]
            if pkt.proto not in (6, 17, 132):
                raise Unsupported("multiport on a protocol without ports")
            port = pkt.dport if flag == "--dports" else pkt.sport
            ok = any(int(a) <= port <= int(b or a)
                     for a, _, b in (p.partition(":") for p in spec.split(",")))
        elif kind == "set":
            ok = self._in_set(m[1], m[2], pkt)
        elif kind == "mark":
            value, mask = (int(x, 16) for x in m[1].split("/"))
            ok = (pkt.mark & mask) == value
        elif kind == "ctstate":
            ok = pkt.ctstate in m[1].split(",")
        else:
            raise Unsupported(kind)
        return ok != negate

    def _in_set(self, name: str, flags: str, pkt: Packet) -> bool:
        ipset = self.sets[name]
        first = flags.split(",")[0]
        address = pkt.saddr if first == "src" else pkt.daddr
        if ipset.type == "hash:ip":
            return address in ipset.members
        if ipset.type == "hash:net":
            a = _addr(address)
            return any(a in _net(member) for member in ipset.members)
        if ipset.type == "hash:ip,port":
            second = flags.split(",")[1]
            port = pkt.sport if second == "src" else pkt.dport
            names = {v: k for k, v in PROTOCOLS.items()}
            if pkt.proto not in (6, 17, 132):
                return False
            return f"{address},{names[pkt.proto]}:{port}" in ipset.members
        raise Unsupported(ipset.type)
