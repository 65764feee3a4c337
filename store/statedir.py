"""The state dir: the one place weft keeps files, and the only code that opens them.

weft runs as root and acts on what it reads here, so everything in it is treated as hostile
until checked:
  - the directory (and each of its ancestors) must belong to root (or to weft's own user) and
    not be writable by group or others, unless sticky like /tmp: otherwise another user could
    swap what weft reads, or have weft write through a link of theirs;
  - every file is opened without following symlinks (O_NOFOLLOW), must be a regular file with
    the same owner and no group/other write bit, and is read up to a size limit;
  - files are replaced atomically: a new file (O_EXCL, mode 0600 unless said otherwise) is
    written, fsync'd and renamed over the old name, then the directory is fsync'd; a reader
    sees the old file or the new one, whole, also after a crash;
  - one lock, `weft.lock`: exclusive for a reconcile run's kernel work, shared for the CNI
    plugin's per-pod steps (flock, so it is released when the process dies).

Standard library only: the CNI plugin opens the state dir on every pod start. (filelock is not
used: it has no shared flock mode, and importing it costs ~40 ms on the plugin's path.)
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager

from weft.model.errors import WeftError

DEFAULT = "/var/lib/weft"
LOCK_FILE = "weft.lock"
DIR_MODE = 0o700
FILE_MODE = 0o600
MAX_FILE = 64 << 20            # no state file weft writes comes near this; larger is not weft's
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def default_state_dir() -> str:
    """$WEFT_STATE_DIR, else /var/lib/weft."""
    return os.environ.get("WEFT_STATE_DIR", DEFAULT)


class UnsafeState(WeftError):
    """A state dir or file weft must not trust (wrong owner, writable by others, a symlink,
    not a regular file, too large). The message names it and says how to fix it."""


class CorruptState(WeftError):
    """A state file that is there but is not what weft wrote (unparsable, wrong format)."""


def _owners() -> tuple[int, ...]:
    return (0, os.geteuid())


def _check_dir(path: str, st: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeState(f"{what} {path} is a symbolic link: weft does not follow links in its state dir; "
                          "point --state-dir at the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeState(f"{what} {path} is not a directory")
    if st.st_uid not in _owners():
        raise UnsafeState(f"{what} {path} belongs to uid {st.st_uid}, not root: another user could change what "
                          f"weft (as root) reads there; use a root-owned directory (chown root {path})")
    if st.st_mode & _WRITABLE_BY_OTHERS and not st.st_mode & stat.S_ISVTX:
        raise UnsafeState(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                          f"another user could change what weft reads there; chmod go-w {path}")


def _check_ancestors(path: str) -> None:
    """Every existing directory above `path` must be one another user cannot rename entries in."""
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                st = os.stat(parent)        # a link above the state dir (/var -> /data/var) is the admin's
            _check_dir(parent, st, "the state dir's parent")
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up


def atomic_write(path: str, data: bytes | str, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` atomically and durably: a new file in the same directory
    (created exclusively, never through a link, `mode` whatever the umask), fsync'd, renamed over
    `path` (a link there is replaced, never followed), then the directory fsync'd. The temporary
    name starts with a dot and ends in .tmp, so readers that glob (node_exporter: *.prom) never
    see it. The caller has checked the directory."""
    directory = os.path.dirname(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    sync_dir(directory)


class StateDir:
    """A checked state dir. `create`: make it (mode 0700) when it does not exist."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = os.path.abspath(os.fspath(path))
        _check_ancestors(self.path)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            if not create:
                raise UnsafeState(f"state dir {self.path} does not exist") from None
            try:
                os.makedirs(self.path, mode=DIR_MODE)
            except FileExistsError:
                pass
            st = os.lstat(self.path)
        _check_dir(self.path, st, "state dir")

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"StateDir({self.path!r})"

    def file(self, name: str) -> str:
        """The path of `name` ("x.json" or "ipam/x.json") in the state dir."""
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"not a state dir file name: {name!r}")
        return os.path.join(self.path, name)

    def subdir(self, name: str) -> str:
        """The checked subdirectory `name`, made (0700) if missing."""
        path = self.file(name)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
        _check_dir(path, os.lstat(path), "state subdirectory")
        return path

    # ---- reading ----------------------------------------------------------------------------

    def open_checked(self, name: str, flags: int = os.O_RDONLY) -> int | None:
        """A descriptor of `name` opened with `flags` (with O_CREAT: made 0600 if missing), or None
        when there is no such file; refuses links and files weft would not have written (see the
        module docstring). Every open of a state-dir file goes through here."""
        path = self.file(name)
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeState(f"{path} is a symbolic link: weft does not follow links in its state dir; "
                                  "remove it") from None
            raise UnsafeState(f"{path}: cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            problem = None
            if not stat.S_ISREG(st.st_mode):
                problem = "is not a regular file"
            elif st.st_uid not in _owners():
                problem = f"belongs to uid {st.st_uid}, not root"
            elif st.st_mode & _WRITABLE_BY_OTHERS:
                problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
            if problem:
                raise UnsafeState(f"{path} {problem}: weft does not trust it; remove it (weft writes it anew)")
            return fd
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, name: str, limit: int = MAX_FILE) -> bytes | None:
        """The file's content (None when it does not exist); UnsafeState past `limit` bytes."""
        fd = self.open_checked(name)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise UnsafeState(f"{self.file(name)} is {size} bytes, more than the {limit} weft allows for it: "
                                  "not a file weft wrote; remove it")
            chunks, total = [], 0
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
                if total > limit:
                    raise UnsafeState(f"{self.file(name)} grew past {limit} bytes while read; remove it")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_json(self, name: str, limit: int = MAX_FILE):
        """The file parsed as JSON (None when it does not exist); CorruptState when it is not JSON."""
        import json
        data = self.read_bytes(name, limit)
        if data is None:
            return None
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise CorruptState(f"{self.file(name)} is not valid JSON ({str(exc)[:80]})") from None

    # ---- writing ----------------------------------------------------------------------------

    def replace(self, name: str, data: bytes | str, mode: int = FILE_MODE) -> None:
        """Replace `name` with `data` atomically and durably (see the module docstring)."""
        atomic_write(self.file(name), data, mode)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self.file(name))
        except FileNotFoundError:
            pass

    def append_log(self, name: str) -> int:
        """A descriptor to append to log file `name` (created 0600; never through a link)."""
        return self._open_or_create(name, os.O_WRONLY | os.O_APPEND)

    def _open_or_create(self, name: str, flags: int) -> int:
        fd = self.open_checked(name, flags | os.O_CREAT)
        if fd is None:                            # O_CREAT: only a missing directory gets here
            raise UnsafeState(f"{self.file(name)}: cannot create it: its directory is gone")
        return fd

    # ---- the node lock ----------------------------------------------------------------------

    @contextmanager
    def lock(self, *, shared: bool, timeout: float, name: str = LOCK_FILE) -> Iterator[None]:
        """The node lock: exclusive for a reconcile run's kernel work, shared for the CNI plugin's
        per-pod steps. WeftError when it cannot be had within `timeout` seconds."""
        path = self.file(name)
        fd = self._open_or_create(name, os.O_RDWR)
        try:
            operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
            deadline = time.monotonic() + timeout
            pause = 0.002
            while True:
                try:
                    fcntl.flock(fd, operation)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise WeftError(f"{path}: another weft run held the node lock for {timeout:g}s; "
                                        "gave up") from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
            yield
        finally:
            os.close(fd)                          # closing releases the flock


def sync_dir(directory: str) -> None:
    """fsync a directory, so a rename in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
