"""The Ansible playbooks, run for real against this machine (connection local) into a disposable
root: install, a second install that changes nothing, the installed unit's command line
reconciling a node network namespace, a pod's ADD and DEL through the installed CNI plugin (the
native client the role builds with the node's C compiler), check.yml's drift report, an upgrade stopped by its plan
gate and then approved, a rollback, and remove.yml leaving the root as it found it.

Nothing outside the disposable root changes: weft_root moves every path under it, systemd is
not asked to do anything (weft_manage_services: false; the units are still checked with
`systemd-analyze verify` by the role), the package task only checks (weft_packages_check_only),
and every weft command the playbooks run enters the test's node namespace (weft_netns).
Ansible's and pip's own caches are kept in the test's directory too.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import nodens

if (why := nodens.usable()) is not None:
    pytest.skip(why, allow_module_level=True)
if shutil.which("setpriv") is None or shutil.which("systemd-analyze") is None:
    pytest.skip("needs setpriv and systemd-analyze", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
PLAYBOOKS = REPO / "playbooks" / "ansible"
ANSIBLE = Path(sys.executable).parent / "ansible-playbook"
NODE = "n1"
# Real system paths a test run must not touch: compared before and after.
POOL = {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "pods"},
        "spec": {"cidr": "198.19.0.0/16", "blockSize": 26}}
BLOCK = {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock", "metadata": {"name": "198-19-4-0-26"},
         "spec": {"cidr": "198.19.4.0/26", "affinity": f"host:{NODE}"}}
WATCHED = ("/etc/systemd/system", "/opt/cni/bin", "/etc/cni/net.d", "/opt/weft", "/etc/weft", "/var/lib/weft")


def _listing() -> dict[str, list[str]]:
    return {p: sorted(os.listdir(p)) if os.path.isdir(p) else [] for p in WATCHED}


def _tree(root: Path) -> dict[str, str]:
    """Every path under root, with its type: what remove.yml must leave as install found it."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = "dir" if path.is_dir() and not path.is_symlink() else "file"
    return out


def _build_wheel(source: Path, out: Path, version: str | None = None) -> Path:
    """weft's wheel, as a user builds it; `version`: from a copy of the source with that version."""
    if version:
        copy = out / f"src-{version}"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build",
                                                                      "__pycache__", ".tox"))
        pyproject = copy / "pyproject.toml"
        pyproject.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', pyproject.read_text()))
        source = copy
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheels = sorted(out.glob(f"weft-{version or '*'}-py3-none-any.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1]


class Lab:
    """A disposable root, a node namespace, an inventory, and ansible-playbook to run on them."""

    def __init__(self, base: Path, ns: str):
        self.base, self.ns = base, ns
        self.root = base / "root"
        for d in ("etc/systemd/system", "opt/cni/bin", "etc/cni/net.d", "var/lib", "opt"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.manifests = base / "manifests"
        self.manifests.mkdir()
        nodens.write_manifests(self.manifests, [
            POOL, BLOCK,
            nodens.namespace("web", team="web"),
            nodens.pod("web", "front", "198.18.0.10", {"app": "front"}),
            nodens.pod("web", "back", "198.18.0.11", {"app": "back"}),
            nodens.policy("web", "back-from-front", {
                "podSelector": {"matchLabels": {"app": "back"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "front"}}}]}]}),
        ])
        self.wheels = base / "wheels"
        self.wheels.mkdir()
        self.env = os.environ | {
            "ANSIBLE_HOME": str(base / "ansible"), "ANSIBLE_LOCAL_TEMP": str(base / "ansible" / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(base / "ansible" / "rtmp"), "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0", "PIP_CACHE_DIR": str(base / "pip-cache"),
            "ANSIBLE_FORCE_COLOR": "0"}

    def inventory(self, **extra) -> Path:
        host = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
                "weft_root": str(self.root), "weft_manage_services": False, "weft_packages_check_only": True,
                "weft_source": "manifests", "weft_manifests_dir": str(self.manifests), "weft_node_name": NODE,
                "weft_netns": self.ns} | extra
        path = self.base / "inventory.json"
        path.write_text(json.dumps({"all": {"children": {"weft_nodes": {"hosts": {"testnode": host}}}}}))
        return path

    def play(self, playbook: str, *extra_args: str, expect_ok: bool = True, **host_vars) -> tuple[int, str]:
        """Run a playbook; returns (changed count, output)."""
        proc = subprocess.run([str(ANSIBLE), "-i", str(self.inventory(**host_vars)), str(PLAYBOOKS / playbook),
                               *extra_args], capture_output=True, text=True, env=self.env, cwd=self.base,
                              timeout=900)
        out = proc.stdout + proc.stderr
        recap = re.search(r"testnode\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
        assert recap, out
        if expect_ok:
            assert proc.returncode == 0 and recap.group(3) == "0", out
        else:
            assert proc.returncode != 0, out
        return int(recap.group(1)), out

    @property
    def unit_dir(self) -> Path:
        return self.root / "etc/systemd/system"

    def unit_argv(self, unit: str) -> list[str]:
        """ExecStart of an installed unit, with its EnvironmentFile's variables put in as systemd
        does (${X}: one word; $X: split at whitespace)."""
        text = (self.unit_dir / unit).read_text()
        env_file = re.search(r"(?m)^EnvironmentFile=(.*)$", text).group(1)
        env = {}
        for line in Path(env_file).read_text().splitlines():
            if line and not line.startswith("#"):
                key, value = line.split("=", 1)
                env[key] = value[1:-1] if value[:1] == value[-1:] == '"' else value
        words = []
        for word in shlex.split(re.search(r"(?m)^ExecStart=(.*)$", text).group(1)):
            if m := re.fullmatch(r"\$\{(\w+)\}", word):
                words.append(env[m.group(1)])
            elif m := re.fullmatch(r"\$(\w+)", word):
                words += env[m.group(1)].split()
            else:
                words.append(word)
        return words

    def capabilities(self, unit: str) -> str:
        """The unit's CapabilityBoundingSet as setpriv's --bounding-set argument."""
        caps = re.search(r"(?m)^CapabilityBoundingSet=(.*)$", (self.unit_dir / unit).read_text()).group(1).split()
        known = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True).stdout.split()
        return "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps
                                  if c.lower().removeprefix("cap_") in known)

    def run_unit(self, unit: str) -> subprocess.CompletedProcess:
        """The unit's command line in the node namespace, with only the unit's capabilities and
        no new privileges, as systemd would start it."""
        argv = ["nsenter", f"--net=/run/netns/{self.ns}", "setpriv", "--no-new-privs",
                f"--bounding-set={self.capabilities(unit)}", *self.unit_argv(unit)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def venv_link(self) -> str:
        return os.readlink(self.root / "opt/weft/venv")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("deploy")
    before = _listing()
    with nodens.node_netns() as ns:
        lab = Lab(base, ns)
        lab.wheel = _build_wheel(REPO, lab.wheels)
        lab.pristine = _tree(lab.root)
        changed, out = lab.play("install.yml", "-e", f"weft_wheel={lab.wheel}")
        assert changed > 0, out
        yield lab       # the namespace goes with whatever weft left in it; the root is the test's
    assert _listing() == before, "a test run changed files outside its disposable root"


def test_install_writes_the_node_and_a_second_run_changes_nothing(lab):
    root = lab.root
    assert (root / "var/lib/weft").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/weft/weft.env").stat().st_mode & 0o777 == 0o600
    launcher = root / "opt/cni/bin/weft"
    assert launcher.stat().st_mode & 0o777 == 0o755
    assert launcher.read_bytes()[:4] == b"\x7fELF", "the CNI plugin is the native client"
    assert f"{root}/opt/weft/venv/bin/python".encode() in launcher.read_bytes()
    assert launcher.read_bytes() == (root / "opt/weft/venv/weft-cni").read_bytes()
    conflist = json.loads((root / "etc/cni/net.d/10-weft.conflist").read_text())
    assert conflist["cniVersion"] == "1.0.0" and conflist["cniVersions"] == ["1.0.0", "1.1.0"]
    assert conflist["plugins"] == [{"type": "weft", "node": NODE, "state_dir": str(root / "var/lib/weft"),
                                    "manifests": str(lab.manifests), "mtu": 1500}]
    # The plugin answers VERSION through the installed launcher, with the conflist's versions.
    proc = subprocess.run([str(launcher)], input='{"cniVersion": "1.0.0"}', capture_output=True, text=True,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert {"1.0.0", "1.1.0"} <= set(json.loads(proc.stdout)["supportedVersions"])
    units = sorted(p.name for p in lab.unit_dir.iterdir())
    assert units == ["weft-bird.path", "weft-bird.service", "weft-drift.service", "weft-drift.timer",
                     "weft-drift.timer.d", "weft-reconcile.service", "weft-reconcile.timer",
                     "weft-reconcile.timer.d"]
    assert "OnUnitInactiveSec=60s" in (lab.unit_dir / "weft-reconcile.timer.d/period.conf").read_text()
    changed, out = lab.play("install.yml", "-e", f"weft_wheel={lab.wheel}")
    assert changed == 0, out
    assert "is weft's Python launcher" not in out, out


def test_the_installed_units_command_line_reconciles_the_node(lab):
    assert not nodens.weft_names(lab.ns)
    first = lab.run_unit("weft-reconcile.service")
    assert first.returncode == 0, nodens.describe(first)
    names = "\n".join(nodens.weft_names(lab.ns))
    assert "weft-FORWARD" in names and "weft-tw-" in names, names
    again = lab.run_unit("weft-reconcile.service")
    assert again.returncode == 0 and "No changes" in again.stdout, nodens.describe(again)
    drift = lab.run_unit("weft-drift.service")
    assert drift.returncode == 0, nodens.describe(drift)
    assert json.loads(drift.stdout)["drifted"] is False


def cni(lab, command: str, pod_ns: str, conflist: dict) -> subprocess.CompletedProcess:
    """The installed plugin called in the node namespace as a runtime calls it, with the
    installed conflist's configuration."""
    config = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": "c-app",
           "CNI_NETNS": f"/run/netns/{pod_ns}", "CNI_IFNAME": "eth0", "CNI_PATH": str(lab.root / "opt/cni/bin"),
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=app"}
    return subprocess.run(["nsenter", f"--net=/run/netns/{lab.ns}", str(lab.root / "opt/cni/bin/weft")],
                          input=json.dumps(config), capture_output=True, text=True, env=env, timeout=60)


def test_a_pods_add_and_del_through_the_installed_native_plugin(lab):
    conflist = json.loads((lab.root / "etc/cni/net.d/10-weft.conflist").read_text())
    with nodens.node_netns() as pod_ns:
        try:
            added = cni(lab, "ADD", pod_ns, conflist)
            assert added.returncode == 0, nodens.describe(added)
            address = json.loads(added.stdout)["ips"][0]["address"]
            assert address.startswith("198.19.4."), added.stdout
            assert address.split("/")[0] in nodens.in_ns(pod_ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
            assert "weft" in nodens.in_ns(lab.ns, "ip", "-o", "link", "show", "type", "veth")
        finally:
            deleted = cni(lab, "DEL", pod_ns, conflist)
        assert deleted.returncode == 0, nodens.describe(deleted)
    assert nodens.in_ns(lab.ns, "ip", "-o", "link", "show", "type", "veth").strip() == ""
    _stop_helpers(lab.ns)


def _stop_helpers(ns: str) -> None:
    """The resident CNI helper the calls started in the node namespace (it would exit once idle)."""
    import signal
    for pid in nodens.sh("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            if b"cni.helper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGTERM)
        except OSError:
            pass


def test_check_reports_drift_on_the_fleet(lab):
    assert lab.run_unit("weft-reconcile.service").returncode == 0
    changed, out = lab.play("check.yml")
    assert changed == 0 and "1 nodes checked: 1 in sync, 0 drifted" in out, out
    chain = next(line.split()[0].lstrip(":") for line in nodens.weft_names(lab.ns)
                 if line.startswith(":weft-tw-"))
    nodens.in_ns(lab.ns, "iptables-nft", "-F", chain)
    _, out = lab.play("check.yml")
    assert "0 in sync, 1 drifted" in out and chain in out, out
    _, out = lab.play("check.yml", "-e", "weft_check_fail_on_drift=true", expect_ok=False)
    assert "drift on n1" in out, out
    assert lab.run_unit("weft-reconcile.service").returncode == 0
    _, out = lab.play("check.yml")
    assert "1 in sync, 0 drifted" in out, out


def test_upgrade_shows_the_plan_stops_unless_approved_and_rolls_back(lab):
    old_link = lab.venv_link()
    new_wheel = _build_wheel(REPO, lab.wheels, version="0.1.0+upgrade")
    # Drift the node so that the new version's plan has changes.
    chain = next(line.split()[0].lstrip(":") for line in nodens.weft_names(lab.ns) if line.startswith(":weft-tw-"))
    nodens.in_ns(lab.ns, "iptables-nft", "-F", chain)
    _, out = lab.play("upgrade.yml", "-e", f"weft_wheel={new_wheel}", expect_ok=False)
    assert "would change node n1" in out and chain in out, out
    assert lab.venv_link() == old_link                       # nothing switched
    changed, out = lab.play("upgrade.yml", "-e", f"weft_wheel={new_wheel}", "-e", "weft_upgrade_approve=true")
    new_link = lab.venv_link()
    assert new_link != old_link and changed > 0, out
    assert sorted(p.name for p in (lab.root / "opt/weft/venvs").iterdir()) == sorted(
        [Path(old_link).name, Path(new_link).name])          # the old version is kept for a rollback
    assert str(lab.root / "opt/weft" / new_link).encode() in (lab.root / "opt/cni/bin/weft").read_bytes()
    version = subprocess.run([str(lab.root / "opt/weft/venv/bin/python"), "-c",
                              "import importlib.metadata as m; print(m.version('weft'))"],
                             capture_output=True, text=True, cwd=lab.base).stdout.strip()
    assert version == "0.1.0+upgrade"
    assert lab.run_unit("weft-reconcile.service").returncode == 0
    changed, out = lab.play("upgrade.yml", "-e", f"weft_wheel={new_wheel}")
    assert changed == 0, out
    # Rollback: the old wheel again; its venv is still there, so only the link moves back.
    changed, out = lab.play("install.yml", "-e", f"weft_wheel={lab.wheel}")
    assert lab.venv_link() == old_link and changed > 0, out
    assert str(lab.root / "opt/weft" / old_link).encode() in (lab.root / "opt/cni/bin/weft").read_bytes()


def test_without_a_compiler_the_plugin_is_the_python_launcher_and_the_play_says_so(lab):
    """A node whose compiler fails (CC=false): the installer's fallback is what the role leaves,
    and says so; a second run changes nothing; with the compiler back the native client returns."""
    plugin, build = lab.root / "opt/cni/bin/weft", lab.root / "opt/weft/venv/weft-cni"
    build.unlink()                                  # as if this version had been installed without one
    lab.env["CC"] = "false"
    try:
        changed, out = lab.play("install.yml", "-e", f"weft_wheel={lab.wheel}")
        assert changed == 1 and "is weft's Python launcher, not its native client" in out, out
        assert plugin.read_text().startswith(f"#!{lab.root}/opt/weft/venv/bin/python -IS\n")
        changed, out = lab.play("install.yml", "-e", f"weft_wheel={lab.wheel}")
        assert changed == 0 and "is weft's Python launcher" in out, out
    finally:
        del lab.env["CC"]
    changed, out = lab.play("install.yml", "-e", f"weft_wheel={lab.wheel}")
    assert changed == 1 and "is weft's Python launcher" not in out, out
    assert plugin.read_bytes()[:4] == b"\x7fELF"


def test_remove_leaves_nothing_behind(lab):
    assert lab.run_unit("weft-reconcile.service").returncode == 0
    assert nodens.weft_names(lab.ns)
    changed, out = lab.play("remove.yml")
    assert changed > 0, out
    assert not nodens.weft_names(lab.ns)
    assert _tree(lab.root) == lab.pristine
    changed, out = lab.play("remove.yml")
    assert changed == 0, out

