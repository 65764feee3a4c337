"""The `weft` command: plan, apply, drift, status, ipam, lab.

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
from weft.reconciler import ipam_cli, status
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
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:          # the lab parses its own options (argparse's REMAINDER drops "--x")
        return _lab(argv[1:])
    args = parser().parse_args(argv)
    if args.command == "lab":
        return _lab(args.lab_args)
    if args.command == "status":
        return status.run(args)
    if args.command == "ipam":
        return ipam_cli.run(args)
    try:
        return _dispatch(args)
    except (WeftError, OSError) as exc:
        message = str(exc) if isinstance(exc, WeftError) else f"{exc.filename or 'weft'}: {exc.strerror or exc}"
        if args.output == "json":
            print(json.dumps({"format_version": 1, "error": message}))
        print(f"weft: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _lab(argv: list[str]) -> int:
    if any(a == "--nodes" or a.startswith("--nodes=") for a in argv):
        from weft.playbooks.multinode import main as multinode_main
        return multinode_main(argv)
    from weft.playbooks.lab import main as lab_main
    return lab_main(argv)


def _dispatch(args) -> int:
    from weft.probes.runner import Runner
    from weft.reconciler import drift as driftmod
    from weft.reconciler import plan as planmod
    from weft.reconciler import run

    opts = run.Options(node=args.node, state_dir=args.state_dir or Path(default_state_dir()),
                       from_dir=args.from_dir, kubeconfig=args.kubeconfig, context=args.context,
                       backend=args.iptables_backend, lock_timeout=args.lock_timeout,
                       bird_socket=args.bird_socket, bird_log=args.bird_log)
    runner = Runner()
    if args.command == "plan":
        plan = run.make_plan(opts, runner, destroy=args.destroy)
        if args.out:
            planmod.save_plan(plan, args.out)
        _emit(args, plan.to_json(), planmod.format_text(plan)
              + (f"\nSaved the plan to {args.out}; apply it with `weft apply {args.out}` and the same source, "
                 "--node and --state-dir.\n" if args.out else ""))
        return EXIT_CHANGES if args.detailed_exitcode and not plan.empty else EXIT_OK
    if args.command == "apply":
        saved = planmod.load_plan(args.plan_file) if args.plan_file else None
        plan = run.apply(opts, runner, saved, args.plan_file or "", destroy=args.destroy)
        report = plan.to_json() | {"commands": runner.writes, "bytes_written": runner.bytes_written}
        text = ("No changes. The kernel already matches.\n" if plan.empty else
                planmod.format_text(plan) + "\n" + planmod.summary_line(plan, "Apply complete") + "\n")
        _emit(args, report, text)
        return EXIT_OK
    plan, items = run.plan_and_drift(opts, runner, check=False)
    _emit(args, {"format_version": driftmod.FORMAT_VERSION, "node": opts.node, "drifted": bool(items),
                 "items": items}, driftmod.format_text(opts.node, items))
    return EXIT_CHANGES if items else EXIT_OK


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
