"""Benchmarks measure weft as installed: its bytecode compiled, as pip does for a regular install.

A checkout compiles its modules on import, and under PYTHONDONTWRITEBYTECODE (or after an edit)
on every run: ~40 ms that no installed weft pays.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGES = ("cni", "desired", "probes", "reconciler", "renderers")


def compile_weft() -> None:
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *PACKAGES], check=True,
                   stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
