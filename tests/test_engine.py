"""The resource engine itself on a real kernel: the declared order, verify judging only what the
plan touched, and what it reports when a write did not land as planned."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.nodens import REPO, in_ns, node_ns, usable
from weft.model.kernel import Chain, Dataplane, IpSet
from weft.probes.backend import Backend
from weft.reconciler import engine
from weft.reconciler.ipsets import IpSets
from weft.reconciler.links import InterfaceSettings
from weft.reconciler.rendered import RenderedNode
from weft.reconciler.resource import Phase, Restore
from weft.reconciler.routes import Routes
from weft.reconciler.tables import Table

pytestmark = pytest.mark.skipif(usable() is not None, reason=usable() or "")
node_ns = node_ns  # the fixture

VERIFY = """
import json
from weft.model.kernel import Chain, Dataplane
from weft.probes.runner import Runner
from weft.reconciler import engine
from weft.reconciler.rendered import RenderedNode
r = Runner()
backend, resources = engine.kernel_resources(r, "nft")
found = engine.start_probe(resources, r)()
# iptables prints this rule with "-m tcp": what lands is not what was planned
dp = Dataplane({("filter", "weft-x"): Chain("filter", "weft-x", ("-A weft-x -p tcp --dport 80 -j ACCEPT",))}, {}, {})
planned = engine.plan(resources, backend, found.have, RenderedNode(dp))
engine.execute(planned, r)
r.run(["iptables-nft", "-t", "filter", "-N", "weft-meanwhile"])     # a write the plan did not make
left = engine.verify(planned, r)
print(json.dumps({name: [c.name for c in changes] for name, changes in left.items()}))
"""


def test_verify_judges_only_what_the_plan_touched(node_ns):
    done = subprocess.run(["ip", "netns", "exec", node_ns, sys.executable, "-c", VERIFY], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    untouched = {t: [] for t in ("filter6", "nat", "mangle", "raw", "nat6", "mangle6", "raw6")}
    assert json.loads(done.stdout) == {"ipsets": [], "filter": ["weft-x"], **untouched, "routes": [], "links": []}
    assert "weft-meanwhile" in in_ns(node_ns, "iptables-nft-save", "-t", "filter")


def test_writes_run_in_the_declared_order():
    """New sets before the table that uses them; the table's transaction commits the sets' step
    (and would undo it); sets no longer used go last; routes after the table."""
    from weft.model.kernel import Route
    backend = Backend("nft")
    resources = [IpSets(), Table("filter", backend, main=True), Routes(), InterfaceSettings()]
    have = {"ipsets": {"weft-s-old": IpSet("weft-s-old", "hash:ip", frozenset({"198.18.0.1"}))},
            "filter": Table("filter", backend, True).want(RenderedNode(Dataplane({}, {}, {}))),
            "routes": Routes().want(RenderedNode(Dataplane({}, {}, {}))), "links": {}}
    have["routes"] = type(have["routes"])({}, frozenset({"weft0123456789a"}))
    dp = Dataplane({("filter", "weft-x"): Chain("filter", "weft-x", ("-A weft-x -m set --match-set weft-s-new src "
                                                                     "-j ACCEPT",))},
                   {"weft-s-new": IpSet("weft-s-new", "hash:ip", frozenset({"198.18.0.2"}))}, {},
                   {"198.18.0.2/32": Route("198.18.0.2/32", "weft0123456789a")})
    planned = engine.plan(resources, backend, have, RenderedNode(dp), check=False)
    steps = planned.steps()
    what = [(type(s.write).__name__, s.write.text.split("\n")[0] if isinstance(s.write, Restore) else s.what,
             s.commits, s.undo is not None) for s in steps]
    assert what == [("Restore", "create weft-s-new hash:ip family inet hashsize 1024 maxelem 65536", False, True),
                    ("Restore", "*filter", True, False),
                    ("RouteWrite", "route replace 198.18.0.2/32", False, False),
                    ("Restore", "destroy weft-s-old", False, False)]
    assert [r.steps(planned.changes[r.name], Phase.PREPARE) for r in resources] == [[], [], [], []]
