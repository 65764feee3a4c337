"""The CNI plugin's resident helper: one warm process per node network namespace that serves the
plugin's calls, so a pod's ADD pays a small client's start (cni/client.c, or a bare interpreter's
running cni/client.py) and not the imports.

- Found by an abstract unix socket name (cni.client.ADDRESS): such names are per network
  namespace, so each node namespace has its own helper and no file is left behind. Only callers
  with this process's user id are served (SO_PEERCRED).
- Started by the client after a call it had to run itself (cni.client.main); a second helper in
  the same namespace cannot bind the name and exits at once.
- Runs each call in a thread with `cni.plugin.respond`, the same code the client would run; calls
  for one attachment run one after the other, in the order they came; the threads' IPAM writes
  and policy steps are batched by the helper's one FastPath (cni.fastpath), which also keeps
  what the helper knows of the dispatch chains between batches.
- Declines, and the client runs the call itself, when the caller's PATH or mount namespace
  (where CNI_NETNS paths are looked up) differ from its own, or the configuration says
  "helper": false. When weft's code changed on disk, or the caller runs weft from another
  directory (an upgrade installed elsewhere), it answers "stale" and exits; the caller then
  starts a fresh helper.
- Exits when idle for IDLE_EXIT seconds, or when every state dir it served is gone.
- Counts the calls it serves in their state dir's CNI counters (cni/counting.py): in memory on
  the call's path, added to the state dir by a thread of its own at most every FLUSH_EVERY
  seconds, and when it exits.
Its log (tracebacks, failed undo steps) is <state_dir>/cni-helper.log of the call that started it.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

from weft.cni import client, counting

IDLE_EXIT = 120.0
FLUSH_EVERY = 1.0


def _weft_files() -> dict[str, int]:
    """mtime of every weft module this process loaded: a change means new code was installed."""
    root = client.CODE_ROOT + os.sep
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if path.startswith(root):
            try:
                stamps[path] = os.stat(path).st_mtime_ns
            except OSError:
                stamps[path] = -1
    return stamps


class Helper:
    """`plugin`: the cni.plugin module (imported once the socket is bound); `fast`: the batches
    every call of this process shares (cni.fastpath.FastPath); `counters`: the class that counts
    calls (reconciler.metrics.CniCounters)."""

    def __init__(self, listener: socket.socket, idle_exit: float, plugin, fast, counters):
        self.listener, self.idle_exit, self.plugin, self.fast = listener, idle_exit, plugin, fast
        self.counters_class = counters
        self.counters: dict[str, Any] = {}        # state dir -> its CniCounters, not flushed yet
        self.flusher: threading.Thread | None = None
        self.flushed = time.monotonic()
        self.stamps = _weft_files()
        self.path = os.environ.get("PATH", "")
        self.mount_ns = os.fsdecode(client.mount_namespace())
        self.state_dirs: set[str] = set()
        self.attachments: dict[tuple[str, str], tuple[threading.Lock, int]] = {}
        self.busy = 0
        self.last = time.monotonic()
        self.stopping = False
        self.lock = threading.Condition()

    def serve(self) -> None:
        self.listener.settimeout(1.0)
        while not self.stopping:
            self._maybe_flush()
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                self._maybe_stop()
                continue
            except OSError:
                break                             # closed by a handler that found the code stale
            with self.lock:
                self.busy += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        with self.lock:                           # let calls in progress finish
            self.lock.wait_for(lambda: self.busy == 0)
        if self.flusher is not None:
            self.flusher.join()
        self._flush()                             # what the last calls observed

    def observe(self, directory: str | None, command: str, seconds: float, ok: bool) -> None:
        if directory is None:
            return
        with self.lock:
            if directory not in self.counters:
                self.counters[directory] = self.counters_class()
            self.counters[directory].observe(command, seconds, ok)

    def _maybe_flush(self) -> None:
        """Start the thread that adds the counts to the state dirs, when there are counts and the
        last one ended FLUSH_EVERY seconds ago (never on a call's path: its lock and fsync)."""
        if not self.counters or time.monotonic() - self.flushed < FLUSH_EVERY:
            return
        if self.flusher is not None and self.flusher.is_alive():
            return
        self.flusher = threading.Thread(target=self._flush, daemon=True)
        self.flusher.start()

    def _flush(self) -> None:
        with self.lock:
            taken, self.counters = self.counters, {}
        for directory, counters in taken.items():
            counting.flush(counters, directory)
        self.flushed = time.monotonic()

    def _maybe_stop(self) -> None:
        with self.lock:
            if self.busy:
                return
            idle = time.monotonic() - self.last > self.idle_exit
            gone = bool(self.state_dirs) and not any(os.path.isdir(d) for d in self.state_dirs)
            if idle or gone or self._stale():
                self._stop()

    def _stale(self) -> bool:
        """Whether a weft module this process loaded changed on disk since (modules imported
        lazily, after start, are noted as they come)."""
        return any(self.stamps.setdefault(path, now) != now for path, now in _weft_files().items())

    def _stop(self) -> None:
        """Free the name for a new helper at once: shutdown() also wakes the accept() blocked in
        serve(), which would otherwise keep the socket (and its name) alive."""
        self.stopping = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
                if uid != os.getuid():
                    return
                environ, stdin = _read_request(conn)
                conn.sendall(self._answer(environ, stdin))
        except (BrokenPipeError, ConnectionResetError):
            pass                                  # the caller was killed; its call was completed
        except Exception as exc:                  # a broken caller must not take the helper down
            print(f"weft-cni helper: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            with self.lock:
                self.busy -= 1
                self.last = time.monotonic()
                self.lock.notify_all()

    def _answer(self, environ: dict[str, str], stdin: bytes) -> bytes:
        started = time.monotonic()
        wanted, state_dir = self.plugin.helper_settings(stdin)
        if (environ.pop("WEFT_MNTNS", None), environ.get("PATH", "")) != (self.mount_ns, self.path) or not wanted:
            return b"- declined\n"
        with self.lock:
            if self.stopping or self._stale() or environ.pop("WEFT_CODE", None) != client.CODE_ROOT:
                self._stop()                      # weft was upgraded (in place, or installed elsewhere)
                return b"- stale\n"
            self.state_dirs.add(os.path.abspath(state_dir))
            attachment = self._attachment(environ, +1)
        try:
            with self.fast.serving(), attachment:
                code, stdout, stderr = self.plugin.respond(environ, stdin, self.fast)
        finally:
            with self.lock:
                self._attachment(environ, -1)
        self.observe(counting.counters_dir(stdin), environ.get("CNI_COMMAND", ""), time.monotonic() - started,
                     code == 0)
        sys.stderr.flush()
        return b"%d %d\n" % (code, len(stdout)) + stdout + stderr


    def _attachment(self, environ: dict[str, str], count: int) -> threading.Lock:
        """The lock of the call's attachment (container id, ifname), held while the call runs: a
        DEL (or a new ADD) waits for an ADD still in progress, even when that ADD's caller was
        killed (the runtime then DELs at once). Kept while any call holds it (self.lock held)."""
        key = (environ.get("CNI_CONTAINERID", ""), environ.get("CNI_IFNAME", ""))
        lock, users = self.attachments.get(key, (None, 0))
        if lock is None:
            lock = threading.Lock()
        if users + count:
            self.attachments[key] = (lock, users + count)
        else:
            self.attachments.pop(key, None)
        return lock


def _read_request(conn: socket.socket) -> tuple[dict[str, str], bytes]:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    header, _, rest = b"".join(chunks).partition(b"\n")
    length = int(header)
    environ = {}
    for pair in rest[:length].split(b"\0"):
        key, sep, value = pair.partition(b"=")
        if sep:
            environ[os.fsdecode(key)] = os.fsdecode(value)
    return environ, rest[length:]


def main(idle_exit: float = IDLE_EXIT, counted: tuple[str, float, bool, str | None] | None = None) -> int:
    """`counted`: the call (command, seconds, success, state dir) that the process starting this
    helper ran itself, for this helper to count (cni/client.py, start_helper)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(client.ADDRESS)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:         # another helper serves this namespace
            if counted is not None:
                counting.count(*counted)
            return 0
        raise
    listener.listen(256)
    # Imported only now: callers from now on wait in the backlog while it loads, rather than
    # finding no helper and starting one each.
    from weft.cni import plugin
    from weft.cni.fastpath import FastPath
    from weft.reconciler.metrics import CniCounters
    helper = Helper(listener, idle_exit, plugin, FastPath(), CniCounters)
    if counted is not None:
        command, seconds, ok, directory = counted
        helper.observe(directory, command, seconds, ok)
    helper.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
