"""What the CNI plugin needs to program a new pod's policy alone, made by the reconcile run.

The plugin must put a pod's policy in place before the pod runs, in milliseconds, without
loading the cluster. So each successful run leaves a small JSON document (reconciler.endpoint
reads it with the standard library only):
  - "pods": the two chains of every pod scheduled to this node, exactly as the run rendered
    them (their policy chains exist on the node);
  - "closed": per namespace, whether a pod the run did not know must be closed for egress and
    for ingress (some policy of the namespace might select it); "default" for namespaces the
    run did not know (only global policies could apply).
"""
from __future__ import annotations

from weft.model.cluster import EGRESS, INGRESS, ClusterState
from weft.model.kernel import Dataplane
from weft.renderers.iptables import TABLE, might_apply

FORMAT = 1


def make_snapshot(state: ClusterState, node: str, dataplane: Dataplane, token: str) -> dict:
    pods = {}
    for ep in state.endpoints:
        fw = dataplane.chains.get((TABLE, f"weft-fw-{ep.iface}"))
        tw = dataplane.chains.get((TABLE, f"weft-tw-{ep.iface}"))
        if ep.node == node and fw is not None and tw is not None:
            pods[ep.key] = {"fw": list(fw.rules), "tw": list(tw.rules)}
    closed = {ns: [might_apply(state.policies, ns, EGRESS), might_apply(state.policies, ns, INGRESS)]
              for ns in state.namespaces}
    default = [might_apply(state.policies, None, EGRESS), might_apply(state.policies, None, INGRESS)]
    return {"format": FORMAT, "node": node, "token": token, "pods": pods, "closed": closed, "default": default}
