"""`weft node-jobs`: weft's node runs as Kubernetes CronJobs, for clusters that run node jobs
through Kubernetes rather than systemd timers.

`weft node-jobs generate --node A --node B ...` prints, for each node, a reconcile CronJob and
a drift CronJob pinned to it (nodeName: no scheduler involved, so they run on a node that is
NotReady because its network is not set up yet), on the host network, privileged, with the state
dir, bpffs and iptables' lock mounted from the node, as the weft-node ServiceAccount
(playbooks/kubernetes/rbac.yaml). A drift Job whose `weft drift` exits 2 fails through its
podFailurePolicy (FailJob, no retry): a failed drift Job is a node that drifted.

`weft node-jobs report` (the fleet drift report CronJob, playbooks/kubernetes/drift-report.yaml)
reads those drift Jobs back and prints, per node, its last result: in sync, drifted, failed
(could not check), or never run; exit 2 when a node drifted, 1 when one could not be checked.
"""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable

from weft.reconciler.output import emit

NAMESPACE = "weft-system"
SERVICE_ACCOUNT = "weft-node"
LABELS = {"app.kubernetes.io/name": "weft", "app.kubernetes.io/part-of": "weft"}
COMPONENT = "app.kubernetes.io/component"
NODE_LABEL = "weft/node"
STATE_DIR = "/var/lib/weft"
FORMAT_VERSION = 1
EXIT_OK, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2


def add_parser(subparsers) -> None:
    top = subparsers.add_parser("node-jobs",
                                help="weft's node runs as Kubernetes CronJobs: generate them, report drift")
    sub = top.add_subparsers(dest="node_jobs_command", required=True)
    gen = sub.add_parser("generate", help="print a reconcile and a drift CronJob for each node (YAML)")
    gen.add_argument("--node", action="append", required=True, metavar="NAME", help="a node (repeat for each)")
    gen.add_argument("--image", required=True, help="the weft image (weft installed, Debian's data plane tools)")
    gen.add_argument("--namespace", default=NAMESPACE)
    gen.add_argument("--reconcile-schedule", default="* * * * *", help="cron schedule of the reconcile runs")
    gen.add_argument("--drift-schedule", default="*/15 * * * *", help="cron schedule of the drift reports")
    gen.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto")
    rep = sub.add_parser("report", help="the fleet's drift, from the nodes' drift Jobs (exit 2 if any drifted)")
    rep.add_argument("--namespace", default=NAMESPACE)
    rep.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    rep.add_argument("--context")
    rep.add_argument("--output", choices=("text", "json"), default="text")


def job_name(kind: str, node: str) -> str:
    """`weft-<kind>-<node>`, within a CronJob's 52 characters; a long node name is cut and
    given a digest, so two nodes never share a name."""
    name = f"weft-{kind}-{node}"
    if len(name) <= 52:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:8]
    return f"{name[:43].rstrip('-.')}-{digest}"


def cronjobs(nodes: Iterable[str], image: str, *, namespace: str = NAMESPACE,
             reconcile_schedule: str = "* * * * *", drift_schedule: str = "*/15 * * * *",
             backend: str = "auto") -> list[dict]:
    """The CronJobs of `nodes` (pure: the same arguments give the same objects)."""
    out = []
    for node in nodes:
        common = ["--node", node, "--state-dir", STATE_DIR, "--iptables-backend", backend]
        out.append(_cronjob("reconcile", node, image, namespace, reconcile_schedule,
                            ["weft", "apply", *common], drift=False))
        out.append(_cronjob("drift", node, image, namespace, drift_schedule,
                            ["weft", "drift", "--output", "json", *common], drift=True))
    return out


def _cronjob(kind: str, node: str, image: str, namespace: str, schedule: str, command: list[str],
             *, drift: bool) -> dict:
    labels = LABELS | {COMPONENT: kind, NODE_LABEL: _label_value(node)}
    host = [("state", STATE_DIR, "DirectoryOrCreate", False), ("bpffs", "/sys/fs/bpf", "Directory", False),
            ("xtables-lock", "/run/xtables.lock", "FileOrCreate", False),
            ("modules", "/lib/modules", "Directory", True)]
    job_spec: dict = {
        "backoffLimit": 0,
        "activeDeadlineSeconds": 600,
        "ttlSecondsAfterFinished": 86400,
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {
                "nodeName": node,
                "hostNetwork": True,
                "dnsPolicy": "ClusterFirstWithHostNet",
                "serviceAccountName": SERVICE_ACCOUNT,
                "restartPolicy": "Never",
                "priorityClassName": "system-node-critical",
                "tolerations": [{"operator": "Exists"}],
                "containers": [{
                    "name": "weft",
                    "image": image,
                    "command": command,
                    "securityContext": {"privileged": True},
                    "volumeMounts": [{"name": n, "mountPath": p, "readOnly": ro} for n, p, _, ro in host],
                }],
                "volumes": [{"name": n, "hostPath": {"path": p, "type": t}} for n, p, t, _ in host],
            },
        },
    }
    if drift:
        # Exit 2 is drift found: the Job fails at once (no retry) and the report counts it.
        job_spec["podFailurePolicy"] = {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": "weft", "operator": "In", "values": [EXIT_DRIFT]}}]}
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": job_name(kind, node), "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "schedule": schedule,
            "concurrencyPolicy": "Forbid",          # runs never overlap
            "startingDeadlineSeconds": 120,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"metadata": {"labels": dict(labels)}, "spec": job_spec},
        },
    }


def _label_value(node: str) -> str:
    """A node name as a label value (63 characters at most)."""
    if len(node) <= 63:
        return node
    return node[:54].rstrip("-._") + "-" + hashlib.sha256(node.encode()).hexdigest()[:8]


def summarise(jobs: Iterable[dict]) -> dict:
    """Each node's latest drift Job, as a result: in-sync, drifted, failed or running."""
    latest: dict[str, dict] = {}
    for job in jobs:
        meta = job.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(COMPONENT) != "drift" or labels.get("app.kubernetes.io/name") != "weft":
            continue
        node = labels.get(NODE_LABEL) or "?"
        started = str((job.get("status") or {}).get("startTime") or meta.get("creationTimestamp") or "")
        if node not in latest or started > latest[node]["started"]:
            latest[node] = {"node": node, "job": meta.get("name", ""), "started": started,
                            "result": _result(job.get("status") or {})}
    nodes = sorted(latest.values(), key=lambda r: r["node"])
    counts = {r: sum(1 for n in nodes if n["result"] == r) for r in ("in-sync", "drifted", "failed", "running")}
    return {"format_version": FORMAT_VERSION, "nodes": nodes, "counts": counts}


def _result(status: dict) -> str:
    for cond in status.get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "in-sync"
        if cond.get("type") == "Failed":
            return "drifted" if cond.get("reason") == "PodFailurePolicy" else "failed"
    return "running"


def format_report(data: dict) -> str:
    c = data["counts"]
    lines = [f"{len(data['nodes'])} nodes: {c['in-sync']} in sync, {c['drifted']} drifted, "
             f"{c['failed']} could not be checked, {c['running']} running."]
    lines += [f"  {n['node']:<30} {n['result']:<9} {n['started']} (job {n['job']})" for n in data["nodes"]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.node_jobs_command == "generate":
        import yaml
        docs = cronjobs(args.node, args.image, namespace=args.namespace, reconcile_schedule=args.reconcile_schedule,
                        drift_schedule=args.drift_schedule, backend=args.iptables_backend)
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
        return EXIT_OK
    from weft.desired.api import ApiError, connect
    from weft.model.errors import WeftError
    try:
        with connect(args.kubeconfig, args.context) as api:
            jobs = api.request("GET", f"/apis/batch/v1/namespaces/{args.namespace}/jobs").get("items") or []
    except ApiError as exc:
        print(f"weft: error: listing Jobs in namespace {args.namespace}: HTTP {exc.status} {exc.reason}",
              file=sys.stderr)
        return EXIT_ERROR
    except WeftError as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    data = summarise(jobs)
    emit(args.output, data, format_report(data))
    if data["counts"]["failed"]:
        return EXIT_ERROR
    return EXIT_DRIFT if data["counts"]["drifted"] else EXIT_OK
