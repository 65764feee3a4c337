"""The desired model -> one node's BIRD 2 configuration. Pure and deterministic.

Who peers with whom follows Calico's confd (facts, not code): a full node-to-node mesh unless
BGPConfiguration turns it off (route-reflector nodes stay out of it), global and node-specific
BGPPeers by peerIP or peerSelector, with the reverse peering added between two nodes so every
node-to-node session is configured at both ends; global wins over node-specific, explicit over
mesh. The node with the lower address is passive towards another node, so two nodes never race
to open the same session. A route reflector treats every iBGP peer of another cluster ID as its
client.

What moves where:
  - the node's own blocks: blackhole routes in BIRD's static protocol `weft_blocks_vN`, sent to
    the kernel (so addresses of the block not in use are dropped here, not bounced back) and
    exported, aggregated, to every peer (blocks of a pool with disableBGPExport are not);
  - service ranges (BGPConfiguration serviceClusterIPs/ExternalIPs/LoadBalancerIPs): static
    `weft_services_vN`, exported only to peers that are not weft nodes, never to the kernel;
  - imported from other weft nodes: routes inside some IPPool, never one of the node's own blocks;
  - imported from routers that are not weft nodes: only whole blocks of other nodes in pools BGP
    carries. A router that announces a pod's /32 (or any piece of a pool) would otherwise win over
    the owner's block route by longest prefix and cut the pod off;
  - learned routes go to the kernel through `weft_kernel_vN`, which carries BIRD's own route
    protocol ("proto bird"). BIRD never learns kernel routes (`learn off`), so the per-pod /32
    routes weft's CNI plugin writes (route protocol 201) are neither exported nor touched.
Protocol names say the peer's kind and address (`Mesh_198_18_0_2`, `Node_...`, `Global_...`,
`..._port_1790` for another port): `weft status` maps them back with `parse_protocol_name`.

Filter and function names end in a digest of their body (`weft_export_node_v4_1f0c...`). On
`configure` BIRD reconfigures the static protocol first, which offers a new block to each BGP
channel's *old* export filter (rejected), and re-runs the export only if it finds the export
filter changed, by comparing it with the old filter of the same name. 2.0.12 took a prefix set
grown inside a /24 that already held an exported block for the old set: the new block was never
announced (10 of 13 blocks added one by one in a 3-node lab; BIRD's log shows only "Reloading
channel", for the import side). A filter of another name is never the same (filter_same), so a
changed filter always re-runs the export (and, for an import, asks the peer to resend).
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, replace
from functools import cache

from weft.desired.kinds.bgp import DEFAULT_AS_NUMBER, duration_seconds, secret_value
from weft.model.cluster import BGPConfiguration, BGPPeer, ClusterState, Node, SecretKeyRef
from weft.model.errors import InvalidDesiredState, ValidationError, WeftError

TEMPLATE_PACKAGE = "weft.bgp_config"       # bgp-config/ in the repository, package data once installed
BGP_PORT = 179
KINDS = {"Mesh": "node-to-node mesh", "Node": "node specific", "Global": "global"}
_NAME = re.compile(r"^(Mesh|Node|Global)_([0-9A-Fa-f_]+?)(?:_port_(\d+))?$")
_LOG_CLASSES = {
    "Debug": "all",
    "Info": "{ info, remote, warning, error, auth, fatal, bug, trace }",
    "Warning": "{ warning, error, auth, fatal, bug }",
    "Error": "{ error, auth, fatal, bug }",
    "Fatal": "{ fatal, bug }",
}
_DEBUG = {"Debug": "all", "Info": "{ states }"}
_PASSWORD = re.compile(r'^(\s*password\s+)"[^"\n]*"', re.MULTILINE)
# A log file is rotated by BIRD itself: past this size it is renamed to "<file>.1" (replacing the
# previous one) and a new file is started, so the two never hold more than twice this.
LOG_FILE_LIMIT = 8 * 1024 * 1024
DIGEST_LENGTH = 12                # hex digits of sha256 in filter names: 48 bits, no collisions in practice


@dataclass(frozen=True)
class Session:
    """One BGP session of this node: a `protocol bgp` block."""
    name: str                     # BIRD protocol name, e.g. Mesh_198_18_0_2
    kind: str                     # Mesh | Node | Global
    family: int                   # 4 or 6
    address: str
    port: int
    peer_as: int
    local_as: int
    local_address: str | None     # None: the kernel picks the source (sourceAddress: None)
    peer_node: str | None         # the weft node at that address, if it is one
    passive: bool
    hops: int | None              # None: directly connected; 0: multihop to any distance; N: N hops
    ttl_security: bool
    password: str | None
    next_hop: str | None          # "self" | "keep" | None (BIRD's default)
    rr_client: bool
    rr_cluster_id: str | None
    restart_time: int | None
    keepalive_time: int | None
    export: str                   # "node" or "external": which export filter
    origin: str                   # why it exists, for the description


@dataclass(frozen=True)
class Family:
    """What the configuration holds for one address family."""
    version: int
    pools: tuple[str, ...]
    own_blocks: tuple[str, ...]
    exported_blocks: tuple[str, ...]
    services: tuple[str, ...]
    communities: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]   # (cidr, standard, large)
    peer_blocks: tuple[str, ...] = ()          # other nodes' blocks in pools BGP carries
    definitions: tuple[Definition, ...] = ()   # its filters and functions, as rendered

    @property
    def suffix(self) -> str:
        return f"v{self.version}"

    def filter(self, role: str) -> str:
        """The rendered name of this family's filter for `role` ("import_node", "kernel", ...)."""
        return next(d.name for d in self.definitions if d.role == role)


@dataclass(frozen=True)
class Definition:
    """A BIRD filter or function; `name` is `weft_<role>_v<N>_<digest of kind and body>`."""
    kind: str                     # filter | function
    role: str                     # import_node | import_external | export_node | export_external | kernel | communities
    name: str
    body: str


def render_bird_config(state: ClusterState, node: str, *, socket_path: str | None = None,
                       router_id: str | None = None, hold_time: int | None = None,
                       log_target: str | os.PathLike = "syslog", log_limit: int = LOG_FILE_LIMIT) -> str:
    """BIRD's whole configuration for `node`, byte-identical for the same inputs.

    `hold_time` (seconds) applies to every session (the lab uses a short one); `log_target` is
    "syslog", "stderr" or an absolute file path, which BIRD rotates: past `log_limit` bytes it is
    renamed to "<path>.1" and a new one started. Raises InvalidDesiredState for a BGPPeer or the
    mesh whose password Secret is missing or unusable, WeftError when the node has no address to
    use as router ID.
    """
    me = state.nodes.get(node)
    config = effective_configuration(state, node)
    my_v4 = _address(me, 4)
    router_id = router_id or my_v4
    if router_id is None:
        raise WeftError(f"node {node} has no IPv4 BGP address (Node annotation projectcalico.org/IPv4Address) "
                        "to use as BIRD's router ID")
    sessions = bgp_sessions(state, node)
    reflect = _cluster_id(me) is not None
    families = tuple(replace(f, definitions=_definitions(f, reflect, {s.export for s in sessions
                                                                      if s.family == f.version}))
                     for f in _families(state, node, me, config))
    severity = config.log_severity or "Info"
    return _template().render(
        node=node, router_id=str(ipaddress.IPv4Address(router_id)), socket_path=socket_path,
        log_target=_log_target(log_target, log_limit), log_classes=_LOG_CLASSES[severity],
        debug=_DEBUG.get(severity, "off"),
        families=families, filters={f.version: f.filter for f in families}, sessions=sessions,
        hold_time=hold_time, listen_port=_listen_port(state, node),
    )


def _log_target(target: str | os.PathLike, limit: int) -> str:
    """BIRD's `log` destination: syslog, stderr, or a file BIRD rotates itself."""
    target = os.fspath(target)
    if target in ("syslog", "stderr"):
        return target
    if not target.startswith("/"):
        raise WeftError(f"BIRD's log file must be an absolute path, got {target!r}")
    path = _bird_string(target, "log file")
    return f'"{path}" {int(limit)} "{path}.1"'


def redact(text: str) -> str:
    """The configuration with every BGP password replaced, for plans, diffs and logs."""
    return _PASSWORD.sub(r'\1"(redacted)"', text)


def parse_protocol_name(name: str) -> tuple[str, str, int | None] | None:
    """`Mesh_198_18_0_2` -> ("Mesh", "198.18.0.2", None); None for weft's other protocols."""
    match = _NAME.match(name)
    if not match:
        return None
    parts = match.group(2).split("_")
    text = ".".join(parts) if len(parts) == 4 and all(p.isdigit() for p in parts) else ":".join(parts)
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        return None
    return match.group(1), address, int(match.group(3)) if match.group(3) else None


def protocol_name(kind: str, address: str, port: int) -> str:
    name = f"{kind}_{address.replace('.', '_').replace(':', '_')}"
    return name if port == BGP_PORT else f"{name}_port_{port}"


# --- configuration --------------------------------------------------------------------------

def effective_configuration(state: ClusterState, node: str) -> BGPConfiguration:
    """BGPConfiguration "default" with "node.<node>" on top (each field the node sets wins)."""
    by_name = {c.name: c for c in state.bgp_configurations}
    base = by_name.get("default") or BGPConfiguration("default")
    override = by_name.get(f"node.{node}")
    if override is None:
        return base
    merged = {f: getattr(override, f) if getattr(override, f) not in (None, ()) else getattr(base, f)
              for f in BGPConfiguration.__dataclass_fields__ if f != "name"}
    return BGPConfiguration(name=f"node.{node}", **merged)


def _interface(node: Node | None, version: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    """The node's BGP address of `version` with its subnet (Calico's IPv4Address/IPv6Address)."""
    bgp = node.bgp if node else None
    text = (bgp.ipv4_address if version == 4 else bgp.ipv6_address) if bgp else None
    return ipaddress.ip_interface(text) if text else None


def _address(node: Node | None, version: int) -> str | None:
    interface = _interface(node, version)
    return str(interface.ip) if interface else None


def _seconds(duration: str | None) -> int | None:
    """Whole seconds of a Go duration the converter has checked; None when unset."""
    seconds = duration_seconds(duration) if duration else None
    return round(seconds) if seconds is not None else None


def _peer_ip(p: BGPPeer) -> str:
    """A BGPPeer without peerSelector has a peerIP (the converter refuses one without either)."""
    if p.peer_ip is None:
        raise WeftError(f"BGPPeer {p.name}: neither peerIP nor peerSelector")
    return p.peer_ip


def _cluster_id(node: Node | None) -> str | None:
    return node.bgp.route_reflector_cluster_id if node and node.bgp else None


def _as_of(state: ClusterState, node: Node) -> int:
    if node.bgp and node.bgp.as_number:
        return node.bgp.as_number
    default = next((c for c in state.bgp_configurations if c.name == "default"), None)
    return (default.as_number if default else None) or DEFAULT_AS_NUMBER


def _listen_port(state: ClusterState, node: str) -> int:
    return effective_configuration(state, node).listen_port or BGP_PORT


def _matches(selector, node: Node) -> bool:
    return selector.matches(node.labels)


# --- sessions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Peering:
    kind: str
    family: int
    address: str
    port: int
    peer_as: int
    peer_node: Node | None
    peer: BGPPeer | None


def bgp_sessions(state: ClusterState, node: str) -> tuple[Session, ...]:
    """Every BGP session `node` should have, sorted by protocol name."""
    me = state.nodes.get(node)
    if me is None or me.bgp is None:
        return ()
    found: dict[tuple[int, str, int], _Peering] = {}

    def emit(p: _Peering) -> None:
        if not p.address or _address(me, p.family) is None or p.address == _address(me, p.family):
            return
        found.setdefault((p.family, p.address, p.port), p)   # the first kind to claim an address wins

    peers = sorted(state.bgp_peers, key=lambda p: p.name)
    others = [n for name, n in sorted(state.nodes.items()) if name != node and n.bgp is not None]
    for glob in (True, False):
        for p in peers:
            if (p.node is None and p.node_selector is None) == glob and _applies_to(p, me):
                for peering in _forward(state, p, others, "Global" if glob else "Node"):
                    emit(peering)
    for p in peers:
        if me in _reverse_locals(state, p):
            for other in others:
                if _applies_to(p, other):
                    for version in _reverse_families(p):
                        emit(_node_peering(state, "Node", version, other, p))
    config = effective_configuration(state, node)
    mesh = _Mesh(None, None)
    if config.node_to_node_mesh is not False and _cluster_id(me) is None:
        mesh = _mesh_settings(state, config)
        for other in others:
            if _cluster_id(other) is None:
                for version in (4, 6):
                    emit(_node_peering(state, "Mesh", version, other, None))
    local_as = _as_of(state, me)
    return tuple(sorted((_session(state, me, local_as, p, mesh) for p in found.values()),
                        key=lambda s: s.name))


@dataclass(frozen=True)
class _Mesh:
    """What BGPConfiguration sets for every node-to-node mesh session."""
    password: str | None
    restart_time: int | None


def _mesh_settings(state: ClusterState, config: BGPConfiguration) -> _Mesh:
    """nodeMeshPassword (resolved from its Secret: an error even before the first mesh session
    exists, so a typo shows on the first node) and nodeMeshMaxRestartTime. Both are set only on
    "default" (the converter refuses them elsewhere), so that is the object an error names."""
    password = None
    if config.node_mesh_password is not None:
        password = _secret_password(state, config.node_mesh_password, "BGPConfiguration default",
                                    "spec.nodeMeshPassword")
    restart = config.node_mesh_max_restart_time
    return _Mesh(password, _seconds(restart))


def _applies_to(p: BGPPeer, node: Node) -> bool:
    if p.node is not None:
        return p.node == node.name
    return p.node_selector is None or _matches(p.node_selector, node)


def _node_peering(state: ClusterState, kind: str, version: int, other: Node, p: BGPPeer | None) -> _Peering:
    return _Peering(kind, version, _address(other, version) or "", _listen_port(state, other.name),
                    _as_of(state, other), other, p)


def _forward(state: ClusterState, p: BGPPeer, others: list[Node], kind: str) -> list[_Peering]:
    if p.peer_selector is not None:
        return [_node_peering(state, kind, v, n, p) for n in others if _matches(p.peer_selector, n) for v in (4, 6)]
    peer_ip = _peer_ip(p)
    node = next((n for n in _nodes_at(state, p) if n in others), None)
    port = p.peer_port or (_listen_port(state, node.name) if node else BGP_PORT)
    if p.as_number is None:             # the converter refuses a peerIP peer without asNumber
        raise WeftError(f"BGPPeer {p.name}: peerIP without asNumber")
    return [_Peering(kind, ipaddress.ip_address(peer_ip).version, peer_ip, port, p.as_number, node, p)]


def _nodes_at(state: ClusterState, p: BGPPeer) -> list[Node]:
    """Nodes a peerIP BGPPeer names: same address, same AS, and same port when one is given."""
    return [n for _, n in sorted(state.nodes.items())
            if n.bgp and p.peer_ip in (_address(n, 4), _address(n, 6)) and _as_of(state, n) == p.as_number
            and (p.peer_port is None or p.peer_port == _listen_port(state, n.name))]


def _reverse_locals(state: ClusterState, p: BGPPeer) -> list[Node]:
    """The nodes that are the *peer* side of `p`: they get the reverse peering."""
    if p.peer_selector is not None:
        return [n for _, n in sorted(state.nodes.items()) if n.bgp and _matches(p.peer_selector, n)]
    return _nodes_at(state, p)


def _reverse_families(p: BGPPeer) -> tuple[int, ...]:
    return (4, 6) if p.peer_selector is not None else (ipaddress.ip_address(_peer_ip(p)).version,)


def _session(state: ClusterState, me: Node, local_as: int, p: _Peering, mesh: _Mesh) -> Session:
    peer = p.peer
    my_address = _address(me, p.family)
    ttl = peer.ttl_security if peer else None
    if ttl:
        hops = None if ttl == 1 else ttl
    else:
        mine = _interface(me, p.family)
        hops = None if mine and ipaddress.ip_address(p.address) in mine.network else 0
    next_hop = None
    if peer and peer.next_hop_mode == "Self":
        next_hop = "self"
    elif peer and (peer.next_hop_mode == "Keep" or (peer.keep_original_next_hop and p.peer_as != local_as)):
        next_hop = "keep"
    my_cid = _cluster_id(me)
    rr_client = bool(my_cid) and p.peer_as == local_as and _cluster_id(p.peer_node) != my_cid
    peer_node = p.peer_node.name if p.peer_node else None
    origin = (f"node-to-node mesh with node {peer_node}" if peer is None else
              f"BGPPeer {peer.name}" + (f" (node {peer_node})" if peer_node else ""))
    return Session(
        name=protocol_name(p.kind, p.address, p.port), kind=p.kind, family=p.family, address=p.address,
        port=p.port, peer_as=p.peer_as, local_as=local_as,
        local_address=None if peer and peer.source_address == "None" else my_address,
        peer_node=peer_node,
        passive=p.peer_node is not None and my_address is not None and _after(p.address, my_address),
        hops=hops, ttl_security=bool(ttl), password=mesh.password if p.kind == "Mesh" else _password(state, peer),
        next_hop=next_hop, rr_client=rr_client, rr_cluster_id=my_cid if rr_client else None,
        restart_time=mesh.restart_time if p.kind == "Mesh" else _seconds(peer.max_restart_time if peer else None),
        keepalive_time=_seconds(peer.keepalive_time if peer else None),
        export="node" if p.peer_node is not None else "external", origin=origin,
    )


def _after(address: str, other: str) -> bool:
    """Whether `address` sorts after `other` (both of one family): that end of a session between
    two nodes is passive."""
    return int(ipaddress.ip_address(address)) > int(ipaddress.ip_address(other))


def _password(state: ClusterState, peer: BGPPeer | None) -> str | None:
    if peer is None or peer.password is None:
        return None
    return _secret_password(state, peer.password, f"BGPPeer {peer.name}", "spec.password")


def _secret_password(state: ClusterState, ref: SecretKeyRef, where: str, field: str) -> str:
    """The password `ref` names, checked: InvalidDesiredState naming `where` and `field` else."""
    value = secret_value(state.secrets, ref)
    if value is None:
        raise InvalidDesiredState([ValidationError(
            "desired state", where, f"{field}.secretKeyRef",
            f"no Secret {ref.name!r} with key {ref.key!r} in namespace calico-system or kube-system")])
    if not value or len(value.encode()) > 80 or not value.isprintable() or '"' in value:
        raise InvalidDesiredState([ValidationError(
            "desired state", where, f"{field}.secretKeyRef",
            f"Secret {ref.name!r} key {ref.key!r}: a BGP password must be 1-80 bytes of printable text "
            "without double quotes (BIRD cannot quote them)")])
    return value


# --- address families -----------------------------------------------------------------------

def _families(state: ClusterState, node: str, me: Node | None, config: BGPConfiguration) -> tuple[Family, ...]:
    pools = sorted(state.ippools, key=lambda p: (ipaddress.ip_network(p.cidr).version, p.cidr))
    own = sorted({b.cidr for b in state.blocks if b.node == node}, key=_net_key)
    no_export = [ipaddress.ip_network(p.cidr) for p in pools if p.disable_bgp_export]
    exported = [b for b in own if not any(_within(b, pool) for pool in no_export)]
    carried = [ipaddress.ip_network(p.cidr) for p in pools if not p.disable_bgp_export]
    peer_blocks = sorted({b.cidr for b in state.blocks
                          if b.node != node and any(_within(b.cidr, pool) for pool in carried)}, key=_net_key)
    services = sorted({*config.service_cluster_ips, *config.service_external_ips,
                       *config.service_loadbalancer_ips}, key=_net_key)
    families = []
    for version in (4, 6):
        def mine(cidrs, v=version):
            return tuple(c for c in cidrs if ipaddress.ip_network(c).version == v)
        pool_cidrs = mine([p.cidr for p in pools])
        if version == 6 and not pool_cidrs and not mine(own) and _address(me, 6) is None:
            continue
        rules = []
        for advert in config.prefix_advertisements:
            if ipaddress.ip_network(advert.cidr).version == version and advert.communities:
                standard = tuple(f"({c.replace(':', ', ')})" for c in advert.communities if c.count(":") == 1)
                large = tuple(f"({c.replace(':', ', ')})" for c in advert.communities if c.count(":") == 2)
                rules.append((advert.cidr, standard, large))
        families.append(Family(version, pool_cidrs, mine(own), mine(exported), mine(services), tuple(rules),
                               mine(peer_blocks)))
    return tuple(families)


def _definitions(f: Family, reflect: bool, peers: set[str]) -> tuple[Definition, ...]:
    """The family's filters (those its sessions use: `peers` holds "node" and/or "external", plus
    the kernel's) and the functions they call, each named by a digest of its body: see the module
    docstring. A function's digest is part of the body of every filter calling it."""
    macros = _template("filters.j2").module
    found: list[Definition] = []

    def define(kind: str, role: str, body: str) -> str:
        digest = hashlib.sha256(f"{kind}\n{body}".encode()).hexdigest()[:DIGEST_LENGTH]
        found.append(Definition(kind, role, f"weft_{role}_{f.suffix}_{digest}", body))
        return found[-1].name

    communities = define("function", "communities", str(macros.communities(f))) if f.communities and peers else None
    for kind in sorted(peers):
        define("filter", f"import_{kind}", str(getattr(macros, f"import_{kind}")(f)))
        define("filter", f"export_{kind}", str(macros.export(f, kind, reflect, communities)))
    define("filter", "kernel", str(macros.kernel(f)))
    return tuple(found)


def _net_key(cidr: str):
    net = ipaddress.ip_network(cidr)
    return net.version, net.network_address, net.prefixlen


def _within(cidr: str, pool) -> bool:
    net = ipaddress.ip_network(cidr)
    return net.version == pool.version and net.subnet_of(pool)


def _bird_string(value: str, what: str) -> str:
    if '"' in value or "\n" in value:
        raise WeftError(f"{what} {value!r} cannot be written in BIRD's configuration (a double quote or newline)")
    return value


@cache
def _template(name: str = "bird.conf.j2"):
    """A template, loaded on first use: jinja2 costs ~30 ms to import, and most runs render no
    BIRD config (BGP off, or nothing changed)."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, "."), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    return env.get_template(name)
