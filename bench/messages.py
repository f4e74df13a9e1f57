"""Upload throughput over loopback gRPC by message size (chose UPLOAD_MESSAGE_BYTES).

Sends 512 MiB of 256 KiB chunks to a receiver that only counts them, so the
figure is the transport's own cost (serialisation, HTTP/2, Python), not the disk.

    python bench/messages.py
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from drsync.transport import ReceivedChunk
from drsync.transport.grpc import GrpcStandbyLink, ReplicationServicer, start_server


class CountingReceiver:
    state: Any = None

    def missing(self, epoch: int, ids: list[bytes]) -> list[bytes]:
        return ids

    def receive(self, batches: Iterator[tuple[int, list[ReceivedChunk]]]) -> tuple[int, int, int]:
        n = size = 0
        for _epoch, batch in batches:
            n += len(batch)
            size += sum(len(c.data) for c in batch)
        return n, n, size

    def commit(self, epoch: int, snapshot_doc: bytes, manifest_bytes: bytes) -> tuple[Any, Any]:
        raise NotImplementedError


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(ReplicationServicer(CountingReceiver(), agent="m", role="standby", cluster_id="c",
                                              release="1"), f"127.0.0.1:{port}")
    link = GrpcStandbyLink(f"127.0.0.1:{port}")
    chunk = 256 * 1024
    data = [os.urandom(chunk) for _ in range(64)]
    total = 512 * 1024 * 1024
    print(f"{'message':>10} {'GB/s':>6}")
    for message in (256 * 1024, 512 * 1024, 1024 * 1024, 2048 * 1024, 4096 * 1024):
        per = max(1, message // chunk)

        def batches(per: int = per) -> Iterator[list[ReceivedChunk]]:
            sent = 0
            i = 0
            while sent < total:
                batch = []
                for _ in range(per):
                    batch.append(ReceivedChunk(bytes(32), 0, chunk, data[i % len(data)]))
                    i += 1
                sent += per * chunk
                yield batch

        t = time.perf_counter()
        link.upload(1, batches())
        print(f"{message >> 10:>7} KiB {total / (time.perf_counter() - t) / 1e9:>6.2f}")
    link.close()
    server.stop(0)


if __name__ == "__main__":
    main()
