"""Which of Calico's groups serves each kind, kept in the state dir between runs.

API discovery (desired.api.discover_served) costs two GETs, and every run that lists or watches
needs its answer; it changes only when CRDs are installed, removed or moved between Calico's
groups. So the answer is kept in `<state dir>/api-discovery.json` with the URL of the API server
it came from, and reused by later runs against that server:
  - for DISCOVERY_MAX_AGE (10 minutes) at most, then discovered anew;
  - until a list or watch of a kind it names answers 404 (the CRD was removed, or moved to
    Calico's other group): that run then discovers anew, once, and reads again from where the
    kinds are now what it had not read yet.
Like every state-dir file it is read through store.statedir (no link followed, owner and mode
checked, at most DISCOVERY_LIMIT bytes) and then checked field by field: each group's entries
must be plurals of Calico kinds weft reads. A file that fails any check is ignored with a
warning and replaced by a fresh discovery: only what the server itself answers is trusted.

Warnings go to the run's `warn` callback (the reconciler's event log, so `--log-format json`
keeps stderr all JSON: this layer may not import the reconciler), else to stderr as
`weft: warning: ...` lines.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from weft.desired.api import (
    CALICO_API_GROUPS,
    CALICO_KINDS,
    Connection,
    NotServed,
    Resource,
    check_needed,
    choose_resources,
    discover_served,
    optional_warning,
)

DISCOVERY_FILE = "api-discovery.json"
DISCOVERY_MAX_AGE = 600.0           # seconds a kept discovery is used before it is made anew
DISCOVERY_LIMIT = 64 << 10          # bytes; weft writes ~1 KB
FORMAT = 1
_PLURALS = frozenset(plural for _kind, plural, _namespaced in CALICO_KINDS)

T = TypeVar("T")


def print_warning(text: str) -> None:
    """The default `warn`: one `weft: warning:` line on stderr."""
    print(f"weft: warning: {text}", file=sys.stderr)


def served_problem(data: Any) -> str | None:
    """Why `data` (the file, parsed) is not a discovery weft wrote; None when it is one."""
    if not isinstance(data, dict) or set(data) != {"format", "server", "at", "served"}:
        return "not a mapping of format, server, at and served"
    if data["format"] != FORMAT:
        return f"format is not {FORMAT}"
    if not isinstance(data["server"], str) or not data["server"]:
        return "server is not a URL"
    if isinstance(data["at"], bool) or not isinstance(data["at"], int | float):
        return "at is not a time"
    served = data["served"]
    if not isinstance(served, dict) or set(served) != set(CALICO_API_GROUPS):
        return f"served does not name exactly the groups {', '.join(CALICO_API_GROUPS)}"
    for group, plurals in served.items():
        if not isinstance(plurals, list) or not all(isinstance(p, str) and p in _PLURALS for p in plurals) \
                or len(set(plurals)) != len(plurals):
            return f"served[{group!r}] is not a list of Calico plurals weft reads"
    return None


class Discovery:
    """One run's answer to "which group serves each Calico kind": kept (see the module
    docstring) or discovered. `cached` says whether resources() came from the kept file."""

    def __init__(self, api: Connection, state_dir: Path | None, warn: Callable[[str], None] | None = None):
        self.api, self.state_dir = api, state_dir
        self.warn = warn or print_warning
        self.cached = False
        self._chosen: tuple[Resource, ...] | None = None

    def resources(self) -> tuple[Resource, ...]:
        """desired.api.RESOURCES as this cluster serves them: each Calico kind from one group."""
        if self._chosen is None:
            served = self._kept()
            self.cached = served is not None
            self._chosen = choose_resources(served) if served is not None else self._discover()
            check_needed(self.api.host, self._chosen)
        return self._chosen

    def rediscover(self) -> tuple[Resource, ...] | None:
        """Discovered anew after a kind of the kept discovery answered 404 (once a run); None
        when this run's discovery is fresh already (the kind went since: there is none of it)."""
        if not self.cached:
            return None
        self.cached = False
        self._chosen = self._discover()
        return self._chosen

    def each(self, work: Callable[[Resource, bool], T], workers: int | None = None) -> list[tuple[Resource, T]]:
        """(resource, work(resource, absent_ok)) for every resource, run at once on `workers`
        threads (one per resource if None). A kept discovery's kinds must be served
        (absent_ok=False): if one is not (NotServed), the run discovers anew and does again the
        resources it has no answer for; a fresh discovery's kinds that answer 404 are empty."""
        resources = self.resources()
        absent_ok = not self.cached
        stale = object()

        def attempt(resource: Resource) -> Any:
            try:
                return work(resource, absent_ok)
            except NotServed:
                return stale

        with ThreadPoolExecutor(workers or len(resources), thread_name_prefix="weft-read") as pool:
            answers = dict(zip(resources, pool.map(attempt, resources), strict=True))
            if all(answer is not stale for answer in answers.values()):
                return list(answers.items())
            resources = self.rediscover() or resources
            todo = [r for r in resources if answers.get(r, stale) is stale]
            answers.update(zip(todo, pool.map(lambda r: work(r, True), todo), strict=True))
        return [(r, answers[r]) for r in resources]

    def served(self) -> dict[str, frozenset[str]]:
        """api_version -> the plurals it serves: the kept discovery where fresh, else discovered
        now (and not kept: only a discovery that passes check_needed is, in _discover)."""
        kept = self._kept()
        return kept if kept is not None else discover_served(self.api)

    def _discover(self) -> tuple[Resource, ...]:
        """Discovered now: SourceError when a kind weft needs is served by neither group (then
        nothing is kept: the next run asks again); a newer kind missing is a warning, given
        with each discovery (every DISCOVERY_MAX_AGE at most)."""
        served = discover_served(self.api)
        chosen = choose_resources(served)
        check_needed(self.api.host, chosen)
        warning = optional_warning(self.api.host, chosen)
        if warning:
            self.warn(warning)
        self._keep(served)
        return chosen

    def _kept(self) -> dict[str, frozenset[str]] | None:
        """The kept discovery of this API server, if fresh and of the right shape."""
        from weft.store.statedir import CorruptState, StateDir, UnsafeState
        if self.state_dir is None or not Path(self.state_dir).is_dir():
            return None
        where = Path(self.state_dir) / DISCOVERY_FILE
        try:
            data = StateDir(self.state_dir, create=False).read_json(DISCOVERY_FILE, limit=DISCOVERY_LIMIT)
        except (UnsafeState, CorruptState) as e:
            self.warn(f"{e}; ignored: discovering the API server's kinds anew")
            return None
        if data is None:
            return None
        problem = served_problem(data)
        if problem:
            self.warn(f"{where}: {problem}: not what weft wrote, ignored: discovering the API server's kinds anew")
            return None
        if data["server"] != self.api.host or not 0 <= time.time() - data["at"] < DISCOVERY_MAX_AGE:
            return None
        return {group: frozenset(plurals) for group, plurals in data["served"].items()}

    def _keep(self, served: dict[str, frozenset[str]]) -> None:
        """Keep `served` for later runs (only the plurals weft reads), replaced atomically through
        store.statedir; a read-only (or missing) state dir keeps nothing."""
        from weft.store.statedir import StateDir, UnsafeState
        if self.state_dir is None:
            return
        text = json.dumps({"format": FORMAT, "server": self.api.host, "at": time.time(),
                           "served": {group: sorted(served.get(group, frozenset()) & _PLURALS)
                                      for group in CALICO_API_GROUPS}})
        with contextlib.suppress(OSError, UnsafeState):
            if Path(self.state_dir).is_dir():
                StateDir(self.state_dir, create=False).replace(DISCOVERY_FILE, text)


def serving(api: Connection, kinds: tuple[str, ...], state_dir: Path | None = None) -> dict[str, Resource]:
    """Where this cluster serves each of Calico's `kinds`: kind -> the resource of the first of
    Calico's groups that serves it (choose_resources), from the kept discovery of `state_dir`
    where fresh, else discovered now. A kind served by neither group is absent. For commands
    that need a few kinds only (weft ipam-gc): no kind weft reads is required here."""
    chosen = choose_resources(Discovery(api, state_dir).served())
    return {r.kind: r for r in chosen if r.api_version in CALICO_API_GROUPS and r.kind in kinds}
