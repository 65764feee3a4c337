"""Names shared by every part of weft that touches a pod's interface.

The host side of a pod's veth is named by a fixed rule, so that the CNI plugin, the reconciler,
tests and users' own tools agree on it without coordinating: "weft" followed by the first 11 hex
digits of sha1("<namespace>.<pod name>") -- 15 characters, the kernel's limit for a link name.
"""
import hashlib

HOST_IFACE_PREFIX = "weft"


def host_iface_name(namespace: str, pod: str) -> str:
    """The host-side veth name of pod `namespace/pod`."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    return HOST_IFACE_PREFIX + digest[:11]


# weft's own routes (to pods, blackholes for its blocks) carry this route protocol, so a
# process with no memory can tell them from everyone else's: `ip route show proto 201`.
ROUTE_PROTOCOL = 201


def host_sysctls(host_iface: str, ipv6: bool) -> dict[str, str]:
    """The host side's settings: forward the pod's traffic, drop what it sends from an address
    that is not routed back through it (strict rp_filter: no spoofing), take no router adverts."""
    out = {f"net/ipv4/conf/{host_iface}/forwarding": "1", f"net/ipv4/conf/{host_iface}/rp_filter": "1"}
    if ipv6:
        out |= {f"net/ipv6/conf/{host_iface}/forwarding": "1", f"net/ipv6/conf/{host_iface}/accept_ra": "0"}
    return out


# A policy's chain for one direction (renderers.iptables.policy_chain_name): "weft-pi-<hash>"
# for ingress, "weft-po-<hash>" for egress, the hash lowercase base32. The CNI snapshot names
# policies only by these; anything else read there is refused.
POLICY_CHAIN_PATTERNS = {"ingress": r"weft-pi-[a-z2-7]{1,20}", "egress": r"weft-po-[a-z2-7]{1,20}"}
