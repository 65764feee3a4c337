"""Bad desired state is refused whole: exit 1, a message naming the file, the object and the field,
and not one byte of kernel state changed.

One lab node gets a good policy set applied first; its iptables (both backends) and ipsets are
recorded. Every bad input below is then the same good source plus one broken file, and must leave
the recorded state exactly as it was (weft validates everything before it writes anything).
"""
from __future__ import annotations

import json
import textwrap

import pytest

from tests.matrices import (
    SCENARIOS,
    describe,
    is_no_op,
    kernel_state,
    require_lab,
    state_diff,
    weft,
    write_source,
)

GOOD_POLICIES = [SCENARIOS / "several-policies-union.yaml", SCENARIOS / "ip-block-except.yaml"]


def policy(namespace: str, name: str, spec: str) -> str:
    """A NetworkPolicy document; `spec` is the YAML body of its spec (unindented)."""
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
            f"metadata:\n  namespace: {namespace}\n  name: {name}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")


GOOD_DOC = policy("z", "fine", "podSelector: {}\ningress:\n- {}\n")

# (id, file name, file text, what stderr must name besides the file)
CASES = [
    ("malformed-yaml", "broken.yaml",
     "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x, name: [oops\n",
     []),
    ("policy-type-sideways", "sideways.yaml",
     policy("x", "sideways", """
        podSelector: {}
        policyTypes: [Ingress, Sideways]
        """),
     ["NetworkPolicy x/sideways", "spec.policyTypes[1]"]),
    ("protocol-icmp", "icmp.yaml",
     GOOD_DOC + "---\n" + policy("y", "icmp", """
        podSelector: {}
        egress:
        - ports:
          - {protocol: TCP, port: 80}
          - {protocol: ICMP}
        """),
     ["NetworkPolicy y/icmp", "spec.egress[0].ports[1].protocol"]),
    ("invalid-cidr", "cidr.yaml",
     policy("x", "cidr", """
        podSelector: {}
        ingress:
        - from:
          - podSelector: {}
          - ipBlock: {cidr: 198.18.300.0/24}
        """),
     ["NetworkPolicy x/cidr", "spec.ingress[0].from[1].ipBlock.cidr"]),
    ("except-outside-cidr", "except.yaml",
     policy("z", "except", """
        podSelector: {}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock:
              cidr: 198.18.1.0/24
              except: [198.18.1.16/28, 198.18.2.0/28]
        """),
     ["NetworkPolicy z/except", "spec.egress[0].to[0].ipBlock.except[1]"]),
    ("except-equals-cidr", "except-equal.yaml",
     policy("z", "except-equal", """
        podSelector: {}
        ingress:
        - from:
          - ipBlock:
              cidr: 198.18.1.0/24
              except: [198.18.1.0/24]
        """),
     ["NetworkPolicy z/except-equal", "spec.ingress[0].from[0].ipBlock.except[0]"]),
    ("selector-operator-like", "like.yaml",
     policy("x", "like", """
        podSelector:
          matchExpressions:
          - {key: pod, operator: Like, values: [a]}
        """),
     ["NetworkPolicy x/like", "spec.podSelector.matchExpressions[0].operator"]),
    ("peer-selector-operator-like", "peer-like.yaml",
     policy("y", "peer-like", """
        podSelector: {}
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: ns, operator: Exists}
              - {key: ns, operator: Like, values: [x]}
        """),
     ["NetworkPolicy y/peer-like", "spec.ingress[0].from[0].namespaceSelector.matchExpressions[1].operator"]),
    ("port-70000", "port-high.yaml",
     policy("x", "port-high", """
        podSelector: {}
        ingress:
        - ports:
          - {protocol: TCP, port: 70000}
        """),
     ["NetworkPolicy x/port-high", "spec.ingress[0].ports[0].port"]),
    ("port-0", "port-zero.yaml",
     policy("x", "port-zero", """
        podSelector: {}
        ingress:
        - ports:
          - {protocol: UDP, port: 80}
        - ports:
          - {protocol: UDP, port: 0}
        """),
     ["NetworkPolicy x/port-zero", "spec.ingress[1].ports[0].port"]),
    ("end-port-below-port", "end-port.yaml",
     policy("y", "end-port", """
        podSelector: {}
        egress:
        - ports:
          - {protocol: TCP, port: 81, endPort: 80}
        """),
     ["NetworkPolicy y/end-port", "spec.egress[0].ports[0].endPort"]),
    ("end-port-with-named-port", "end-port-named.yaml",
     policy("y", "end-port-named", """
        podSelector: {}
        ingress:
        - ports:
          - {port: serve-80-tcp, endPort: 81}
        """),
     ["NetworkPolicy y/end-port-named", "spec.ingress[0].ports[0].endPort"]),
    ("policy-in-missing-namespace", "nowhere.yaml",
     policy("w", "nowhere", "podSelector: {}\n"),
     ["NetworkPolicy w/nowhere", "metadata.namespace"]),
    ("pod-invalid-ip", "pod.yaml",
     textwrap.dedent("""\
        apiVersion: v1
        kind: Pod
        metadata:
          namespace: x
          name: d
          labels: {pod: d}
        spec:
          nodeName: lab-node
          containers:
          - name: cont
            image: registry.k8s.io/e2e-test-images/agnhost:2.43
        status:
          phase: Running
          podIP: 198.18.1.300
        """),
     ["Pod x/d", "status.podIP"]),
    # The eight inputs of issue 9 that ended in tracebacks: now clear errors.
    ("namespace-a-list", "ns-list.yaml", policy("[x]", "ns-list", "podSelector: {}\n"),
     ["NetworkPolicy ['x']/ns-list", "metadata.namespace", "must be a namespace name"]),
    ("namespace-a-map", "ns-map.yaml", policy("{x: 1}", "ns-map", "podSelector: {}\n"),
     ["metadata.namespace", "got {'x': 1}"]),
    ("namespace-an-int", "ns-int.yaml", policy("5", "ns-int", "podSelector: {}\n"),
     ["NetworkPolicy 5/ns-int", "metadata.namespace"]),
    ("policy-type-a-list", "types-list.yaml", policy("x", "types-list", "podSelector: {}\npolicyTypes: [[Ingress]]\n"),
     ["NetworkPolicy x/types-list", "spec.policyTypes[0]", "must be Ingress or Egress"]),
    ("policy-type-a-map", "types-map.yaml",
     policy("x", "types-map", "podSelector: {}\npolicyTypes: [Ingress, {Egress: 1}]\n"),
     ["NetworkPolicy x/types-map", "spec.policyTypes[1]"]),
    ("int-and-string-keys-in-spec", "keys.yaml", policy("x", "keys", "podSelector: {}\n1: a\nzz: b\n"),
     ["NetworkPolicy x/keys", "spec.1: unknown field", "spec.zz: unknown field"]),
    ("int-and-string-keys-in-rule", "rule-keys.yaml",
     policy("y", "rule-keys", "podSelector: {}\ningress:\n- {2: a, zz: b}\n"),
     ["NetworkPolicy y/rule-keys", "spec.ingress[0].2: unknown field"]),
    ("int-and-string-keys-in-peer", "peer-keys.yaml",
     policy("y", "peer-keys", "podSelector: {}\negress:\n- to: [{podSelector: {}, 3: a, zz: b}]\n"),
     ["NetworkPolicy y/peer-keys", "spec.egress[0].to[0].3: unknown field"]),
    # Size and shape (desired.bounds): refused at once, in a message of readable length.
    ("alias-bomb-in-matchLabels", "bomb.yaml",
     policy("x", "bomb", "podSelector:\n  matchLabels:\n    v0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
            + "".join(f"    v{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))),
     ["document 1", "more than 1,000,000 values (YAML aliases count each time they are used)"]),
    ("nested-too-deep", "deep.yaml", policy("x", "deep", "podSelector: {}\ningress: " + "[" * 150 + "]" * 150 + "\n"),
     ["document 1", "nested deeper than 100 levels"]),
    ("integer-beyond-64-bits", "big-int.yaml",
     policy("x", "big-int", "podSelector: {}\ningress:\n- ports: [{port: 0b" + "1" * 80 + "}]\n"),
     ["document 1", "an integer beyond 64 bits"]),
    # Names as Kubernetes validates them: a namespace is a DNS label ("a.b"/"c" and "a"/"b.c"
    # got one interface name, and one of the two pods was left open).
    ("namespace-name-with-a-dot", "dotted.yaml",
     "apiVersion: v1\nkind: Namespace\nmetadata: {name: x.y}\n",
     ["Namespace x.y", "metadata.name", "must be a DNS label"]),
    ("selector-value-calico-cannot-hold", "quote.yaml",
     policy("x", "quote", "podSelector:\n  matchExpressions: [{key: a, operator: In, values: [\"it's\"]}]\n"),
     ["NetworkPolicy x/quote", "spec.podSelector.matchExpressions[0].values[0]", "invalid label value"]),
    # A policy that is already enforced, changed into a bad one: the old version stays enforced.
    ("applied-policy-made-invalid", GOOD_POLICIES[0].name,
     GOOD_POLICIES[0].read_text().replace("port: 80", "port: 70000"),
     ["NetworkPolicy x/a-tcp-80-from-y", "spec.ingress[0].ports[0].port"]),
]


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """A lab node with the good policies applied; yields (lab, source dir, state dir, recorded state)."""
    require_lab()
    from weft.playbooks.netlab import NodeLab, pods_from_manifests

    source = write_source(tmp_path_factory.mktemp("good"), *GOOD_POLICIES)
    state = tmp_path_factory.mktemp("weft-state")
    with NodeLab(pods_from_manifests(source, "lab-node")) as lab:
        done = weft(lab, ["apply"], source, state)
        assert done.returncode == 0, f"the good apply failed\n{describe(done)}"
        recorded = kernel_state(lab)
        assert "weft-" in recorded["iptables-nft-save"] + recorded["iptables-legacy-save"]
        assert "weft-" in recorded["ipset save"]
        yield lab, source, state, recorded


@pytest.mark.parametrize("case, file_name, text, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(applied, tmp_path, case, file_name, text, names):
    lab, good, state, recorded = applied
    policies = [p for p in GOOD_POLICIES if p.name != file_name]
    source = write_source(tmp_path / "src", *policies, texts={file_name: text})

    for argv in (["apply"], ["plan", "--detailed-exitcode"]):
        done = weft(lab, argv, source, state)
        assert done.returncode == 1, f"{case}: `weft {' '.join(argv)}` should fail with 1\n{describe(done)}"
        missing = [n for n in [file_name, *names] if n not in done.stderr]
        assert not missing, f"{case}: the message does not name {missing}\n{describe(done)}"
        assert "Traceback" not in done.stderr and max(map(len, done.stderr.splitlines())) < 600, describe(done)
        changed = state_diff(recorded, kernel_state(lab))
        assert not changed, f"{case}: `weft {' '.join(argv)}` changed the kernel\n{changed}"


def test_good_input_after_bad_is_a_no_op(applied):
    """The refused runs left weft's own records alone too: the good source is still converged."""
    lab, good, state, recorded = applied
    done = weft(lab, ["apply", "--output", "json"], good, state)
    assert done.returncode == 0, describe(done)
    report = json.loads(done.stdout)
    assert is_no_op(report), report
    assert not state_diff(recorded, kernel_state(lab))
