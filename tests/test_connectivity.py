"""End-to-end Kubernetes NetworkPolicy semantics on a real kernel.

One lab node (network namespaces, veths, TCP and UDP servers on ports 80 and 81 in every pod of
playbooks/example/cluster.yaml) is shared by every scenario. Its pods are dual-stack (198.18.1.x
and 2001:db8:1::x). For each scenario step weft applies the base cluster plus the step's policies
inside the node namespace, the lab probes every pod pair over IPv4 and again over IPv6, and each
observed matrix must equal the expected one -- written once, by hand, from the Kubernetes
semantics (tests/matrices.py explains the notation): a policy means the same in both families.
Then a second apply must do nothing and `plan --detailed-exitcode` must say so; `apply --destroy`
resets between scenarios and must leave nothing weft owns behind, in either family.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import yaml

from tests.matrices import (
    BASE_CLUSTER,
    CONTAINER_PORTS,
    FAMILIES,
    NAMESPACE_LABELS,
    NAMESPACES,
    POD_IPS,
    POD_IPS6,
    POD_KEYS,
    POD_LABELS,
    PROBES,
    SCENARIOS,
    Expect,
    all_open,
    describe,
    diff,
    format_table,
    is_no_op,
    kernel_state,
    pods,
    probes,
    reference_matrix,
    require_lab,
    weft,
    weft_leftovers,
    write_source,
)


@dataclass(frozen=True)
class Step:
    policies: str | None        # a file under tests/scenarios/, or None: no policy at all
    expect: Expect
    relabel: dict = field(default_factory=dict)   # label changes to the base cluster (write_source)


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]


def one(name: str, expect: Expect) -> Scenario:
    return Scenario(name, (Step(f"{name}.yaml", expect),))


# Every expected matrix, from the Kubernetes NetworkPolicy semantics. Each line restates what the
# scenario's YAML means; the YAML comments say the same in words.
SCENARIO_LIST = [
    one("deny-ingress-namespace",
        Expect().isolate_ingress("x/*")),

    one("deny-egress-namespace",
        Expect().isolate_egress("y/*")),

    one("pod-selector-peer",
        Expect().isolate_ingress("x/a")
        .allow_ingress(dst="x/a", src="x/b")),

    one("namespace-selector-peer",
        Expect().isolate_ingress("y/*")
        .allow_ingress(dst="y/*", src="x/*")),

    one("selectors-and-vs-or",
        Expect().isolate_ingress(["z/a", "z/c"])
        .allow_ingress(dst="z/a", src="x/b")                   # one peer: ns=x AND pod=b
        .allow_ingress(dst="z/c", src=["x/*", "z/b"])),        # two peers: ns=x OR (own ns, pod=b)

    one("ip-block-except",
        Expect().isolate_ingress("x/a")
        .allow_ingress(dst="x/a", src=["x/*", "z/*"])          # /24 minus .20/30 (= the y pods)
        .isolate_egress("z/b")
        .allow_egress(src="z/b", dst=["x/a", "x/c"])),         # .0/28 (x pods) minus .12 (x/b)

    one("named-port-ingress",
        Expect().isolate_ingress(["x/a", "y/a"])
        .allow_ingress(dst="x/a", ports=["tcp/81", "udp/80"])),  # y/a: TCP serve-80-udp = nothing

    one("end-port-range",
        Expect().isolate_ingress(["x/a", "y/a"])
        .allow_ingress(dst="x/a", ports="tcp/*")               # TCP 80..81
        .allow_ingress(dst="y/a", ports="udp/80")),            # UDP 79..80

    one("several-policies-union",
        Expect().isolate_ingress("x/*")
        .allow_ingress(dst="x/a", src="y/*", ports="tcp/80")
        .allow_ingress(dst="x/a", src="x/b")),

    one("policy-types",
        Expect()
        .isolate_ingress("x/a").allow_ingress(dst="x/a", src="x/b")      # ingress only
        .isolate_ingress("y/a").isolate_egress("y/a")                    # egress section: both
        .allow_egress(src="y/a", dst="z/*")
        .isolate_egress("z/a")                                           # [Egress], no rules
        .isolate_ingress("z/b").allow_ingress(dst="z/b", src="*")        # [Ingress, Egress],
        .isolate_egress("z/b")),                                         # ingress: [{}]

    one("empty-pod-selector",
        Expect().isolate_ingress("y/*")
        .allow_ingress(dst="y/*", src="y/*")),

    one("ports-only-and-peers-only",
        Expect().isolate_ingress(["x/b", "x/c"])
        .allow_ingress(dst="x/b", ports="udp/81")              # any peer
        .allow_ingress(dst="x/c", src="*/a")),                 # any port

    one("egress-named-port",
        Expect().isolate_egress("x/a")
        .allow_egress(src="x/a", dst="y/*", ports="tcp/80")    # serve-80-tcp
        .allow_egress(src="x/a", dst="*", ports="udp/81")),    # serve-81-udp

    one("ingress-and-egress",
        Expect().isolate_egress("x/a")
        .allow_egress(src="x/a", dst="y/*")
        .isolate_ingress("y/b")
        .allow_ingress(dst="y/b", src="x/*", ports="tcp/80")),

    one("peers-times-ports",
        Expect().isolate_ingress(["x/a", "y/b", "z/c"])
        .allow_ingress(dst="x/a", src=["x/b", "y/c"], ports=["tcp/80", "udp/81"])
        .allow_ingress(dst="z/c", ports="tcp/81")),            # y/b: SCTP only, no TCP/UDP

    one("match-expressions",
        Expect().isolate_ingress(["y/a", "y/c", "z/b"])
        .allow_ingress(dst="y/a", src=["x/a", "x/c", "z/a", "z/c"])
        .allow_ingress(dst="y/c", src="z/*")
        .allow_ingress(dst="z/b", src="*")),                   # selects-nobody: no effect

    Scenario("policy-update", (
        Step("policy-update/1-initial.yaml",
             Expect().isolate_ingress("x/a")
             .allow_ingress(dst="x/a", src="x/b")),
        Step("policy-update/2-modified.yaml",
             Expect().isolate_ingress("x/a")
             .allow_ingress(dst="x/a", src="z/*", ports="tcp/81")),
        Step("policy-update/3-moved.yaml",
             Expect().isolate_ingress("x/c")
             .allow_ingress(dst="x/c", src="z/*", ports="tcp/81")),
    )),

    Scenario("label-change", (
        Step("label-change/policy.yaml",
             Expect().isolate_ingress("z/a").allow_ingress(dst="z/a", src="x/b")),
        Step("label-change/policy.yaml",
             Expect().isolate_ingress("z/a").allow_ingress(dst="z/a", src=["x/c", "y/b"]),
             relabel={"pod x/b": {"pod": "bee"}, "pod x/c": {"pod": "b"}, "namespace y": {"ns": "x"}}),
    )),

    Scenario("policy-delete", (
        Step("policy-delete/1-two-policies.yaml",
             Expect().isolate_ingress("x/*")
             .isolate_ingress("y/a").allow_ingress(dst="y/a", src="x/a")),
        Step("policy-delete/2-one-deleted.yaml",
             Expect().isolate_ingress("y/a").allow_ingress(dst="y/a", src="x/a")),
        Step(None, Expect()),
    )),
]
SCENARIO_BY_NAME = {s.name: s for s in SCENARIO_LIST}


def load_policies(step: Step) -> list[dict]:
    if step.policies is None:
        return []
    return [d for d in yaml.safe_load_all((SCENARIOS / step.policies).read_text()) if d]


# --- Checks that need neither root nor weft: the scenarios and expectations themselves. ---------

def all_steps():
    return [pytest.param(s, i, step, id=f"{s.name}[{i + 1}]")
            for s in SCENARIO_LIST for i, step in enumerate(s.steps)]


def test_every_scenario_file_is_used():
    files = {str(p.relative_to(SCENARIOS)) for p in SCENARIOS.rglob("*.yaml")}
    used = {step.policies for s in SCENARIO_LIST for step in s.steps if step.policies}
    assert files == used


def test_relabelled_cluster_is_written(tmp_path):
    relabel = {"pod x/c": {"pod": "b"}, "namespace y": {"ns": "x"}}
    docs = yaml.safe_load_all((write_source(tmp_path, relabel=relabel) / "cluster.yaml").read_text())
    labels = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d["metadata"].get("labels")
              for d in docs if d}
    assert labels[("Pod", "x", "c")] == {"pod": "b"} and labels[("Namespace", None, "y")] == {"ns": "x"}
    assert labels[("Pod", "x", "b")] == {"pod": "b"} and labels[("Namespace", None, "z")] == {"ns": "z"}


@pytest.mark.parametrize("scenario, index, step", all_steps())
def test_scenario_yaml_is_a_valid_policy_set(scenario, index, step):
    names = set()
    for doc in load_policies(step):
        assert doc["apiVersion"] == "networking.k8s.io/v1"
        assert doc["kind"] == "NetworkPolicy"
        meta = doc["metadata"]
        assert meta["namespace"] in NAMESPACES
        assert (meta["namespace"], meta["name"]) not in names, "duplicate policy"
        names.add((meta["namespace"], meta["name"]))
        assert "podSelector" in doc["spec"]
        assert set(doc["spec"]) <= {"podSelector", "policyTypes", "ingress", "egress"}


@pytest.mark.parametrize("scenario, index, step", all_steps())
def test_hand_written_matrix_agrees_with_reference_model(scenario, index, step):
    """Two independent derivations of the same semantics must agree before either is trusted;
    the reference model reads the policies for each family's addresses, the hand table is one."""
    expected = step.expect.matrix()
    assert len(expected) == len(POD_KEYS) ** 2 * len(PROBES)
    assert all(expected[(k, k, pr, po)] for k in POD_KEYS for pr, po in PROBES)
    for family in FAMILIES:
        differences = diff(expected, reference_matrix(load_policies(step), step.relabel, family))
        assert not differences, "\n".join([f"hand table vs reference model (IPv{family}):", *differences])


def test_every_step_changes_the_matrix():
    """A step whose expected matrix equals the previous one would not show that weft followed."""
    for s in SCENARIO_LIST:
        previous = all_open()
        for i, step in enumerate(s.steps):
            current = step.expect.matrix()
            assert current != previous, f"{s.name} step {i + 1} expects no change"
            previous = current


def test_expect_notation():
    assert pods("x/*") == ("x/a", "x/b", "x/c")
    assert pods(["*/a", "z/c"]) == ("x/a", "y/a", "z/a", "z/c")
    assert probes("udp/*") == (("udp", 80), ("udp", 81))
    assert probes(["*/81"]) == (("tcp", 81), ("udp", 81))
    with pytest.raises(ValueError):
        pods("w/a")
    with pytest.raises(ValueError):
        Expect().allow_ingress(dst="x/a", src="x/b")     # x/a is not isolated: meaningless
    e = Expect().isolate_ingress("x/a").isolate_egress("y/a").allow_egress(src="y/a", dst="x/a")
    assert not e.connected("y/a", "x/a", "tcp", 80)      # egress allows, ingress does not
    assert e.connected("x/a", "y/a", "tcp", 80)          # x/a's egress is open, y/a's ingress too
    assert not e.connected("y/a", "z/a", "udp", 81)      # y/a's egress allows x/a only
    assert e.connected("x/a", "x/a", "tcp", 80)          # self is always connected
    table = format_table(e.matrix())
    assert table.splitlines()[1].startswith("    x/a  TTUU")


def test_base_cluster_matches_the_contract():
    """The constants tests/matrices.py writes expectations against are the base cluster's."""
    if not BASE_CLUSTER.exists():
        pytest.skip(f"{BASE_CLUSTER} is not there yet")
    docs = [d for d in yaml.safe_load_all(BASE_CLUSTER.read_text()) if d]
    nodes = [d["metadata"]["name"] for d in docs if d["kind"] == "Node"]
    assert nodes == ["lab-node"]
    namespaces = {d["metadata"]["name"]: d["metadata"].get("labels", {})
                  for d in docs if d["kind"] == "Namespace"}
    # weft adds kubernetes.io/metadata.name itself, as the API server does.
    assert {n: {**labels, "kubernetes.io/metadata.name": n} for n, labels in namespaces.items()} \
        == NAMESPACE_LABELS
    found = {}
    for d in (d for d in docs if d["kind"] == "Pod"):
        key = f"{d['metadata']['namespace']}/{d['metadata']['name']}"
        ports = {(p["name"], p.get("protocol", "TCP").lower(), p["containerPort"])
                 for c in d["spec"]["containers"] for p in c.get("ports", [])}
        found[key] = (d["metadata"]["labels"], d["status"]["podIP"], [ip["ip"] for ip in d["status"]["podIPs"]],
                      d["spec"]["nodeName"], ports)
    assert found == {k: (POD_LABELS[k], POD_IPS[k], [POD_IPS[k], POD_IPS6[k]], "lab-node", set(CONTAINER_PORTS))
                     for k in POD_KEYS}


# --- The lab. -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_lab()
    from weft.playbooks.netlab import NodeLab, pods_from_manifests
    cluster_dir = write_source(tmp_path_factory.mktemp("cluster"))
    node = NodeLab(pods_from_manifests(cluster_dir, "lab-node"))
    with node:
        assert sorted(p.key for p in node.pods) == sorted(POD_KEYS)
        assert {p.key: p.ip6 for p in node.pods} == POD_IPS6, "dual-stack pods"
        yield node


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weft-state")


@pytest.fixture
def weft_lab(lab, state_dir, tmp_path):
    """The lab, with weft available; afterwards `apply --destroy` must leave nothing of weft's.

    If it does not, the leftovers are flushed here by hand (so the next scenario starts clean)
    and the test errors with what was left.
    """
    yield lab
    source = write_source(tmp_path / "destroy-source")
    done = weft(lab, ["apply", "--destroy"], source, state_dir)
    left = weft_leftovers(kernel_state(lab))
    stray_rules = [line for text in kernel_state(lab).values() for line in text.splitlines()
                   if line.startswith("-A ")]
    if done.returncode != 0 or left or stray_rules:
        flush_node(lab)
        pytest.fail(f"apply --destroy did not reset the node:\n{describe(done)}\n"
                    + "\n".join(["weft leftovers:", *left, "other rules:", *stray_rules]))


def flush_node(lab):
    """Empty every table and set of the lab node (it holds nothing but what weft made)."""
    for save, restore in (("iptables-nft-save", "iptables-nft-restore"),
                          ("iptables-legacy-save", "iptables-legacy-restore"),
                          ("ip6tables-nft-save", "ip6tables-nft-restore"),
                          ("ip6tables-legacy-save", "ip6tables-legacy-restore")):
        tables = [line[1:] for line in lab.node_run([save]).stdout.splitlines() if line.startswith("*")]
        for table in tables:
            lab.node_run([restore, "-w"] if "legacy" in restore else [restore],
                         input=f"*{table}\nCOMMIT\n")
    lab.node_run(["ipset", "flush"])
    lab.node_run(["ipset", "destroy"])


def observe(lab, family=4):
    """Probe every pair with new connections only: forget the node's tracked flows first, so a
    probe that happens to reuse an earlier probe's source port cannot ride on its old entry."""
    lab.node_run(["conntrack", "-F"])
    return lab.matrix(family=family)


def check_matrix(lab, expected, context, families=FAMILIES):
    """Compare, over each family's addresses; on a difference probe once more (a loaded machine
    can lose a probe) and report the second observation, naming any cell that changed between
    the two."""
    for family in families:
        check_family_matrix(lab, expected, f"{context} over IPv{family}", family)


def check_family_matrix(lab, expected, context, family):
    from weft.playbooks.netlab import format_matrix
    observed = observe(lab, family)
    differences, unstable = diff(expected, observed), []
    if differences:
        first, observed = observed, observe(lab, family)
        differences = diff(expected, observed)
        unstable = diff(first, observed)
    if differences:
        pytest.fail(
            f"{context}: {len(differences)} cells differ from the Kubernetes semantics\n"
            + "\n".join(differences)
            + ("\n\nunstable between two observations (first vs second):\n" + "\n".join(unstable)
               if unstable else "")
            + "\n\nEXPECTED\n" + format_matrix(lab.pods, expected)
            + "\n\nOBSERVED\n" + format_matrix(lab.pods, observed), pytrace=False)


def run_json(lab, argv, source, state):
    done = weft(lab, argv, source, state)
    assert done.returncode == 0, describe(done)
    try:
        return json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"--output json did not print one JSON object\n{describe(done)}")


def test_lab_is_all_open_without_policies(lab):
    """Before weft touches the node: every probe connects, including a pod to itself."""
    check_matrix(lab, all_open(), "lab without weft")


@pytest.mark.parametrize("scenario", SCENARIO_LIST, ids=lambda s: s.name)
def test_scenario(weft_lab, state_dir, tmp_path, scenario):
    lab = weft_lab
    for i, step in enumerate(scenario.steps):
        context = f"{scenario.name} step {i + 1} ({step.policies or 'no policies'})"
        files = [SCENARIOS / step.policies] if step.policies else []
        source = write_source(tmp_path / f"step-{i + 1}", *files, relabel=step.relabel)
        if step.relabel:
            context += f" with labels {step.relabel}"

        plan = weft(lab, ["plan", "--detailed-exitcode"], source, state_dir)
        assert plan.returncode == 2, f"{context}: plan should report pending changes\n{describe(plan)}"

        first = run_json(lab, ["apply", "--output", "json"], source, state_dir)
        assert any(first["summary"].get(k) for k in ("add", "change", "destroy")) and first["commands"], \
            f"{context}: the apply that enforces the step reported no change: {first}"

        check_matrix(lab, step.expect.matrix(), context)

        again = run_json(lab, ["apply", "--output", "json"], source, state_dir)
        assert is_no_op(again), \
            f"{context}: second apply is not a no-op: {json.dumps(again, indent=1)}"
        plan = weft(lab, ["plan", "--detailed-exitcode"], source, state_dir)
        assert plan.returncode == 0, f"{context}: plan after apply is not clean\n{describe(plan)}"


def test_destroy_reopens_everything(weft_lab, state_dir, tmp_path):
    """After `apply --destroy` no weft state is left (checked by the fixture), traffic is all open
    again, and destroying again has nothing to do."""
    lab = weft_lab
    source = write_source(tmp_path / "src", SCENARIOS / "deny-ingress-namespace.yaml",
                          SCENARIOS / "deny-egress-namespace.yaml")
    run_json(lab, ["apply", "--output", "json"], source, state_dir)
    check_matrix(lab, Expect().isolate_ingress("x/*").isolate_egress("y/*").matrix(), "deny x in, y out")
    run_json(lab, ["apply", "--destroy", "--output", "json"], source, state_dir)
    assert not weft_leftovers(kernel_state(lab))
    check_matrix(lab, all_open(), "after apply --destroy")
    again = run_json(lab, ["apply", "--destroy", "--output", "json"], source, state_dir)
    assert is_no_op(again), f"second destroy is not a no-op: {again}"
