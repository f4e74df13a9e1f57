"""The mass-change guard (issue 18): a shipped snapshot that rewrites the content of more than
replication.max_change_fraction of the standby's files (same names, other bytes: an encryption sweep,
which the deletion guard does not see) is held like a mass deletion until an operator confirms it, or,
with replication.on_mass_change = "alert", applied and flagged until an operator acknowledges it.

The judging function is tested directly; the rest with real agent processes (a fixed-role pair).
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from drsync.guard import change_guard, changed_files, deletion_guard
from drsync.repository.manifest import Manifest
from tests.conftest import run_drsync, tree_state
from tests.group import Group, scrape, wait_for
from tests.test_agents import Pair
from tests.test_deletion_guard import apply_state, bootstrap, non_dirs, standby_snapshots

# path -> content (a regular file), "dir", ("symlink", target), or ("external", HDFS checksum): a DistCp row
Spec = str | tuple[str, str]


def manifest(entries: dict[str, Spec], *, mode: int = 0o644, mtime_ns: int = 0) -> Manifest:
    paths = sorted(entries)
    kinds, contents, targets, sizes, chunks, chunk_sizes = [], [], [], [], [], []
    for p in paths:
        v = entries[p]
        kind, content, target, size, ids, lens = "file", None, None, 0, [], []
        if v == "dir":
            kind = "dir"
        elif isinstance(v, tuple) and v[0] == "symlink":
            kind, target = "symlink", v[1]
        elif isinstance(v, tuple):  # external: no chunk ids, one size (the file's), content from a checksum
            size, content, lens = 100, blake3.blake3(v[1].encode()).digest(), [100]
        else:  # same size whatever the content: the guard must see same-size rewrites
            size, ids, lens = 100, [blake3.blake3(v.encode()).digest()], [100]
            content = blake3.blake3(ids[0]).digest()
        kinds.append(kind), contents.append(content), targets.append(target)
        sizes.append(size), chunks.append(ids), chunk_sizes.append(lens)
    n = len(paths)
    return Manifest.from_columns({
        "path": paths, "type": kinds, "mode": [mode] * n, "uid": [0] * n, "gid": [0] * n, "size": sizes,
        "mtime_ns": [mtime_ns] * n, "ctime_ns": [mtime_ns] * n, "inode": list(range(1, n + 1)),
        "target": targets, "content": contents, "chunks": chunks, "chunk_sizes": chunk_sizes})


def files(n: int, tag: str = "") -> dict[str, Spec]:
    return {f"f{i:03}": f"content {i}{tag}" for i in range(n)}


def test_rewritten_content_is_counted_and_flagged_only_over_the_limit() -> None:
    applied = manifest(files(10) | {"d": "dir", "l": ("symlink", "f000")})
    # Six of ten files rewritten in place, same names and sizes: an encryption sweep.
    six = files(10) | {f"f{i:03}": f"encrypted {i}" for i in range(6)}
    assert changed_files(applied, manifest(six)) == (10, 6)
    fraction, flag = change_guard(applied, manifest(six), 0.5)
    assert fraction == 0.6 and flag is not None and (flag.files, flag.changed) == (10, 6)
    assert flag.describe() == ("rewrites the content of 60.0% of the files (6 of 10, over "
                               "replication.max_change_fraction 0.5)")
    assert change_guard(applied, manifest(six), 0.6) == (0.6, None)  # exactly at the limit passes
    five = files(10) | {f"f{i:03}": f"encrypted {i}" for i in range(5)}
    assert change_guard(applied, manifest(five), 0.5) == (0.5, None)
    assert change_guard(applied, manifest(files(10, " encrypted")), 1.0)[1] is None  # 1: never
    # The deletion guard does not see it: nothing is removed.
    assert deletion_guard(applied, manifest(files(10, " encrypted")), 0.5) is None


def test_metadata_new_files_renames_and_removals_are_not_content_changes() -> None:
    applied = manifest(files(10))
    # Mode and times of every file changed, content the same.
    assert changed_files(applied, manifest(files(10), mode=0o600, mtime_ns=10**18)) == (10, 0)
    # A thousand files added beside the ten: none of the applied set changed.
    more = files(10) | {f"new{i:04}": f"new {i}" for i in range(1000)}
    assert change_guard(applied, manifest(more), 0.0) == (0.0, None)
    # Renamed (same content, other names): no file of the applied set holds other content.
    assert changed_files(applied, manifest({f"a/{p}": v for p, v in files(10).items()} | {"a": "dir"})) == (10, 0)
    # Renamed and rewritten (f000 -> f000.locked): removals, the deletion guard's to judge.
    locked = manifest({f"{p}.locked": f"encrypted {p}" for p in files(10)})
    assert changed_files(applied, locked) == (10, 0)
    hold = deletion_guard(applied, locked, 0.5)
    assert hold is not None and hold.removed == 10
    # Removed files are not changed ones; the share is of the applied snapshot's files.
    assert changed_files(applied, manifest({"f000": "other", "f001": "content 1"})) == (10, 1)
    # A file replaced by a directory or a link is a removal too, not a change of content.
    assert changed_files(applied, manifest(files(10) | {"f000": "dir", "f001": ("symlink", "x")})) == (10, 0)
    # Directories and links are not counted at all.
    links = manifest(files(2) | {"l": ("symlink", "f000"), "d": "dir"})
    assert changed_files(links, manifest(files(2) | {"l": ("symlink", "f001")})) == (2, 0)
    # Nothing applied (or no file in it): nothing to judge.
    assert change_guard(Manifest.empty(), manifest(files(3)), 0.5) == (0.0, None)
    assert change_guard(manifest({"d": "dir"}), manifest(files(3)), 0.5) == (0.0, None)


def test_external_rows_compare_their_hdfs_checksums() -> None:
    ext = {f"x{i}": ("external", f"crc {i}") for i in range(4)}
    applied = manifest(ext)
    rewritten = manifest(ext | {f"x{i}": ("external", f"crc {i} encrypted") for i in range(3)})
    assert changed_files(applied, rewritten) == (4, 3)
    assert change_guard(applied, rewritten, 0.5)[1] is not None
    # Checksums of another algorithm never match: such rows are not compared.
    assert changed_files(applied, rewritten, compare_external=False) == (4, 0)
    # A file captured by the agent on one side and by DistCp on the other (the engine changed): digests
    # of different kinds, not compared.
    local = manifest({f"x{i}": f"bytes {i}" for i in range(4)})
    assert changed_files(local, applied) == (4, 0)


def test_a_million_files_are_judged_in_columns() -> None:
    """A million files, a quarter rewritten, with the same paths and with shifted ones (the join path).
    No timing here (make test has none): make bench-style figures are in the closing notes."""
    import pyarrow as pa

    from drsync.repository.manifest import SCHEMA

    n = 1_000_000
    paths = [f"d{i // 1000:04}/f{i:07}".encode() for i in range(n)]

    def big(contents: list[bytes], names: list[bytes]) -> Manifest:
        cols = {f.name: pa.nulls(n, f.type) for f in SCHEMA}
        cols |= {"path": pa.array(names, pa.binary()), "type": pa.array(["file"] * n),
                 "size": pa.array([100] * n, pa.int64()), "content": pa.array(contents, pa.binary(32)),
                 "chunks": pa.array([[c] for c in contents], pa.list_(pa.binary(32)))}
        return Manifest(pa.table(cols, schema=SCHEMA))

    base = [blake3.blake3(p).digest() for p in paths]
    rewritten = [c if i % 4 else blake3.blake3(c).digest() for i, c in enumerate(base)]
    applied = big(base, paths)
    changed_files(applied, applied)  # Arrow's kernels warm up once per process
    for new in (big(rewritten, paths), big([*rewritten[1:], base[0]], [*paths[1:], b"zzz"])):
        files_, changed = changed_files(applied, new)
        assert files_ == n and changed in (n // 4, n // 4 - 1)


def test_config_keys(tmp_path: Path) -> None:
    from drsync.config import load_config
    from drsync.errors import ConfigError
    from tests.test_config import MINIMAL, write

    cfg = load_config(write(tmp_path, MINIMAL))
    assert (cfg.replication.max_change_fraction, cfg.replication.on_mass_change) == (0.5, "hold")
    cfg = load_config(write(tmp_path, MINIMAL + '[replication]\nmax_change_fraction = 1\non_mass_change = "alert"\n'))
    assert (cfg.replication.max_change_fraction, cfg.replication.on_mass_change) == (1.0, "alert")
    for bad, message in (("max_change_fraction = 1.5", "replication.max_change_fraction: expected a number above 0"),
                         ('on_mass_change = "ignore"', "replication.on_mass_change")):
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, MINIMAL + f"[replication]\n{bad}\n"))
        assert message in str(e.value) and "\n" not in str(e.value)


# --- with real agents: a fixed-role pair ------------------------------------------------------------


def make_pair(tmp_path: Path, extra: str = "") -> Pair:
    p = Pair(tmp_path)
    with open(p.standby_cfg, "a") as f:
        f.write("[snapshots]\nkeep = { last = 2 }\n")  # retention bites at once on the standby
    if extra:
        text = p.standby_cfg.read_text()
        p.standby_cfg.write_text(text + extra)
    return p


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = make_pair(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture
def alerting_pair(tmp_path: Path) -> Iterator[Pair]:
    p = make_pair(tmp_path, '[replication]\non_mass_change = "alert"\n')
    yield p
    p.stop_all()


def metrics(pair: Pair) -> dict[str, float]:
    return scrape(pair.metrics["standby"], "default", "standby")


def regular_files(root: Path) -> list[Path]:
    return [p for p in non_dirs(root) if not p.is_symlink()]


def encrypt(pair: Pair, share: float) -> int:
    """Rewrite the first ``share`` of production's regular files in place: same names, same sizes, other
    bytes (what an encryption sweep leaves). The primary's agent is stopped meanwhile, so one capture
    sees the whole sweep. Returns how many files were rewritten."""
    n = len(regular_files(pair.prod))
    return encrypt_slice(pair, 0.0, (int(n * share) + 1) / n)


def test_metadata_changes_apply_and_an_encryption_sweep_is_held_until_confirmed(pair: Pair) -> None:
    bootstrap(pair)
    m = metrics(pair)
    assert m["drsync_mass_change"] == 0 and 0 <= m["drsync_snapshot_changed_fraction"] < 0.5
    # Every file's mode and times change, no content: applied as usual.
    pair.kill("primary", signal.SIGTERM)
    for p in regular_files(pair.prod):
        p.chmod(0o640)
    pair.start("primary")
    wait_for(pair.in_sync, "the metadata changes to be applied")
    assert metrics(pair)["drsync_mass_change"] == 0 and apply_state(pair)["held"] is False
    good = tree_state(pair.standby_data)
    applied = apply_state(pair)["applied_snapshot"]
    total = len(regular_files(pair.prod))

    rewritten = encrypt(pair, 0.8)
    wait_for(lambda: metrics(pair)["drsync_mass_change"] == 1, "the standby to hold the mass change")
    m = metrics(pair)
    assert m["drsync_apply_held"] == 1 and m["drsync_apply_held_deletions"] == 0
    # The guard's hold (DrsyncApplyHeld pages for it), not an operator's.
    assert m["drsync_apply_held_by_guard"] == 1 and m["drsync_apply_held_by_operator"] == 0
    assert m["drsync_snapshot_changed_fraction"] == pytest.approx(rewritten / total)
    state = apply_state(pair)
    held = state["snapshot"]
    # The applied snapshot the hold names is the one read above, or one the standby recorded as applied
    # after it (the primary's next unchanged capture): the same content.
    d = run_drsync("snapshot", "diff", applied, state["applied"], "--json", "--config", pair.standby_cfg)
    assert d.code == 0 and not (d.json()["changed"] or d.json()["removed"] or d.json()["added"]), d.out
    applied = state["applied"]
    assert state["held"] and state["mass_change"]
    assert (state["changed"], state["files"], state["removed"]) == (rewritten, total, 0)
    assert state["message"].startswith(
        f"snapshot {held} rewrites the content of {rewritten / total:.1%} of the files ({rewritten} of {total}, "
        f"over replication.max_change_fraction 0.5): held, not applied; ")
    assert f"drsync apply --confirm {held}" in state["message"] and f"snapshot {applied} is the last good one" \
        in state["message"]
    assert tree_state(pair.standby_data) == good and held in standby_snapshots(pair)
    log = (pair.tmp / "standby.log").read_text().splitlines()
    assert any("WARNING" in line and f"snapshot {held} rewrites the content" in line for line in log)
    # Later shipments are refused too; retention expires nothing; status and the status page say why.
    kept = standby_snapshots(pair)
    wait_for(lambda: apply_state(pair)["refused"] >= 3, "more shipments to arrive while held")
    assert set(kept) <= set(standby_snapshots(pair)) and apply_state(pair)["snapshot"] == held
    assert tree_state(pair.standby_data) == good
    r = run_drsync("status", "--config", pair.standby_cfg)
    assert r.code == 0 and f"APPLY HELD on standby: snapshot {held} rewrites the content" in r.out, r.out + r.err
    r = run_drsync("apply", "--config", pair.standby_cfg)
    assert r.code == 0 and "held by the mass-change guard" in r.out, r.out
    page = json.loads(urllib.request.urlopen(f"http://{pair.metrics['standby']}/status.json", timeout=10).read())
    assert page["apply_hold"]["snapshot"] == held and page["apply_hold"]["mass_change"] is True
    r = run_drsync("snapshot", "expire", "--config", pair.standby_cfg)
    assert r.code == 4 and "held by the mass-change guard" in r.err and r.err.count("\n") == 1, r.err
    r = run_drsync("apply", "--confirm", applied, "--config", pair.standby_cfg)
    assert r.code == 4 and f"{held} is (it rewrites the content of {rewritten} files)" in r.err, r.err

    # The operator inspected it: intended. Confirmed, it is applied, and applies go on.
    r = run_drsync("apply", "--confirm", held, "--json", "--config", pair.standby_cfg)
    assert r.code == 0 and r.json()["result"]["applied"] == held, r.err
    wait_for(pair.in_sync, "the standby to follow production again")
    wait_for(lambda: metrics(pair)["drsync_mass_change"] == 0, "the mass change to be settled in the metrics")
    assert metrics(pair)["drsync_apply_held"] == 0 and apply_state(pair)["held"] is False
    (pair.prod / "catalog" / "after.txt").write_text("after the confirmation")
    wait_for(pair.in_sync, "a later change to be applied")
    assert metrics(pair)["drsync_snapshot_changed_fraction"] < 0.5


def test_with_on_mass_change_alert_the_sweep_is_applied_and_flagged_until_resumed(alerting_pair: Pair) -> None:
    pair = alerting_pair
    bootstrap(pair)
    applied = apply_state(pair)["applied_snapshot"]
    rewritten = encrypt(pair, 0.6)
    wait_for(lambda: metrics(pair)["drsync_mass_change"] == 1, "the standby to flag the mass change")
    wait_for(pair.in_sync, "the flagged snapshot to be applied all the same")
    state = apply_state(pair)
    flagged = state["flagged"]
    assert state["held"] is False and state["mass_change"] and flagged
    assert metrics(pair)["drsync_apply_held"] == 0
    assert state["flagged_message"].startswith(f"snapshot {flagged} rewrites the content of ")
    assert f"({rewritten} of " in state["flagged_message"]
    # The snapshot named for recovery holds the content from before the sweep (the one read as applied
    # above, or an unchanged-content one the standby applied after it).
    good = re.search(r"recover from snapshot (\w+)", state["flagged_message"]).group(1)  # type: ignore[union-attr]
    d = run_drsync("snapshot", "diff", applied, good, "--json", "--config", pair.standby_cfg)
    assert d.code == 0 and not (d.json()["changed"] or d.json()["removed"] or d.json()["added"]), d.out
    log = (pair.tmp / "standby.log").read_text().splitlines()
    assert any("WARNING" in line and f"snapshot {flagged} rewrites the content" in line for line in log)
    r = run_drsync("status", "--config", pair.standby_cfg)
    assert r.code == 0 and f"MASS CHANGE on standby: snapshot {flagged}" in r.out and "APPLY HELD" not in r.out
    # The snapshots from before the sweep are kept until the operator settles it.
    assert applied in standby_snapshots(pair)
    assert run_drsync("snapshot", "expire", "--config", pair.standby_cfg).code == 4
    # The operator holds applies while looking into it; the flag stays through the hold...
    assert run_drsync("apply", "--hold", "--config", pair.standby_cfg).code == 0
    wait_for(lambda: metrics(pair)["drsync_apply_held"] == 1, "the operator's hold in the metrics")
    m = metrics(pair)
    assert m["drsync_mass_change"] == 1
    # An operator's own hold, not a guard's: DrsyncApplyHeld does not page for it.
    assert m["drsync_apply_held_by_operator"] == 1 and m["drsync_apply_held_by_guard"] == 0
    # ... and a resume settles it: applies go on, the alert resolves.
    r = run_drsync("apply", "--resume", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    wait_for(lambda: metrics(pair)["drsync_mass_change"] == 0 and metrics(pair)["drsync_apply_held"] == 0,
             "the flag and the hold to be lifted")
    assert apply_state(pair)["flagged"] == ""
    (pair.prod / "catalog" / "after.txt").write_text("after the resume")
    wait_for(pair.in_sync, "a later change to be applied")

    # A second sweep, acknowledged by confirming the flagged (already applied) snapshot.
    encrypt(pair, 0.9)
    wait_for(lambda: metrics(pair)["drsync_mass_change"] == 1, "the second sweep to be flagged")
    flagged = apply_state(pair)["flagged"]
    r = run_drsync("apply", "--confirm", flagged, "--json", "--config", pair.standby_cfg)
    assert r.code == 0 and r.json()["result"]["acknowledged"] == flagged, r.err
    wait_for(lambda: metrics(pair)["drsync_mass_change"] == 0, "the acknowledgement in the metrics")
    wait_for(pair.in_sync, "applies to go on")


def encrypt_slice(pair: Pair, lo: float, hi: float) -> int:
    """Rewrite production's regular files from share ``lo`` to share ``hi`` of them (one step of a sweep
    spread over several shipments). Returns how many were rewritten."""
    pair.kill("primary", signal.SIGTERM)
    files = regular_files(pair.prod)
    doomed = files[int(len(files) * lo):int(len(files) * hi)]
    for p in doomed:
        data = p.read_bytes()
        p.write_bytes(bytes(b ^ 0x5A for b in data) if data else b"\x00")
    pair.start("primary")
    return len(doomed)


def test_a_sweep_spread_over_several_shipments_is_held_against_the_window(tmp_path: Path) -> None:
    """Ransomware that encrypts a third of the files per interval passes a per-shipment check every time;
    judged against the snapshot applied a window ago, the second step already rewrites most files."""
    p = make_pair(tmp_path, '[replication]\nmass_change_window = "1h"\n')
    try:
        bootstrap(p)
        encrypt_slice(p, 0.0, 0.3)
        wait_for(p.in_sync, "the first third of the sweep to be applied (under the limit)")
        encrypt_slice(p, 0.3, 0.65)  # 35 % more against the applied snapshot, 65 % since the first one
        wait_for(lambda: metrics(p)["drsync_mass_change"] == 1, "the standby to hold the spread sweep")
        state = apply_state(p)
        found = re.search(r"of the files since snapshot (\w+) \(", state["message"])
        assert state["held"] and found and "predates the whole change" in state["message"], state["message"]
        since = found.group(1)
        assert not p.in_sync()
        # The window's baseline is kept by retention (keep = { last = 2 }), and is not the applied snapshot
        # (which holds the first third of the sweep); against it most files are rewritten.
        assert since in standby_snapshots(p) and since != state["applied"]
        changed, files = map(int, re.search(r"\((\d+) of (\d+), over", state["message"]).groups())  # type: ignore[union-attr]
        assert changed / files > 0.5
    finally:
        p.stop_all()


def test_the_window_keeps_a_few_checkpoints_and_judges_against_one_a_window_old() -> None:
    from drsync.guard import change_baseline, next_checkpoints

    h = 3600.0
    cps: tuple[tuple[str, float], ...] = ()
    for i, t in enumerate([0, 600, 1000, 1200, 2000, 3000, 4000, 5000, 8000, 9000]):
        cps = next_checkpoints(cps, f"s{i}", float(t), h)
    # One checkpoint per quarter window at most, and none older than the baseline.
    # Added at 0, 1000, 2000, 3000, 4000, 5000, 8000, 9000 (600 and 1200 were within a quarter window).
    assert [c[0] for c in cps] == ["s7", "s8", "s9"] and len(cps) <= 5
    assert change_baseline(cps, 9000.0, h) == "s7"  # the newest applied at least an hour ago (5000)
    assert change_baseline(cps[-1:], 9000.0, h) == "s9"  # younger than the window: its oldest one
    assert change_baseline((), 9000.0, h) == "" and change_baseline(cps, 9000.0, 0.0) == ""
    assert next_checkpoints(cps, "x", 9500.0, 0.0) == ()


def test_an_older_pending_snapshot_coming_due_does_not_lift_a_hold(tmp_path: Path) -> None:
    """A delayed standby: a small change waits for apply_delay, then a sweep arrives and is held at once.
    When the small change comes due and is applied, the hold on the (newer) sweep stays: only a later
    shipment that passes the guards lifts a hold."""
    p = make_pair(tmp_path, '[replication]\napply_delay = "30s"\n')
    try:
        p.start("standby")
        p.start("primary")
        wait_for(p.in_sync, "the first snapshot to be applied (at once: nothing to delay it behind)")
        (p.prod / "catalog" / "extra.txt").write_text("a small change")  # stored, then waits 30 s
        state_file = p.tmp / "standby-repo" / "agent" / "state.json"
        wait_for(lambda: json.loads(state_file.read_text()).get("pending"), "a shipment to wait for apply_delay")
        pending = json.loads(state_file.read_text())["pending"][-1][0]
        encrypt(p, 0.8)
        wait_for(lambda: metrics(p)["drsync_mass_change"] == 1, "the standby to hold the sweep on arrival")
        held = apply_state(p)["snapshot"]
        wait_for(lambda: pending not in [x[0] for x in json.loads(state_file.read_text())["pending"]],
                 "the older one to come due", timeout=120)
        st = apply_state(p)
        assert st["held"] and st["snapshot"] == held, st
        assert metrics(p)["drsync_mass_change"] == 1 and metrics(p)["drsync_apply_held"] == 1
    finally:
        p.stop_all()


# --- with ZooKeeper roles: hold, resume, and a promotion at the last good snapshot ------------------------


def test_under_zookeeper_roles_a_held_sweep_is_kept_out_through_hold_and_resume_and_promoted_past(
        make_group: Any) -> None:
    """Agents with ZooKeeper roles (agent.role = auto). An encryption sweep on production is held on the
    standby (the alert's metric is 1); the operator holds applies (shipments are stored, not applied),
    resumes them (the guard's hold stays: the sweep is still not applied), then promotes the standby at its
    applied snapshot, the good one: its root is production's tree from before the sweep, and the sweep's
    snapshots stay in its repository, named as newer."""
    g: Group = make_group(["east", "west"], extra="[snapshots]\nkeep = { last = 1000 }\n")
    g.start_all("east")
    g.wait_synced("east", "west", "west's first sync")
    good_tree = tree_state(g.data["east"])

    def state() -> dict[str, Any]:
        r = g.drsync("west", "apply", "--json")
        assert r.code == 0, r.err
        return r.json()  # type: ignore[no-any-return]

    def west_metrics() -> dict[str, float]:
        return scrape(g.metrics["west"], g.group, "west")

    # The sweep, while production's agent is stopped: one capture sees all of it.
    g.kill("east", signal.SIGTERM)
    files = regular_files(g.data["east"])
    for p in files[: int(len(files) * 0.8) + 1]:
        data = p.read_bytes()
        p.write_bytes(bytes(b ^ 0x5A for b in data) if data else b"\x00")
    g.start("east")
    wait_for(lambda: west_metrics()["drsync_mass_change"] == 1, "west to hold the sweep")
    st = state()
    held, applied = st["snapshot"], st["applied"]
    assert st["held"] and st["mass_change"] and not st["operator_hold"], st
    assert g.hello("west").held_snapshot == held and g.hello("west").applied_snapshot == applied
    assert tree_state(g.data["west"]) == good_tree

    # The operator holds applies: later shipments are stored and refused; the root stays.
    r = g.drsync("west", "apply", "--hold")
    assert r.code == 0, r.err
    refused = state()["refused"]
    wait_for(lambda: state()["refused"] > refused, "a later shipment to be refused while held")
    st = state()
    assert st["operator_hold"] and st["snapshot"] == held and tree_state(g.data["west"]) == good_tree

    # Resumed: the operator's hold is lifted, the guard's stays; still nothing of the sweep is applied.
    r = g.drsync("west", "apply", "--resume", "--json")
    assert r.code == 0, r.err
    assert f"snapshot {held} stays held by the mass-change guard" in r.json()["result"]["message"], r.out
    st = state()
    assert not st["operator_hold"] and st["held"] and st["snapshot"] == held
    refused = st["refused"]
    wait_for(lambda: state()["refused"] > refused, "a shipment after the resume to be refused by the guard")
    assert tree_state(g.data["west"]) == good_tree and west_metrics()["drsync_mass_change"] == 1

    # Production cannot be trusted: west takes over at its applied snapshot, from before the sweep.
    g.kill("east", signal.SIGKILL)
    r = g.promote("west", "--to-snapshot", applied, "--force")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["applied_snapshot"] == applied and held in doc["newer_kept"], doc
    assert g.primary() == ("west", 2)
    assert tree_state(g.data["west"]) == good_tree
    assert held in [s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()]
