"""IP sets for policy rules: peers matched by selectors, multi-CIDR nets, named ports.

A rule refers to a set by a name derived from what the set means (its selector, its nets),
so two rules meaning the same peers share one set, the same meaning always gets the same name,
and a chain's length never depends on how many pods match.

Sets hold one IP family each (ipset's "inet" / "inet6"): an IPv6 set's name carries a 6 after
its kind ("weft-s6-...", "weft-n6-...", "weft-p6-..."), so a pod's IPv4 addresses go to the IPv4
rules' sets and its IPv6 addresses to the IPv6 rules' ones. Names stay within ipset's 31
characters with room for the temporary name a resized set is filled under (reconciler.ipsets).
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from functools import cache

from weft.desired.index import EndpointIndex
from weft.model.cluster import EntityMatch
from weft.model.kernel import PREFIX, IpSet

SET_FAMILY = {4: "inet", 6: "inet6"}


def set_prefix(letter: str, family: int) -> str:
    """The name prefix of a set of this kind and family: "weft-s-" (IPv4), "weft-s6-" (IPv6)."""
    return f"{PREFIX}{letter}{'6' if family == 6 else ''}-"


def _in_family(ip: str, family: int) -> bool:
    return (":" in ip) == (family == 6)


@cache
def short_hash(*parts: str, length: int = 20) -> str:
    """A stable lowercase name fragment for `parts` (base32 of sha256; no '-' or '_')."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    # base32 turns each 5 bytes into 8 characters on their own: encode only the bytes needed.
    return base64.b32encode(digest[:5 * -(-length // 8)]).decode().lower()[:length]


def entity_key(entity: EntityMatch) -> str:
    sel = entity.selector.canonical() if entity.selector is not None else "-"
    nssel = entity.namespace_selector.canonical() if entity.namespace_selector is not None else "-"
    key = f"selector={sel};namespaceSelector={nssel};namespace={entity.namespace or '-'}"
    if entity.has_service_accounts:         # Calico rules only: Kubernetes rules keep their set names
        sasel = entity.service_account_selector.canonical() if entity.service_account_selector is not None else "-"
        key += f";serviceAccounts={','.join(entity.service_account_names) or '-'};serviceAccountSelector={sasel}"
    return key


def ipset_net(net: str) -> list[str]:
    """A CIDR as `ipset save` prints members of a hash:net set (a /32 is a bare address;
    /0 cannot be stored, so it becomes two /1s)."""
    network = ipaddress.ip_network(net, strict=False)
    if network.prefixlen == 0:
        return [str(n) for n in network.subnets(1)]
    return [str(network.network_address)] if network.prefixlen == network.max_prefixlen else [str(network)]


PEERS, NAMED_PORT = "peers", "named-port"      # the kinds of set whose members come from endpoints


def set_members(index: EndpointIndex, meaning: tuple, positions: Iterable[int] | None = None) -> frozenset[str]:
    """The members a peers or named-port set of `meaning` ((kind, entity, port name, protocol,
    family), as SetCatalog.meanings keeps it) gets from the endpoints of `index` (or only from
    those at `positions`, a subset of the ones it matches)."""
    kind, entity, port_name, protocol, family = meaning
    eps = index.endpoints
    chosen = index.match(entity) if positions is None else positions
    if kind == PEERS:
        return frozenset(ip for i in chosen for ip in eps[i].ips if _in_family(ip, family))
    members = {f"{ip},{cp.protocol}:{cp.port}"
               for i in chosen for cp in eps[i].ports
               if cp.name == port_name and (protocol is None or cp.protocol == protocol)
               for ip in eps[i].ips if _in_family(ip, family)}
    if positions is None and index.state.host_endpoints:
        # Host endpoints' named ports (spec.ports) at their expectedIPs, as Felix's named-port
        # index has them (desired.index.named_port_members). Never in an incremental render:
        # renderers.incremental renders from scratch where host endpoints exist.
        side = index.side(entity)
        heps = side.host_endpoints if side is not None else index.state.host_endpoints
        members |= {f"{ip},{cp.protocol}:{cp.port}"
                    for h in heps for cp in h.ports
                    if cp.name == port_name and (protocol is None or cp.protocol == protocol)
                    for ip in h.expected_ips if _in_family(ip, family)}
    return frozenset(members)


class SetCatalog:
    """Collects the sets the rendered rules refer to, with their members.

    `index` may be a function that builds the index: it is built only when some set's members
    must be computed. `reuse` holds sets of a previous render whose members were computed from
    the same endpoints and namespaces (the caller vouches for that): a peers or named-port set
    found there is taken as it is (its meaning is its name; nets sets cost nothing to make).
    """

    def __init__(self, index: EndpointIndex | Callable[[], EndpointIndex], reuse: Mapping[str, IpSet] | None = None,
                 reused_meanings: Mapping[str, tuple] | None = None):
        self._index = index
        self.reuse = reuse or {}
        self.reused_meanings = reused_meanings or {}
        self.sets: dict[str, IpSet] = {}
        # What each peers and named-port set means (its members are computed from it), kept with
        # a render so a later one can tell which sets a changed pod touches (renderers.incremental).
        self.meanings: dict[str, tuple] = {}

    def adopt(self, names: Iterable[str]) -> bool:
        """Take the sets `names` (those a chain of the reused render refers to) from the reused
        render, with what they mean; False, taking none, when it lacks one of them."""
        names = [n for n in names if n not in self.sets]
        if not all(n in self.reuse and (n in self.reused_meanings or n.startswith(set_prefix("n", 4))
                                        or n.startswith(set_prefix("n", 6))) for n in names):
            return False
        for n in names:
            self.sets[n] = self.reuse[n]
            if n in self.reused_meanings:
                self.meanings[n] = self.reused_meanings[n]
        return True

    @property
    def index(self) -> EndpointIndex:
        if not isinstance(self._index, EndpointIndex):
            self._index = self._index()
        return self._index

    def peers(self, entity: EntityMatch, family: int = 4) -> str:
        """The addresses of `family` of the endpoints matching `entity`."""
        key = entity_key(entity)
        name = f"{set_prefix('s', family)}{short_hash('peers', key)}"
        if name not in self.sets:
            self.sets[name] = self.reuse.get(name) or self._peers(name, entity, key, family)
            self.meanings[name] = (PEERS, entity, "", None, family)
        return name

    def _peers(self, name: str, entity: EntityMatch, key: str, family: int) -> IpSet:
        members = set_members(self.index, (PEERS, entity, "", None, family))
        return IpSet(name, "hash:ip", members, SET_FAMILY[family], about=f"endpoints matching {key}")

    def nets(self, nets: tuple[str, ...], family: int = 4) -> str:
        """The CIDRs `nets` (all of `family`)."""
        normal = sorted({m for n in nets for m in ipset_net(n)})
        name = f"{set_prefix('n', family)}{short_hash('nets', *normal)}"
        self.sets.setdefault(name, IpSet(name, "hash:net", frozenset(normal), SET_FAMILY[family],
                                         about="nets " + ", ".join(nets)))
        return name

    def named_port(self, entity: EntityMatch, port_name: str, protocol: str | None, family: int = 4) -> str:
        """(address of `family`, protocol:port) of endpoints matching `entity` that have a port of that name."""
        key = entity_key(entity)
        name = f"{set_prefix('p', family)}{short_hash('named-port', key, port_name, protocol or '*')}"
        if name not in self.sets:
            self.sets[name] = self.reuse.get(name) or self._named_port(name, entity, key, port_name, protocol, family)
            self.meanings[name] = (NAMED_PORT, entity, port_name, protocol, family)
        return name

    def _named_port(self, name: str, entity: EntityMatch, key: str, port_name: str, protocol: str | None,
                    family: int) -> IpSet:
        members = set_members(self.index, (NAMED_PORT, entity, port_name, protocol, family))
        about = f"port {port_name!r}/{protocol or 'any'} of endpoints matching {key}"
        return IpSet(name, "hash:ip,port", members, SET_FAMILY[family], about=about)
