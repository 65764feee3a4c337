"""Group commit: calls made at once by threads of one process share one piece of work.

The CNI helper (cni/helper.py) serves many pods at once in threads. Their IPAM writes (an fsync'd
file under a lock) and their policy steps (listing iptables chains, one iptables-restore) cost
about the same for one pod as for twenty, so instead of queueing for the lock one by one, the
first caller in does the work for every call queued by then and the others find theirs done.
In a process of its own (the plugin run without the helper) every call is a batch of one.
Stdlib only: this is on the plugin's path.
"""
from __future__ import annotations

import threading
import time

# How many calls this process is serving at once (the CNI helper keeps it; 0 in a plain plugin run).
# While others are in flight, the leader of a batch that costs processes (`linger=True`) waits a
# little for them to join: one more pod in such a batch costs far less than one more batch.
in_flight = 0
LINGER_GAP = 0.008                     # go when no call joined for this long,
LINGER_MAX = 0.030                     # or after this long in all


class Call:
    """One caller's request in a batch; the batch's work settles it with a result or an error."""
    __slots__ = ("key", "args", "result", "error", "settled")

    def __init__(self, key, args: tuple):
        self.key, self.args = key, args
        self.result = self.error = None
        self.settled = False

    def settle(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error, self.settled = result, error, True


class GroupCommit:
    """`work(key, calls)` does a batch of calls with the same key and settles each; an exception
    it raises becomes the error of every call it had not settled."""

    def __init__(self, work, linger: bool = False):
        self._work, self._linger = work, linger
        self._queue: list[Call] = []
        self._queue_lock = threading.Condition()
        self._leader = threading.Lock()

    def run(self, key, *args):
        call = Call(key, args)
        with self._queue_lock:
            self._queue.append(call)
            self._queue_lock.notify_all()
        with self._leader:
            if not call.settled:                  # no earlier leader took it: lead a batch
                self._lead(self._take_batch())
        if call.error is not None:
            raise call.error
        return call.result

    def _take_batch(self) -> list[Call]:
        with self._queue_lock:
            deadline = time.monotonic() + LINGER_MAX
            while self._linger and in_flight > len(self._queue) and time.monotonic() < deadline:
                if not self._queue_lock.wait(LINGER_GAP):
                    break
            batch, self._queue = self._queue, []
        return batch

    def _lead(self, batch: list[Call]) -> None:
        groups: dict = {}
        for queued in batch:
            groups.setdefault(queued.key, []).append(queued)
        for group_key, calls in groups.items():
            try:
                self._work(group_key, calls)
            except BaseException as exc:
                for call in calls:
                    if not call.settled:
                        call.settle(error=exc)


def together_or_alone(calls: list[Call], do) -> None:
    """`do([each call's args])` once for the whole batch; if that fails, once per call, so that
    each gets its own outcome (`do` must be safe to repeat). Settles every call."""
    try:
        do([call.args for call in calls])
    except Exception:
        if len(calls) == 1:
            raise
        for call in calls:
            try:
                do([call.args])
            except Exception as exc:
                call.settle(error=exc)
            else:
                call.settle()
    else:
        for call in calls:
            call.settle()
