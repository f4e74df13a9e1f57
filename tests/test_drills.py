"""Drills on a real standby: verify, trial restore, dry-run promotion against real ZooKeeper, reports."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync.agent.drill import estimate_rto, sample_chunks, verify_all_this_time
from drsync.repository import format as fmt
from drsync.storage.local import LocalStorage
from tests.group import Group, scrape, wait_for


@pytest.fixture
def synced(tmp_path: Path, zk_server, group: str) -> Iterator[Group]:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"],
              extra="", replication="")
    for name in g.names:
        g.start(name)
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"), "west to sync")
    yield g
    g.stop_all()


def test_drill_passes_and_is_recorded_everywhere(synced: Group) -> None:
    g = synced
    # Every cycle is recorded as applied (unchanged content too): held, west's applied snapshot stays
    # the one the drill takes while the drill runs and is compared.
    assert g.drsync("west", "apply", "--hold").code == 0
    try:
        r = g.drsync("west", "drill", "run", "--json")
        assert r.code == 0, r.err
        rep = json.loads(r.out)
        assert rep["snapshot"] == g.hello("west").applied_snapshot
    finally:
        assert g.drsync("west", "apply", "--resume").code == 0
    assert rep["passed"] is True and rep["number"] == 1 and rep["full_verify"] is True
    steps = {s["name"]: s for s in rep["steps"]}
    assert set(steps) == {"verify", "restore", "promotion"} and all(s["passed"] for s in steps.values())
    assert steps["verify"]["figures"]["checked"] == steps["verify"]["figures"]["chunks"] > 0
    assert steps["restore"]["figures"]["root_compared"] is True
    assert steps["promotion"]["figures"]["epoch"] == 1 and steps["promotion"]["figures"]["primary"] == "east"
    assert 0 <= rep["rpo_s"] < 120 and rep["rto_s"] is not None and rep["rto_s"] < 10
    # The drill changed nothing: the pair is still in sync, roles and epoch unchanged, no scratch left.
    assert g.in_sync("east", "west") and g.primary() == ("east", 1)
    state_dir = g.tmp / "west-repo" / "agent"
    assert not any((state_dir / "drill-scratch").iterdir())
    # Recorded: a file in the state dir, ZooKeeper drills/<seq>, the agent's metrics, drsync status.
    assert json.loads((state_dir / "drills" / "drill-00000001.json").read_text())["passed"] is True
    assert [d["number"] for d in g.coord.drills(5)] == [1]
    wait_for(lambda: scrape(g.metrics["west"], g.group, "west").get("drsync_drill_last_result") == 1,
             "the agent to export the drill result")
    m = scrape(g.metrics["west"], g.group, "west")
    assert m["drsync_drill_last_success_timestamp_seconds"] > 0 and m["drsync_drill_rto_seconds"] == rep["rto_s"]
    assert m["drsync_drill_rpo_seconds"] == rep["rpo_s"]
    st = g.status("east")
    assert st["last_drill"]["number"] == 1 and st["last_drill"]["passed"] is True
    human = g.drsync("east", "status")
    assert "last drill: #1 by west" in human.out and "passed" in human.out
    # Drills run on a standby only.
    r = g.drsync("east", "drill", "run")
    assert r.code == 2 and "drills run on a standby" in r.err


def test_drill_reports_corruption_with_the_file_and_exits_1(synced: Group) -> None:
    g = synced
    storage = LocalStorage(str(g.tmp / "west-repo"))
    pack = max(storage.list(fmt.PACKS_DIR), key=lambda o: o.size)
    raw = bytearray(storage.read(pack.name))
    raw[1000] ^= 0x55
    storage.write(pack.name, bytes(raw))
    r = g.drsync("west", "drill", "run", "--json")
    assert r.code == 1, r.err
    rep = json.loads(r.out)
    steps = {s["name"]: s for s in rep["steps"]}
    assert rep["passed"] is False and steps["verify"]["passed"] is False
    assert "tables/orders/part-0.bin" in steps["verify"]["detail"] and rep["snapshot"] in steps["verify"]["detail"]
    assert steps["restore"]["passed"] is False  # the trial restore hits the same chunk
    assert "failed at verify" in r.err and len(r.err.strip().splitlines()) == 1
    wait_for(lambda: scrape(g.metrics["west"], g.group, "west").get("drsync_drill_last_result") == 0,
             "the agent to export the failed drill")


def test_drill_refuses_a_restore_that_does_not_fit(synced: Group, tmp_path: Path) -> None:
    g = synced
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        cfg = g.cfg["west"]
        cfg.write_text(cfg.read_text() + f'[drills]\nscratch = "{mnt}"\n')
        r = g.drsync("west", "drill", "run", "--json")
        assert r.code == 1
        steps = {s["name"]: s for s in json.loads(r.out)["steps"]}
        assert steps["restore"]["passed"] is False and "refused" in steps["restore"]["detail"]
        assert "drills.scratch" in steps["restore"]["detail"]
        assert list(mnt.iterdir()) == []  # nothing was written
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_the_agent_runs_drills_on_its_schedule(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    for name in g.names:
        g.cfg[name].write_text(g.cfg[name].read_text() + '[drills]\ninterval = "2s"\nsample = 0.5\nfull_every = 2\n')
    try:
        for name in g.names:
            g.start(name)
        assert g.promote("east").code == 0
        # Production keeps changing while the drills run: replication goes on undisturbed.
        applied: set[str] = set()

        def drills_done() -> bool:
            applied.add(g.hello("west").applied_snapshot)
            n = len(applied)
            (g.data["east"] / "catalog" / f"change-{n}.txt").write_text(f"change {n}\n")
            return len(g.coord.drills(10)) >= 3

        wait_for(drills_done, "three scheduled drills", timeout=90, step=0.3)
        assert len(applied) >= 4, applied  # west kept applying new snapshots meanwhile
        wait_for(lambda: g.in_sync("east", "west"), "west to catch up with the last change")
        drills = g.coord.drills(10)
        assert all(d["agent"] == "west" and d["passed"] for d in drills)  # never on the primary
        assert [d["full_verify"] for d in drills[:3]] == [False, True, False]
        assert g.primary() == ("east", 1)
    finally:
        g.stop_all()


def test_drill_planning_is_pure() -> None:
    assert verify_all_this_time(1, 1.0, 7) and not verify_all_this_time(1, 0.1, 7) and verify_all_this_time(7, 0.1, 7)
    ids = [bytes([i]) * 32 for i in range(100)]
    s = sample_chunks(ids, 0.1, seed=3)
    assert len(s) == 10 and s == sample_chunks(ids, 0.1, seed=3) and s != sample_chunks(ids, 0.1, seed=4)
    assert sample_chunks(ids[:3], 0.01, seed=1) and sample_chunks([], 0.5, 1) == []
    assert estimate_rto(0.05, automatic=True, session_timeout_s=10, grace_s=1)[0] == 11.05
    assert estimate_rto(0.05, automatic=False, session_timeout_s=10, grace_s=1)[0] == 0.05


def test_an_apply_during_the_drill_gets_the_root_compared_again(synced: Group, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A commit that reaches the standby before a drill may finish applying during it: the comparison of
    the root with the old snapshot is then moot, and the drill makes it again on the new one."""
    from drsync.agent import drill
    from drsync.config import load_config

    g = synced
    state_dir = g.tmp / "west-repo" / "agent"
    assert g.drsync("west", "apply", "--hold").code == 0
    before = g.hello("west").applied_snapshot
    (g.data["east"] / "catalog" / "arrived-during-the-drill.txt").write_bytes(b"new rows")
    hold_file = state_dir / "apply-hold.json"
    wait_for(lambda: hold_file.exists() and json.loads(hold_file.read_text()).get("latest") not in ("", before),
             "west to store a snapshot while it holds applies")
    real, calls = drill.restore_step, []

    def apply_lands_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not calls:  # the stored snapshot is applied while the first comparison runs
            assert g.drsync("west", "apply", "--resume").code == 0
            assert g.drsync("west", "apply", "--hold").code == 0
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(drill, "restore_step", apply_lands_meanwhile)
    try:
        rep = drill.run_drill(load_config(g.cfg["west"]), state_dir=str(state_dir), open_coord=None)
    finally:
        assert g.drsync("west", "apply", "--resume").code == 0
    restore = next(s for s in rep.steps if s.name == "restore")
    assert calls[0] == before and calls[1] != before and rep.snapshot == calls[1]
    assert restore.passed and restore.figures["root_compared"] is True, restore.detail
    assert [s.name for s in rep.steps].count("restore") == 1


def test_the_root_comparison_names_a_link_with_another_time_as_metadata_not_missing(tmp_path: Path) -> None:
    """The drill's comparison of a root with a snapshot: a link that points right but has another mtime
    "has other metadata"; a link pointing elsewhere "differs"; an absent one "is missing"."""
    import os

    from drsync import engine
    from drsync.agent.drill import _structure_diffs
    from drsync.dataroot import open_data_root
    from drsync.repository.repo import Repository
    from drsync.storage.memory import MemoryStorage

    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_text("x")
    for name in ("same", "other", "gone"):
        os.symlink("f", root / name)
    repo = Repository.init(MemoryStorage(), cluster_id="east", release="1")
    manifest = repo.load_manifest(engine.create_snapshot(repo, engine.SnapshotRequest(str(root))))
    assert _structure_diffs(open_data_root(str(root)), manifest, ())[0] == []
    os.utime(root / "same", ns=(0, 10**18), follow_symlinks=False)
    (root / "other").unlink()
    os.symlink("elsewhere", root / "other")
    (root / "gone").unlink()
    diffs = _structure_diffs(open_data_root(str(root)), manifest, ())[0]
    assert "same has other metadata" in diffs and "other differs" in diffs and "gone is missing" in diffs, diffs
    # The root itself: its mode set by hand since the snapshot (its time is drsync's to move: not compared).
    os.utime(root, ns=(0, 10**18))
    assert not any(d.startswith(". ") for d in _structure_diffs(open_data_root(str(root)), manifest, ())[0])
    root.chmod(0o700)
    assert ". (the data root itself) has other metadata" in _structure_diffs(open_data_root(str(root)), manifest, ())[0]
