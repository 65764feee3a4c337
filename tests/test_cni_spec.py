"""The CNI protocol as the spec (1.1.0) words it, without touching a kernel: VERSION, the result
format of each supported version, prevResult chaining, and the error code for every kind of bad
input. The plugin's `run(environ, stdin)` is what the executable calls; one test runs the real
executable (the console script and the installed launcher) to show the wire is the same."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from weft.cni import plugin, spec
from weft.cni.install import install

ENV = {"CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/none", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", "CNI_PATH": "/opt/cni/bin"}


def conf(version="1.1.0", **extra) -> bytes:
    return json.dumps({"cniVersion": version, "name": "weft", "type": "weft", **extra}).encode()


def call(command, stdin=None, **env):
    environ = {**ENV, "CNI_COMMAND": command, **env}
    environ = {k: v for k, v in environ.items() if v is not None}
    return plugin.run(environ, conf() if stdin is None else stdin)


def error_code(command, stdin=None, **env) -> int:
    code, out = call(command, stdin, **env)
    assert code == 1 and set(out) >= {"cniVersion", "code", "msg"}, out
    return out["code"]


# ---- VERSION ------------------------------------------------------------------------------

def test_version_lists_every_supported_version_in_the_callers_version():
    assert call("VERSION", conf("0.4.0")) == (0, {"cniVersion": "0.4.0", "supportedVersions": [
        "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    assert call("VERSION", b"")[1]["cniVersion"] == "1.1.0"


# ---- results per version --------------------------------------------------------------------

OURS = {"interfaces": [{"name": "weftx", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1400},
                       {"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1400, "sandbox": "/run/netns/p"}],
        "ips": [{"address": "198.18.1.5/32", "gateway": "169.254.1.1", "interface": 1},
                {"address": "2001:2::5/128", "gateway": "fe80::ecee:eeff:feee:eeee", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}], "dns": {}}


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_result_format_of_each_version(version):
    out = spec.format_result(OURS, version)
    assert out["cniVersion"] == version
    before_1 = spec.version_key(version) < (1, 0, 0)
    assert [ip.get("version") for ip in out["ips"]] == (["4", "6"] if before_1 else [None, None])
    assert all("interface" in ip and "address" in ip for ip in out["ips"])
    has_mtu = version == "1.1.0"
    assert ["mtu" in i for i in out["interfaces"]] == [has_mtu, has_mtu]
    assert out["interfaces"][1]["sandbox"] == "/run/netns/p" and "sandbox" not in out["interfaces"][0]


def test_prev_result_is_passed_through_with_our_additions():
    prev = {"cniVersion": "0.3.1", "interfaces": [{"name": "other0"}],
            "ips": [{"version": "4", "address": "10.9.9.9/24", "interface": 0}],
            "routes": [{"dst": "10.0.0.0/8"}], "dns": {"nameservers": ["10.0.0.10"]}}
    out = spec.format_result(spec.merge_results(prev, OURS), "0.3.1")
    assert [i["name"] for i in out["interfaces"]] == ["other0", "weftx", "eth0"]
    assert [(ip["address"], ip["interface"], ip["version"]) for ip in out["ips"]] == [
        ("10.9.9.9/24", 0, "4"), ("198.18.1.5/32", 2, "4"), ("2001:2::5/128", 2, "6")]
    assert out["routes"][0] == {"dst": "10.0.0.0/8"} and out["dns"] == {"nameservers": ["10.0.0.10"]}


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stdin, code", [
    (b"{not json", spec.DECODE_FAILURE),
    (b"[1, 2]", spec.DECODE_FAILURE),
    (conf("0.2.0"), spec.INCOMPATIBLE_VERSION),
    (conf("2.0.0"), spec.INCOMPATIBLE_VERSION),
    (json.dumps({"name": "weft", "type": "weft"}).encode(), spec.INCOMPATIBLE_VERSION),   # no cniVersion: 0.1.0
    (conf(name="bad name!"), spec.INVALID_CONFIG),
    (conf(mtu=20), spec.INVALID_CONFIG),
    (conf(mtu="1500"), spec.INVALID_CONFIG),
    (conf(manifests="/a", kubeconfig="/b"), spec.INVALID_CONFIG),
    (conf(ipam={"type": "host-local", "subnet": "198.18.0.0/24"}), spec.UNSUPPORTED_FIELD),
    (conf(ipMasq=True), spec.UNSUPPORTED_FIELD),
])
def test_bad_configuration(stdin, code):
    assert error_code("ADD", stdin) == code


@pytest.mark.parametrize("env, names", [
    ({"CNI_COMMAND": None}, "CNI_COMMAND"),
    ({"CNI_COMMAND": "ATTACH"}, "CNI_COMMAND"),
    ({"CNI_NETNS": None, "CNI_IFNAME": None}, "CNI_NETNS, CNI_IFNAME"),
    ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
    ({"CNI_CONTAINERID": "-leading-dash"}, "CNI_CONTAINERID"),
    ({"CNI_IFNAME": "a-name-too-long-x"}, "CNI_IFNAME"),
    ({"CNI_IFNAME": "eth 0"}, "CNI_IFNAME"),
    ({"CNI_IFNAME": ".."}, "CNI_IFNAME"),
    ({"CNI_ARGS": "K8S_POD_NAME"}, "CNI_ARGS"),
    ({"CNI_ARGS": "K8S_POD_NAMESPACE=ns"}, "CNI_ARGS"),
])
def test_bad_environment_names_the_variable(env, names):
    environ = {**ENV, "CNI_COMMAND": "ADD", **env}
    code, out = plugin.run({k: v for k, v in environ.items() if v is not None}, conf())
    assert (code, out["code"]) == (1, spec.INVALID_ENVIRONMENT)
    assert names in out["msg"] + out.get("details", "")


def test_add_into_a_namespace_that_does_not_exist_is_an_unknown_container(tmp_path):
    assert error_code("ADD", conf(state_dir=str(tmp_path)), CNI_NETNS="/run/netns/weft-no-such-ns") == \
        spec.UNKNOWN_CONTAINER
    assert not (tmp_path / "ipam" / "allocations.json").exists()


@pytest.mark.parametrize("command, version", [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "0.4.0")])
def test_commands_newer_than_the_configs_version_are_refused(command, version):
    assert error_code(command, conf(version)) == spec.INCOMPATIBLE_VERSION


def test_error_is_in_the_configs_version_when_known():
    assert call("ADD", conf("0.4.0", mtu=1))[1]["cniVersion"] == "0.4.0"
    assert call("ADD", b"{")[1]["cniVersion"] == spec.LATEST


@pytest.mark.parametrize("command, env", [("STATUS", {}), ("ADD", {"CNI_NETNS": None}), ("ADD", {"CNI_IFNAME": "a/b"}),
                                          ("NOPE", {}), ("ADD", {"CNI_ARGS": "broken"})])
def test_an_error_before_the_config_is_accepted_is_in_its_version_too(command, env):
    """These fail before the configuration is accepted (a bad CNI_* variable, a command its
    version does not have): the answer still speaks the configuration's version, not 1.1.0."""
    code, out = call(command, conf("1.0.0"), **env)
    assert code == 1 and out["cniVersion"] == "1.0.0", out


def test_a_relative_state_dir_is_refused(tmp_path):
    assert error_code("DEL", conf(state_dir="state")) == spec.INVALID_CONFIG


def test_del_of_an_unknown_container_succeeds_and_twice_too(tmp_path):
    stdin = conf(state_dir=str(tmp_path))
    assert call("DEL", stdin, CNI_NETNS=None, CNI_ARGS=None) == (0, None)
    assert call("DEL", stdin, CNI_NETNS=None, CNI_ARGS=None) == (0, None)


def test_gc_needs_a_list_of_attachments(tmp_path):
    assert error_code("GC", conf(state_dir=str(tmp_path), **{"cni.dev/valid-attachments": [{"id": 1}]})) == \
        spec.INVALID_CONFIG
    assert call("GC", conf(state_dir=str(tmp_path), **{"cni.dev/valid-attachments": []})) == (0, None)


def test_status_without_any_ipam_state_is_not_available(tmp_path):
    assert error_code("STATUS", conf(state_dir=str(tmp_path))) == spec.NOT_AVAILABLE
    (tmp_path / "ipam").mkdir()
    (tmp_path / "ipam" / "node.json").write_text("{broken")
    code, out = call("STATUS", conf(state_dir=str(tmp_path)))
    assert out["code"] == spec.NOT_AVAILABLE and "node.json" in out["details"]


# ---- the executable --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["console script", "launcher"])
def test_the_executable_speaks_the_protocol_on_stdout(how, tmp_path):
    binary = os.path.join(os.path.dirname(sys.executable), "weft-cni")
    if how == "launcher":
        binary = str(install(tmp_path / "weft"))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "VERSION"}
    done = subprocess.run([binary], input=conf("1.0.0"), env=env, capture_output=True, timeout=30)
    assert done.returncode == 0 and json.loads(done.stdout)["supportedVersions"][-1] == "1.1.0"
    done = subprocess.run([binary], input=b"{", env={**env, **ENV, "CNI_COMMAND": "ADD"}, capture_output=True,
                          timeout=30)
    assert done.returncode == 1 and json.loads(done.stdout)["code"] == spec.DECODE_FAILURE
    assert b"cannot decode" in done.stderr
