"""An emulated WAN link for the bench: a TCP proxy on loopback that delays and rate-limits.

The kernel of the bench machine may lack ``sch_netem`` (``tc qdisc add ... netem`` answers "Specified
qdisc kind is unknown"), so the link is emulated in user space: :class:`WanLink` listens on a loopback
port and forwards every connection to ``upstream``. Each direction of the link is one serial line shared
by all of its connections: a chunk read from one side waits until the line is free, occupies it for
``len * 8 / rate`` seconds (pacing at ``rate`` bit/s, a token bucket whose burst is one chunk) and is
delivered ``delay`` seconds after it left the line, from a timestamped queue, so the delay does not
serialise throughput (a full bandwidth-delay product can be in flight). The round trip is twice
``delay``. Bytes are counted per direction (payload: TCP/IP headers are not seen by a proxy).

What it does not model: TCP's own window over the long path (both TCP connections are on loopback,
so the sender's kernel window never sees the delay; HTTP/2's and rsync's application-level flow control
do, as their acknowledgements cross the link), loss, and the SYN round trip of a connection.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

CHUNK = 64 * 1024
# A real line's buffer: what the proxy reads ahead of the line, per connection and direction.
QUEUE_CHUNKS = 64
# How far reading may run ahead of the line (seconds): departures stay on the line's own schedule, so the
# event loop's late wake-ups do not leave the line idle.
SLACK_S = 0.005


@dataclass
class Direction:
    """One direction of the link: the time its line is next free, and the bytes that crossed it."""

    rate_bps: float
    delay_s: float
    free_at: float = 0.0
    bytes: int = 0

    def depart(self, now: float, n: int) -> float:
        """Book the line for ``n`` bytes; when they have all left it."""
        start = max(now, self.free_at)
        self.free_at = start + n * 8 / self.rate_bps
        return self.free_at


class WanLink:
    """A delaying, rate-limiting TCP proxy to ``upstream`` (host, port), run in its own thread."""

    def __init__(self, upstream: tuple[str, int], *, rate_bps: float = 100e6, rtt_s: float = 0.050) -> None:
        self.upstream = upstream
        self.rate_bps, self.rtt_s = rate_bps, rtt_s
        self.up = Direction(rate_bps, rtt_s / 2)  # client -> upstream
        self.down = Direction(rate_bps, rtt_s / 2)  # upstream -> client
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0
        self.thread = threading.Thread(target=self._main, name="wan-link", daemon=True)
        self.thread.start()
        if not self._ready.wait(10) or not self.port:
            raise SystemExit("bench: the WAN link proxy did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        return (f"user-space proxy: {self.rate_bps / 1e6:g} Mbit/s each way, {self.rtt_s * 1000:g} ms round trip "
                f"(sch_netem is not available in this kernel)")

    def counters(self) -> tuple[int, int]:
        """Bytes that crossed the link so far: (client to upstream, upstream to client)."""
        return self.up.bytes, self.down.bytes

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        try:
            self.loop.run_until_complete(start())
        finally:
            self._ready.set()
        self.loop.run_forever()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task:
            self._tasks.add(task)
        self.connections += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(self._pipe(c_reader, u_writer, self.up), self._pipe(u_reader, c_writer, self.down))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (c_writer, u_writer):
                w.close()
            if task:
                self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, d: Direction) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()

        async def line() -> None:
            """Read, wait for the line, put on the wire with its arrival time."""
            try:
                while data := await reader.read(CHUNK):
                    left = d.depart(loop.time(), len(data))
                    if left - loop.time() > SLACK_S:
                        await asyncio.sleep(left - loop.time() - SLACK_S)
                    await queue.put((left + d.delay_s, data))
            finally:
                await queue.put((0.0, b""))

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                d.bytes += len(data)
                await writer.drain()

        sender = asyncio.ensure_future(line())
        try:
            await deliver()
        finally:
            sender.cancel()

    def close(self) -> None:
        async def stop() -> None:
            if self._server:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def self_test() -> None:
    """Measure the link with a sink: the round trip of a small message and the throughput of 64 MiB."""
    import socket

    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen()
    port = sink.getsockname()[1]

    def echo() -> None:
        conn, _ = sink.accept()
        with conn:
            while data := conn.recv(1 << 20):
                if data.endswith(b"?"):
                    conn.sendall(b"!")

    threading.Thread(target=echo, daemon=True).start()
    link = WanLink(("127.0.0.1", port))
    try:
        with socket.create_connection(("127.0.0.1", link.port)) as s:
            rtts = []
            for _ in range(5):
                t = time.perf_counter()
                s.sendall(b"?")
                s.recv(1)
                rtts.append(time.perf_counter() - t)
            blob = bytes(1 << 20)
            t = time.perf_counter()
            for _ in range(64):
                s.sendall(blob)
            s.sendall(b"?")
            s.recv(1)
            took = time.perf_counter() - t
        print(f"round trip {min(rtts) * 1000:.1f} ms (median {sorted(rtts)[2] * 1000:.1f}); 64 MiB in {took:.2f}s "
              f"= {64 * 8 * 1.048576 / took:.1f} Mbit/s; counted {link.counters()}")
    finally:
        link.close()


if __name__ == "__main__":
    self_test()
