"""Install the plugin where the container runtime looks for it:  python -m weft.cni.install [DEST]

DEST defaults to /opt/cni/bin/weft (the CNI configuration's "type": "weft"). What is written is a
three-line launcher, not a copy: it runs this interpreter with -I -S and puts weft's code and this
environment's site-packages on sys.path itself. Skipping `site` saves most of Python's start-up
(its .pth processing, the editable-install finder: ~40 ms here against ~10 ms), and the plugin's
start-up is on every pod's creation path. A plain symlink to the `weft-cni` console script works
too, only slower.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

DEFAULT_DEST = "/opt/cni/bin/weft"


def launcher_paths() -> list[str]:
    """What the launcher puts on sys.path: weft's code, then this environment's site-packages."""
    root = str(Path(__file__).resolve().parents[2])             # the directory holding the `weft` package
    site = dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]))
    return [root] + [p for p in site if p != root]


def launcher_text(python: str | None = None) -> str:
    return (f"#!{python or sys.executable} -IS\n"
            f"import sys; sys.path[:0] = {launcher_paths()!r}\n"
            "from weft.cni.client import main; sys.exit(main())\n")


def install(dest: str | os.PathLike = DEFAULT_DEST, python: str | None = None) -> Path:
    """Write the launcher to `dest` atomically (a runtime may be running the old one), mode 0755."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(launcher_text(python))
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(__doc__.splitlines()[0].split(":", 1)[1].strip(), file=sys.stderr)
        return 2
    print(f"installed {install(args[0] if args else DEFAULT_DEST)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
