"""Converters for Calico's IPAM kinds: IPPool, IPAMBlock, BlockAffinity (both apiVersions).

Owned by the IPAM work (issue #3); each converter takes a Checker and the raw object and
returns a model value (desired.model.IPPool / Block) or None, recording problems on the checker.
"""
from __future__ import annotations

from desired.validation import Checker


def ippool(check: Checker, raw: dict):
    raise NotImplementedError("IPPool conversion: issue #3")


def ipam_block(check: Checker, raw: dict):
    raise NotImplementedError("IPAMBlock conversion: issue #3")


def block_affinity(check: Checker, raw: dict):
    raise NotImplementedError("BlockAffinity conversion: issue #3")
