"""How the plugin is started, and what it costs: every entry point starts the resident helper on
the installed weft, the launcher pins the installed package (never a checkout), and the import
budgets of the fast path are a checked contract (issue #9 item 5, #10 item 6).

Real kernel where a pod is wired (tests/cninode.py); nothing in the root namespace.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import weft.cni
from tests.cninode import NSENTER, CniNode, helper_pids, node, plugin_binary, wait_for_helper
from tests.nodens import REPO, node_netns, usable
from weft.cni.install import install, is_native, launcher_code, launcher_paths

needs_root = pytest.mark.skipif(usable() is not None, reason=usable() or "")
needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
node, plugin_binary = node, plugin_binary  # the fixtures

# What an ADD served by the plugin must never import: each costs tens to hundreds of ms.
HEAVY = ("yaml", "kubernetes", "pyroute2", "jinja2", "deepdiff", "urllib3", "filelock")


def _launcher_lines(path: Path) -> tuple[str, list[str]]:
    shebang, setup, _ = path.read_text().splitlines()
    return shebang, ast.literal_eval(setup.split("=", 1)[1].strip())


def test_install_pins_the_installed_weft_even_run_from_inside_a_checkout(tmp_path):
    done = subprocess.run([sys.executable, "-c", f"from weft.cni.install import install; install({str(tmp_path)!r} "
                           "+ '/weft', native=False)"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shebang, paths = _launcher_lines(tmp_path / "weft")
    installed = Path(weft.cni.__file__).resolve().parents[1]          # .../site-packages/weft
    assert shebang == f"#!{sys.executable} -IS"
    assert paths[0] == str(installed.parent) and str(REPO) not in paths
    where = subprocess.run([sys.executable, "-IS", "-c", f"import sys; sys.path[:0] = {paths!r}; "
                            "import weft.cni.client as c; print(c.__file__)"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert where.stdout.strip() == str(installed / "cni" / "client.py"), where
    assert launcher_paths() == paths
    done = subprocess.run([str(tmp_path / "weft")], input=b'{"cniVersion": "1.0.0"}', cwd=REPO,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin"}, capture_output=True, timeout=60)
    assert json.loads(done.stdout)["cniVersion"] == "1.0.0"


@needs_cc
def test_the_native_client_is_built_for_the_installed_weft_even_from_inside_a_checkout(tmp_path):
    """`python -m weft.cni.install` builds the native client when a C compiler is there; it hands
    the call to the helper of the installed weft (the code root the helper compares) and runs the
    installed weft's Python client for the rest."""
    done = subprocess.run([sys.executable, "-m", "weft.cni.install", str(tmp_path / "weft")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "the native client" in done.stdout, done
    assert is_native(tmp_path / "weft")
    binary = (tmp_path / "weft").read_bytes()
    installed = Path(weft.cni.__file__).resolve().parents[1]
    assert b"WEFT_CODE=" + os.fsencode(str(installed)) + b"\0" in binary
    assert launcher_code().encode() in binary and repr(str(REPO)) not in launcher_code()
    done = subprocess.run([str(tmp_path / "weft")], input=b'{"cniVersion": "1.0.0"}', cwd=REPO,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin"}, capture_output=True, timeout=60)
    assert json.loads(done.stdout)["cniVersion"] == "1.0.0"


@needs_root
@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_working_c_compiler_the_installed_plugin_is_the_python_launcher_and_serves(cc, tmp_path):
    """The native client is optional: with no C compiler (or one that fails), `python -m
    weft.cni.install` writes the Python launcher, says so, and that plugin does the whole job,
    its helper included."""
    binary = tmp_path / "bin" / "weft"
    done = subprocess.run([sys.executable, "-m", "weft.cni.install", str(binary)], cwd=REPO,
                          env={**os.environ, "CC": cc}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "the Python launcher (the native client was not built" in done.stdout, done
    assert not is_native(binary) and binary.read_text().startswith(f"#!{sys.executable} -IS\n")
    with contextlib.ExitStack() as stack:
        cni = CniNode(stack.enter_context(node_netns()), tmp_path, str(binary), stack)
        assert cni.add("a").startswith("198.18.4.")
        helper = wait_for_helper(cni)
        cni.add("b")
        assert helper_pids(cni) == [helper]
        assert cni.call(cni.env("CHECK", "b"))[0] == 0
        cni.ok("DEL", "a")
        cni.ok("DEL", "b")
        cni.clean()


def test_the_client_imports_only_built_in_modules():
    """All a call the helper serves costs is an interpreter start and this import."""
    code = (f"import sys; sys.path[:0] = {launcher_paths()!r}; before = set(sys.modules); "
            "import weft.cni.client; print(sorted(set(sys.modules) - before))")
    done = subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    new = ast.literal_eval(done.stdout)
    assert [m for m in new if m not in sys.builtin_module_names and m.split(".")[0] != "weft"] == []
    assert set(new) >= {"weft.cni.client"}


@needs_root
def test_an_add_the_plugin_serves_itself_imports_nothing_heavy(node, tmp_path):
    node.add("warm")                                  # node.json written (reading manifests needs yaml)
    script = tmp_path / "add.py"
    script.write_text(
        f"import sys; sys.path[:0] = {launcher_paths()!r}\n"
        "from weft.cni import plugin\n"
        "code = plugin.main()\n"
        f"open({str(tmp_path / 'modules')!r}, 'w').write(repr(sorted(sys.modules)))\n"
        "sys.exit(code)\n")
    env = node.env("ADD", "b")
    proc = subprocess.run([NSENTER, f"--net=/run/netns/{node.ns}", sys.executable, "-IS", str(script)], env=env,
                          input=json.dumps({**node.config, "helper": False}).encode(), capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modules = ast.literal_eval((tmp_path / "modules").read_text())
    assert "weft.reconciler.endpoint" in modules and "weft.cni.fastpath" in modules, "the ADD did its policy step"
    assert [m for m in modules if m.split(".")[0] in HEAVY] == []
    assert [m for m in modules if m in ("dataclasses", "typing")] == [], \
        "the fast path avoids these on purpose (~10 ms): a module on the ADD path started using them"
    assert not [m for m in modules if m.startswith(("weft.desired", "weft.renderers.iptables"))]


@needs_root
@pytest.mark.parametrize("how", ["console script", "installed launcher", "native client"])
def test_the_helper_starts_from_every_entry_point_and_logs_no_error(how, tmp_path):
    """The issue: with the `weft-cni` console script every call found no helper and left
    `ModuleNotFoundError` in cni-helper.log."""
    if how == "native client" and shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler")
    binary = str(Path(sys.executable).parent / "weft-cni") if how == "console script" else \
        str(install(tmp_path / "bin" / "weft", native=how == "native client"))
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(node_netns())
        cni = CniNode(ns, tmp_path, binary, stack)
        cni.add("a")
        helper = wait_for_helper(cni)
        cni.add("b")                                  # served by it
        assert helper_pids(cni) == [helper], "a second helper: the first did not serve the call"
        assert cni.call(cni.env("CHECK", "b"))[0] == 0
        cni.ok("DEL", "a")
        cni.ok("DEL", "b")
        log = (cni.state_dir / "cni-helper.log").read_text()
        assert log == "", log
        cmdline = Path(f"/proc/{helper}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1] == b"-IS" and os.fsencode(str(Path(weft.cni.__file__).resolve().parents[2])) in cmdline[3]


IMPOSTOR = """
import os, socket, sys
seen = open(sys.argv[1], "ab", buffering=0)
os.setuid(65534)                    # the credentials a client sees are those of listen()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\\0weft-cni")
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        seen.write(c.recv(65536))
    except OSError:
        pass
    c.close()
"""


@needs_root
@pytest.mark.parametrize("how", ["installed launcher", "native client"])
def test_a_helper_name_held_by_another_user_is_handed_nothing(how, tmp_path):
    """Any process in the node's namespace may bind @weft-cni first. The client hands the call
    only to a helper of its own user; else it runs the plugin itself, says why, and starts no
    helper (the name is taken)."""
    if how == "native client" and shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler")
    binary = str(install(tmp_path / "bin" / "weft", native=how == "native client"))
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(node_netns())
        cni = CniNode(ns, tmp_path, binary, stack)
        seen = tmp_path / "seen"
        impostor = subprocess.Popen([NSENTER, f"--net=/run/netns/{ns}", sys.executable, "-I", "-c", IMPOSTOR,
                                     str(seen)], stdout=subprocess.PIPE, text=True)
        stack.callback(impostor.kill)
        assert impostor.stdout.readline().strip() == "ready"
        code, out, err = cni.call(cni.env("ADD", "a"))
        assert code == 0, (out, err)
        assert "held by a process of another user" in err
        assert seen.read_bytes() == b"", "the call was handed to the impostor"
        assert helper_pids(cni) == []
        assert cni.call(cni.env("CHECK", "a"))[0] == 0
        cni.ok("DEL", "a")
        cni.clean()


@needs_root
@needs_cc
def test_the_native_client_hands_a_large_configuration_whole_to_the_python_client(node, tmp_path):
    """A call the helper declines ("helper": false) is run by the Python client with the stdin
    the native client already read: whole, also when it is larger than a pipe holds."""
    assert is_native(node.binary)
    node.add("first")
    wait_for_helper(node)
    padding = "x" * (300 << 10)
    out = node.ok("ADD", "b", config={"helper": False, "comment": padding})
    assert out["ips"][0]["address"].startswith("198.18.4.")
    node.ok("DEL", "b", config={"helper": False, "comment": padding})
    assert [a["pod"] for a in node.allocations()] == ["first"]
