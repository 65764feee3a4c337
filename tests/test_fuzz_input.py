"""Hostile desired state, generated: every converter and the manifest loader either succeed or
refuse with clear errors naming the file, the object and the field; never another exception.

For every kind weft reads (desired.loader.KINDS: Kubernetes, IPAM and BGP kinds, both Calico
apiVersions), a valid object is mutated at random: any value replaced by any other (mappings,
lists, huge integers, dates, bytes, sets, long or odd strings, keys that are not strings), keys
deleted or added. The result goes through build_cluster_state directly and, written as YAML
(aliases where the values are shared, and text-level damage), through the manifest loader; a
state that loads is rendered too. What a refused run leaves in a real kernel is checked by
tests/test_bad_input.py (the same inputs through `weft apply`: exit 1, nothing changed).
"""
from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.desired.bounds import BoundExceeded, ValueBudget
from weft.desired.loader import KINDS, build_cluster_state
from weft.desired.manifests import load_manifest_dir
from weft.model.errors import InvalidDesiredState, SourceError, ValidationError, WeftError
from weft.renderers.iptables import render_node

NODE = "n1"
FILE = "fuzz.yaml"
CALICO = "projectcalico.org/v3"

# One valid object per kind, using every field the converters read.
BASE: dict[str, dict] = {
    "Namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labels": {"team": "a"}}},
    "Node": {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": NODE, "labels": {"rack": "r1"},
        "annotations": {"projectcalico.org/IPv4Address": "198.18.0.1/24", "projectcalico.org/ASNumber": "64512",
                        "projectcalico.org/RouteReflectorClusterID": "244.0.0.1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]}},
    "Pod": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x", "labels": {"app": "web"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": "198.18.4.2", "podIPs": [{"ip": "198.18.4.2"}]}},
    "NetworkPolicy": {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                      "metadata": {"name": "np", "namespace": "x"},
                      "spec": {"podSelector": {"matchLabels": {"app": "web"},
                                               "matchExpressions": [{"key": "t", "operator": "In", "values": ["a"]}]},
                               "policyTypes": ["Ingress", "Egress"],
                               "ingress": [{"from": [{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {}}},
                                                     {"ipBlock": {"cidr": "198.18.0.0/16",
                                                                  "except": ["198.18.1.0/24"]}}],
                                            "ports": [{"protocol": "TCP", "port": 80, "endPort": 90},
                                                      {"port": "http"}]}],
                               "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                                           "ports": [{"protocol": "UDP", "port": 53}]}]}},
    "IPPool": {"apiVersion": CALICO, "kind": "IPPool", "metadata": {"name": "pool"},
               "spec": {"cidr": "198.18.4.0/22", "blockSize": 26, "nodeSelector": "rack == 'r1'",
                        "natOutgoing": True, "disabled": False, "disableBGPExport": False}},
    "IPAMBlock": {"apiVersion": CALICO, "kind": "IPAMBlock", "metadata": {"name": "198-18-4-0-26"},
                  "spec": {"cidr": "198.18.4.0/26", "affinity": f"host:{NODE}", "deleted": False}},
    "BlockAffinity": {"apiVersion": CALICO, "kind": "BlockAffinity", "metadata": {"name": "n1-198-18-4-64-26"},
                      "spec": {"node": NODE, "cidr": "198.18.4.64/26", "state": "confirmed", "deleted": "false"}},
    "BGPConfiguration": {"apiVersion": CALICO, "kind": "BGPConfiguration", "metadata": {"name": "default"},
                         "spec": {"asNumber": 64512, "nodeToNodeMeshEnabled": True, "listenPort": 179,
                                  "logSeverityScreen": "Info", "serviceClusterIPs": [{"cidr": "198.19.0.0/16"}],
                                  "communities": [{"name": "c", "value": "64512:1"}],
                                  "prefixAdvertisements": [{"cidr": "198.18.4.0/22", "communities": ["c"]}]}},
    "BGPPeer": {"apiVersion": CALICO, "kind": "BGPPeer", "metadata": {"name": "tor"},
                "spec": {"peerIP": "198.18.0.254:179", "asNumber": 65001, "nodeSelector": "rack == 'r1'",
                         "password": {"secretKeyRef": {"name": "bgp", "key": "tor"}}, "keepaliveTime": "30s",
                         "maxRestartTime": "120s", "ttlSecurity": 1, "sourceAddress": "UseNodeIP",
                         "nextHopMode": "Auto"}},
    "Secret": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp", "namespace": "kube-system"},
               "data": {"tor": "czNjcjN0"}},
    "ServiceAccount": {"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": "web", "namespace": "x", "labels": {"team": "a"}}},
    "GlobalNetworkPolicy": {"apiVersion": CALICO, "kind": "GlobalNetworkPolicy",
                            "metadata": {"name": "default-deny"},
                            "spec": {"order": 10, "selector": "app == 'web'", "namespaceSelector": "team == 'a'",
                                     "serviceAccountSelector": "all()", "types": ["Ingress", "Egress"],
                                     "applyOnForward": True, "preDNAT": False, "doNotTrack": False,
                                     "performanceHints": ["AssumeNeededOnEveryNode"],
                                     "ingress": [{"action": "Allow", "protocol": "TCP", "ipVersion": 4,
                                                  "source": {"nets": ["198.18.0.0/16"], "notNets": ["198.18.1.0/24"],
                                                             "selector": "role == 'db'", "notSelector": "has(x)",
                                                             "namespaceSelector": "global()",
                                                             "serviceAccounts": {"names": ["web"],
                                                                                 "selector": "a == 'b'"},
                                                             "ports": [80, "8000:8080", "http"], "notPorts": [81]},
                                                  "destination": {"ports": ["http"]},
                                                  "metadata": {"annotations": {"k": "v"}}}],
                                     "egress": [{"action": "Pass", "protocol": "ICMP",
                                                 "icmp": {"type": 8, "code": 0},
                                                 "notICMP": {"type": 3}},
                                                {"action": "Log", "notProtocol": 17,
                                                 "destination": {"selector": "all()"}},
                                                {"action": "Deny"}]}},
    "CalicoNetworkPolicy": {"apiVersion": CALICO, "kind": "NetworkPolicy",
                            "metadata": {"name": "security.allow-dns", "namespace": "x"},
                            "spec": {"tier": "security", "order": 1.5, "selector": "all()",
                                     "serviceAccountSelector": "team == 'a'", "types": ["Egress"],
                                     "egress": [{"action": "Allow", "protocol": "UDP",
                                                 "destination": {"selector": "k8s-app == 'kube-dns'",
                                                                 "namespaceSelector":
                                                                     "projectcalico.org/name == 'kube-system'",
                                                                 "ports": [53]}}]}},
    "Tier": {"apiVersion": CALICO, "kind": "Tier", "metadata": {"name": "security"},
             "spec": {"order": 100, "defaultAction": "Pass"}},
    "NetworkSet": {"apiVersion": CALICO, "kind": "NetworkSet",
                   "metadata": {"name": "external-db", "namespace": "x", "labels": {"role": "db"}},
                   "spec": {"nets": ["198.51.100.0/28", "203.0.113.7"]}},
    "GlobalNetworkSet": {"apiVersion": CALICO, "kind": "GlobalNetworkSet",
                         "metadata": {"name": "outside", "labels": {"zone": "outside"}},
                         "spec": {"nets": ["192.0.2.0/24", "2001:db8::/48"]}},
    "HostEndpoint": {"apiVersion": CALICO, "kind": "HostEndpoint",
                     "metadata": {"name": "n1-eth0", "labels": {"a": "b"}},
                     "spec": {"node": NODE, "interfaceName": "eth0", "expectedIPs": ["198.18.0.1"],
                              "profiles": ["projectcalico-default-allow"],
                              "ports": [{"name": "ssh", "port": 22, "protocol": "TCP"}]}},
    "FelixConfiguration": {"apiVersion": CALICO, "kind": "FelixConfiguration", "metadata": {"name": "default"},
                           "spec": {"failsafeInboundHostPorts": [{"protocol": "TCP", "port": 22,
                                                                  "net": "198.18.0.0/16"}],
                                    "failsafeOutboundHostPorts": [{"protocol": "UDP", "port": 53}],
                                    "bpfEnabled": False, "defaultEndpointToHostAction": "Return",
                                    "iptablesFilterAllowAction": "Accept", "iptablesFilterDenyAction": "Drop",
                                    "logPrefix": "calico-packet", "ipv6Support": True,
                                    "natOutgoingAddress": "198.18.0.1", "natPortRange": "32768:65535"}},
    "StagedGlobalNetworkPolicy": {"apiVersion": CALICO, "kind": "StagedGlobalNetworkPolicy",
                                  "metadata": {"name": "preview"}, "spec": {"selector": "all()"}},
    "StagedNetworkPolicy": {"apiVersion": CALICO, "kind": "StagedNetworkPolicy",
                            "metadata": {"name": "preview", "namespace": "x"}, "spec": {"selector": "all()"}},
    "StagedKubernetesNetworkPolicy": {"apiVersion": CALICO, "kind": "StagedKubernetesNetworkPolicy",
                                      "metadata": {"name": "preview", "namespace": "x"}, "spec": {"podSelector": {}}},
    "Service": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "x"},
                "spec": {"type": "NodePort", "clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"],
                         "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                         "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080,
                                    "protocol": "TCP"},
                                   {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}},
    "EndpointSlice": {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": "web-1", "namespace": "x",
                                   "labels": {"kubernetes.io/service-name": "web"}},
                      "addressType": "IPv4",
                      "endpoints": [{"addresses": ["198.18.4.2"], "conditions": {"ready": True},
                                     "targetRef": {"kind": "Pod", "name": "p", "namespace": "x"}}],
                      "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
}
KIND_NAMES = sorted({k.name for k in KINDS.values()})
CONTEXT = [BASE["Namespace"], BASE["IPPool"], BASE["Tier"]]       # what other objects refer to

# --- values ---------------------------------------------------------------------------------

NAMES = ["x", "a.b", "A", "-a", "a" * 64, "a" * 254, "kube-system", "default", "n1", "", " ", "a/b", "é", "\x00",
         "Ingress", "Egress", "Sideways", "TCP", "ICMP", "In", "NotIn", "Exists", "Like", "http", "serve-80-tcp",
         "198.18.0.1", "198.18.300.1", "198.18.0.0/16", "2001:db8::/64", "0.0.0.0/0", "host:n1", "host:",
         "virtual:x", "true", "false", "120s", "2h", "64512:1", "1.2", "all()", "has(a) && !", "(" * 70, "!" * 999,
         "a == 'x'", "a in {'x', \"y\"}", "x" * 100_000]
scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(NAMES), st.text(max_size=20),
    st.integers(-2, 70_000), st.integers(), st.just(0).map(lambda _: 10 ** 5000), st.just(-(2 ** 64)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=8), st.dates(), st.datetimes(timezones=st.just(datetime.UTC)),
    st.frozensets(st.sampled_from(["a", "b"]), max_size=2).map(set),
)
keys = st.one_of(st.sampled_from(["metadata", "spec", "name", "namespace", "labels", "items", "kind", "cidr",
                                  "ports", "port", "from", "to", "ingress", "podSelector", "matchLabels"]),
                 st.text(max_size=6), st.integers(), st.booleans(), st.none(), st.dates())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def paths(value, prefix=()) -> list[tuple]:
    """Every place in `value` a mutation can hit: (path to a container, key or index)."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            found.append((prefix, k))
            found += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.append((prefix, i))
            found += paths(v, (*prefix, i))
    return found


def at(value, path):
    for step in path:
        value = value[step]
    return value


@st.composite
def mutated(draw, kind: str) -> dict:
    """The base object of `kind` with 1-4 random mutations; sometimes a value used twice (as a
    YAML alias would make it)."""
    doc = copy.deepcopy(BASE[kind])
    for _ in range(draw(st.integers(1, 4))):
        where = paths(doc)
        if not where:
            break
        parent_path, key = draw(st.sampled_from(where))
        parent = at(doc, parent_path)
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "share"]))
        if action == "replace":
            parent[key] = draw(values)
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        elif action == "add":
            parent.append(draw(values))
        elif action == "share":
            shared = draw(st.lists(st.sampled_from(NAMES[:8]), min_size=1, max_size=5))
            parent[key] = [shared] * draw(st.integers(1, 20))
    return doc


def check_outcome(objects: list[tuple[str, object]]) -> None:
    """Success (and then a render), or InvalidDesiredState whose every error names the file,
    an object and, past the document level, a field; all in readable lengths. A document beyond
    desired.bounds never reaches a converter: both sources refuse it first (tested below)."""
    try:
        for _, obj in objects:
            ValueBudget().check(obj)
    except BoundExceeded:
        return
    try:
        state = build_cluster_state(objects)
    except InvalidDesiredState as refused:
        assert refused.errors
        for error in refused.errors:
            assert isinstance(error, ValidationError)
            assert error.where.startswith(FILE.split(".")[0]) or FILE in error.where, error
            assert error.obj, error
            assert len(str(error)) < 800, str(error)[:300]
        return
    try:
        render_node(state, NODE)
    except WeftError as refused:                      # e.g. two pods with one interface name
        assert len(str(refused)) < 800


# WEFT_FUZZ_EXAMPLES=1000 for a deeper run (~3 min); the default keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("WEFT_FUZZ_EXAMPLES", "120")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", KIND_NAMES)
@FUZZ
@given(data=st.data())
def test_every_converter_refuses_clearly_or_succeeds(kind, data):
    doc = data.draw(mutated(kind))
    check_outcome([(FILE, o) for o in (*CONTEXT, doc) if o is doc or o["kind"] != kind])


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_kind_is_fuzzed_in_both_apiversions(kind):
    """The base objects are valid (so the fuzz starts where conversion goes deep), and every
    kind of KINDS has one: a new kind cannot skip the fuzz."""
    versions = [api for (api, name), k in KINDS.items() if k.name == kind]
    context = [o for o in CONTEXT if o["kind"] != kind]
    for api in versions:
        doc = BASE[kind] | {"apiVersion": api}
        build_cluster_state([(FILE, o) for o in (*context, doc)])


DAMAGE = ["&a ", "*a", "*b ", "!!binary ", "!!set ", "!!python/object:os.system ", "[", "]", "{", "}", ": ",
          "- ", "\n", "\t", "'", '"', "? ", "%YAML 1.1\n", "---\n", "...\n", "0b" + "1" * 20_000, "9" * 5000,
          "2024-13-45", "<<: *a\n", "!!timestamp x", "&a [*a]"]


@FUZZ
@given(kind=st.sampled_from(KIND_NAMES), data=st.data())
def test_the_manifest_loader_refuses_clearly_or_succeeds(tmp_path_factory, kind, data):
    """Through YAML text: what the dumper writes (with aliases for shared values), damaged at
    random places, through load_manifest_dir as `weft --from DIR` reads it."""
    doc = data.draw(mutated(kind))
    try:
        text = yaml.safe_dump_all([*CONTEXT, doc])
    except (yaml.YAMLError, ValueError):             # a value the dumper cannot write: no text to test
        text = yaml.safe_dump_all(CONTEXT)
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, len(text)))
        text = text[:pos] + data.draw(st.sampled_from(DAMAGE)) + text[pos:]
    directory = tmp_path_factory.mktemp("src")
    (directory / FILE).write_text(text)
    try:
        objects = load_manifest_dir(directory)
    except (InvalidDesiredState, SourceError) as refused:
        assert str(directory / FILE) in str(refused)
        assert all(len(line) < 800 for line in str(refused).splitlines())
        return
    check_outcome([(FILE, o) for _, o in objects])


# --- the bounds, exactly ----------------------------------------------------------------------

def bomb(levels: int, width: int = 9) -> str:
    """A label value that is `width`**`levels` strings in a few hundred bytes of YAML."""
    lines = ['    v0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"    v{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return ("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bombed\n  labels:\n"
            + "\n".join(lines) + "\n")


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine: 387 million strings in a 700-byte file (2.5 GB and a kill before)."""
    import resource
    import time
    (tmp_path / "bomb.yaml").write_text(bomb(9))
    started = time.monotonic()
    with pytest.raises(InvalidDesiredState, match=r"bomb.yaml: document 1: more than 1,000,000 values"):
        load_manifest_dir(tmp_path)
    assert time.monotonic() - started < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 1 << 20       # KiB: under 1 GiB


def test_aliases_within_the_budget_load(tmp_path):
    """Aliases are YAML: a few shared values load (and are judged like any other value)."""
    (tmp_path / "ok.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: &n shared\n"
                                      "  labels: {team: *n}\n")
    (namespace,) = [o for _, o in load_manifest_dir(tmp_path)]
    assert namespace["metadata"]["labels"] == {"team": "shared"}
    (tmp_path / "big.yaml").write_text(bomb(4))                  # 59,049 strings: refused as labels
    with pytest.raises(InvalidDesiredState) as refused:
        build_cluster_state(load_manifest_dir(tmp_path))
    assert "Namespace bombed: metadata.labels.v4: invalid label value [[[" in str(refused.value)
    assert max(len(line) for line in str(refused.value).splitlines()) < 400


@pytest.mark.parametrize("text, problem", [
    ("a: " + "[" * 101 + "]" * 101 + "\n", "document 1: nested deeper than 100 levels"),
    ("---\na: 1\n---\n&a [*a]\n", "document 2: nested deeper than 100 levels (or a YAML alias of itself)"),
    ("a: " + "[" * 2000 + "]" * 2000 + "\n", "malformed YAML"),
    ("a: " + "9" * 5000 + "\n", "document 1: cannot be loaded: Exceeds the limit"),
    ("a: 0b" + "1" * 70 + "\n", "document 1: an integer beyond 64 bits"),
    ("a: 2024-13-45\n", "document 1: cannot be loaded: month must be in 1..12"),
    ("a: !!timestamp x\n", "document 1: cannot be loaded: AttributeError in the YAML library"),
    ("a: !!python/object/apply:os.system [true]\n", "malformed YAML"),
])
def test_documents_beyond_the_bounds_are_refused(tmp_path, text, problem):
    (tmp_path / "doc.yaml").write_text(text)
    with pytest.raises(InvalidDesiredState, match="doc.yaml") as refused:
        load_manifest_dir(tmp_path)
    assert problem in str(refused.value)


def test_a_file_beyond_the_size_bound_is_refused_unread(tmp_path, monkeypatch):
    from weft.desired import manifests
    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 1000)
    Path(tmp_path / "big.yaml").write_text("a: " + "x" * 2000 + "\n")
    with pytest.raises(SourceError, match=r"big.yaml: larger than"):
        manifests.read_manifest(tmp_path / "big.yaml", limit=1000)
    with pytest.raises(SourceError, match=r"gone.yaml: cannot read the manifest file: No such file"):
        manifests.read_manifest(tmp_path / "gone.yaml")


def test_a_saved_plan_beyond_its_bounds_is_refused(tmp_path, monkeypatch):
    """A saved plan is read with the manifests' bounded read (desired.bounds): too large, too deep
    or unreadable, it is one clear PlanError naming the file."""
    from weft.reconciler import plan
    monkeypatch.setattr(plan, "MAX_PLAN_BYTES", 1000)
    saved = tmp_path / "plan.json"
    saved.write_text('{"node": "' + "n" * 2000 + '"}')
    with pytest.raises(plan.PlanError, match=r"plan.json: larger than 1,000 bytes, the most weft reads from one "
                                             r"saved plan"):
        plan.load_plan(str(saved))
    saved.write_text("[" * 17 + "]" * 17)
    with pytest.raises(plan.PlanError, match=r"plan.json: not a weft plan: nested deeper than 16 levels"):
        plan.load_plan(str(saved))
    saved.write_text("[" * 16 + "]" * 16)
    with pytest.raises(plan.PlanError, match=r"plan.json: not a weft plan of format_version 2"):
        plan.load_plan(str(saved))
    with pytest.raises(plan.PlanError, match=r"gone.json: cannot read the saved plan: No such file"):
        plan.load_plan(str(tmp_path / "gone.json"))


# --- the eight tracebacks of issue 9 ------------------------------------------------------------

NP = BASE["NetworkPolicy"]


def np_with(path: tuple, value) -> dict:
    doc = copy.deepcopy(NP)
    at(doc, path[:-1])[path[-1]] = value
    return doc


@pytest.mark.parametrize("doc, field", [
    (np_with(("metadata", "namespace"), ["x"]), "metadata.namespace"),
    (np_with(("metadata", "namespace"), {"x": 1}), "metadata.namespace"),
    (np_with(("metadata", "namespace"), 5), "metadata.namespace"),
    (np_with(("spec", "policyTypes"), [["Ingress"]]), "spec.policyTypes[0]"),
    (np_with(("spec", "policyTypes"), ["Ingress", {"Egress": 1}]), "spec.policyTypes[1]"),
    # int and string keys mixed (unknown fields were sorted together: a TypeError)
    (np_with(("spec",), NP["spec"] | {7: "x", "zz": "y"}), "spec.7"),
    (np_with(("spec", "ingress"), [{"from": [], 1: "a", "zz": "b"}]), "spec.ingress[0].1"),
    (np_with(("spec", "egress"), [{"to": [{"podSelector": {}, 2: "a", "zz": "b"}]}]), "spec.egress[0].to[0].2"),
])
def test_the_eight_tracebacks_are_clear_errors(doc, field):
    with pytest.raises(InvalidDesiredState) as refused:
        build_cluster_state([(FILE, BASE["Namespace"]), (FILE, doc)])
    assert f"{FILE}: NetworkPolicy " in str(refused.value) and f": {field}: " in str(refused.value)
