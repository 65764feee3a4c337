"""Sets sized for their members, on a real kernel (issue #14.0).

ipset's default maxelem is 65536: a set made without a size refuses its 65,537th member with
"Hash is full", so a policy whose peers are more pods than that could never be applied. weft
creates each set with a maxelem and hashsize from its member count (room for half again), and a
set that must outgrow its size is made anew under a temporary name, filled, swapped in and the
old one destroyed: the rules using it never see it missing or partly filled. These tests drive
the resource engine (what `weft apply` runs) in a namespace of their own with sets of 70,000
members, in both families; the sizing arithmetic itself is checked without a kernel.
"""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import pytest

from tests.nodens import REPO, in_ns, node_ns, usable
from weft.reconciler.ipsets import MAX_MAXELEM, set_size

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node_ns = node_ns  # the fixture

BIG = 70_000                    # past ipset's default maxelem (65536)

# One chain per family matching one peers set per family of `count` members; `mode` plan: print
# the plan; apply: run it and print what still differs afterwards.
RUN = """
import ipaddress, json, sys
from weft.model.kernel import Chain, Dataplane, IpSet
from weft.probes.runner import Runner
from weft.reconciler import engine
from weft.reconciler.rendered import RenderedNode
count, mode = int(sys.argv[1]), sys.argv[2]
v4 = int(ipaddress.IPv4Address("198.18.0.0"))
v6 = int(ipaddress.IPv6Address("2001:db8:7::"))
sets = {"weft-s-big": IpSet("weft-s-big", "hash:ip", frozenset(
            str(ipaddress.IPv4Address(v4 + i)) for i in range(count)), "inet", about="many peers"),
        "weft-s6-big": IpSet("weft-s6-big", "hash:ip", frozenset(
            str(ipaddress.IPv6Address(v6 + i)) for i in range(count)), "inet6", about="many peers")}
chains = {("filter", "weft-big"): Chain("filter", "weft-big",
                                        ("-A weft-big -m set --match-set weft-s-big src -j ACCEPT",)),
          ("filter6", "weft-big"): Chain("filter6", "weft-big",
                                         ("-A weft-big -m set --match-set weft-s6-big src -j ACCEPT",))}
dp = Dataplane(chains, sets, {}) if count else Dataplane({}, {}, {})
r = Runner()
backend, resources = engine.kernel_resources(r, "nft")
planned = engine.plan(resources, backend, engine.start_probe(resources, r)().have, RenderedNode(dp))
out = {"text": "\\n".join(line for line in planned.text_blocks() if not line.startswith("      ")),
       "drift": [i for i in planned.drift_items() if i["kind"] != "ipset-member"],
       "members": {c["name"]: [len(c["add"]), len(c["remove"]), len(c["keep"])]
                   for c in planned.sections()["ipsets"]},
       "empty": planned.empty}
if mode == "apply":
    engine.execute(planned, r)
    out["left"] = {name: [c.name for c in changes] for name, changes in engine.verify(planned, r).items()}
print(json.dumps(out))
"""


def weft_sets(ns: str, count: int, mode: str = "apply") -> dict:
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", RUN, str(count), mode],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if mode == "apply":
        assert not any(out["left"].values()), f"what did not land: {out['left']}"
    return out


def header(ns: str, name: str) -> dict[str, str]:
    """`ipset list -t` of one set: Header fields and the entry count."""
    fields = dict(line.split(": ", 1) for line in in_ns(ns, "ipset", "list", "-t", name).splitlines() if ": " in line)
    head = fields["Header"].split()
    return {**dict(zip(head[::2], head[1::2], strict=False)), "entries": fields["Number of entries"]}


def replace_by_hand(ns: str, name: str, family: str, maxelem: int, members: list[str]) -> None:
    """Swap a set of this size and these members in for `name`, as an operator's script might."""
    script = [f"create hand-{name} hash:ip family {family} maxelem {maxelem}",
              *(f"add hand-{name} {m}" for m in members), f"swap hand-{name} {name}", f"destroy hand-{name}"]
    in_ns(ns, "ipset", "restore", stdin="\n".join(script) + "\n")


def test_a_set_outgrowing_its_size_is_swapped_for_a_bigger_one(node_ns):
    weft_sets(node_ns, 1000)
    assert {k: header(node_ns, "weft-s-big")[k] for k in ("family", "hashsize", "maxelem", "entries")} == \
        {"family": "inet", "hashsize": "1024", "maxelem": "65536", "entries": "1000"}

    plan = weft_sets(node_ns, BIG, "plan")
    for name in ("weft-s-big", "weft-s6-big"):
        assert (f"{BIG} members outgrow its maxelem 65536: a set of maxelem 131072 is filled as "
                f"weft-t-{name[5:]} and swapped in") in plan["text"]
        assert f"-/+ ipset {name} (hash:ip, maxelem 65536 -> 131072)" in plan["text"]
        assert plan["members"][name] == [BIG - 1000, 0, 1000]
    assert plan["drift"] == [{"kind": "ipset", "name": n, "problem": f"too small (maxelem 65536, {BIG} members wanted)"}
                             for n in ("weft-s-big", "weft-s6-big")]
    assert "chain" not in plan["text"], "the rules keep using the set: no chain is touched"

    weft_sets(node_ns, BIG)
    for name, family in (("weft-s-big", "inet"), ("weft-s6-big", "inet6")):
        assert {k: header(node_ns, name)[k] for k in ("family", "hashsize", "maxelem", "entries")} == \
            {"family": family, "hashsize": "65536", "maxelem": "131072", "entries": str(BIG)}
    assert [n for n in in_ns(node_ns, "ipset", "list", "-n").split() if n.startswith("weft-t-")] == []
    assert "--match-set weft-s-big src" in in_ns(node_ns, "iptables-nft-save", "-t", "filter")
    assert "--match-set weft-s6-big src" in in_ns(node_ns, "ip6tables-nft-save", "-t", "filter")
    assert weft_sets(node_ns, BIG, "plan")["empty"], "a second run changes nothing"

    weft_sets(node_ns, 0)
    assert [n for n in in_ns(node_ns, "ipset", "list", "-n").split() if n.startswith("weft-")] == []


def test_a_set_made_big_at_once_and_resized_by_hand(node_ns):
    """A set past 65,536 members from the start is created big; made bigger by hand it is not
    drift; swapped for one too small (members lost) it is, and the repair grows it back, also
    over a temporary set an interrupted resize left behind."""
    weft_sets(node_ns, BIG)
    assert header(node_ns, "weft-s6-big")["maxelem"] == "131072"
    members = [str(ipaddress.IPv4Address("198.18.0.0") + i) for i in range(BIG)]     # RUN's

    replace_by_hand(node_ns, "weft-s-big", "inet", 262144, members)
    assert weft_sets(node_ns, BIG, "plan")["empty"], "a set bigger than needed holding its members is no drift"

    replace_by_hand(node_ns, "weft-s-big", "inet", 65536, members[:60_000])
    in_ns(node_ns, "ipset", "create", "weft-t-s-big", "hash:ip", "maxelem", "65536")   # a resize killed half-way
    plan = weft_sets(node_ns, BIG, "plan")
    assert {"kind": "ipset", "name": "weft-s-big", "problem": f"too small (maxelem 65536, {BIG} members wanted)"} \
        in plan["drift"]
    assert {"kind": "ipset", "name": "weft-t-s-big", "problem": "unexpected"} in plan["drift"]
    assert plan["members"]["weft-s-big"] == [10_000, 0, 60_000]
    weft_sets(node_ns, BIG)
    assert {k: header(node_ns, "weft-s-big")[k] for k in ("maxelem", "entries")} == \
        {"maxelem": "131072", "entries": str(BIG)}
    assert "weft-t-s-big" not in in_ns(node_ns, "ipset", "list", "-n").split()
    weft_sets(node_ns, 0)


@pytest.mark.parametrize("members, hashsize, maxelem", [
    (0, 1024, 65536), (1000, 1024, 65536), (43690, 32768, 65536),
    (43691, 32768, 65536), (43692, 32768, 131072), (BIG, 65536, 131072), (150_000, 131072, 262144)])
def test_set_size_leaves_room_for_half_again(members, hashsize, maxelem):
    assert set_size(members) == (hashsize, maxelem)
    assert members + members // 2 <= maxelem


def test_set_size_stops_at_weft_s_largest_set():
    assert set_size(10**9)[1] == MAX_MAXELEM
