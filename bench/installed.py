"""Benchmarks measure weft as installed: its bytecode compiled, as pip does for a regular install.

pip compiles an installed wheel; under PYTHONDONTWRITEBYTECODE (set on some machines) a module
compiled on import is not kept, which would cost every weft run ~40 ms that no installed weft pays.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def compile_weft() -> None:
    import weft.model
    root = Path(weft.model.__file__).resolve().parent.parent        # the installed `weft` package
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(root)], check=True,
                   stdout=subprocess.DEVNULL)


def rerun_inside_namespace(module: str, argv: list[str] | None) -> int:
    """Run `python -m module --inside ARGV` in a network namespace of its own (lo up), removed
    afterwards: the benchmarks' applies touch no kernel state but the namespace's."""
    import uuid
    compile_weft()
    ns = f"weft-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", module, "--inside",
                               *(argv if argv is not None else sys.argv[1:])]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
