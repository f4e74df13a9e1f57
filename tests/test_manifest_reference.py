"""An unchanged capture's commit names the manifest the standby applied instead of sending it again.

A manifest is about 73 bytes a file: every no-change cycle of a 1,000,000-file tree sent 70 MiB over the
standby's link. The primary now names the snapshot whose manifest it is (CommitPart.manifest_of), when the
standby's Hello says it applied one with the same hash and takes commits by reference; the standby reads
its own copy, checked, and commits as before. When it cannot (its copy is gone or damaged) it answers
ABORTED and the primary sends the bytes at once. Real agents over gRPC, through a byte-counting proxy.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.repository.snapshots import SnapshotInfo
from drsync.storage import open_storage
from drsync.transport.pb import drsync_pb2 as pb
from drsync.transport.pb import drsync_pb2_grpc as pb_grpc
from tests.conftest import run_drsync
from tests.faultproxy import FaultProxy
from tests.test_agents import Pair, pair, scrape, wait_for  # noqa: F401 - pair is a fixture


def _many_files(root: Path, n: int) -> None:
    rnd = random.Random(3)
    for d in range(n // 100 + 1):
        sub = root / "logs" / f"d{d:03}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(min(100, n - d * 100)):
            (sub / f"f{i:03}.log").write_bytes(rnd.randbytes(rnd.randrange(10, 400)))


@contextlib.contextmanager
def _through_proxy(p: Pair) -> Iterator[FaultProxy]:
    """The primary ships through a byte-counting proxy; the agents are stopped and the proxy closed after."""
    proxy = FaultProxy(p.standby_addr)
    text = p.primary_cfg.read_text()
    p.primary_cfg.write_text(text.replace(f'standbys = ["{p.standby_addr}"]', f'standbys = ["{proxy.address}"]'))
    try:
        yield proxy
    finally:
        p.stop_all()
        proxy.close()


def _once(p: Pair) -> dict:
    r = run_drsync("agent", "--config", p.primary_cfg, "--once", "--json")
    assert r.code == 0, (r.out, r.err)
    return r.json()


def _standby_repo(p: Pair) -> Repository:
    return Repository.open(open_storage(p.standby_site.url("standby-repo")))


def _manifest_size(p: Pair) -> int:
    repo = Repository.open(open_storage(p.prod_site.url("primary-repo")))
    newest = repo.list_snapshots()[-1]
    return len(repo.manifest_bytes(newest))


def _applied(p: Pair) -> str:
    r = run_drsync("status", "--config", p.standby_cfg, "--points", "--json")
    assert r.code == 0, r.err
    return next(x["id"] for x in r.json()["points"] if x["state"] == "applied")


def _rot_applied_manifest(p: Pair) -> None:
    """After a first sync: one byte of the standby's copy of its applied snapshot's manifest flipped."""
    p.start("standby")
    _once(p)
    path = Path(p.standby_site.url("standby-repo")) / fmt.manifest_name(_applied(p))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _newest_applied_there(p: Pair, what: str) -> SnapshotInfo:
    """Wait for the standby to apply the primary's newest snapshot; its manifest there has the same hash."""
    newest = Repository.open(open_storage(p.prod_site.url("primary-repo"))).list_snapshots()[-1]
    wait_for(lambda: _applied(p) == newest.id, what)
    assert _standby_repo(p).find_snapshot(newest.id).manifest_hash == newest.manifest_hash
    return newest


@pytest.mark.parametrize("pair", ["local", "to-hdfs"], indirect=True)
def test_an_unchanged_cycle_names_the_manifest_and_the_standby_applies_it(pair: Pair) -> None:  # noqa: F811
    n = 3000 if pair.standby_site.kind == "local" else 600
    _many_files(pair.prod, n)
    with _through_proxy(pair) as proxy:
        pair.start("standby")
        _once(pair)
        assert pair.in_sync()
        size = _manifest_size(pair)
        # A change sends the manifest: the counter sees at least its bytes. Whole over loopback, unless this
        # busy host made the loopback look far (a 10 ms round trip): then a patch of it.
        (pair.prod / "catalog" / "f001.txt").write_text("changed")
        before = proxy.forwarded
        res = next(iter(_once(pair)["results"].values()))
        changed = proxy.forwarded - before
        assert changed >= res["manifest_bytes"], (changed, res)
        assert res["manifest_sent"] == "patch" or (
            res["manifest_sent"] == "bytes" and res["manifest_bytes"] == _manifest_size(pair)), (res, size)
        # Nothing changed: a new snapshot, the same manifest, named and not sent.
        before = proxy.forwarded
        doc = _once(pair)
        unchanged = proxy.forwarded - before
        assert unchanged < size // 4, (unchanged, size)
        assert doc["results"], doc
        newest = _newest_applied_there(pair, "the standby to apply the unchanged snapshot")
        assert _standby_repo(pair).storage.exists(fmt.manifest_name(newest.id))
        assert pair.in_sync()
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0


def test_a_standby_whose_copy_is_damaged_is_sent_the_bytes(pair: Pair) -> None:  # noqa: F811
    """The manifest the commit names is damaged in the standby's repository (a rotted disk): the standby
    answers ABORTED (a WARNING there), the primary sends the bytes at once (a WARNING), and the snapshot is
    committed whole; the new snapshot's manifest on the standby is intact."""
    _many_files(pair.prod, 500)
    _rot_applied_manifest(pair)
    r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
    assert r.code == 0, (r.out, r.err)
    assert "was sent whole" in r.err and "cannot be read here" in r.err, r.err
    newest = _newest_applied_there(pair, "the standby to apply the snapshot sent with its bytes")
    standby = _standby_repo(pair)
    spool = standby.manifest_spool(standby.find_snapshot(newest.id))  # checked against its hash
    spool.close()
    pair.stop_all()
    log = (pair.tmp / "standby.log").read_text(errors="replace")
    assert "cannot be read here" in log, log[-2000:]


def test_a_named_manifest_that_is_not_the_documents_is_refused_and_nothing_is_committed(pair: Pair) -> None:  # noqa: F811
    """A rogue or confused sender names a held snapshot whose manifest is not the one its document names, or
    names one and sends pieces too: nothing is committed (ABORTED, INVALID_ARGUMENT)."""
    pair.start("standby")
    _once(pair)
    applied = _applied(pair)
    prod = Repository.open(open_storage(pair.prod_site.url("primary-repo")))
    (pair.prod / "catalog" / "other.txt").write_text("another tree")
    r = run_drsync("snapshot", "create", "--config", pair.primary_cfg, "--json")
    assert r.code == 0, r.err
    other = prod.list_snapshots()[-1]
    assert other.manifest_hash != prod.find_snapshot(applied).manifest_hash
    doc = prod.find_snapshot(other.id).to_bytes()
    channel = grpc.insecure_channel(pair.standby_addr)
    stub = pb_grpc.ReplicationStub(channel)
    try:
        epoch = int(stub.Hello(pb.HelloRequest(sender="primary", epoch=0)).epoch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Commit(iter([pb.CommitPart(epoch=epoch, sender="primary", snapshot=doc, manifest_of=applied)]))
        assert e.value.code() == grpc.StatusCode.ABORTED, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Commit(iter([pb.CommitPart(epoch=epoch, sender="primary", snapshot=doc, manifest_of=applied),
                              pb.CommitPart(epoch=epoch, manifest=b"PAR1")]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        # A patch taken against another manifest than the one named: the rebuilt one has another hash.
        from drsync.repository.manifest import ManifestFile
        from drsync.repository.manifest_patch import make_patch
        wrong, _ = make_patch(ManifestFile(prod.manifest_spool(other)), ManifestFile(prod.manifest_spool(other)))
        with pytest.raises(grpc.RpcError) as e:
            stub.Commit(iter([pb.CommitPart(epoch=epoch, sender="primary", snapshot=doc, patch_of=applied,
                                            manifest=wrong.getvalue())]))
        assert e.value.code() == grpc.StatusCode.ABORTED and "not the one" in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Commit(iter([pb.CommitPart(epoch=epoch, sender="primary", snapshot=doc, patch_of=applied,
                                            manifest=b"PAR1 garbage PAR1")]))
        assert e.value.code() == grpc.StatusCode.ABORTED, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Commit(iter([pb.CommitPart(epoch=epoch, sender="primary", snapshot=doc, patch_of=applied,
                                            manifest_of=applied)]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    finally:
        channel.close()
    assert _applied(pair) == applied
    assert not _standby_repo(pair).storage.exists(fmt.snapshot_name(other.id))


def test_a_change_over_a_limited_link_sends_a_patch_of_the_manifest(pair: Pair) -> None:  # noqa: F811
    """With a bandwidth limit in force (a far link's rule, as for deltas), a cycle that changed 3 of 3,000
    files sends a patch of the manifest the standby applied, not the manifest: the standby rebuilds it byte
    for byte (its hash), applies it, and verifies. Without a limit (loopback), the manifest goes whole
    (:func:`test_patches_go_only_over_a_far_or_limited_link` decides it)."""
    _many_files(pair.prod, 3000)
    with _through_proxy(pair) as proxy:
        pair.start("standby")
        first = next(iter(_once(pair)["results"].values()))
        assert first["manifest_sent"] == "bytes", first  # nothing applied there yet
        size = _manifest_size(pair)
        for i in range(3):
            (pair.prod / "logs" / f"d00{i}" / "f007.log").write_bytes(b"rewritten %d" % i)
        near = next(iter(_once(pair)["results"].values()))
        # Loopback and no limit: whole, unless this busy host made the loopback look far (a 10 ms round trip)
        assert (near["manifest_sent"] == "bytes" and near["manifest_bytes"] >= size // 2) or \
            near["manifest_sent"] == "patch", near
        with open(pair.primary_cfg, "a") as f:
            f.write('bandwidth_limit = "1GiB/s"\n')
        for i in range(3):
            (pair.prod / "logs" / f"d01{i}" / "f009.log").unlink()
        (pair.prod / "logs" / "d020" / "added.log").write_bytes(b"added")
        before = proxy.forwarded
        far = next(iter(_once(pair)["results"].values()))
        assert far["manifest_sent"] == "patch", far
        size = _manifest_size(pair)
        assert far["manifest_bytes"] * 10 < size, (far, size)
        assert proxy.forwarded - before < size // 2, (proxy.forwarded - before, size)
        _newest_applied_there(pair, "the standby to apply the patched snapshot")
        assert pair.in_sync()
    assert run_drsync("repo", "verify", "--config", pair.standby_cfg).code == 0


def test_a_patch_the_standby_cannot_rebuild_from_goes_whole(pair: Pair) -> None:  # noqa: F811
    """The standby's copy of the manifest a patch is taken against is damaged: it answers ABORTED, the primary
    sends the manifest whole at once (a WARNING: and whole to that standby for the rest of its process), and
    the snapshot is committed and applied."""
    _many_files(pair.prod, 500)
    with open(pair.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')
    _rot_applied_manifest(pair)
    (pair.prod / "logs" / "d001" / "f001.log").write_bytes(b"changed")
    r = run_drsync("agent", "--config", pair.primary_cfg, "--once", "--json")
    assert r.code == 0, (r.out, r.err)
    res = next(iter(r.json()["results"].values()))
    assert res["manifest_sent"] == "bytes", res
    assert "could not be rebuilt" in r.err and "from now on" in r.err, r.err
    _newest_applied_there(pair, "the standby to apply the snapshot sent whole")
    assert pair.in_sync()


def test_patches_go_only_over_a_far_or_limited_link() -> None:
    from drsync.agent.primary import wants_patches
    from drsync.transport import StandbyHello

    def hello(rtt: float, patches: bool = True) -> StandbyHello:
        return StandbyHello("s", "standby", "c", "1", 1, "snap", 0.0, 0.0, 0.0, rtt, manifest_patches=patches)

    assert not wants_patches(hello(0.001), None, False)  # loopback, no limit
    assert wants_patches(hello(0.05), None, False)  # a far link
    assert wants_patches(hello(0.001), 1e9, False)  # a limit in force
    assert not wants_patches(hello(0.05), 1e9, True)  # it refused one: whole from then on
    assert not wants_patches(hello(0.05, patches=False), 1e9, False)  # an older standby


def test_the_primary_counts_the_manifest_bytes_it_sends(pair: Pair) -> None:  # noqa: F811
    """``drsync_manifest_bytes_total`` on a running primary: the first sync's manifest went whole, so it is at
    least that manifest's size; unchanged cycles after it name the manifest and add nothing."""
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first sync")
    size = _manifest_size(pair)
    # A shipment's duration is counted after its other figures: once it is, its manifest bytes are in too.
    wait_for(lambda: scrape(pair.metrics["primary"]).get("drsync_ship_duration_seconds_count", 0) >= 1,
             "the primary to count the first sync")
    before = scrape(pair.metrics["primary"])
    assert before["drsync_manifest_bytes_total"] >= size
    counted, shipments = before["drsync_manifest_bytes_total"], before["drsync_ship_duration_seconds_count"]
    first = Repository.open(open_storage(pair.prod_site.url("primary-repo"))).list_snapshots()[-1]
    wait_for(lambda: _applied(pair) != first.id, "an unchanged capture to be shipped and applied")
    wait_for(lambda: scrape(pair.metrics["primary"])["drsync_ship_duration_seconds_count"] > shipments,
             "the primary to count that shipment")
    assert scrape(pair.metrics["primary"])["drsync_manifest_bytes_total"] == counted
