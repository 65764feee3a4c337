"""Parsing the kernel tools' dumps (no kernel needed): `ipset save` as the kernel prints it."""
from __future__ import annotations

from weft.model.kernel import IpSet
from weft.probes.ipsets import parse_save

SAVE = """create other-set hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1
add other-set 198.18.0.1
create weft-s-aaa hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x2
add weft-s-aaa 198.18.0.10
add weft-s-aaa 198.18.0.11
create weft-s-empty hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x3
create weft-p-bbb hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x4
add weft-p-bbb 198.18.0.10,tcp:8080
add weft-p-bbb 198.18.0.11,udp:53 timeout 0
create weft-n-six hash:net family inet6 hashsize 1024 maxelem 65536 bucketsize 12 initval 0x5
add weft-n-six 2001:db8::/32
create weft-s-aaax hash:ip hashsize 1024
add weft-s-aaax 198.18.0.12
"""


def test_ipset_save_gives_weft_sets_with_members_type_and_family():
    assert parse_save(SAVE) == {
        "weft-s-aaa": IpSet("weft-s-aaa", "hash:ip", frozenset({"198.18.0.10", "198.18.0.11"})),
        "weft-s-empty": IpSet("weft-s-empty", "hash:ip", frozenset()),
        "weft-p-bbb": IpSet("weft-p-bbb", "hash:ip,port", frozenset({"198.18.0.10,tcp:8080", "198.18.0.11,udp:53"})),
        "weft-n-six": IpSet("weft-n-six", "hash:net", frozenset({"2001:db8::/32"}), "inet6"),
        "weft-s-aaax": IpSet("weft-s-aaax", "hash:ip", frozenset({"198.18.0.12"})),
    }


def test_empty_dump():
    assert parse_save("") == {}
