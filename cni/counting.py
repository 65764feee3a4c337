"""The plugin's calls counted in its state dir (reconciler.metrics.CniCounters), for the metrics
file the apply run writes (weft_cni_requests_total, weft_cni_request_duration_seconds).

Who counts a call is whoever ran it, and never on the call's path:
- a call the resident helper served: the helper, in memory, added to the state dir's totals by a
  thread of its own at most once a second and when it exits (cni/helper.py);
- the call that found no helper and starts one: the helper it starts, handed the figures on
  its command line (cni/client.py, start_helper), so the node's first call pays nothing more;
- any other call the plugin ran in its own process (the configuration says "helper": false,
  the helper declined, a failed call, the helper's name held by another user): that process,
  after its answer is written (importing reconciler.metrics costs ~10 ms there).

A call's time is from the moment its client read stdin to its answer (for a call the helper
served: from the helper reading the request), not the process's start-up. Counting never
fails a call nor makes a state dir: a state dir that is gone, unsafe, or whose counters' lock
stays busy for a second keeps no count of it.
"""
from __future__ import annotations

# Imports are inside the functions: the helper imports this module before it binds its name,
# when every millisecond keeps the node's next caller from finding it.


def counters_dir(stdin: bytes) -> str | None:
    """The state dir that counts a call with this configuration: its "state_dir", or the default
    when it names none; None when its "state_dir" is not an absolute path (nothing is counted)."""
    import json

    from weft.store.statedir import default_state_dir
    try:
        raw = json.loads(stdin)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    state_dir = raw.get("state_dir")
    if state_dir is None:
        return default_state_dir()
    return state_dir if isinstance(state_dir, str) and state_dir.startswith("/") else None


def flush(counters, directory: str) -> None:
    """Add `counters` (a CniCounters) to the totals in `directory`; dropped when they cannot be."""
    from weft.model.errors import WeftError
    from weft.store.statedir import StateDir
    try:
        counters.flush(StateDir(directory, create=False))
    except (WeftError, OSError):
        pass


def count(command: str, seconds: float, ok: bool, directory: str | None) -> None:
    """One call this process ran, added to `directory`'s totals at once."""
    if directory is None:
        return
    from weft.reconciler.metrics import CniCounters
    counters = CniCounters()
    counters.observe(command, seconds, ok)
    flush(counters, directory)
