"""Converters for the BGP kinds: BGPConfiguration, BGPPeer (both Calico apiVersions) and the
Secrets that peers' passwords refer to.

Owned by the BGP work (issue #4); each converter takes a Checker and the raw object and returns
a model value (desired.model.BGPConfiguration / BGPPeer / Secret) or None.
"""
from __future__ import annotations

from desired.validation import Checker


def bgp_configuration(check: Checker, raw: dict):
    raise NotImplementedError("BGPConfiguration conversion: issue #4")


def bgp_peer(check: Checker, raw: dict):
    raise NotImplementedError("BGPPeer conversion: issue #4")


def secret(check: Checker, raw: dict):
    raise NotImplementedError("Secret conversion: issue #4")
