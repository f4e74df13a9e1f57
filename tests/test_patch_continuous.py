"""Manifest patches in continuous mode, and a primary killed while it ships them.

Over a limited link each changed capture sends a patch of the manifest the standby applied
(``tests/test_manifest_reference.py``). Continuous mode captures as soon as a change settles, so a busy
root sends a stream of patches, each against the snapshot the previous one made; and a primary killed
mid-shipment restarts against whatever the standby then holds. Real agents, a real writer.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

from drsync.repository.repo import Repository
from drsync.storage import open_storage
from tests.conftest import run_drsync
from tests.group import wait_for
from tests.test_agents import Pair, scrape
from tests.test_continuous import continuous_pair
from tests.test_manifest_reference import _many_files


def _limited(p: Pair) -> None:
    with open(p.primary_cfg, "a") as f:
        f.write('bandwidth_limit = "1GiB/s"\n')  # a limit in force: patches, on loopback


def _manifest_size(p: Pair) -> int:
    repo = Repository.open(open_storage(p.prod_site.url("primary-repo")))
    return len(repo.manifest_bytes(repo.list_snapshots()[-1]))


def _writes(root: Path, seed: int, rounds: int, stop: threading.Event | None = None) -> None:
    """Rewrites, removals, additions and a renamed directory, a few files at a time."""
    rnd = random.Random(seed)
    for r in range(rounds):
        # With a stop event: a steady load (10 rounds a second, the agent captures as it settles) until set.
        if stop is not None and stop.wait(0.1):
            return
        d = root / "logs" / f"d{rnd.randrange(20):03}"
        files = sorted(d.glob("*.log")) if d.is_dir() else []
        for f in rnd.sample(files, min(3, len(files))):
            f.write_bytes(rnd.randbytes(rnd.randrange(1, 600)))
        if files and rnd.random() < 0.5:
            files[-1].unlink(missing_ok=True)
        (root / "logs" / f"new-{seed}-{r:03}.log").write_bytes(b"added %d" % r)
        if r % 7 == 3:
            src = root / "logs" / f"d{rnd.randrange(20, 30):03}"
            if src.is_dir():
                src.rename(root / "logs" / f"moved-{seed}-{r:03}")


def _shipments(p: Pair) -> float:
    """Shipments the running primary counted; -1 while it does not serve its metrics yet."""
    try:
        return scrape(p.metrics["primary"]).get("drsync_ship_duration_seconds_count", 0)
    except OSError:
        return -1


def _holds_or_later(p: Pair, snapshot_id: str) -> bool:
    """Whether the standby's repository holds ``snapshot_id`` or a snapshot the primary took after it."""
    primary = [s.id for s in Repository.open(open_storage(p.prod_site.url("primary-repo"))).list_snapshots()]
    standby = {s.id for s in Repository.open(open_storage(p.standby_site.url("standby-repo"))).list_snapshots()}
    later = primary[primary.index(snapshot_id):] if snapshot_id in primary else primary[-1:]
    return bool(standby.intersection(later))


def _first_sync(p: Pair) -> None:
    """2,000 files, a limit in force (patches), both agents started and the first sync done."""
    _many_files(p.prod, 2000)
    _limited(p)
    p.start("standby")
    p.start("primary")
    wait_for(p.in_sync, "the first sync")


def _verified(p: Pair) -> None:
    r = run_drsync("repo", "verify", "--config", p.standby_cfg)
    assert r.code == 0, (r.out, r.err)


def test_a_busy_root_in_continuous_mode_ships_patches_and_the_standby_follows(tmp_path: Path) -> None:
    """A writer changes a 2,000-file root for many captures; each shipment's manifest goes as a patch (none
    refused, none whole after the first sync): all manifests together cost a fraction of one manifest per
    shipment, and the standby ends equal to production with a repository that verifies."""
    p = continuous_pair(tmp_path)
    try:
        _first_sync(p)
        wait_for(lambda: scrape(p.metrics["primary"]).get("drsync_ship_duration_seconds_count", 0) >= 1,
                 "the primary to count the first sync")
        first = scrape(p.metrics["primary"])
        size = _manifest_size(p)
        _writes(p.prod, seed=1, rounds=40)
        wait_for(p.in_sync, "the standby to follow the writer")
        newest = Repository.open(open_storage(p.prod_site.url("primary-repo"))).list_snapshots()[-1]
        wait_for(lambda: scrape(p.metrics["primary"])["drsync_ship_duration_seconds_count"] >
                 first["drsync_ship_duration_seconds_count"], "the primary to count its shipments")
        after = scrape(p.metrics["primary"])
        shipments = after["drsync_ship_duration_seconds_count"] - first["drsync_ship_duration_seconds_count"]
        sent = after["drsync_manifest_bytes_total"] - first["drsync_manifest_bytes_total"]
        assert sent * 4 < shipments * size, (sent, shipments, size)
        log = (tmp_path / "primary.log").read_text()
        assert "sent whole" not in log, log[-3000:]
        # The standby's data can equal production's before the primary's newest snapshot is applied: a
        # capture that began while the writer's last changes were shipped holds the same data, and ships next.
        wait_for(lambda: _holds_or_later(p, newest.id), "the standby to hold the primary's newest snapshot")
    finally:
        p.stop_all()
    _verified(p)


def test_a_primary_killed_while_it_ships_patches_restarts_and_the_standby_follows(tmp_path: Path) -> None:
    """kill -9 of the primary at several moments while a writer keeps it shipping patches: each restart
    patches against whatever the standby then applied (or sends bytes where it cannot), and in the end the
    standby equals production and its repository verifies. (A standby's root after a kill mid-apply is
    checked by ``make reliability``'s kill trials.)"""
    p = continuous_pair(tmp_path)
    try:
        _first_sync(p)
        for trial in range(4):
            stop = threading.Event()
            writer = threading.Thread(target=_writes, args=(p.prod, 10 + trial, 10_000, stop))
            writer.start()
            # Killed once it is shipping this writer's changes: after 1 to 3 shipments of them (counted by
            # this process of the primary, whose metrics may not be served yet right after its restart).
            wait_for(lambda: _shipments(p) >= 0, "the primary to serve its metrics")
            want = _shipments(p) + 1 + trial % 3
            wait_for(lambda want=want: _shipments(p) >= want, "the primary to ship the writer's changes")
            p.kill("primary", signal.SIGKILL)
            stop.set()
            writer.join()
            p.start("primary")
            wait_for(p.in_sync, f"the standby to follow after restart {trial}")
    finally:
        p.stop_all()
    _verified(p)
