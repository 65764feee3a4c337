"""The CNI protocol, spec 1.1.0: environment, network configuration, errors and results per version.

Only what the runtime and the plugin exchange lives here; what weft does with it is in
cni/plugin.py. Stdlib only, and nothing slow to import: the plugin is started once per pod.

Errors follow libcni: the error object goes to stdout (that is where libcni reads it), and a
one-line copy goes to stderr for the runtime's log.
"""
from __future__ import annotations

import json
import os
import re

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# The spec's well-known error codes.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50                 # STATUS: cannot serve ADD now
# weft's own codes (100 and up, as the spec leaves them to plugins).
WIRING_FAILED = 100                # the kernel refused a step of the pod's wiring
NO_ADDRESS = 101                   # no free address: pool exhausted, or no pool for this node
POLICY_FAILED = 102                # the endpoint's rules could not be put in the kernel
DESIRED_STATE = 103                # weft's desired state (pools, blocks) is missing, unreadable or invalid
CHECK_FAILED = 104                 # CHECK found the attachment not as ADD made it
FORBIDDEN = 105                    # the API server refused a permission a block claim needs (not retryable)
INTERNAL = 999                     # a bug (libcni's code for internal errors); the traceback is on stderr

# Commands that exist only from a spec version on.
MIN_VERSION = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
}
IFNAMSIZ = 16
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NETWORK_NAME = _CONTAINER_ID
# Characters the spec allows in an interface name but `ip -batch` would read as quoting or comments.
_IFNAME_UNSAFE = set("\"'#\\")
# Result fields that appeared in 1.1.0; older versions do not have them.
_IFACE_FIELDS_1_1 = ("mtu", "socketPath", "pciID")
_ROUTE_FIELDS_1_1 = ("mtu", "advmss", "priority", "table", "scope")


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict:
        out = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except (AttributeError, ValueError):
        raise CniError(DECODE_FAILURE, "cannot decode the CNI version", f"cniVersion {version!r}") from None


class Invocation:
    """The CNI_* environment of one call, checked for the command."""
    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path")

    def __init__(self, environ) -> None:
        self.command = environ.get("CNI_COMMAND", "")
        if self.command not in COMMANDS:
            raise CniError(INVALID_ENVIRONMENT, "invalid CNI_COMMAND",
                           f"CNI_COMMAND={self.command!r}: must be one of {', '.join(COMMANDS)}")
        missing = [name for name in REQUIRED_ENV.get(self.command, ()) if not environ.get(name)]
        if missing:
            raise CniError(INVALID_ENVIRONMENT, "required environment variables missing",
                           f"{', '.join(missing)} must be set for {self.command}")
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.netns = environ.get("CNI_NETNS", "")
        self.ifname = environ.get("CNI_IFNAME", "")
        self.path = environ.get("CNI_PATH", "")
        if self.container_id and not _CONTAINER_ID.match(self.container_id):
            raise CniError(INVALID_ENVIRONMENT, "invalid CNI_CONTAINERID",
                           f"{self.container_id!r}: must start with a letter or digit, then letters, digits, "
                           "'_', '.' or '-'")
        if self.ifname:
            check_ifname(self.ifname)
        self.args = parse_args(environ.get("CNI_ARGS", ""))


def check_ifname(name: str) -> None:
    """The spec's rules for CNI_IFNAME (Linux's): 1-15 characters, not . or .., no / : or whitespace."""
    problem = None
    if len(name) >= IFNAMSIZ:
        problem = f"is {len(name)} characters long: an interface name has at most {IFNAMSIZ - 1}"
    elif name in (".", ".."):
        problem = "must not be '.' or '..'"
    elif any(c in "/:" or c.isspace() for c in name):
        problem = "must not contain '/', ':' or whitespace"
    elif _IFNAME_UNSAFE.intersection(name):
        problem = "contains a quote, '#' or '\\', which weft does not support"
    if problem:
        raise CniError(INVALID_ENVIRONMENT, "invalid CNI_IFNAME", f"{name!r} {problem}")


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS "K1=V1;K2=V2" as a mapping; unknown keys are kept (and ignored by the caller)."""
    args = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, "invalid CNI_ARGS", f"{item!r} is not KEY=VALUE (CNI_ARGS={text!r})")
        args[key] = value
    return args


def parse_config(data: bytes, command: str) -> dict:
    """The network configuration on stdin, decoded, with its cniVersion checked for `command`."""
    if command == "VERSION" and not data.strip():
        return {}
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_FAILURE, "cannot decode the network configuration on stdin", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "cannot decode the network configuration on stdin",
                       f"expected a JSON object, got {type(config).__name__}")
    version = config.get("cniVersion", "0.1.0")        # libcni's reading of a config without one
    if not isinstance(version, str):
        raise CniError(DECODE_FAILURE, "cannot decode the CNI version", f"cniVersion {version!r}")
    if command == "VERSION":
        version_key(version)
        return config
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")
    needed = MIN_VERSION.get(command)
    if needed and version_key(version) < version_key(needed):
        raise CniError(INCOMPATIBLE_VERSION, f"config version does not allow {command}",
                       f"{command} needs cniVersion {needed} or later, config is {version}")
    name = config.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.match(name):
        raise CniError(INVALID_CONFIG, "invalid network name",
                       f"name {name!r}: must start with a letter or digit, then letters, digits, '_', '.' or '-'")
    return config


def config_version(config: dict | None) -> str:
    """The version to answer in: the config's when it is one we speak, else the latest."""
    version = (config or {}).get("cniVersion")
    return version if version in SUPPORTED_VERSIONS else LATEST


def version_result(config: dict) -> dict:
    version = config.get("cniVersion") or LATEST
    return {"cniVersion": version if isinstance(version, str) else LATEST,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


def normalise_result(result: dict) -> dict:
    """A result of any supported version (a prevResult) in the 1.x shape: no `version` on IPs."""
    out = dict(result)
    out["ips"] = [{k: v for k, v in ip.items() if k != "version"} for ip in result.get("ips") or ()]
    out.pop("cniVersion", None)
    return out


def merge_results(prev: dict | None, ours: dict) -> dict:
    """Chaining: a plugin given a prevResult outputs it with its own additions."""
    if not prev:
        return ours
    prev = normalise_result(prev)
    offset = len(prev.get("interfaces") or ())
    ips = [dict(ip, interface=ip["interface"] + offset) if "interface" in ip else ip for ip in ours["ips"]]
    merged = dict(prev)
    merged["interfaces"] = list(prev.get("interfaces") or ()) + ours["interfaces"]
    merged["ips"] = list(prev.get("ips") or ()) + ips
    merged["routes"] = list(prev.get("routes") or ()) + ours.get("routes", [])
    merged["dns"] = prev.get("dns") or ours.get("dns") or {}
    return merged


def format_result(result: dict, version: str) -> dict:
    """`result` (1.1.0 shape) as the given version writes it: IPs carry `version` before 1.0.0, and
    the interface and route fields new in 1.1.0 are left out before it."""
    out: dict = {"cniVersion": version}
    old = version_key(version) < (1, 1, 0)
    ifaces = result.get("interfaces")
    if ifaces is not None:
        out["interfaces"] = [{k: v for k, v in i.items() if not (old and k in _IFACE_FIELDS_1_1)} for i in ifaces]
    ips = [dict(ip) for ip in result.get("ips") or ()]
    if version_key(version) < (1, 0, 0):
        for ip in ips:
            ip["version"] = "6" if ":" in ip["address"] else "4"
    out["ips"] = ips
    routes = result.get("routes")
    if routes:
        out["routes"] = [{k: v for k, v in r.items() if not (old and k in _ROUTE_FIELDS_1_1)} for r in routes]
    out["dns"] = result.get("dns") or {}
    return out


def dumps(obj: dict) -> str:
    """A result or error as the plugin prints it on stdout."""
    return json.dumps(obj, indent=2) + "\n"


NS_GET_NSTYPE = 0xB703                  # ioctl(2) on a namespace file: its CLONE_NEW* type
CLONE_NEWNET = 0x40000000


def open_netns(path: str) -> int:
    """CNI_NETNS opened, once the kernel says it is a network namespace (ioctl NS_GET_NSTYPE):
    a regular file, a directory or another kind of namespace is error 3 (the container is not
    what the runtime says), before anything is allocated. The caller closes the descriptor."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)    # no FIFO can block us
    except OSError as exc:
        raise CniError(UNKNOWN_CONTAINER, "the container's network namespace does not exist",
                       f"CNI_NETNS={path}: {exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise CniError(UNKNOWN_CONTAINER, "the container's network namespace does not exist",
                       f"CNI_NETNS={path} is not a network namespace")
    return fd


def peek_version(stdin: bytes) -> dict | None:
    """{"cniVersion": ...} of a configuration that was not accepted, if it names one (for the error)."""
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError):
        return None
    return {"cniVersion": config.get("cniVersion")} if isinstance(config, dict) else None
