"""weft touches nothing it does not own.

A fresh lab node first gets the kind of state a real node carries (kube-proxy's and Docker's
chains, rules in the built-in chains, a foreign ipset with members, a nat chain, and a chain and
set whose names begin with "weft" but not "weft-"). Then weft applies policies, foreign rules are
slipped in right before and right after weft's jump rules, weft applies changed policies, and
finally destroys. After every step the iptables (both backends) and ipset state, with weft's own
lines taken out, is byte-for-byte what it was; after the destroy there is nothing of weft's left.
"""
from __future__ import annotations

import re

import pytest

from tests.matrices import (
    SCENARIOS,
    Expect,
    describe,
    diff,
    kernel_state,
    require_lab,
    state_diff,
    weft,
    weft_leftovers,
    without_weft,
    write_source,
)

FOREIGN_IPSETS = """\
create KUBE-xyz hash:ip family inet hashsize 1024 maxelem 65536 comment
add KUBE-xyz 198.18.250.1 comment "kube-system/coredns:dns"
add KUBE-xyz 198.18.250.2
create KUBE-nets hash:net family inet hashsize 1024 maxelem 65536 counters
add KUBE-nets 198.18.254.0/24 packets 0 bytes 0
create weftish hash:ip family inet hashsize 1024 maxelem 65536
add weftish 198.18.253.1
"""

# Nothing here matches lab traffic (198.18.1.0/24 pods): the policies still decide.
FOREIGN_IPTABLES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
:weftish - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -m set --match-set KUBE-xyz src -j ACCEPT
-A FORWARD -s 198.18.253.0/24 -j weftish
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -d 198.18.251.1/32 -j DROP
-A KUBE-SERVICES -d 198.18.200.10/32 -p tcp -m comment --comment "default/kubernetes:https has no endpoints" \
-m tcp --dport 443 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-SERVICES -m set --match-set KUBE-nets dst -j RETURN
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A DOCKER -d 198.18.252.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-USER -j RETURN
-A weftish -m set --match-set weftish src -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-POSTROUTING - [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -s 198.18.250.0/24 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
"""

BUILTIN = ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING")


def weft_hooks(save: str) -> list[tuple[str, str, int]]:
    """(table, chain, 1-based position) of every weft jump rule in a built-in chain."""
    hooks, table, positions = [], None, {}
    for line in save.splitlines():
        if line.startswith("*"):
            table, positions = line[1:], {}
        m = re.match(r"-A (\S+) ", line)
        if m:
            positions[m.group(1)] = positions.get(m.group(1), 0) + 1
            if m.group(1) in BUILTIN and re.search(r"\s-[jg] weft-", line):
                hooks.append((table, m.group(1), positions[m.group(1)]))
    return hooks


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    require_lab()
    from weft.playbooks.netlab import NodeLab, pods_from_manifests

    cluster = write_source(tmp_path_factory.mktemp("cluster"))
    with NodeLab(pods_from_manifests(cluster, "lab-node")) as lab:
        done = lab.node_run(["ipset", "restore"], input=FOREIGN_IPSETS)
        assert done.returncode == 0, describe(done)
        done = lab.node_run(["iptables-restore", "-w"], input=FOREIGN_IPTABLES)
        assert done.returncode == 0, describe(done)
        yield lab


def check_foreign_unchanged(lab, foreign, step):
    now = kernel_state(lab)
    changed = state_diff(without_weft(foreign), without_weft(now))
    assert not changed, f"{step} changed state weft does not own (weft's own lines left out):\n{changed}"
    return now


def test_weft_leaves_foreign_state_alone(node, tmp_path):
    lab, state = node, tmp_path / "state"
    foreign = kernel_state(lab)
    assert "KUBE-SERVICES" in foreign["iptables-nft-save"] and "KUBE-xyz" in foreign["ipset save"]
    assert not weft_leftovers(foreign)

    # 1. First apply, among the foreign chains.
    first = write_source(tmp_path / "first", SCENARIOS / "several-policies-union.yaml",
                         SCENARIOS / "ip-block-except.yaml")
    done = weft(lab, ["apply"], first, state)
    assert done.returncode == 0, describe(done)
    now = check_foreign_unchanged(lab, foreign, "the first apply")
    saves = now["iptables-nft-save"] + now["iptables-legacy-save"]
    hooks = weft_hooks(now["iptables-nft-save"])
    assert hooks, f"weft hooked no built-in chain of the nft backend:\n{saves}"
    # The policies still work with the foreign rules in the path.
    expected = (Expect().isolate_ingress("x/*")
                .allow_ingress(dst="x/a", src="y/*", ports="tcp/80")
                .allow_ingress(dst="x/a", src="x/b")
                .allow_ingress(dst="x/a", src=["x/*", "z/*"])     # ip-block-except's a-from-block
                .isolate_egress("z/b").allow_egress(src="z/b", dst=["x/a", "x/c"])).matrix()
    differences = diff(expected, lab.matrix())
    assert not differences, "\n".join(["policies not enforced among foreign rules:", *differences])

    # 2. Someone else adds rules right before and right after each weft jump rule.
    # Last hook first, and "after" before "before", so no insertion moves a position still to use.
    for n, (table, chain, position) in enumerate(sorted(hooks, key=lambda h: -h[2])):
        for where, at in (("after", position + 1), ("before", position)):
            rule = ["-d", f"198.18.249.{n + 1}/32", "-m", "comment", "--comment", f"foreign {where} weft",
                    "-j", "ACCEPT"]
            done = lab.node_run(["iptables", "-w", "-t", table, "-I", chain, str(at), *rule])
            assert done.returncode == 0, describe(done)
    foreign = without_weft(kernel_state(lab))
    assert foreign["iptables-nft-save"].count("foreign before weft") == len(hooks)

    # 3. Changed policies.
    second = write_source(tmp_path / "second", SCENARIOS / "policy-types.yaml",
                          SCENARIOS / "egress-named-port.yaml")
    done = weft(lab, ["apply"], second, state)
    assert done.returncode == 0, describe(done)
    check_foreign_unchanged(lab, foreign, "the apply of changed policies")

    # 4. Destroy: exactly the foreign state remains.
    done = weft(lab, ["apply", "--destroy"], second, state)
    assert done.returncode == 0, describe(done)
    now = check_foreign_unchanged(lab, foreign, "apply --destroy")
    assert not weft_leftovers(now), "\n".join(["left behind by apply --destroy:", *weft_leftovers(now)])
