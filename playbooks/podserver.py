"""The lab's stand-in for agnhost: answers TCP and UDP on every given port until killed.

Run inside a pod namespace as `python -I -S podserver.py 80 81`. TCP: accept, send b"ok\\n", close.
UDP: echo each datagram back to its sender. Prints "ready" once every socket is bound, so the lab
can wait for it instead of sleeping. Standard library only, so it can start without site-packages.
"""
import os
import selectors
import socket
import sys

TCP_REPLY = b"ok\n"


def bind_all(ports: list[int]) -> selectors.DefaultSelector:
    """Bind TCP listeners and UDP sockets on 0.0.0.0 for each port, and on :: where the namespace
    has IPv6 (a dual-stack pod), registered on one selector."""
    selector = selectors.DefaultSelector()
    families = [(socket.AF_INET, "0.0.0.0")]
    if os.path.exists("/proc/net/if_inet6"):
        families.append((socket.AF_INET6, "::"))
    for port in ports:
        for family, address in families:
            tcp = socket.create_server((address, port), family=family, backlog=256)
            tcp.setblocking(False)
            selector.register(tcp, selectors.EVENT_READ, "tcp")
            udp = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.bind((address, port))
            udp.setblocking(False)
            selector.register(udp, selectors.EVENT_READ, "udp")
    return selector


def answer(sock: socket.socket, proto: str) -> None:
    """Serve one ready socket; a peer that vanished mid-answer is not the server's problem."""
    try:
        if proto == "tcp":
            conn, _ = sock.accept()
            with conn:
                conn.settimeout(1.0)
                conn.sendall(TCP_REPLY)
        else:
            data, peer = sock.recvfrom(2048)
            sock.sendto(data, peer)
    except OSError:
        pass


def main(argv: list[str]) -> None:
    selector = bind_all([int(port) for port in argv])
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if isinstance(sock := key.fileobj, socket.socket):     # always: bind_all registers sockets
                answer(sock, key.data)


if __name__ == "__main__":
    main(sys.argv[1:])
