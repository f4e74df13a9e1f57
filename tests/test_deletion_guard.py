"""The deletion guard (safety rule 8, second half): a shipped snapshot that would remove more than
replication.max_delete_fraction of the standby's files is stored but held, not applied, until an
operator confirms it; retention never expires snapshots while a hold is in place.

The planning function is tested directly; the rest with real agent processes (a fixed-role pair).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from drsync.guard import deletion_guard, removed_files
from drsync.repository.manifest import Manifest
from tests.conftest import run_drsync, tree_state
from tests.group import scrape, wait_for
from tests.test_agents import Pair


def manifest(entries: dict[str, str | tuple[str, str]]) -> Manifest:
    """path -> "dir" | file content (str) | ("symlink", target)."""
    paths = sorted(entries)
    kinds, contents, targets = [], [], []
    for p in paths:
        v = entries[p]
        if v == "dir":
            kinds.append("dir"), contents.append(None), targets.append(None)
        elif isinstance(v, tuple):
            kinds.append("symlink"), contents.append(None), targets.append(v[1])
        else:
            kinds.append("file"), contents.append(blake3.blake3(v.encode()).digest()), targets.append(None)
    n = len(paths)
    return Manifest.from_columns({
        "path": paths, "type": kinds, "mode": [0o644] * n, "uid": [0] * n, "gid": [0] * n, "size": [0] * n,
        "mtime_ns": [0] * n, "ctime_ns": [0] * n, "inode": list(range(1, n + 1)), "target": targets,
        "content": contents, "chunks": [[] for _ in paths], "chunk_sizes": [[] for _ in paths]})


def files(n: int, prefix: str = "f") -> dict[str, str | tuple[str, str]]:
    return {f"{prefix}{i:03}": f"content {prefix}{i}" for i in range(n)}


def test_guard_holds_only_over_the_limit() -> None:
    applied = manifest(files(10))
    half = manifest(dict(list(files(10).items())[:5]))  # removes exactly 50%
    assert deletion_guard(applied, half, 0.5) is None
    four = manifest(dict(list(files(10).items())[:4]))  # removes 60%
    hold = deletion_guard(applied, four, 0.5)
    assert hold is not None and (hold.files, hold.removed, hold.remaining) == (10, 6, 4)
    assert hold.describe() == "would remove 6 of 10 files (60.0%, over replication.max_delete_fraction 0.5)"
    assert deletion_guard(applied, four, 0.6) is None
    assert deletion_guard(applied, applied, 0.0) is None  # nothing removed: never held, even at limit 0
    one = manifest(dict(list(files(10).items())[:9]))
    assert deletion_guard(applied, one, 0.0) is not None  # limit 0: any deletion waits
    big = manifest(files(10_000))
    left = manifest(dict(list(files(10_000).items())[:129]))
    hold = deletion_guard(big, left, 0.5)
    assert hold is not None and "would remove 9,871 of 10,000 files (98.7%" in hold.describe()


def test_guard_on_empty_new_and_empty_applied() -> None:
    applied = manifest(files(3) | {"d": "dir"})
    empty = Manifest.empty()
    hold = deletion_guard(applied, empty, 0.5)
    assert hold is not None and hold.empties and hold.removed == 3
    # An emptied root waits whatever the limit says (a limit of 1 would otherwise let it through).
    hold = deletion_guard(applied, manifest({"d": "dir"}), 1.0)
    assert hold is not None and hold.empties and "without any file" in hold.describe()
    # Nothing applied yet, or an applied root without files: nothing to protect.
    assert deletion_guard(Manifest.empty(), manifest(files(3)), 0.5) is None
    assert deletion_guard(Manifest.empty(), Manifest.empty(), 0.5) is None
    assert deletion_guard(manifest({"d": "dir", "d/e": "dir"}), Manifest.empty(), 0.5) is None


def test_guard_counts_files_not_directories() -> None:
    tree = files(4) | {f"dir{i}": "dir" for i in range(20)}
    applied = manifest(tree)
    # Removing every directory (and no file) removes no file.
    assert removed_files(applied, manifest(files(4)))[:2] == (4, 0)
    assert deletion_guard(applied, manifest(files(4)), 0.5) is None
    # Links count as files.
    with_links = manifest(files(2) | {"l1": ("symlink", "f000"), "l2": ("symlink", "f001")})
    assert removed_files(with_links, manifest(files(2)))[:2] == (4, 2)
    # A file replaced by a directory of the same name is gone.
    assert removed_files(manifest(files(2)), manifest({"f000": "dir", "f001": "content f1"}))[:2] == (2, 1)
    # Files changed in place are not removals.
    changed = {p: v + " changed" for p, v in files(10).items() if isinstance(v, str)}
    assert deletion_guard(manifest(files(10)), manifest(changed), 0.0) is None


def test_guard_does_not_count_renames() -> None:
    applied = manifest(files(10) | {"a": "dir"})
    moved = manifest({f"a/{p}": v for p, v in files(10).items()} | {"a": "dir"})  # mv f* a/
    assert removed_files(applied, moved) == (10, 0, 10)
    assert deletion_guard(applied, moved, 0.5) is None
    # Renamed *and* rewritten (what ransomware does: f000 -> f000.locked, new content) is a removal.
    locked = manifest({f"{p}.locked": "encrypted " + str(v) for p, v in files(10).items()})
    hold = deletion_guard(applied, locked, 0.5)
    assert hold is not None and hold.removed == 10
    # Each added file stands for one removed file at most: ten identical files, one survivor moved.
    same = manifest({f"x{i}": "same" for i in range(10)})
    assert removed_files(same, manifest({"y": "same"}))[:2] == (10, 9)
    # A moved link keeps its target.
    assert removed_files(manifest({"l": ("symlink", "t")}), manifest({"m": ("symlink", "t")}))[:2] == (1, 0)
    assert removed_files(manifest({"l": ("symlink", "t")}), manifest({"m": ("symlink", "u")}))[:2] == (1, 1)


# --- with real agents: a fixed-role pair ------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    with open(p.standby_cfg, "a") as f:
        f.write("[snapshots]\nkeep = { last = 2 }\n")  # retention bites at once on the standby
    yield p
    p.stop_all()


def held_metrics(pair: Pair) -> tuple[float, float]:
    m = scrape(pair.metrics["standby"], "default", "standby")
    return m["drsync_apply_held"], m["drsync_apply_held_deletions"]


def apply_state(pair: Pair) -> dict[str, Any]:
    r = run_drsync("apply", "--json", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    return r.json()  # type: ignore[no-any-return]


def standby_snapshots(pair: Pair) -> list[str]:
    r = run_drsync("snapshot", "list", "--json", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    return [s["id"] for s in r.json()]


def holds_path(pair: Pair, snapshot: str | None, path: str) -> bool:
    """Whether the standby's repository has ``snapshot`` and it holds ``path`` (False while there is
    none yet, or when retention expired it since it was named: the caller asks again)."""
    if not snapshot:
        return False
    r = run_drsync("snapshot", "show", snapshot, "--files", "--json", "--config", pair.standby_cfg)
    if r.code == 2 and "no snapshot" in r.err:
        return False
    assert r.code == 0, r.err
    return path in [e["path"] for e in r.json()["entries"]]


def stored_with(pair: Pair, path: str) -> bool:
    """Whether the newest snapshot the standby stored (and refused) holds ``path``. (One read of the
    apply state names it: comparing with a separate 'latest' raced the next shipment.)"""
    return holds_path(pair, apply_state(pair)["latest"], path)


def non_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def bootstrap(pair: Pair) -> dict[str, tuple]:
    """Both agents running, the standby in sync after a few shipments; returns its root's state."""
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the standby to match production")
    for i in range(3):  # a few good snapshots on the standby, for retention to work on
        (pair.prod / "catalog" / f"extra-{i}.txt").write_text(f"extra {i}")
        wait_for(pair.in_sync, f"the standby to follow change {i}")
    # The root matches a moment before the standby records the snapshot as applied: tests read
    # the applied snapshot next, so wait until it is the one with the last change.
    wait_for(lambda: applied_with(pair, "catalog/extra-2.txt"), "the standby to record the last apply")
    return tree_state(pair.standby_data)


def applied_with(pair: Pair, path: str) -> bool:
    """Whether the snapshot the standby records as applied holds ``path``. (A shipment of unchanged
    content is recorded as applied too: the applied snapshot moves on every cycle.)"""
    return holds_path(pair, apply_state(pair)["applied_snapshot"], path)


def test_an_emptied_production_root_is_held_until_confirmed(pair: Pair) -> None:
    good = bootstrap(pair)
    assert held_metrics(pair) == (0, 0)
    # The primary's agent is down while the applied snapshot is read and production changes: every
    # cycle is recorded as applied (unchanged content too), and a capture half-way through the
    # deletions would ship them in two parts.
    pair.kill("primary", signal.SIGTERM)
    before = apply_state(pair)
    assert before["held"] is False and before["applied_snapshot"]
    applied = before["applied_snapshot"]
    # Production loses everything but one file (an emptied root itself is never captured: see
    # test_capture); its next shipment would remove all the other files.
    keep = pair.prod / "catalog" / "f000.txt"
    total = len(non_dirs(pair.prod))
    for p in non_dirs(pair.prod):
        if p != keep:
            p.unlink()
    pair.start("primary")
    wait_for(lambda: held_metrics(pair)[0] == 1, "the standby to hold the shipment")
    state = apply_state(pair)
    held = state["snapshot"]
    assert state["held"] and held and state["applied"] == applied and state["files"] == total
    assert state["removed"] == total - 1
    pct = f"{(total - 1) / total:.1%}"
    assert f"would remove {total - 1:,} of {total:,} files ({pct}, over replication.max_delete_fraction 0.5)" \
        in state["message"]
    assert f"drsync apply --confirm {held}" in state["message"]
    assert held_metrics(pair) == (1, total - 1)
    # Stored, not applied: the root is exactly the last applied snapshot.
    assert held in standby_snapshots(pair)
    assert tree_state(pair.standby_data) == good
    # The primary was told, in one line, and logged it as a warning.
    wait_for(lambda: any("WARNING" in line and f"snapshot {held} would remove" in line and "held, not applied"
                         in line for line in (pair.tmp / "primary.log").read_text().splitlines()),
             "the refusal in the primary's log")
    standby_log = (pair.tmp / "standby.log").read_text()
    assert any("WARNING" in line and "held, not applied" in line for line in standby_log.splitlines())
    # Later shipments are stored and refused too; the hold stays on the first one; retention
    # ([snapshots] keep last = 2) expires nothing meanwhile.
    kept = standby_snapshots(pair)
    wait_for(lambda: apply_state(pair)["refused"] >= 4, "more shipments to arrive while held")
    now = standby_snapshots(pair)
    assert set(kept) <= set(now) and len(now) > len(kept) >= 3
    assert apply_state(pair)["snapshot"] == held
    assert tree_state(pair.standby_data) == good
    # Nor can an operator expire or collect by mistake.
    r = run_drsync("snapshot", "expire", "--config", pair.standby_cfg)
    assert r.code == 4 and "held by the deletion guard" in r.err and "Traceback" not in r.err
    assert run_drsync("repo", "gc", "--config", pair.standby_cfg).code == 4
    assert set(kept) <= set(standby_snapshots(pair))
    # Confirming anything but the held snapshot is refused, and changes nothing.
    for wrong in ("WRONG", applied):
        r = run_drsync("apply", "--confirm", wrong, "--config", pair.standby_cfg)
        assert r.code == 4, r.err
        assert r.err.count("\n") == 1 and f"snapshot {wrong} is not the one held" in r.err, r.err
        assert "Traceback" not in r.err
    assert tree_state(pair.standby_data) == good and held_metrics(pair)[0] == 1
    # The operator confirms the one held: the running agent applies it.
    r = run_drsync("apply", "--confirm", held, "--json", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["ok"] and doc["via"] == "agent" and doc["result"]["applied"] == held
    assert doc["result"]["removed"] >= total - 1
    assert [p.relative_to(pair.standby_data) for p in non_dirs(pair.standby_data)] == \
        [keep.relative_to(pair.prod)]
    wait_for(pair.in_sync, "the standby to follow production again")
    assert held_metrics(pair) == (0, 0)
    assert apply_state(pair)["held"] is False
    # Applies go on as before.
    (pair.prod / "catalog" / "after.txt").write_text("after the confirmation")
    wait_for(pair.in_sync, "a later change to be applied")
    assert held_metrics(pair)[0] == 0


def test_a_60_percent_deletion_is_held_across_a_restart_and_operator_holds(pair: Pair) -> None:
    good = bootstrap(pair)
    files = non_dirs(pair.prod)
    doomed = files[: int(len(files) * 0.6) + 1]
    pair.kill("primary", signal.SIGTERM)  # one change: a capture half-way would ship it in two parts
    for p in doomed:
        p.unlink()
    pair.start("primary")
    wait_for(lambda: held_metrics(pair)[0] == 1, "the standby to hold the shipment")
    held = apply_state(pair)["snapshot"]
    assert apply_state(pair)["removed"] == len(doomed)
    assert tree_state(pair.standby_data) == good
    # The hold is durable: a restarted standby still holds, and still refuses.
    pair.kill("standby")
    pair.start("standby")
    assert held_metrics(pair) == (1, len(doomed))
    state = apply_state(pair)
    assert state["snapshot"] == held
    refused = state["refused"]
    wait_for(lambda: apply_state(pair)["refused"] > refused, "a refusal after the restart")
    assert tree_state(pair.standby_data) == good
    r = run_drsync("status", "--config", pair.standby_cfg)
    assert r.code == 0 and f"APPLY HELD on standby: snapshot {held} would remove" in r.out, r.out + r.err
    page = json.loads(urllib.request.urlopen(f"http://{pair.metrics['standby']}/status.json", timeout=10).read())
    assert page["apply_hold"]["snapshot"] == held
    assert run_drsync("apply", "--confirm", held, "--config", pair.standby_cfg).code == 0
    wait_for(pair.in_sync, "the confirmed snapshot to be applied")
    assert held_metrics(pair) == (0, 0)

    # An operator's hold, with the agent running: shipments are stored, none applied.
    r = run_drsync("apply", "--hold", "--config", pair.standby_cfg)
    assert r.code == 0 and "holds applies" in r.out, r.err
    wait_for(lambda: held_metrics(pair) == (1, 0), "the operator's hold in the metrics")
    synced = tree_state(pair.standby_data)
    (pair.prod / "catalog" / "during-hold.txt").write_text("written while the standby holds")
    wait_for(lambda: apply_state(pair)["refused"] >= 2, "shipments refused while held")
    assert tree_state(pair.standby_data) == synced
    assert apply_state(pair)["operator_hold"] is True
    wait_for(lambda: "drsync apply --resume" in (pair.tmp / "primary.log").read_text(),
             "the primary to be told why")
    r = run_drsync("apply", "--resume", "--json", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    assert r.json()["via"] == "agent"
    wait_for(pair.in_sync, "applies to resume")
    wait_for(lambda: held_metrics(pair) == (0, 0), "the hold to be lifted in the metrics")
    assert apply_state(pair)["held"] is False


def test_hold_and_resume_with_the_standby_agent_stopped(pair: Pair) -> None:
    bootstrap(pair)
    pair.kill("standby", signal.SIGTERM)
    # No agent runs: the command line takes the state directory itself.
    r = run_drsync("apply", "--hold", "--json", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    assert r.json()["via"] == "direct"
    assert apply_state(pair)["operator_hold"] is True
    pair.start("standby")
    assert held_metrics(pair) == (1, 0)
    synced = tree_state(pair.standby_data)
    (pair.prod / "catalog" / "during-hold.txt").write_text("written while the standby holds")
    wait_for(lambda: stored_with(pair, "catalog/during-hold.txt"), "the change to be stored and refused")
    assert tree_state(pair.standby_data) == synced
    pair.kill("primary", signal.SIGTERM)
    pair.kill("standby", signal.SIGTERM)
    # Resumed without the agent: the snapshot stored while held is applied here and now.
    r = run_drsync("apply", "--resume", "--json", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["via"] == "direct" and doc["result"]["applied"], doc
    assert pair.in_sync()
    assert apply_state(pair)["held"] is False
    # Nothing held: confirming is refused (exit 4), resuming again changes nothing (exit 0).
    r = run_drsync("apply", "--confirm", doc["result"]["applied"], "--config", pair.standby_cfg)
    assert r.code == 4 and "no snapshot is held" in r.err
    assert run_drsync("apply", "--resume", "--config", pair.standby_cfg).code == 0
    assert run_drsync("apply", "--hold", "--resume", "--config", pair.standby_cfg).code == 2
    pair.start("standby")
    assert held_metrics(pair) == (0, 0)


def test_a_request_nobody_picks_up_is_withdrawn_and_reported(tmp_path: Path) -> None:
    """An agent holds the state directory but never serves requests (here: this test holds its lock):
    the command gives up after --wait, withdraws its request, and says that nothing was done."""
    from drsync.agent.locks import StateDirLock
    from drsync.agent.requests import requests_dir
    from drsync.agent.state import state_dir_of
    from drsync.config import load_config

    p = Pair(tmp_path)
    state_dir = state_dir_of(load_config(str(p.standby_cfg)))
    lock = StateDirLock(state_dir)
    try:
        r = run_drsync("apply", "--hold", "--wait", "0.5", "--config", p.standby_cfg)
    finally:
        lock.release()
    assert r.code == 1 and "did not pick the request up" in r.err and "nothing was done" in r.err, r.err
    assert r.err.count("\n") == 1
    assert os.listdir(requests_dir(state_dir)) == []
    assert apply_state(p)["held"] is False
