"""Install the plugin where the container runtime looks for it:  python -m weft.cni.install [DEST]

DEST defaults to /opt/cni/bin/weft (the CNI configuration's "type": "weft"). What is written is
one of two things, both pinned to the `weft` package this module was imported from (never a
checkout: the checkout's folders are not a `weft` package, they are installed under that
namespace, so running this from inside one changes nothing):

- the native client (cni/client.c), when a C compiler is there (`$CC`, else `cc`): a small
  program that hands the call to the node's resident helper, as cni/client.py does, and runs
  the Python client in its place for anything else. It spares every pod's creation the Python
  interpreter's start-up: ~15 ms of CPU here against ~1 ms, and the plugin's start-up is on
  every pod's creation path;
- else a three-line launcher: it runs this interpreter with -I -S and puts the installed weft
  package's directory and this environment's site-packages on sys.path itself. Skipping `site`
  saves most of Python's start-up (its .pth processing: ~40 ms here against ~10 ms).

An editable install has no package directory (a finder maps the folders, and only `site` loads
it): its launcher runs with -I and `site`, and there is no native client. A plain symlink to the
`weft-cni` console script works too, only slower.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from weft.store.statedir import atomic_write

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


def launcher_code() -> str:
    """What the launcher runs: the installed weft's client (cni/client.py)."""
    return (f"import sys; sys.path[:0] = {launcher_paths()!r}\n"
            "from weft.cni.client import main; sys.exit(main())\n")


def launcher_text(python: str | None = None) -> str:
    flags = "-IS" if package_root() else "-I"                   # an editable install needs `site`
    return f"#!{python or sys.executable} {flags}\n" + launcher_code()


def _c_string(text: str) -> str:
    """`text` as a C string literal (every byte but plain printable ASCII escaped)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\?' else f"\\{b:03o}"
                         for b in text.encode()) + '"'


def native_client(python: str | None = None) -> bytes | None:
    """cni/client.c built for this installation, or None when it cannot be: an editable install
    (no package directory to pin), no C compiler, or the build failed."""
    root = package_root()
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if root is None or compiler is None:
        return None
    header = "".join(f"#define {name} {_c_string(value)}\n" for name, value in (
        ("WEFT_CODE", str(root / "weft")), ("WEFT_PYTHON", python or sys.executable), ("WEFT_BOOT", launcher_code())))
    with tempfile.TemporaryDirectory(prefix="weft-cni-build-") as build:
        Path(build, "weft_client.h").write_text(header)
        out, source = Path(build, "weft"), Path(__file__).with_name("client.c")
        try:
            done = subprocess.run([compiler, "-O2", "-I", build, "-o", str(out), str(source)], capture_output=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.read_bytes() if done.returncode == 0 and out.is_file() else None


def install(dest: str | os.PathLike = DEFAULT_DEST, python: str | None = None, native: bool | None = None) -> Path:
    """Write the plugin to `dest` atomically (a runtime may be running the old one), mode 0755:
    the native client if `native` (None: when it can be built), else the Python launcher."""
    content = native_client(python) if native is not False else None
    if native and content is None:
        raise RuntimeError("cannot build weft's native CNI client: no C compiler (cc or $CC), or an editable install")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(dest.absolute()), content if content is not None else launcher_text(python), 0o755)
    return dest


def is_native(path: str | os.PathLike) -> bool:
    """Whether the plugin at `path` is the native client (an ELF file), not the Python launcher."""
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(__doc__.splitlines()[0].split(":", 1)[1].strip(), file=sys.stderr)
        return 2
    dest = install(args[0] if args else DEFAULT_DEST)
    what = "the native client" if is_native(dest) else \
        "the Python launcher (the native client was not built: no C compiler, $CC or cc, or it failed)"
    print(f"installed {dest}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
