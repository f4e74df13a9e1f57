"""Planning what to ship is a pure function of two manifests."""

from __future__ import annotations

from drsync.agent.primary import chunk_sizes, chunks_to_negotiate
from tests.test_manifest import build

A, B, C, D = (bytes([n]) * 32 for n in (1, 2, 3, 4))


def test_without_an_applied_snapshot_everything_is_negotiated() -> None:
    new = build([{"path": "d", "type": "dir"}, {"path": "d/x", "chunks": [A, B], "chunk_sizes": [2, 3],
                                                 "size": 5}])
    assert chunks_to_negotiate(new, None) == sorted([A, B])
    assert chunk_sizes(new) == {A: 2, B: 3}


def test_only_chunks_of_added_or_changed_files_that_the_standby_lacks() -> None:
    applied = build([{"path": "same", "chunks": [A], "chunk_sizes": [5]},
                     {"path": "edited", "chunks": [B], "chunk_sizes": [5]},
                     {"path": "gone", "chunks": [C], "chunk_sizes": [5]}])
    new = build([{"path": "same", "chunks": [A], "chunk_sizes": [5]},
                 {"path": "edited", "chunks": [B, D], "chunk_sizes": [2, 3]},
                 {"path": "moved-here", "chunks": [C], "chunk_sizes": [5]}])
    # B and C are on the standby already (in the applied snapshot); only D is new.
    assert chunks_to_negotiate(new, applied) == [D]
    assert chunks_to_negotiate(applied, applied) == []


def test_pacing_keeps_the_average_rate() -> None:
    from drsync.agent.primary import pacing_delay

    assert pacing_delay(10_000_000, 0, 0.1) == 0.0  # unlimited
    assert pacing_delay(10_000_000, 5_000_000, 1.0) == 1.0  # 10 MB at 5 MB/s needs 2 s; 1 s gone
    assert pacing_delay(10_000_000, 5_000_000, 3.0) == 0.0  # behind schedule: no wait


def test_agents_refuse_plaintext_on_a_public_address() -> None:
    import pytest

    from drsync.errors import UsageError
    from drsync.transport.grpc import ReplicationServicer, start_server

    servicer = ReplicationServicer(None, agent="a", role="primary", cluster_id="c", release="1")
    with pytest.raises(UsageError, match="not a loopback address and \\[tls\\] is not configured"):
        start_server(servicer, "0.0.0.0:0")
    server = start_server(servicer, "0.0.0.0:0", allow_insecure_remote=True)  # the operator said so
    server.stop(0)


def test_bandwidth_limit_config() -> None:
    from drsync.config import config_from_dict

    cfg = config_from_dict({"cluster": {"id": "c", "release": "1", "data": "/d", "repository": "/r"},
                            "replication": {"bandwidth_limit": "50MiB/s"}})
    assert cfg.replication.bandwidth_limit == 50 * 1024 * 1024
