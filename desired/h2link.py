"""A run's watches as streams of one HTTP/2 connection to the API server.

Why: on a live cluster the usual run is "the resourceVersion moved, nothing weft reads changed"
(leases and events move it every few seconds), and it watches every kind it reads from its
cursor until the watch goes quiet (desired.sources). Over HTTP/1.1 a watch holds its connection
until the server ends it, and the server ends a watch only at its `timeoutSeconds` (1 s at
least): a watch ended at the quiet gap must close its connection. So a quiet run over HTTP/1.1
cost one TLS connection per kind (19), and nothing can make it fewer without making it slower;
measured on FakeKubeAPI (1,000 pods, 19 kinds, this 2-core machine under load):
  - each watch ended at the quiet gap, all at once:      19 connections, 1.2 s;
  - each ended by the server (timeoutSeconds=1), pooled:  19 connections on 19 lanes (2.3 s),
    4 on 4 lanes (5.0 s), 1 on 1 lane (19.1 s).
kube-apiserver speaks HTTP/2 (ALPN "h2" over TLS), where each request is a stream of one
connection and a stream is ended alone (RST_STREAM) without closing the connection: all of a
run's watches share one connection, each still ended at its own quiet gap, nothing waits for
another, and the run's small GETs (the version probe, API discovery) go there too. So a quiet
run costs one connection and one handshake; bytes and requests are as before (HTTP/2's header
compression makes the bytes fewer). Lists stay on HTTP/1.1's pool (desired.api.Connection):
pages of megabytes parse faster there than as pure-Python frames, and a quiet run lists nothing.

Judged and left out: ending each HTTP/1.1 watch at the server (timeoutSeconds) to reuse its
connection (figures above: fewer connections only by making a run seconds slower); skipping
kinds whose cursor "the list proves current" (a list's resourceVersion is the cluster's, not
the kind's: it proves a kind unchanged only when nothing changed at all, the one-request path
desired.sources already takes).

Used only where it is sure to work: over TLS, without a proxy, and when the server picks "h2"
by ALPN; anything else (plain http, a proxy, a server without HTTP/2, a failed connection)
makes the watches use HTTP/1.1 as before. `h2` (pure Python, ~25 ms to import) is imported
only by a run that watches.

One thread does all the socket's I/O for the connection (an SSL socket may not be read and
written at once from two threads): it reads frames and hands each stream's data to the thread
waiting for it; requests and stream resets are written under the same lock. FakeKubeAPI
(tests/kubeapi.py) serves HTTP/2 with this same Link.
"""
from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

WINDOW = 1 << 20                 # flow-control window asked of the server, per stream and connection (1 MiB)


class Link:
    """One HTTP/2 connection's socket and protocol state (`h2.connection.H2Connection`): `run()`
    reads frames until the connection ends and gives each event to `on_event` (under the lock);
    `write(fn)` runs fn(conn) under the lock and sends what it produced."""

    def __init__(self, sock: ssl.SSLSocket, conn: Any, on_event: Callable[[Any], None],
                 on_close: Callable[[], None] = lambda: None, count: Callable[[int], None] = lambda n: None):
        self.sock, self.conn, self._on_event, self._on_close, self._count = sock, conn, on_event, on_close, count
        self.lock = threading.RLock()
        self.closed = False

    def write(self, fn: Callable[[Any], Any] | None = None) -> Any:
        with self.lock:
            if self.closed:
                raise OSError("the HTTP/2 connection is closed")
            result = fn(self.conn) if fn is not None else None
            self._flush()
            return result

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)
            self._count(len(out))

    def run(self) -> None:
        """Read until the peer closes, an error, or close(); then on_close()."""
        try:
            while True:
                with self.lock:                     # the socket is closed only under the lock
                    if self.closed:
                        break
                    pending = self.sock.pending()
                if not pending:
                    readable, _w, _x = select.select([self.sock], [], [], 0.05)
                    if not readable:
                        continue
                with self.lock:
                    if self.closed:
                        break
                    try:
                        data = self.sock.recv(1 << 16)
                    except (ssl.SSLWantReadError, TimeoutError):
                        continue
                    if not data:
                        break
                    for event in self.conn.receive_data(data):
                        self._on_event(event)
                    self._flush()
        except (OSError, ValueError, _protocol_errors()):
            pass
        finally:
            self.close()
            self._on_close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.conn.close_connection()
                self._flush()
            except (OSError, ValueError, _protocol_errors()):
                pass
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def _protocol_errors() -> type[Exception]:
    import h2.exceptions
    return h2.exceptions.H2Error


class Stream:
    """One request's answer as it arrives: `ready` once the headers are in (or the connection or
    stream failed: `failed`), then its data in `chunks` (None: the stream ended).

    Data is acknowledged (the server's flow-control window given back) only as it is taken, so
    a server cannot make weft hold more than the window (WINDOW, for the whole connection) of
    answers not read yet."""

    def __init__(self, stream_id: int, ack: Callable[[int, int], None] = lambda sid, n: None):
        self.id, self._ack = stream_id, ack
        self.ready = threading.Event()
        self.headers: dict[str, str] = {}
        self.chunks: queue.Queue[tuple[bytes, int] | None] = queue.Queue()
        self.failed: str | None = None
        self.ended = False

    def take(self, wait: float) -> bytes | None:
        """The next chunk (None at the end), acknowledged; queue.Empty after `wait` seconds."""
        item = self.chunks.get(timeout=wait)
        if item is None:
            self.chunks.put(None)               # the end stays the end for the next reader
            return None
        data, flow = item
        if flow:
            self._ack(self.id, flow)
        return data

    def drain(self) -> None:
        """Acknowledge what was received and not read (the stream is given up)."""
        while True:
            try:
                if self.take(0) is None:
                    return
            except queue.Empty:
                return

    def body(self, limit: int, wait: float) -> bytes:
        """Up to `limit` bytes of the data (an error answer's Status), waiting `wait` at most."""
        out = b""
        try:
            while len(out) < limit:
                chunk = self.take(wait)
                if chunk is None:
                    break
                out += chunk
        except queue.Empty:
            pass
        return out[:limit]

    def data(self, quiet: float, deadline: float) -> Iterator[bytes]:
        """The data as it comes, until the stream ends, `quiet` seconds pass without any, or the
        (time.monotonic) deadline."""
        import time
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                chunk = self.take(min(quiet, left))
            except queue.Empty:
                return
            if chunk is None:
                return
            yield chunk


class Session:
    """The client's HTTP/2 connection to the API server: `open()` sends a GET and returns its
    Stream; `cancel()` ends a stream the client is done with (RST_STREAM CANCEL)."""

    def __init__(self, sock: ssl.SSLSocket, authority: str, headers: dict[str, str]):
        import h2.config
        import h2.connection
        import h2.settings
        self.authority, self._headers = authority, headers
        self._streams: dict[int, Stream] = {}
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                              h2.settings.SettingCodes.ENABLE_PUSH: 0})
        conn.increment_flow_control_window(WINDOW)
        self.link = Link(sock, conn, self._event, self._closed)
        self.link.write()
        threading.Thread(target=self.link.run, name="weft-h2", daemon=True).start()

    def open(self, path: str) -> Stream:
        def send(conn) -> Stream:
            stream = Stream(conn.get_next_available_stream_id(), self._ack)
            self._streams[stream.id] = stream
            conn.send_headers(stream.id, [(":method", "GET"), (":scheme", "https"), (":authority", self.authority),
                                          (":path", path), *((k.lower(), v) for k, v in self._headers.items())],
                              end_stream=True)
            return stream
        return self.link.write(send)

    def cancel(self, stream: Stream) -> None:
        import h2.errors

        def reset(conn) -> None:
            self._streams.pop(stream.id, None)
            if not stream.ended:
                conn.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
        try:
            self.link.write(reset)
        except (OSError, _protocol_errors()):
            pass
        stream.drain()

    def _ack(self, stream_id: int, size: int) -> None:
        try:
            self.link.write(lambda conn: conn.acknowledge_received_data(size, stream_id))
        except (OSError, _protocol_errors()):
            pass                                # closed: nothing more will come anyway

    def close(self) -> None:
        self.link.close()

    def _event(self, event: Any) -> None:
        import h2.events
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = {_text(k): _text(v) for k, v in event.headers}
            stream.ready.set()
        elif isinstance(event, h2.events.DataReceived) and stream is not None:
            stream.chunks.put((event.data, event.flow_controlled_length))
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
            stream.chunks.put(None)
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.ended = True
            stream.failed = stream.failed or f"the server reset the stream (HTTP/2 error {event.error_code})"
            stream.ready.set()
            stream.chunks.put(None)
        elif isinstance(event, h2.events.DataReceived):           # a stream given up: its window back
            self.link.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._closed()

    def _closed(self) -> None:
        for stream in list(self._streams.values()):
            if not stream.ended:
                stream.failed = stream.failed or "the HTTP/2 connection closed"
                stream.ready.set()
                stream.chunks.put(None)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def tls_context(profile: Any, cert_files: tuple[str, str] | None) -> ssl.SSLContext:
    """A client context that checks the server as desired.api.Connection's urllib3 pool does
    (profile's CA or the system's, hostname unless assert_hostname is False), offering only h2."""
    context = ssl.create_default_context(cadata=profile.ca_pem) if profile.ca_pem else ssl.create_default_context()
    if not profile.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif profile.assert_hostname is False:
        context.check_hostname = False
    if cert_files:
        context.load_cert_chain(*cert_files)
    context.set_alpn_protocols(["h2"])
    return context


def connect(profile: Any, cert_files: tuple[str, str] | None, headers: dict[str, str],
            timeout: float) -> Session | None:
    """An HTTP/2 session with the API server of `profile`, or None where HTTP/2 is not for sure
    (not https, a proxy, the server did not pick h2, or no connection: the caller uses HTTP/1.1,
    whose own errors then say what is wrong)."""
    from urllib.parse import urlsplit
    url = urlsplit(profile.host)
    if url.scheme != "https" or profile.proxy or not url.hostname:
        return None
    port = url.port or 443
    name = profile.server_hostname or (profile.assert_hostname if isinstance(profile.assert_hostname, str)
                                       else url.hostname)
    try:
        import h2.connection  # noqa: F401  (not installed: HTTP/1.1)
        raw = socket.create_connection((url.hostname, port), timeout=timeout)
    except (ImportError, OSError):
        return None
    try:
        sock = tls_context(profile, cert_files).wrap_socket(raw, server_hostname=name)
        if sock.selected_alpn_protocol() != "h2":
            sock.close()
            return None
        sock.settimeout(timeout)
        authority = url.netloc.rpartition("@")[2]
        return Session(sock, authority, headers)
    except (OSError, ValueError):
        raw.close()
        return None
