"""The standby's root holds the content its applied snapshot names, not just files of the same size and time.

A rewrite that keeps a file's size and restores its modification time (what careful ransomware does) is
seen by the capture (its ctime moved); the standby must then write it, whatever the stat of its own copy
says. And a shipment may never change what a stored snapshot id names.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync import engine
from drsync.config import load_config
from drsync.errors import RefusedError
from drsync.repository import format as fmt
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import tree_state
from tests.group import Group, wait_for
from tests.test_agents import Pair
from tests.test_deletion_guard import apply_state, bootstrap


def sneaky_rewrite(path: Path) -> None:
    """Other bytes, same size, the old modification time put back."""
    st = path.stat()
    data = path.read_bytes()
    path.write_bytes(bytes(b ^ 0x33 for b in data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    yield p
    p.stop_all()


def test_a_rewrite_that_keeps_size_and_time_reaches_the_standby(pair: Pair) -> None:
    bootstrap(pair)
    target = pair.prod / "catalog" / "f004.txt"
    sneaky_rewrite(target)
    wait_for(lambda: (pair.standby_data / "catalog" / "f004.txt").read_bytes() == target.read_bytes(),
             "the standby to write the rewritten file")
    wait_for(pair.in_sync, "the standby to match production")


def test_a_shipment_cannot_change_what_a_stored_snapshot_id_names(pair: Pair) -> None:
    """A sender (valid epoch) that ships an applied snapshot's id with another manifest is refused, and
    the standby's record and root stay as they were."""
    bootstrap(pair)
    pair.prod.joinpath("catalog", "f005.txt").write_text("a later change")
    wait_for(pair.in_sync, "one more shipment")
    pair.kill("primary", signal.SIGTERM)
    repo = engine.open_repository(load_config(pair.standby_cfg).cluster.repository)
    snaps = repo.list_snapshots()
    good, other = snaps[0], snaps[-1]
    forged = json.loads(repo.storage.read(fmt.snapshot_name(good.id)))
    manifest = repo.storage.read(fmt.manifest_name(other.id))
    forged["manifest_hash"] = other.manifest_hash  # the other manifest under the good snapshot's id
    before = (apply_state(pair)["applied_snapshot"], tree_state(pair.standby_data))
    link = GrpcStandbyLink(pair.standby_addr)
    try:
        with pytest.raises(RefusedError, match="is stored here already with another manifest"):
            link.commit(1, "primary", json.dumps(forged).encode(), iter([manifest]), sender_seq=999)
    finally:
        link.close()
    assert (apply_state(pair)["applied_snapshot"], tree_state(pair.standby_data)) == before
    assert repo.find_snapshot(good.id).manifest_hash == good.manifest_hash


def test_a_point_promotion_restores_a_root_changed_by_hand(make_group) -> None:  # type: ignore[no-untyped-def]
    """Promoting at the snapshot the standby records as applied still makes its root that snapshot: a root
    changed by hand (size and times kept) is read and rewritten, not trusted."""
    g: Group = make_group(["east", "west"])
    for n in g.names:
        g.start(n)
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.hello("west").applied_snapshot, "west to sync")
    assert g.drsync("west", "apply", "--hold").code == 0
    applied = g.hello("west").applied_snapshot
    good = tree_state(g.data["west"])
    sneaky_rewrite(g.data["west"] / "catalog" / "f002.txt")
    assert tree_state(g.data["west"]) != good
    g.kill("east", signal.SIGKILL)
    r = g.promote("west", "--to-snapshot", applied, "--force")
    assert r.code == 0, r.err
    assert json.loads(r.out)["applied_first"]["written_files"] >= 1
    assert tree_state(g.data["west"]) == good and g.primary() == ("west", 2)
    # On the primary itself a point promotion is refused, dry run or not.
    for extra in ((), ("--dry-run",)):
        r = g.promote("west", "--to-snapshot", applied, "--force", *extra)
        assert r.code == 2 and "is for a standby" in (r.err + r.out), (r.out, r.err)


# --- in-process: a root nobody vouches for --------------------------------------------------------------


def _standby_with(tmp_path: Path, *, baseline: bool) -> tuple[Path, Path, str]:
    """A standby repository holding production's good snapshot G, and a standby root that holds the
    good tree with a few files rewritten sneakily (an ex-primary's swept root, or a pre-seeded copy).
    ``baseline``: that root was captured as its before-rejoin snapshot (state.guard_baseline), as a
    rejoining ex-primary's is. Returns (standby root, state dir, G's id)."""
    import shutil

    from drsync.agent.state import StateStore
    from tests.conftest import make_tree

    good = tmp_path / "good"
    make_tree(good, files=12, big=1)
    repo = engine.init_repository(str(tmp_path / "repo"), cluster_id="c", release="1")
    g = engine.create_snapshot(repo, engine.SnapshotRequest(str(good), kind="cycle"))
    root = tmp_path / "root"
    shutil.copytree(good, root, symlinks=True)
    for name in ("f001.txt", "f002.txt", "f003.txt"):
        sneaky_rewrite(root / "catalog" / name)
    state_dir = tmp_path / "state"
    store = StateStore(str(state_dir))
    if baseline:
        b = engine.create_snapshot(repo, engine.SnapshotRequest(str(root), name="before-rejoin"))
        store.update(guard_baseline=b.id)
    return root, state_dir, g.id


@pytest.mark.parametrize("baseline", [True, False], ids=["rejoined-ex-primary", "pre-seeded-root"])
def test_a_first_apply_onto_a_swept_root_writes_the_swept_files(tmp_path: Path, baseline: bool) -> None:
    from drsync.agent.committer import Committer
    from drsync.agent.state import StateStore

    root, state_dir, good = _standby_with(tmp_path, baseline=baseline)
    repo = engine.open_repository(str(tmp_path / "repo"))
    c = Committer(repo, str(root), StateStore(str(state_dir)), agent="standby")
    info = repo.find_snapshot(good)
    result = c._apply(info, repo.load_manifest(info), [1, info.seq], base=c._known_root())
    assert result.written_files >= 3
    assert tree_state(root) == tree_state(tmp_path / "good")
