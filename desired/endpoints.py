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
