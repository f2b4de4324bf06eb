"""A reachability probe run inside one NetLab node (``python tests/netns_probe.py --udp-port P
--tcp-port Q``), driven by JSON lines on stdin, answering with JSON lines on stdout.

The test process in the root namespace cannot (and must not) reach the lab's addresses, so the
control channel is the probe's stdin/stdout pipes; only the probes themselves talk over the lab.

* It counts the UDP datagrams it receives, per tag and source address.
* It runs a TCP echo server.

Commands (one JSON object a line; every answer is one JSON object a line, carrying the
command's ``id``):

* ``{"op": "udp_send", "to": ADDR, "n": N, "tag": T}`` -> ``{"sent": N}``
* ``{"op": "udp_counts", "tag": T}`` -> ``{"counts": {SRC_ADDR: N, ...}}``
* ``{"op": "tcp_echo", "to": ADDR, "port": P?, "timeout_s": S}`` ->
  ``{"ok": true, "rtt_s": X}`` or ``{"ok": false, "error": "timeout" | "refused" | ...}``
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys
import threading
import time

_RCVBUF_BYTES = 8 << 20  # room for bursts of datagrams: a count below N means the lab dropped them
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; root may exceed rmem_max


class Probe:
    def __init__(self, udp_port: int, tcp_port: int) -> None:
        self.udp_port, self.tcp_port = udp_port, tcp_port
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lock = threading.Lock()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.udp.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF_BYTES)
        except OSError:
            self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF_BYTES)
        self.udp.bind(("0.0.0.0", udp_port))
        self.tcp = socket.create_server(("0.0.0.0", tcp_port), backlog=64)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        threading.Thread(target=self._receive_udp, daemon=True).start()
        threading.Thread(target=serve_echo, args=(self.tcp,), daemon=True).start()

    def _receive_udp(self) -> None:
        while True:
            data, (src, _port) = self.udp.recvfrom(2048)
            tag = data.split(b"|", 1)[0].decode(errors="replace")
            with self.lock:
                self.counts[(tag, src)] += 1

    def handle(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "udp_send":
            for seq in range(int(cmd["n"])):
                self.sender.sendto(f"{cmd['tag']}|{seq}".encode(), (cmd["to"], self.udp_port))
            return {"sent": int(cmd["n"])}
        if op == "udp_counts":
            with self.lock:
                return {"counts": {src: n for (tag, src), n in self.counts.items()
                                   if tag == cmd["tag"]}}
        if op == "tcp_echo":
            return tcp_echo(cmd["to"], int(cmd.get("port", self.tcp_port)),
                            float(cmd.get("timeout_s", 1.0)), int(cmd.get("rounds", 1)))
        return {"error": f"unknown op {op!r}"}


def serve_echo(server: socket.socket) -> None:
    """Accept on ``server`` until it is closed; echo each connection on its own thread."""
    while True:
        try:
            conn, _addr = server.accept()
        except OSError:
            return
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def tcp_echo(host: str, port: int, timeout_s: float, rounds: int) -> dict:
    payload = b"x" * 32
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(rounds):
                start = time.monotonic()
                conn.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = conn.recv(len(payload) - len(got))
                    if not chunk:
                        return {"ok": False, "error": "closed"}
                    got += chunk
                rtts.append(time.monotonic() - start)
            return {"ok": True, "rtt_s": rtts[0], "rtts_s": rtts}
    except TimeoutError:
        return {"ok": False, "error": "timeout"}
    except ConnectionRefusedError:
        return {"ok": False, "error": "refused"}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--udp-port", type=int, required=True)
    parser.add_argument("--tcp-port", type=int, required=True)
    args = parser.parse_args()
    probe = Probe(args.udp_port, args.tcp_port)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            cmd = json.loads(line)
            print(json.dumps({**probe.handle(cmd), "id": cmd.get("id")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
