"""Slowloris for scripts/soak.sh: COUNT sockets to HOST:PORT (loopback), each sending a
request head one header line every EVERY seconds and never finishing it, until the unix
time END; a socket the server closes is reopened. On SIGTERM or at END it prints how many
it opened and how many the server closed."""
import selectors
import signal
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
count, every, end = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
sel = selectors.DefaultSelector()
opened = closed = 0


def open_one():
    global opened
    s = socket.create_connection((host, int(port)))
    s.setblocking(False)
    s.send(b"GET /healthz HTTP/1.1\r\nhost: soak\r\n")
    sel.register(s, selectors.EVENT_READ)
    opened += 1
    return s


def report(*_):
    print(f"slowloris: {count} sockets held, {opened} opened, {closed} closed by the server")
    sys.exit(0)


signal.signal(signal.SIGTERM, report)
socks = [open_one() for _ in range(count)]
while time.time() < end:
    for key, _ in sel.select(timeout=every):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(s)
            s.close()
            socks.remove(s)
            closed += 1
            socks.append(open_one())
    for s in socks:
        try:
            s.send(b"x-slow: 1\r\n")
        except OSError:
            pass
report()
