"""iptables rules as text, with their identity: the primitives every chain is written with.

Each rule carries a comment "weft:<id>", a hash of its chain, its text and the id of the rule
before it, so a rule can be recognised (and a moved rule is a different rule). Standard library
only: the CNI plugin writes a new pod's chains with these on its hot path.
"""
from __future__ import annotations

import base64
import hashlib
from collections import namedtuple

# One iptables rule before its comment is added, its parts in iptables-save's order: the base
# matches ("-s ... -d ... -i ... -o ... -p ..."), the "-m ..." modules printed after the
# comment, and the target ("-j ..." / "-g ...").
Spec = namedtuple("Spec", "matches extra target", defaults=("", "", ""))

TABLE = "filter"                           # the IPv4 family's filter table (iptables)
TABLE6 = "filter6"                         # the IPv6 family's (ip6tables' filter table), as weft labels it
FAMILY_TABLES = {4: TABLE, 6: TABLE6}
FAMILIES = (4, 6)
MARK_ACCEPT = "0x10000"                    # a policy allowed the packet
MARK_PASS = "0x20000"                      # a policy passed it to the next tier
MARK_ALL = "0x30000"
FROM_DISPATCH = "weft-from-wl-dispatch"    # pod egress: one branch per local pod interface
TO_DISPATCH = "weft-to-wl-dispatch"        # pod ingress
TIER_PASSES = "pass"                       # ends a tier's chains in tiered_specs: its defaultAction is Pass


def families_of(ips) -> tuple[int, ...]:
    """The IP families whose tables hold a pod's policy: those of its addresses, or both while
    they are not known (a pod is never left unenforced in a family it might use)."""
    found = tuple(f for f in FAMILIES if any((":" in ip) == (f == 6) for ip in ips))
    return found or FAMILIES


def rule_id(chain: str, previous: str, body: str) -> str:
    digest = hashlib.sha256(f"{chain}\0{previous}\0{body}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:16]


def chain_lines(chain: str, specs) -> tuple[str, ...]:
    """The chain's rules exactly as iptables-save prints them ("-A <chain> ...")."""
    lines, previous = [], ""
    for spec in specs:
        body = " ".join(p for p in (spec.matches, spec.extra, spec.target) if p)
        previous = rule_id(chain, previous, body)
        parts = [f"-A {chain}", spec.matches, f'-m comment --comment "weft:{previous}"', spec.extra, spec.target]
        lines.append(" ".join(p for p in parts if p))
    return tuple(lines)


def base_matches(src: str = "", dst: str = "", in_if: str = "", out_if: str = "", proto: str = "") -> str:
    parts = [f"-s {src}" if src else "", f"-d {dst}" if dst else "", f"-i {in_if}" if in_if else "",
             f"-o {out_if}" if out_if else "", f"-p {proto}" if proto else ""]
    return " ".join(p for p in parts if p)


def pending_specs(closed: bool) -> list:
    """A pod whose labels are not known yet: dropped where a policy might select it (fail
    closed, until a run knows the pod), open where none could."""
    return [Spec(target="-j DROP")] if closed else []


def tiered_specs(tiers) -> list:
    """A pod's chain for one direction: `tiers` in evaluation order, each the chains of its
    policies in order. In each tier an Allow sets the accept mark and returns, Deny drops, Pass
    skips the rest of the tier; a tier that neither passed nor allowed drops, unless its list
    ends with TIER_PASSES (its defaultAction is Pass: on to the next tier). No tiers: open."""
    specs = [Spec(target=f"-j MARK --set-xmark 0x0/{MARK_ALL}")] if tiers else []
    for chains in tiers:
        specs.append(Spec(target=f"-j MARK --set-xmark 0x0/{MARK_PASS}"))
        for chain in chains:
            if chain == TIER_PASSES:
                break
            specs.append(Spec(extra=f"-m mark --mark 0x0/{MARK_PASS}", target=f"-j {chain}"))
            specs.append(Spec(extra=f"-m mark --mark {MARK_ACCEPT}/{MARK_ACCEPT}", target="-j RETURN"))
        else:
            specs.append(Spec(extra=f"-m mark --mark 0x0/{MARK_PASS}", target="-j DROP"))
    return specs
