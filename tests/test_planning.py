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


def _entry(path: str, typ: str = "file", mode: int = 0o644, mtime: int = 10**18, size: int = 1):  # type: ignore[no-untyped-def]
    from drsync.repository.manifest import Entry

    return Entry(path, typ, mode, 0, 0, size if typ == "file" else 0, mtime, None, [], [])


def _have(e):  # type: ignore[no-untyped-def]
    from drsync.tree import LocalEntry

    return LocalEntry(e.path, e.type, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.target)


def test_apply_plan_touches_only_directories_it_changes() -> None:
    from drsync.apply import plan_apply

    tree = [_entry(f"d{i}", "dir", 0o755) for i in range(50)] + [_entry(f"d{i}/f", size=5) for i in range(50)]
    existing = {e.path: _have(e) for e in tree}
    assert plan_apply(tree, existing).dirs_to_finish() == []  # nothing changed: no directory call at all
    changed = [e for e in tree if e.path not in ("d3/f", "d9/f")] + [_entry("d3/f", size=6), _entry("d7/new")]
    existing["d20"] = _have(_entry("d20", "dir", 0o700))  # someone chmodded a directory
    existing["d40/stray"] = _have(_entry("d40/stray"))
    plan = plan_apply(changed, existing)
    assert sorted(plan.touched_dirs or ()) == ["d20", "d3", "d40", "d7", "d9"]
    assert {e.path for e in plan.dirs_to_finish()} == {"d3", "d7", "d9", "d20", "d40"}
    # Times compare at the coarser precision: a millisecond-rounded copy is not a change.
    ms = {e.path: _have(_entry(e.path, e.type, e.mode, e.mtime_ns // 10**6 * 10**6, e.size)) for e in tree}
    assert plan_apply(tree, ms, mtime_resolution_ns=10**6).dirs_to_finish() == []


def test_apply_plan_fixes_link_times_and_owners_without_counting_them_as_overwrites() -> None:
    """A link pointing right but with another mtime or owner is planned (the commit keeps it and sets its
    time and owner), and is not an overwrite a foreign target must allow; a directory whose owner alone
    differs is finished (chowned) when owners can be set."""
    import dataclasses

    from drsync.apply import plan_apply

    link = dataclasses.replace(_entry("l", "symlink"), target="f")
    d = dataclasses.replace(_entry("d", "dir", 0o755), uid=4321, gid=1)
    tree = [d, _entry("f"), link]
    existing = {e.path: _have(e) for e in tree}
    assert plan_apply(tree, existing, compare_owner=True).link == []
    existing["l"] = dataclasses.replace(existing["l"], mtime_ns=link.mtime_ns + 10**9)
    existing["d"] = dataclasses.replace(existing["d"], uid=0, gid=0)
    plan = plan_apply(tree, existing, compare_owner=True)
    assert [e.path for e in plan.link] == ["l"] and plan.replaces == []
    assert plan.touched_dirs is not None and "d" in plan.touched_dirs
    assert "d" not in (plan_apply(tree, existing, compare_owner=False).touched_dirs or set())
    existing["l"] = dataclasses.replace(existing["l"], target="elsewhere")
    assert plan_apply(tree, existing).replaces == ["l"]
