"""`weft version`: weft's version and the data plane tools it found on this node.

What an operator pastes into a bug report, and what a fleet check compares: the iptables
backend the `iptables` command uses, ipset, BIRD, bpftool and bcc (the eBPF data plane's
compiler). A missing tool is reported as missing, not as an error: exit 0 either way.
"""
from __future__ import annotations

import re
import shutil
import subprocess

from weft.reconciler.output import emit

FORMAT_VERSION = 1
# (name, command, pattern of the version in its output)
TOOLS = (
    ("iptables", ["iptables", "--version"], r"v(\d[\w.]*)(?: \((\w+)\))?"),
    ("ipset", ["ipset", "--version"], r"v(\d[\w.]*)"),
    ("ip", ["ip", "-V"], r"iproute2-(?:ss)?([\w.-]+)"),
    ("bird", ["bird", "--version"], r"BIRD version (\S+)"),
    ("bpftool", ["bpftool", "version"], r"v(\d[\w.]*)"),
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("version", help="weft's version and the data plane tools found")
    p.add_argument("--output", choices=("text", "json"), default="text")


def weft_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("weft")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def tool(name: str, argv: list[str], pattern: str) -> dict:
    path = shutil.which(argv[0], path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        return {"name": name, "found": False}
    try:
        proc = subprocess.run([path, *argv[1:]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"name": name, "found": True, "path": path, "version": None, "error": str(exc)}
    match = re.search(pattern, proc.stdout + proc.stderr)
    out = {"name": name, "found": True, "path": path, "version": match.group(1) if match else None}
    if name == "iptables":
        out["backend"] = {"nf_tables": "nft", "legacy": "legacy"}.get(match.group(2) if match else "", "legacy")
    return out


def bcc() -> dict:
    """bcc is Debian's python3-bpfcc: found in this interpreter's (system) site packages."""
    import importlib.util
    spec = importlib.util.find_spec("bcc")
    if spec is None:
        return {"name": "bcc", "found": False}
    from importlib.metadata import PackageNotFoundError, version
    try:
        found = version("bcc")
    except PackageNotFoundError:
        found = None
    return {"name": "bcc", "found": True, "path": spec.origin, "version": found}


def collect() -> dict:
    return {"format_version": FORMAT_VERSION, "weft": weft_version(),
            "tools": [tool(*t) for t in TOOLS] + [bcc()]}


def format_text(data: dict) -> str:
    lines = [f"weft {data['weft']}"]
    for t in data["tools"]:
        if not t["found"]:
            lines.append(f"  {t['name']:<9} not found")
            continue
        extra = f" ({t['backend']} backend)" if t.get("backend") else ""
        lines.append(f"  {t['name']:<9} {t.get('version') or 'version unknown'}{extra}  {t.get('path', '')}")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    data = collect()
    emit(args.output, data, format_text(data))
    return 0
