"""A render after some pods, namespaces and policies changed, made from the previous render.

A render's chains depend on the policies and on this node's pods (their labels, their
namespaces' and service accounts' labels); its sets' members depend on every pod. When only pods
and namespaces changed since the previous render, a set can change only if its selector matched
a changed pod, with its old or its new labels (a pod of a relabelled namespace counts as
changed): only those sets are computed again, from the few changed pods (what they added or took
away; a member another, unchanged pod also gives is kept, as a full render keeps it). The chains
are rendered again only when a changed pod is on this node, otherwise they are the previous
ones; and even then a policy's chain is taken from the previous render (its rules depend only
on the policy and its sets' names): only the changed pods' own chains are new. The result
equals a render from scratch (`render_node_sets`); tests/test_render_endpoint_changes.py checks
that over random sequences of changes.

When policies changed (added, changed or removed), the chains are rendered again (the endpoint
chains list the policies that apply, in order), each unchanged policy's chain taken from the
previous render as above, the changed policies' chains rendered from their rules: their sets are
the previous render's where it has a set of that meaning (its members depend only on the meaning
and the pods), and a set no chain refers to any more is left out, as a full render leaves it.
A set of a meaning the previous render lacks is computed from every pod (with `partial`: None,
the caller renders with the whole state).

This is a pure function: the caller (reconciler.run) vouches that `previous` was rendered from
the state before these changes, with `meanings` as that render gave them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from weft.desired.index import EndpointIndex
from weft.model.cluster import EGRESS, INGRESS, ClusterState, Endpoint, EntityMatch, Namespace, Policy
from weft.model.kernel import Chain, Dataplane, IpSet
from weft.renderers.ipsets import NAMED_PORT, PEERS, SET_FAMILY, set_members, set_prefix
from weft.renderers.iptables import policy_chain_name, render_node_sets
from weft.renderers.natoutgoing import SETS

NAT_SETS = frozenset(name for names in SETS.values() for name in names)


@dataclass(frozen=True)
class EndpointChanges:
    """What changed since the previous render: pods (as endpoints, addressed as the render saw
    them), namespaces and policies."""
    old: tuple[Endpoint, ...]                   # previous versions of pods changed or gone
    new: tuple[Endpoint, ...]                   # current versions of pods changed or added
    namespaces: Mapping[str, Namespace | None]  # changed namespaces' previous versions (None: it did not exist)
    policies: tuple[Policy, ...] = ()           # previous and current versions of policies changed, added or gone


def valid_meanings(meanings: object, sets: Mapping[str, IpSet]) -> dict[str, tuple] | None:
    """`meanings` as kept with a render (read back from the cache: hostile until checked),
    if it describes every set of `sets` whose members come from endpoints, else None."""
    if not isinstance(meanings, Mapping):
        return None
    checked: dict[str, tuple] = {}
    for name, ipset in sets.items():
        if any(name.startswith(set_prefix("n", f)) for f in SET_FAMILY):
            continue                              # nets: their members are the policy's own
        if name in NAT_SETS:
            continue                              # natOutgoing's: the IP pools' CIDRs
        meaning = meanings.get(name)
        if not (isinstance(meaning, tuple | list) and len(meaning) == 5):
            return None
        kind, entity, port, protocol, family = meaning
        expected = {PEERS: ("s", "hash:ip"), NAMED_PORT: ("p", "hash:ip,port")}.get(kind)
        if expected is None or not isinstance(entity, EntityMatch) or family not in SET_FAMILY \
                or not isinstance(port, str) or not (protocol is None or isinstance(protocol, str)) \
                or not name.startswith(set_prefix(expected[0], family)) or ipset.type != expected[1] \
                or ipset.family != SET_FAMILY[family]:
            return None
        checked[name] = (kind, entity, port, protocol, family)
    return checked


def address_counts(endpoints: Iterable[Endpoint]) -> Counter[str]:
    """How many endpoints hold each address (kept with a render: a set member a changed pod took
    away stays when another pod holds it too)."""
    return Counter(ip for e in endpoints for ip in e.ips)


def rerender(state: ClusterState, node: str, pending: tuple[Endpoint, ...], previous: Dataplane,
             meanings: object, changes: EndpointChanges, counts: Counter[str] | None = None,
             partial: bool = False) -> tuple[Dataplane, dict[str, tuple], Counter[str]] | None:
    """This node's render of `state` (with local addresses applied, as for render_node_sets),
    from `previous`, the render of the state before `changes`, with what its sets mean and the
    new state's address counts; None when that cannot be done here (host endpoints or network
    sets are selectable, `meanings` (as read back from the cache) do not describe `previous`'s
    sets: the caller renders from scratch).

    `counts`: the previous state's `address_counts` (computed from `state` when None).
    `partial`: of the pods, `state` holds only this node's and those of the changed namespaces;
    when a changed pod is local, the rest of it must be whole, otherwise only its namespaces and
    service accounts are looked at. That is enough unless a member taken away is held by another
    pod too, or a set the previous render did not have is needed (None then: the caller renders
    with the whole state)."""
    if state.network_sets or state.host_endpoints:
        return None
    if counts is None:
        if partial:
            return None
        counts = address_counts(state.endpoints)
    else:
        counts = _moved(counts, address_counts(changes.old), address_counts(changes.new))
    checked = valid_meanings(meanings, previous.ipsets)
    if checked is None:
        return None
    touched_ns = set(changes.namespaces)
    changed_keys = {e.key for e in changes.old} | {e.key for e in changes.new}
    same = tuple(e for e in state.endpoints if e.namespace in touched_ns and e.key not in changed_keys)
    old_namespaces = dict(state.namespaces)
    for name, before in changes.namespaces.items():
        if before is None:
            old_namespaces.pop(name, None)
        else:
            old_namespaces[name] = before
    was = EndpointIndex(replace(state, endpoints=changes.old + same, namespaces=old_namespaces))
    now = EndpointIndex(replace(state, endpoints=changes.new + same))
    local = any(e.node == node for e in was.endpoints) or any(e.node == node for e in now.endpoints)
    # Members a changed pod took away may still be given by another pod (a shared address): the
    # addresses held by more endpoints of the new state than the changed ones considered here.
    mine = address_counts(now.endpoints)
    held = {ip for e in was.endpoints for ip in e.ips if counts[ip] > mine[ip]}
    full: list[EndpointIndex] = []


    def updated(ipset: IpSet, meaning: tuple) -> IpSet:
        before, after = set_members(was, meaning), set_members(now, meaning)
        if before == after:
            return ipset
        gone = before - after
        if held and any(m.split(",", 1)[0] in held for m in gone):
            if partial:
                raise Partial
            if not full:
                full.append(EndpointIndex(state))
            return replace(ipset, members=set_members(full[0], meaning))
        return replace(ipset, members=(ipset.members - gone) | after)

    try:
        sets = {name: updated(s, checked[name]) if name in checked else s for name, s in previous.ipsets.items()}
        if not local and not changes.policies:
            return replace(previous, ipsets=sets), dict(checked), counts
        dataplane, made = render_node_sets(state, node, pending, sets, chains=_unchanged(previous, changes.policies),
                                           meanings=checked, index=_not_whole if partial else None)
    except Partial:
        return None
    return dataplane, made, counts


def _unchanged(previous: Dataplane, policies: tuple[Policy, ...]) -> Mapping[tuple[str, str], Chain]:
    """The previous render's chains but those of `policies` (a policy's chain is named after its
    tier and key, not its rules: a changed policy's old chain has its new chain's name)."""
    if not policies:
        return previous.chains
    stale = {policy_chain_name(p, d) for p in policies for d in (INGRESS, EGRESS)}
    return {k: c for k, c in previous.chains.items() if k[1] not in stale}


def _moved(counts: Counter[str], gone: Counter[str], came: Counter[str]) -> Counter[str]:
    """`counts - gone + came` (only positive counts kept), in time of the changes, not of every
    address (`-` and `+` build whole new Counters: 0.3 s for 150,000 pods)."""
    moved = Counter(counts)
    for ip, n in gone.items():
        left = moved[ip] - n
        if left > 0:
            moved[ip] = left
        else:
            del moved[ip]
    for ip, n in came.items():
        if n > 0:
            moved[ip] += n
    return moved


class Partial(Exception):
    """A set must be computed over every pod, and the state at hand does not hold them all."""


def _not_whole() -> EndpointIndex:
    raise Partial
