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
