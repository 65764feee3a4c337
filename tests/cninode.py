"""The CNI test harness: a node namespace, its state dir and manifests, and the plugin called in
it exactly as a container runtime calls it (tests/test_cni_*.py share it).

Each test gets a node namespace (tests/nodens.py: `wtr-<pid>-<n>`, always removed) with its own
state dir and manifest directory (an IPPool in 198.18.0.0/15 and the node's blocks), and pod
namespaces made the same way. The plugin runs inside the node namespace (nsenter), with CNI_*
variables and the network configuration on stdin, from the launcher `python -m weft.cni.install`
writes. Nothing is done in the root namespace.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nodens import REPO, in_ns, node_netns, write_manifests
from weft.cni.install import install
from weft.cni.wiring import ROUTE_PROTOCOL

NODE = "n1"
NSENTER = shutil.which("nsenter") or "nsenter"
POOL = {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool", "metadata": {"name": "pods"},
        "spec": {"cidr": "198.18.0.0/16", "blockSize": 26}}


def block(cidr: str, node: str = NODE) -> dict:
    return {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": cidr.replace(".", "-").replace(":", "-").replace("/", "-")},
            "spec": {"cidr": cidr, "affinity": f"host:{node}"}}


@pytest.fixture(scope="session")
def plugin_binary(tmp_path_factory) -> str:
    return str(install(tmp_path_factory.mktemp("cni-bin") / "weft"))


class CniNode:
    """A node namespace, its state dir and manifests, pod namespaces, and the plugin called in it."""

    def __init__(self, ns: str, tmp_path: Path, binary: str, stack: contextlib.ExitStack):
        self.ns, self.binary, self.stack = ns, binary, stack
        self.state_dir, self.manifests = tmp_path / "state", tmp_path / "manifests"
        self.pods: dict[str, str] = {}             # pod name -> its namespace's name
        self.config = {"cniVersion": "1.1.0", "name": "weft", "type": "weft", "node": NODE,
                       "state_dir": str(self.state_dir), "manifests": str(self.manifests), "mtu": 1400}
        self.write([block("198.18.4.0/26")])

    def write(self, objects: list[dict]) -> None:
        write_manifests(self.manifests, [POOL, *objects])

    def pod_ns(self, name: str) -> str:
        if name not in self.pods:
            self.pods[name] = self.stack.enter_context(node_netns())
        return self.pods[name]

    def env(self, command: str, pod: str, cid: str | None = None, ifname: str = "eth0", k8s_ns: str = "x",
            sandbox: str | None = None) -> dict:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid or f"c-{pod}",
                "CNI_NETNS": f"/run/netns/{self.pod_ns(sandbox or pod)}", "CNI_IFNAME": ifname,
                "CNI_PATH": "/opt/cni/bin",
                "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_ns};K8S_POD_NAME={pod}"}

    def start(self, env: dict, stdin: bytes | None = None, **config) -> subprocess.Popen:
        data = stdin if stdin is not None else json.dumps({**self.config, **config}).encode()
        proc = subprocess.Popen([NSENTER, f"--net=/run/netns/{self.ns}", self.binary], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        proc.stdin.write(data)
        proc.stdin.close()
        return proc

    def call(self, env: dict, stdin: bytes | None = None, **config) -> tuple[int, dict | None, str]:
        return self.finish(self.start(env, stdin, **config))

    @staticmethod
    def finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout=60)
        return proc.returncode, json.loads(out) if out.strip() else None, err.decode()

    def ok(self, command: str, pod: str, **kw) -> dict | None:
        config = kw.pop("config", {})
        code, out, err = self.call(self.env(command, pod, **kw), **config)
        assert code == 0, f"{command} {pod}: {out} {err}"
        return out

    def add(self, pod: str, **kw) -> str:
        """ADD; the pod's IPv4 address."""
        out = self.ok("ADD", pod, **kw)
        return next(ip["address"].split("/")[0] for ip in out["ips"] if "." in ip["address"])

    def sh(self, *argv: str, check: bool = True) -> str:
        return in_ns(self.ns, *argv, check=check)

    def links(self) -> list[str]:
        return sorted(link["ifname"] for link in json.loads(self.sh("ip", "-j", "link", "show")))

    def weft_routes(self) -> str:
        return self.sh("ip", "route", "show", "proto", str(ROUTE_PROTOCOL))

    def allocations(self) -> list[dict]:
        path = self.state_dir / "ipam" / "allocations.json"
        return json.loads(path.read_text())["allocations"] if path.exists() else []

    def ipam_check(self) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-m", "weft.reconciler.ipam_cli",
                               "check", "--state-dir", str(self.state_dir)], capture_output=True, text=True, cwd=REPO)

    def weft_chains(self) -> list[str]:
        return [ln for ln in self.sh("iptables-nft-save", "-t", "filter").splitlines()
                if ln.startswith(":weft-fw-") or ln.startswith(":weft-tw-")]

    def clean(self) -> None:
        """Nothing of any pod is left: no interface, route, address record or per-pod chain."""
        assert self.links() == ["lo"]
        assert self.weft_routes() == ""
        assert self.allocations() == []
        assert self.weft_chains() == []


@pytest.fixture
def node(tmp_path, plugin_binary):
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(node_netns())
        yield CniNode(ns, tmp_path, plugin_binary, stack)


def pod_sh(node: CniNode, pod: str, *argv: str) -> str:
    return in_ns(node.pod_ns(pod), *argv)



SERVER = "import socket,sys; s=socket.create_server(('0.0.0.0',80)); print('ready',flush=True)\n" \
         "while True:\n c,_=s.accept(); c.sendall(b'ok'); c.close()"
PROBE = "import socket,sys\ntry:\n s=socket.create_connection((sys.argv[1],80),timeout=1); print(s.recv(2)==b'ok')\n" \
        "except OSError: print(False)"


def serve(node: CniNode, pod: str) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", node.pod_ns(pod), sys.executable, "-I", "-S", "-c", SERVER],
                            stdout=subprocess.PIPE, text=True)
    node.stack.callback(proc.kill)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def reaches(node: CniNode, src: str, ip: str) -> bool:
    return pod_sh(node, src, sys.executable, "-I", "-S", "-c", PROBE, ip).strip() == "True"



def helper_pids(node: CniNode) -> list[int]:
    """The helper processes in the node's namespace."""
    pids = []
    for pid in node.sh("ip", "netns", "pids", node.ns, check=False).split():
        with contextlib.suppress(OSError):
            if b"cni.helper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
    return pids


def wait_for_helper(node: CniNode, other_than: int | None = None) -> int:
    """The pid of the helper, once it listens (its abstract socket is in the namespace's table) and
    any second one, started by a call that came while the first was starting, has given way."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [p for p in helper_pids(node) if p != other_than]
        if len(pids) == 1 and "@weft-cni" in node.sh("cat", "/proc/net/unix"):
            return pids[0]
        time.sleep(0.05)
    raise AssertionError("no helper started in the node namespace")


def gone(pid: int, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False



@contextlib.contextmanager
def entered(ns: str):
    """This thread inside namespace `ns` for the `with` block (sockets opened there stay there)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    home, there = os.open("/proc/thread-self/ns/net", os.O_RDONLY), os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(there, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if libc.setns(home, clone_newnet) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(home)
        os.close(there)


@contextlib.contextmanager
def api_in_netns(ns: str, objects: list[dict]):
    """A FakeKubeAPI listening on 127.0.0.1 inside the node's namespace, where the plugin runs."""
    from tests.kubeapi import FakeKubeAPI
    fake = FakeKubeAPI(objects, crds=True)
    with entered(ns):
        fake.__enter__()
    try:
        yield fake
    finally:
        fake.__exit__(None, None, None)




def request_json(fake, ns: str, path: str) -> dict:
    import urllib.request
    req = urllib.request.Request(fake.url + path, headers={"Authorization": f"Bearer {fake.token}"})
    with entered(ns):
        return json.loads(urllib.request.urlopen(req, timeout=5).read())
