"""The CNI fast path: what makes many pods at once cheap, behind one object passed down.

The resident helper (cni/helper.py) serves many pods at once, a thread each. Two steps of an
ADD or DEL cost about the same for one pod as for twenty: the IPAM write (an fsync'd file under
a lock) and the policy step (one iptables-restore). So instead of queueing for them one by one,
the calls of one process share them: the first caller in does the work for every call queued by
then (group commit), and the others find theirs done. (The wiring is a few netlink requests of
tens of microseconds each: there is nothing to share.)

A `FastPath` holds those batches, how many calls the process is serving, and what the process
knows of the kernel between batches (the dispatch chains: reconciler.endpoint.DispatchCache).
The plugin creates one per process (a plain plugin run: every batch is a batch of one) and
passes it down to what it calls; the modules that do the work (store.ipam, reconciler.endpoint)
know nothing of batching: each offers a function that does the work for a list, and takes the
fast path's runner as a parameter. Stdlib only: this is on the plugin's path.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from weft.reconciler import endpoint
from weft.store import ipam

LINGER_GAP = 0.008                     # a leader that lingers goes when no call joined for this long,
LINGER_MAX = 0.030                     # or after this long in all


class Call:
    """One caller's request in a batch; the batch's work settles it with a result or an error."""
    __slots__ = ("key", "args", "result", "error", "settled")

    def __init__(self, key, args: tuple):
        self.key, self.args = key, args
        self.result: object = None
        self.error: BaseException | None = None
        self.settled = False

    def settle(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error, self.settled = result, error, True


class GroupCommit:
    """`work(key, calls)` does a batch of calls with the same key and settles each; an exception
    it raises becomes the error of every call it had not settled.

    `linger`: the FastPath whose calls in flight the leader of a batch that costs processes waits
    for a little (one more pod in such a batch costs far less than one more batch); None: go at once.
    """

    def __init__(self, work, linger: FastPath | None = None):
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
            while self._linger and self._linger.in_flight > len(self._queue) and time.monotonic() < deadline:
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


class FastPath:
    """One process's batches of CNI work. `serving()` counts a call in flight (the helper wraps
    each call in it), which is what a lingering leader waits for."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._count = threading.Lock()
        self._ipam = GroupCommit(_ipam_batch)
        self._policy = GroupCommit(self._policy_batch, linger=self)
        self.dispatch = endpoint.DispatchCache()

    @contextmanager
    def serving(self) -> Iterator[None]:
        with self._count:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._count:
                self.in_flight -= 1

    def ipam_commit(self, store, step):
        """store.ipam.Store's `commit`: steps of concurrent calls on one state dir share a transaction."""
        return self._ipam.run(store.sd.path, store, step)

    def add_endpoint(self, state_dir, namespace: str, pod: str, iface: str, ips: tuple[str, ...] = ()) -> None:
        """The pod's policy in the kernel, in the families of `ips` (reconciler.endpoint), one
        restore per family and batch (and a listing of a family's dispatch chains only when they
        changed since this process last saw them)."""
        self._policy.run(("add", os.fspath(state_dir)), iface, namespace, pod, tuple(ips))

    def remove_endpoint(self, state_dir, iface: str) -> None:
        self._policy.run(("remove", os.fspath(state_dir)), iface)

    def _policy_batch(self, key: tuple[str, str], calls: list[Call]) -> None:
        kind, state_dir = key
        work = endpoint.add_endpoints if kind == "add" else endpoint.remove_endpoints
        together_or_alone(calls, lambda pods: work(state_dir, pods, self.dispatch))


def _ipam_batch(_path: str, calls: list[Call]) -> None:
    store = calls[0].args[0]                      # the kernel hooks of the batch's first call
    outcomes = ipam.transact(store.sd, [call.args[1] for call in calls], store.held, store.recover)
    for call, (result, error) in zip(calls, outcomes, strict=True):
        call.settle(result, error)

