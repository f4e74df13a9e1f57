"""A fault-injecting TCP proxy on loopback, for network faults between agents and to ZooKeeper.

Modes: ``pass`` (forward), ``delay`` (hold every piece of data for a while),
``drop`` (accept and read, forward nothing: a black hole, as a partitioned
network looks to TCP), ``cut`` (close every connection now and refuse new
ones). Switching back to ``pass`` heals the link for new connections.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FaultProxy:
    def __init__(self, target: str, listen_port: int = 0) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", listen_port))
        self.server.listen(64)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.mode = "pass"
        self.delay_s = 0.0
        self.faults = 0
        self.forwarded = 0  # bytes passed on toward the target (what its clients sent)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode: str, delay_s: float = 0.0) -> None:
        self.mode, self.delay_s = mode, delay_s
        if mode != "pass":
            self.faults += 1
        if mode == "cut":
            self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, toward: bool = False) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.mode == "drop" and not self._stop:
                    time.sleep(0.01)  # a partition: bytes go nowhere until it heals (or is cut)
                if self.mode == "delay":
                    time.sleep(self.delay_s)
                dst.sendall(data)
                if toward:
                    with self._lock:
                        self.forwarded += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.server.close()
        self._close_all()
