"""Read back weft's chains and hook rules from iptables-save, leaving everything else alone."""
from __future__ import annotations

from weft.model.kernel import PREFIX, Chain, Hooks

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("POSTROUTING",), "mangle": ("PREROUTING",),
           "raw": ("PREROUTING", "OUTPUT")}


def table_may_exist(backend: str, table: str, family: int = 4) -> bool:
    """False when `table` of the legacy backend does not exist in this namespace (then it holds
    nothing of weft's): `iptables-legacy-save -t TABLE` would create it, reading the file does
    not. The nft backend's save never creates a table."""
    if backend != "legacy":
        return True
    try:
        with open("/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names") as f:
            return table in f.read().split()
    except FileNotFoundError:
        return False


def as_save(listing: str, table: str) -> str:
    """`iptables -S CHAIN` output in iptables-save's form ("-N x" declares, "-P" sets a policy)."""
    lines = [f"*{table}"]
    for line in listing.splitlines():
        if line.startswith("-N "):
            lines.append(f":{line[3:]} - [0:0]")
        elif line.startswith("-P "):
            name, policy = line[3:].split(" ", 1)
            lines.append(f":{name} {policy} [0:0]")
        else:
            lines.append(line)
    return "\n".join(lines + ["COMMIT"])


def _is_weft_rule(rule: str) -> bool:
    return f"-j {PREFIX}" in rule or f"-g {PREFIX}" in rule or '--comment "weft:' in rule


def parse_save(text: str, table: str, label: str | None = None
               ) -> tuple[dict[tuple[str, str], Chain], dict[tuple[str, str], Hooks]]:
    """weft's chains (every rule) and weft's rules in built-in chains, from iptables-save output.

    `label` names the table in the result (default: `table`), see probes.backend.table_label.
    """
    label = label or table
    in_table = False
    chains: dict[str, list[str]] = {}
    builtin: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            in_table = line[1:] == table
        elif not in_table or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name.startswith(PREFIX):
                chains[name] = []
            elif name in BUILTIN.get(table, ()):
                builtin[name] = []
        elif line.startswith("-A "):
            name = line[3:].split(" ", 1)[0]
            if name in chains:
                chains[name].append(line)
            elif name in builtin:
                builtin[name].append(line)
    hooks = {}
    for name, rules in builtin.items():
        ours = tuple(r for r in rules if _is_weft_rule(r))
        if ours:
            hooks[(label, name)] = Hooks(label, name, ours, at_top=tuple(rules[:len(ours)]) == ours)
    return {(label, n): Chain(label, n, tuple(r)) for n, r in chains.items()}, hooks
