"""weft's Calico tables (nat: natOutgoing, mangle: preDNAT, raw: doNotTrack; both IP families) and
the two iptables backends (nft, legacy): after a backend switch, or when copied there by hand,
weft's chains and hook rules in those tables of the backend a run does not use are drift, named
by table and backend ("nat@nft/weft-nat-outgoing"), and apply removes them (and only them: the
foreign rules of those tables stay byte for byte), as it always did for the filter table.

A real node namespace and the real `weft` command; no traffic (the rules' effects are
test_calico_nat's and test_calico_kernel's).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import nodens
from tests.nodens import WeftNode, iptables_save, namespace, pod, split_iptables_save, weft_names, write_manifests

if (why := nodens.usable()) is not None:
    pytest.skip(why, allow_module_level=True)

node_ns = nodens.node_ns
CALICO = "projectcalico.org/v3"
TABLES = ("nat", "mangle", "raw")


def calico(kind: str, name: str, spec: dict, **labels: str) -> dict:
    return {"apiVersion": CALICO, "kind": kind, "metadata": {"name": name, "labels": labels}, "spec": spec}


EDGE = {"applyOnForward": True}
STATE = [
    namespace("ns1"), pod("ns1", "a", "198.18.4.1", ip6="2001:db8:4::1"),
    calico("IPPool", "v4", {"cidr": "198.18.4.0/24", "natOutgoing": True}),
    calico("IPPool", "v6", {"cidr": "2001:db8:4::/48", "natOutgoing": True}),
    calico("HostEndpoint", "n1-eth0", {"node": nodens.NODE, "interfaceName": "eth0"}, role="edge"),
    calico("GlobalNetworkPolicy", "pre", {"selector": "role == 'edge'", "preDNAT": True, **EDGE,
                                          "ingress": [{"action": "Deny", "protocol": "TCP",
                                                       "destination": {"ports": [9999]}}]}),
    calico("GlobalNetworkPolicy", "untracked", {"selector": "role == 'edge'", "doNotTrack": True, **EDGE,
                                                "types": ["Ingress", "Egress"],
                                                "ingress": [{"action": "Allow", "protocol": "UDP"}],
                                                "egress": [{"action": "Allow", "protocol": "UDP"}]}),
]
# Foreign rules in the tables weft shares, in both backends: never touched.
FOREIGN = ("*nat\n:OTHER-SNAT - [0:0]\n-A POSTROUTING -j OTHER-SNAT\n-A OTHER-SNAT -s 198.18.200.0/24 -j RETURN\n"
           "COMMIT\n*mangle\n-A PREROUTING -p udp --dport 4789 -j MARK --set-xmark 0x1/0x1\nCOMMIT\n"
           "*raw\n-A OUTPUT -p udp --dport 4789 -j CT --notrack\nCOMMIT\n")


def table_part(ns: str, backend: str, family: int, table: str) -> dict[str, str]:
    """weft's and the foreign lines of one table of one backend ("" when the table is not there)."""
    save = iptables_save(ns, backend, family)
    text, keep = [], False
    for line in save.splitlines():
        if line.startswith("*"):
            keep = line == f"*{table}"
        if keep:
            text.append(line)
    return split_iptables_save("\n".join(text))


def weft_tables(ns: str, backend: str) -> set[str]:
    """The labels ("nat", "raw6", ...) of the tables of `backend` holding weft's chains or hooks."""
    return {f"{t}{'6' if f == 6 else ''}" for f in (4, 6) for t in TABLES if table_part(ns, backend, f, t)["weft"]}


def foreign_parts(ns: str) -> dict:
    return {(b, f, t): table_part(ns, b, f, t)["foreign"] for b in ("nft", "legacy") for f in (4, 6) for t in TABLES}


def add_foreign(ns: str) -> None:
    for backend in ("nft", "legacy"):
        for tool in ("iptables", "ip6tables"):
            rules = FOREIGN if tool == "iptables" else FOREIGN.replace("198.18.200.0/24", "2001:db8:200::/48")
            nodens.in_ns(ns, f"{tool}-{backend}-restore", "--noflush", stdin=rules)


ALL = {"nat", "mangle", "raw", "nat6", "mangle6", "raw6"}


@pytest.mark.parametrize("first,second", [("nft", "legacy"), ("legacy", "nft")])
def test_switching_backend_moves_calico_tables(node_ns, tmp_path: Path, first: str, second: str):
    """Apply with one backend, then with the other: the first backend's nat, mangle and raw
    chains and hooks (both families) go with its filter chains; the foreign rules stay."""
    add_foreign(node_ns)
    foreign = foreign_parts(node_ns)
    src = write_manifests(tmp_path / "src", STATE)
    WeftNode(node_ns, tmp_path / "state", first).weft("apply", from_dir=src)
    assert weft_tables(node_ns, first) == ALL, "the state renders weft's chains in every Calico table"
    switched = WeftNode(node_ns, tmp_path / "state", second)
    plan = switched.weft_json("plan", from_dir=src)
    removed = {c["table"] for c in plan["changes"]["chains"] if c["action"] == "delete"}
    assert {f"{t}@{first}" for t in ALL} <= removed, removed
    switched.weft("apply", from_dir=src)
    assert weft_tables(node_ns, first) == set(), f"weft's chains left in the {first} backend"
    assert "weft" not in iptables_save(node_ns, first) + iptables_save(node_ns, first, 6)
    assert weft_tables(node_ns, second) == ALL
    assert foreign_parts(node_ns) == foreign
    auto = WeftNode(node_ns, tmp_path / "state", None)
    auto.weft("drift", from_dir=src, expect=0)
    auto.weft("apply", "--destroy")
    assert weft_names(node_ns) == []
    assert foreign_parts(node_ns) == foreign


def test_calico_tables_left_in_the_other_backend_are_drift(node_ns, tmp_path: Path):
    """weft's nat/mangle/raw chains copied into the backend the node does not use (a crash between
    two backends, an old node image, an older weft that removed only filter's) while that
    backend has no weft filter chain: drift names each table and chain, apply removes them."""
    add_foreign(node_ns)
    foreign = foreign_parts(node_ns)
    src = write_manifests(tmp_path / "src", STATE)
    legacy = WeftNode(node_ns, tmp_path / "state", "legacy")
    legacy.weft("apply", from_dir=src)
    for tool in ("iptables", "ip6tables"):
        for table in TABLES:
            save = nodens.in_ns(node_ns, f"{tool}-legacy-save", "-t", table)
            weft = [ln for ln in save.splitlines() if ln.startswith((":weft-", "*", "COMMIT")) or
                    (ln.startswith("-A ") and "weft" in ln)]
            subprocess.run(["ip", "netns", "exec", node_ns, f"{tool}-nft-restore", "--noflush"],
                           input="\n".join(weft) + "\n", text=True, check=True)
    assert weft_tables(node_ns, "nft") == ALL and "weft-FORWARD" not in iptables_save(node_ns, "nft")

    auto = WeftNode(node_ns, tmp_path / "state", None)
    drift = auto.weft("drift", from_dir=src, expect=None)
    assert drift.returncode == 2, "weft's Calico tables in the nft backend are not reported:\n" + nodens.describe(drift)
    for named in ("nat@nft/weft-nat-outgoing", "mangle@nft/weft-PREROUTING", "raw@nft/weft-PREROUTING",
                  "raw@nft/weft-OUTPUT", "nat6@nft/weft-nat-outgoing", "raw6@nft/weft-OUTPUT",
                  "nat@nft/POSTROUTING", "raw6@nft/PREROUTING"):
        assert named in drift.stdout, f"{named} not in the drift:\n{drift.stdout}"
    applied = auto.weft_json("apply", from_dir=src)
    assert "iptables-nft-restore --noflush" in applied["commands"], applied["commands"]
    assert weft_tables(node_ns, "nft") == set() and "weft" not in iptables_save(node_ns, "nft", 6)
    assert weft_tables(node_ns, "legacy") == ALL
    assert foreign_parts(node_ns) == foreign
    auto.weft("drift", from_dir=src, expect=0)
    auto.weft("apply", "--destroy")
    assert weft_names(node_ns) == [] and foreign_parts(node_ns) == foreign
