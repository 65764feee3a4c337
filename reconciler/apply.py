"""Executing a change set: the restore inputs (pure) and running them (side effects).

Order, so that no rule ever refers to a set that is not there:
  0. only when a set must change type (it was tampered with): the chains that refer to it are
     emptied first, since the kernel cannot rename, swap or destroy a set in use; the node
     fails closed for those policies until step 2 refills them;
  1. ipset restore: create new sets, update members, recreate type-replaced sets;
  2. iptables-restore --noflush, one transaction: chains declared (flushed) and refilled,
     removed chains emptied then deleted, hook rules fixed;
  3. ipset restore: destroy sets no longer referenced.
If step 2 fails the kernel rejects the whole transaction; step 1 is then undone, so the
previous rules keep running against the previous set contents.
"""
from __future__ import annotations

from dataclasses import dataclass

from weft.model.kernel import Dataplane
from weft.probes.backend import Backend, table_backend
from weft.probes.dataplane import probe_dataplane, probe_some
from weft.probes.routes import start_route_probe
from weft.probes.runner import KernelCommandError, Runner
from weft.reconciler.diff import CREATE, DELETE, REPLACE, UPDATE, Changes, diff, names_set, simulate


@dataclass(frozen=True)
class RestoreInputs:
    iptables_first: dict[str, str]     # per table label, see probes.backend.table_label
    ipset_before: str
    ipset_undo: str
    iptables: dict[str, str]
    ipset_after: str


def restore_inputs(changes: Changes) -> RestoreInputs:
    before, undo, after = [], [], []
    for s in changes.sets:
        if s.action in (CREATE, REPLACE):
            if s.action == REPLACE:
                before.append(f"destroy {s.name}")
            before.append(f"create {s.name} {s.type} family {s.family}")
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.append(f"destroy {s.name}")
        elif s.action == UPDATE:
            before.extend(f"del {s.name} {m}" for m in s.remove)
            before.extend(f"add {s.name} {m}" for m in s.add)
            undo.extend(f"del {s.name} {m}" for m in s.add)
            undo.extend(f"add {s.name} {m}" for m in s.remove)
        elif s.action == DELETE:
            after.append(f"destroy {s.name}")

    replaced = [s.name for s in changes.sets if s.action == REPLACE]
    users = [c for c in changes.chains if any(names_set(r, name) for r in c.previous for name in replaced)]
    first = {label: f"*{_table(label)}\n" + "".join(f":{c.name} - [0:0]\n" for c in users if c.table == label)
             + "COMMIT\n" for label in sorted({c.table for c in users})}
    return RestoreInputs(first, _script(before), _script(reversed(undo)), _iptables_inputs(changes), _script(after))


def _table(label: str) -> str:
    """"filter@legacy" -> "filter": the label says which backend, the text names the table."""
    return label.partition("@")[0]


def _iptables_inputs(changes: Changes) -> dict[str, str]:
    """One iptables-restore input per table label (the other backend's leftovers go apart)."""
    inputs = {}
    for label in sorted({c.table for c in changes.chains} | {h.table for h in changes.hooks}):
        lines = [f"*{_table(label)}"]
        written = [c for c in changes.chains if c.table == label]
        lines.extend(f":{c.name} - [0:0]" for c in written)           # declaring flushes
        for c in written:
            lines.extend(c.rules)
        for h in changes.hooks:
            if h.table != label:
                continue
            lines.extend("-D" + r[2:] for r in h.previous)               # "-A X ..." -> "-D X ..."
            lines.extend(f"-I {h.chain} {i + 1}" + r[2 + len(h.chain) + 1:] for i, r in enumerate(h.rules))
        lines.extend(f"-X {c.name}" for c in written if c.action == DELETE)
        lines.append("COMMIT")
        inputs[label] = "\n".join(lines) + "\n"
    return inputs


def _script(lines) -> str:
    lines = list(lines)
    return "\n".join(lines) + "\n" if lines else ""


def execute(changes: Changes, backend: Backend, runner: Runner) -> None:
    """Apply `changes`; on failure, leave the previous rules in force and raise."""
    inputs = restore_inputs(changes)
    for label, text in inputs.iptables_first.items():
        runner.run(table_backend(label, backend).restore, text, writes=True)
    if inputs.ipset_before:
        runner.run(["ipset", "restore"], inputs.ipset_before, writes=True)
    # This run's backend first: the one transaction whose failure must leave all as it was.
    for label, text in sorted(inputs.iptables.items(), key=lambda kv: "@" in kv[0]):
        try:
            runner.run(table_backend(label, backend).restore, text, writes=True)
        except KernelCommandError:
            if inputs.ipset_undo and "@" not in label:
                runner.run(["ipset", "restore"], inputs.ipset_undo, writes=True)
            raise
    apply_routing(changes, runner)
    if inputs.ipset_after:
        runner.run(["ipset", "restore"], inputs.ipset_after, writes=True)


def apply_routing(changes: Changes, runner: Runner) -> None:
    """Interface sysctls (files under /proc/sys) and routes (netlink), after the policy is in
    place: a new pod becomes reachable only once its rules are."""
    for link in changes.links:
        for key, value in link.sysctls:
            runner.writes.append(f"sysctl {key.replace('/', '.')}={value}")
            try:
                with open(f"/proc/sys/{key}", "w") as f:
                    f.write(value)
            except OSError as exc:
                raise KernelCommandError(f"setting {key.replace('/', '.')}={value}: {exc.strerror}") from None
    if not changes.routes:
        return
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from weft.model.names import ROUTE_PROTOCOL
    with IPRoute() as ipr:
        for r in changes.routes:
            what = f"route {'del' if r.action == DELETE else 'replace'} {r.dst}" + (f" dev {r.dev}" if r.dev else "")
            runner.writes.append(f"netlink {what}")
            try:
                if r.action == DELETE:
                    _delete_route(ipr, r.dst, ROUTE_PROTOCOL)
                elif r.type == "blackhole":
                    ipr.route("replace", dst=r.dst, proto=ROUTE_PROTOCOL, type="blackhole")
                else:
                    index = ipr.link_lookup(ifname=r.dev)
                    if not index:
                        raise KernelCommandError(f"{what}: no interface {r.dev}")
                    ipr.route("replace", dst=r.dst, oif=index[0], proto=ROUTE_PROTOCOL,
                              scope=0 if ":" in r.dst else 253)     # IPv4 /32: scope link
            except NetlinkError as exc:
                raise KernelCommandError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}") from None


def _delete_route(ipr, dst: str, proto: int) -> None:
    """The kernel matches a deletion on scope too: weft's IPv4 pod routes are scope link, its
    blackholes and IPv6 routes scope universe; one of the two is the route's."""
    from pyroute2.netlink.exceptions import NetlinkError
    for scope in (253, 0):
        try:
            ipr.route("del", dst=dst, proto=proto, scope=scope)
            return
        except NetlinkError as exc:
            if exc.code != 3:                 # ESRCH: not with this scope
                raise
    raise KernelCommandError(f"route del {dst}: no such route")


VERIFY_ONE_BY_ONE = 40      # up to this many changed items, read back just those


def verify(runner: Runner, backend: Backend, before: Dataplane, changes: Changes) -> Changes:
    """What still differs from what `changes` should have made of `before` (empty when all landed)."""
    expected = simulate(before, changes)
    elsewhere = {table_backend(c.table, backend) for c in (*changes.chains, *changes.hooks)} - {backend}
    if elsewhere or len(changes.chains) + len(changes.sets) + len(changes.hooks) > VERIFY_ONE_BY_ONE:
        return diff(expected, probe_dataplane(runner, backend, sorted(elsewhere, key=lambda b: b.name)))
    chains = {(c.table, c.name) for c in changes.chains}
    sets = {s.name for s in changes.sets}
    hooks = {(h.table, h.chain) for h in changes.hooks}
    after = probe_some(runner, backend, [n for _t, n in chains], sets, [c for _t, c in hooks])
    if changes.routes or changes.links:
        after = Dataplane(after.chains, after.ipsets, after.hooks, *start_route_probe(runner)())
    else:
        after = Dataplane(after.chains, after.ipsets, after.hooks, expected.routes, expected.links)
    part = Dataplane({k: v for k, v in expected.chains.items() if k in chains},
                     {k: v for k, v in expected.ipsets.items() if k in sets},
                     {k: v for k, v in expected.hooks.items() if k in hooks}, expected.routes, expected.links)
    leftover = diff(part, after)
    if leftover.empty:
        return leftover
    # A per-chain read can misreport (iptables-nft calls some chains "incompatible"): a full
    # dump has the last word before an apply is declared failed.
    return diff(expected, probe_dataplane(runner, backend))
