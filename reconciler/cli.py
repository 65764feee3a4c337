"""The `weft` command: plan, apply, drift, status, ipam, ipam-gc, node-jobs, version, lab.

Exit codes are for machines: 0 success / no changes, 1 error, 2 changes pending or drift found
(plan with --detailed-exitcode, drift).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from weft.model.errors import WeftError
from weft.reconciler import ipam_cli, ipam_gc, logs, metrics, nodejobs, status, version
from weft.reconciler.output import emit
from weft.store.statedir import default_state_dir

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="read the desired state from YAML manifests in DIR (default: the Kubernetes API server)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", help="kubeconfig context to use")
    p.add_argument("--node", default=socket.gethostname(), help="this node's name (default: the hostname)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where weft keeps its lock and state (default: /var/lib/weft)")
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto",
                   help="iptables backend (default: where weft's chains are, else the system's iptables)")
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.add_argument("--bird-socket", metavar="PATH",
                   help="BIRD's control socket (default: <state dir>/bird.ctl)")
    p.add_argument("--bird-log", metavar="TARGET",
                   help="where BIRD logs: a file, syslog or stderr (default: <state dir>/bird.log)")
    p.add_argument("--lock-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long apply waits for another weft run on this node (default 300)")
    metrics.add_arguments(p)
    logs.add_arguments(p)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="weft", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="show what apply would change")
    _common(plan)
    plan.add_argument("--out", metavar="FILE", help="save the plan for `weft apply FILE`")
    plan.add_argument("--detailed-exitcode", action="store_true", help="exit 2 when there are changes")
    plan.add_argument("--destroy", action="store_true", help="plan the removal of everything weft owns")
    apply = sub.add_parser("apply", help="make the kernel match the desired state (or a saved plan)")
    _common(apply)
    apply.add_argument("plan_file", nargs="?", metavar="PLAN",
                       help="a plan saved by `weft plan --out`: applied only if weft, reading the same source and "
                            "the kernel again, would do exactly that")
    apply.add_argument("--destroy", action="store_true", help="remove everything weft owns")
    drift = sub.add_parser("drift", help="report where the kernel differs from the desired state (exit 2)")
    _common(drift)
    lab = sub.add_parser("lab", help="run the built-in example in a throwaway network-namespace lab "
                                     "(--nodes N: the multi-node BGP lab)")
    lab.add_argument("lab_args", nargs=argparse.REMAINDER)
    status.add_parser(sub)
    ipam_cli.add_parsers(sub)
    ipam_gc.add_parser(sub)
    nodejobs.add_parser(sub)
    version.add_parser(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:          # the lab parses its own options (argparse's REMAINDER drops "--x")
        return _lab(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "lab":
        return _lab(args.lab_args)
    others = {"status": status.run, "ipam": ipam_cli.run, "ipam-gc": ipam_gc.run, "node-jobs": nodejobs.run,
              "version": version.run}
    if args.command in others:
        return others[args.command](args)
    run = metrics.RunMetrics(args.node, args.command) if args.metrics_file else None
    log = logs.EventLog(args.log_format, node=args.node, command=args.command) if args.log_format == "json" else None
    try:
        code = _dispatch(args, run, log)
        if run is not None:
            run.success = True
        return code
    except (WeftError, OSError) as exc:
        message = str(exc) if isinstance(exc, WeftError) else f"{exc.filename or 'weft'}: {exc.strerror or exc}"
        if args.output == "json":
            print(json.dumps({"format_version": 1, "error": message}))
        if log is not None:
            log.error("run", message)          # in JSON mode every stderr line is one JSON event
        else:
            print(f"weft: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        if run is not None:
            _write_metrics(args, run)


def _lab(argv: list[str]) -> int:
    if any(a == "--nodes" or a.startswith("--nodes=") for a in argv):
        from weft.playbooks.multinode import main as multinode_main
        return multinode_main(argv)
    from weft.playbooks.lab import main as lab_main
    return lab_main(argv)


def _write_metrics(args, run: metrics.RunMetrics) -> None:
    """The run's metrics file, also after a failure (a failed run is what an alert looks for); an
    apply also carries the CNI plugin's counters. A file that cannot be written is one line."""
    state_dir = args.state_dir or Path(default_state_dir())
    try:
        cni = None
        if args.command in ("apply", "drift"):
            _node_figures(run, state_dir, args.bird_socket)
        if args.command == "apply":
            cni = metrics.CniCounters.load(state_dir)
        metrics.write(args.metrics_file, run, cni)
    except (WeftError, OSError) as exc:
        print(f"weft: error: writing the metrics file {args.metrics_file}: {exc}", file=sys.stderr)


def _node_figures(run: metrics.RunMetrics, state_dir: Path, bird_socket: str | None) -> None:
    """BGP sessions (from BIRD, when it runs) and IPAM blocks' use, as the node has them now."""
    from weft.reconciler.bird import default_socket
    from weft.store import ipam
    try:
        data = status.collect(bird_socket or default_socket(state_dir))
        run.bgp_established, run.bgp_sessions = metrics.bgp_counts(data)
    except WeftError:
        pass                                   # BIRD went away meanwhile: no BGP figures
    try:
        shown = ipam_cli.show(ipam.read_node_ipam(state_dir), ipam.read_allocations(state_dir))
        run.ipam_blocks = metrics.ipam_blocks(shown)
    except WeftError:
        pass                                   # no IPAM records (yet): no IPAM figures


def _dispatch(args, run_metrics: metrics.RunMetrics | None = None, log: logs.EventLog | None = None) -> int:
    from weft.probes.runner import Runner
    from weft.reconciler import drift as driftmod
    from weft.reconciler import plan as planmod
    from weft.reconciler import run
    from weft.reconciler.observe import Observer

    observer = Observer(run_metrics, log)
    opts = run.Options(node=args.node, state_dir=args.state_dir or Path(default_state_dir()),
                       from_dir=args.from_dir, kubeconfig=args.kubeconfig, context=args.context,
                       backend=args.iptables_backend, lock_timeout=args.lock_timeout,
                       bird_socket=args.bird_socket, bird_log=args.bird_log, observer=observer)
    runner = Runner()
    if args.command == "plan":
        plan = run.make_plan(opts, runner, destroy=args.destroy)
        _record(run_metrics, observer, plan)
        if args.out:
            planmod.save_plan(plan, args.out)
        _emit(args, plan.to_json(), planmod.format_text(plan)
              + (f"\nSaved the plan to {args.out}; apply it with `weft apply {args.out}` and the same source, "
                 "--node and --state-dir.\n" if args.out else ""))
        return EXIT_CHANGES if args.detailed_exitcode and not plan.empty else EXIT_OK
    if args.command == "apply":
        saved = planmod.load_plan(args.plan_file) if args.plan_file else None
        plan = run.apply(opts, runner, saved, args.plan_file or "", destroy=args.destroy)
        _record(run_metrics, observer, plan, applied=True)
        report = plan.to_json() | {"commands": runner.writes, "bytes_written": runner.bytes_written}
        text = ("No changes. The kernel already matches.\n" if plan.empty else
                planmod.format_text(plan) + "\n" + planmod.summary_line(plan, "Apply complete") + "\n")
        _emit(args, report, text)
        return EXIT_OK
    plan, items = run.plan_and_drift(opts, runner, check=False)
    if run_metrics is not None:
        run_metrics.drift_items = len(items)
    observer.event("drift", "drifted" if items else "in sync", items=len(items))
    _emit(args, {"format_version": driftmod.FORMAT_VERSION, "node": opts.node, "drifted": bool(items),
                 "items": items}, driftmod.format_text(opts.node, items))
    return EXIT_CHANGES if items else EXIT_OK


def _record(run_metrics: metrics.RunMetrics | None, observer, plan, applied: bool = False) -> None:
    """What the plan changes (or changed), for the metrics file and the log."""
    counts = metrics.changes_by_kind(plan.to_json()) if run_metrics is not None or observer.log else {}
    if run_metrics is not None and applied:
        run_metrics.changes = counts
    observer.event("apply" if applied else "plan", "applied" if applied else "planned", **plan.summary,
                   **{f"changes_{k}": v for k, v in counts.items()})


def _emit(args, data: dict, text: str) -> None:
    emit(args.output, data, text)


def command() -> NoReturn:
    """The `weft` console command: main(), then out without the interpreter's teardown.

    Freeing, one by one, the objects a run over a large cluster leaves in modules costs ~25 ms,
    a tenth of a run with nothing to do; the process is ending anyway. Exit handlers still run
    (the official client removes its temporary credential files in one) and output is flushed.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        atexit._run_exitfuncs()
        os._exit(code)


if __name__ == "__main__":
    command()
