"""A real listening socket that plays a WebHDFS namenode gone wrong, for faults a real namenode cannot
produce on demand (tests of ``config check --timeout`` and of error answers)."""

from __future__ import annotations

import json
import socket
import threading


class BadNamenode:
    """Modes: ``blackhole`` reads the request and never answers; ``trickle`` answers 200 with a chunked
    JSON body that never ends, one byte every 0.2 s; ``ioerror`` answers every call 500 with a
    RemoteException IOException (a namenode whose disk failed); ``redirect`` redirects to itself for
    ever; ``garbage`` answers 200 with bytes that are not JSON; ``endless`` answers 200 with a JSON body
    that never ends, as fast as it can."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _reply(self, c: socket.socket, status: str, body: bytes) -> None:
        c.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                  f"\r\n".encode() + body)

    def _serve(self, c: socket.socket) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                d = c.recv(65536)
                if not d:
                    return
                data += d
            path = data.split(b" ")[1].decode()
            if self.mode == "blackhole":
                self.stop.wait()
            elif self.mode == "trickle":
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                c.sendall(b"1\r\n{\r\n")
                while not self.stop.wait(0.2):
                    c.sendall(b"1\r\n \r\n")
            elif self.mode == "ioerror":
                self._reply(c, "500 Internal Server Error", json.dumps({"RemoteException": {
                    "exception": "IOException", "javaClassName": "java.io.IOException",
                    "message": "Input/output error: disk failed"}}).encode())
            elif self.mode == "redirect":
                c.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{self.port}{path}&x=1\r\n"
                          f"Content-Length: 0\r\n\r\n".encode())
            elif self.mode == "garbage":
                self._reply(c, "200 OK", b"\x00\xffnot json<html>")
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2000000000\r\n\r\n[")
                while not self.stop.is_set():
                    c.sendall(b" " * 65536)
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            c.close()
