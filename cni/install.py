"""Install the plugin where the container runtime looks for it:  python -m weft.cni.install [DEST]

DEST defaults to /opt/cni/bin/weft (the CNI configuration's "type": "weft"). What is written is a
three-line launcher, not a copy: it runs this interpreter with -I -S and puts the installed weft
package's directory and this environment's site-packages on sys.path itself. Skipping `site`
saves most of Python's start-up (its .pth processing: ~40 ms here against ~10 ms), and the
plugin's start-up is on every pod's creation path. What is pinned is the `weft` package this
module was imported from, never a checkout: the checkout's folders are not a `weft` package (they
are installed under that namespace), so running this from inside one changes nothing. An editable
install has no such directory (a finder maps the folders, and only `site` loads it): its launcher
runs with -I and `site`. A plain symlink to the `weft-cni` console script works too, only slower.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

DEFAULT_DEST = "/opt/cni/bin/weft"


def package_root() -> Path | None:
    """The directory holding the installed `weft` package this module belongs to, or None when
    weft is not installed as a package directory (an editable install)."""
    root = Path(__file__).resolve().parents[2]                  # .../site-packages for .../weft/cni/install.py
    return root if (root / "weft" / "cni" / "client.py").is_file() else None


def launcher_paths() -> list[str]:
    """What the launcher puts on sys.path: weft's package directory, then this environment's site-packages."""
    root = package_root()
    site = dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]))
    return ([str(root)] if root else []) + [p for p in site if p != str(root)]


def launcher_text(python: str | None = None) -> str:
    flags = "-IS" if package_root() else "-I"                   # an editable install needs `site`
    return (f"#!{python or sys.executable} {flags}\n"
            f"import sys; sys.path[:0] = {launcher_paths()!r}\n"
            "from weft.cni.client import main; sys.exit(main())\n")


def install(dest: str | os.PathLike = DEFAULT_DEST, python: str | None = None) -> Path:
    """Write the launcher to `dest` atomically (a runtime may be running the old one), mode 0755."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(launcher_text(python))
            os.fchmod(f.fileno(), 0o755)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
