#!/usr/bin/env python3
"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one GET on each
(one after the other, so the proxy needs a single upstream connection),
reads each response in full, then holds every connection open.

Usage: hold_conns.py PORT N READY_FILE HOLD_SECONDS

Writes "ready <ok> <non-2xx>" to READY_FILE once all N responses are in,
then sleeps HOLD_SECONDS (bounded) and exits, closing the sockets.
Exits 1 if a connection fails or a response is not 2xx.
"""

import os
import socket
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: hold-conns\r\n\r\n"


def read_response(sock):
    """Reads one HTTP/1.1 response with Content-Length; returns the status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside a chunked body")
            rest += chunk
    else:
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            rest += chunk
    return status


def main():
    port, count, ready_file, hold = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        float(sys.argv[4]),
    )
    hold = min(hold, 120.0)
    socks = []
    bad = 0
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(REQUEST)
        if not 200 <= read_response(s) < 300:
            bad += 1
        socks.append(s)
    with open(ready_file + ".tmp", "w") as f:
        f.write(f"ready {len(socks)} {bad}\n")
    os.rename(ready_file + ".tmp", ready_file)
    time.sleep(hold)
    for s in socks:
        s.close()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
