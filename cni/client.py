"""The executable's entry point: hand the call to the node's resident helper, else run the plugin here.

A new Python process per pod costs its start-up (~12 ms here) plus the plugin's imports and
work (~60 ms more); with 20 pods at once on 2 cores those add up to most of a second. So this
module imports nothing but built-in C modules: `_socket` (`socket` would cost ~10 ms) and
`posix` (`os` costs ~2 ms, its import of _collections_abc the most; Python's start-up with -S
does not import it). It
passes the CNI_* variables, PATH and stdin to the helper listening in this network namespace
(cni/helper.py), and copies its answer to stdout, stderr and the exit code. The helper runs the
very same `cni.plugin.respond` in a warm process.

When no helper answers (none started yet, it died mid-call, or it retired because weft's code
changed), or it declines (another PATH or mount namespace, the configuration says "helper":
false), or the name is held by a process of another user, the plugin runs in this process as
before; after a successful call this process then starts a helper for the next ones (if the
name is free). When a C compiler was there at install time, the runtime starts the native client
(cni/client.c) instead, which does the helper's part alone and runs this one for the rest.
Every command is safe to run again after a helper died half-way: ADD of a known attachment
returns its address and rewires, DEL is idempotent.
"""
import _socket
import posix
import sys
import time

ADDRESS = b"\0weft-cni"          # abstract socket: one name per network namespace, gone with its process
CODE_ROOT = (__file__ if __file__.startswith("/") else f"{posix.getcwd()}/{__file__}").rsplit("/", 2)[0]
PASSED = (b"CNI_COMMAND", b"CNI_CONTAINERID", b"CNI_NETNS", b"CNI_IFNAME", b"CNI_ARGS", b"CNI_PATH", b"PATH")
NO_HELPER, DECLINED, IMPOSTOR = "none", "declined", "impostor"
HELPER_LOG = "cni-helper.log"   # in the state dir of the call that started the helper


def mount_namespace() -> bytes:
    """This process's mount namespace: CNI_NETNS paths (bind mounts) mean the same file only
    to processes that share it."""
    st = posix.stat("/proc/self/ns/mnt")
    return b"%d:%d" % (st.st_dev, st.st_ino)


def ours(sock) -> bool:
    """Whether the process that holds the helper's name runs as this one's user: any process of
    this network namespace may bind it, and what it is handed (the call) and answers (the
    result) must come from weft."""
    try:
        cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)    # struct ucred: pid, uid, gid
    except OSError:
        return False
    return int.from_bytes(cred[4:8], sys.byteorder) == posix.geteuid()


def request(environ: dict[bytes, bytes], stdin: bytes) -> bytes:
    """The wire format: a line with the length of the environment block, the block ("K=V\\0"...),
    then stdin to the end (the client shuts its side down)."""
    block = b"".join(k + b"=" + v + b"\0" for k, v in environ.items())
    return b"%d\n" % len(block) + block + stdin


def ask_helper(stdin: bytes) -> tuple[int, bytes, bytes] | str:
    """(exit code, stdout, stderr) from the helper, or why it did not answer."""
    environ = {k: v for k, v in posix.environ.items() if k in PASSED}
    environ[b"WEFT_CODE"] = CODE_ROOT.encode()
    environ[b"WEFT_MNTNS"] = mount_namespace()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(ADDRESS)
        except OSError:
            return NO_HELPER
        if not ours(sock):
            return IMPOSTOR
        try:
            sock.sendall(request(environ, stdin))
            sock.shutdown(_socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError:
            return NO_HELPER                      # it died while serving us
    finally:
        sock.close()
    header, _, body = b"".join(chunks).partition(b"\n")
    fields = header.split()
    if len(fields) == 2 and fields[0] == b"-":
        return NO_HELPER if fields[1] == b"stale" else DECLINED
    try:
        code, length = int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return NO_HELPER                          # cut short: it died before answering in full
    if len(body) < length:
        return NO_HELPER
    return code, body[:length], body[length:]


def main() -> int:
    try:
        stdin = sys.stdin.buffer.read()
    except OSError:
        from weft.cni import plugin
        return plugin.main()                      # it reports the read error in the protocol
    started = time.monotonic()
    answer = ask_helper(stdin)
    if not isinstance(answer, str):
        code, stdout, stderr = answer
        sys.stdout.buffer.write(stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(stderr)
        return code
    if answer == IMPOSTOR:
        sys.stderr.write("weft-cni: the CNI helper's socket @weft-cni of this network namespace is held by a "
                         "process of another user; running the call here\n")
    from weft.cni import plugin
    code = plugin.main(stdin)
    call = (posix.environ.get(b"CNI_COMMAND", b"").decode(errors="replace"), time.monotonic() - started, code == 0)
    if answer == NO_HELPER and code == 0 and call[0] not in ("VERSION", "") and start_helper(stdin, call):
        return code                               # the helper counts this call (cni/counting.py)
    from weft.cni import counting
    counting.count(*call, counting.counters_dir(stdin))
    return code


def start_helper(stdin: bytes, call: tuple[str, float, bool]) -> bool:
    """Start a helper in this network namespace for the calls to come, detached from this call
    (its own session, no inherited pipes: the runtime waits for our stdout to close).

    It runs this interpreter on the very code this call ran: from an installed `weft` package,
    with -I -S and that package's directory and this process's sys.path (whichever entry point
    started us: the launcher, the console script, `python -m`); from anything else (an editable
    install maps weft's folders through a finder that only `site` loads), with -I and `site`.
    Its stderr is <state dir>/cni-helper.log, opened through StateDir (no link followed).
    `call` (command, seconds, success) is the call this process ran, for the helper to count;
    False when no helper was started (the caller counts it then)."""
    import os
    import subprocess

    from weft.cni import counting, plugin
    from weft.store.statedir import StateDir
    wanted, state_dir = plugin.helper_settings(stdin)
    if not wanted:
        return False
    packaged = CODE_ROOT.endswith("/weft") and posix.access(f"{CODE_ROOT}/cni/helper.py", posix.R_OK)
    paths = ([CODE_ROOT.rsplit("/", 1)[0]] if packaged else []) + [p for p in sys.path if p]
    counted = (*call, counting.counters_dir(stdin))          # literals only: str, float, bool, str | None
    code = (f"import sys; sys.path[:0] = {paths!r}; from weft.cni.helper import main; "
            f"sys.exit(main(counted={counted!r}))")
    try:
        log = StateDir(state_dir).append_log(HELPER_LOG)
    except Exception:                             # an unsafe state dir (UnsafeState, OSError): no helper
        return False
    try:
        subprocess.Popen([sys.executable, "-IS" if packaged else "-I", "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=log, cwd="/", start_new_session=True,
                         env={"PATH": os.environ.get("PATH", "")})
    except OSError:
        return False                              # no helper: every call runs in its own process
    finally:
        os.close(log)
    return True


if __name__ == "__main__":
    sys.exit(main())
