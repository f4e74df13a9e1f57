"""Breaker s47b: hostile cases against the promises of the s47 fixes, with real agents, real ZooKeeper and the CLI.

Found on c88fae1 (+ its uncommitted keep_uncarried change); the developers' 5a64c47/ab2c855 fixed most of them
while this file was written. The cases are kept; the docstrings say which still fail at ab2c855:

1. `promote --to-snapshot PREFIX` let a snapshot NAMED like the start of another snapshot's id win (fixed).
2. After ZooKeeper lost the group, an agent that never saw the old epoch promoted itself at epoch 1, an epoch
   another primary already held. Fixed when the other agents' registrations are back; STILL FAILS right after
   the loss ('at-once'): the agents do not re-register until something re-creates /drsync/<group>.
3. `snapshot restore` / `backup restore` onto the running standby's root through a symlink was not refused
   (fixed); with --repo naming the running agent's repository and no --config it STILL rolls the root back.
4. state.json with a negative or missing epoch was read as valid: the agent started (fixed).
5. A standby whose state directory cannot be written failed every shipment with an unexpected exception, never
   the WARNING 'could not take a shipment' (fixed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.group import Group, wait_for


def _group(zk_server, tmp: Path, names: list[str] | None = None, **kw) -> Group:  # type: ignore[no-untyped-def]
    return Group(tmp, zk_server.hosts, f"g-{uuid.uuid4().hex[:12]}", names or ["east", "west"], **kw)


def _wipe(g: Group) -> bool:
    """Delete /drsync/<group> whole, as a lost ZooKeeper would; False when an agent wrote a node into it while
    it was deleted (kazoo's recursive delete is not atomic), to be tried again."""
    from kazoo.exceptions import NotEmptyError

    try:
        g.connected().zk.delete(f"/drsync/{g.group}", recursive=True)
    except NotEmptyError:
        return False
    return True


def _bootstrap(g: Group, names: tuple[str, ...] = ("east", "west")) -> str:
    for name in names:
        g.start(name)
    r = g.promote("east")
    assert r.code == 0, r.err
    return g.wait_synced("east", "west", "west to apply production")


# --- 1. promote --to-snapshot: a name that is another snapshot's id prefix ----------------------------------------


def test_promote_to_snapshot_name_that_is_another_snapshots_id_prefix_is_ambiguous(zk_server, tmp_path: Path) -> None:
    """Damage replicated; the operator wants the standby promoted at the good snapshot and types the first
    characters of its id from `drsync status --points` (README: 'IDs may be a unique prefix, a name ...').
    A later snapshot in the standby's repository is NAMED with those characters. The s47 fix makes
    `snapshot show/delete/restore` and `drill run --to-snapshot` refuse that reference as ambiguous ('snapshot
    'c3ee96' is ambiguous: it is the name of ... and the start of ...'). Observed: `promote --to-snapshot
    PREFIX` (pointintime.choose_point: named[-1:] wins) plans to apply the NAMED snapshot ('point  applies
    snapshot <named id> ... first'), i.e. it would promote at the damaged state. Expected: exit 2, ambiguous,
    nothing done."""
    g = _group(zk_server, tmp_path)
    try:
        good = _bootstrap(g)
        (g.data["east"] / "catalog" / "f004.txt").write_text("damage that replicated\n")
        g.wait_synced("east", "west", "west to apply the damage", after=good)
        r = g.drsync("west", "snapshot", "create", "--name", good[:6], "--json")
        assert r.code == 0, r.err
        named = r.json()["id"]
        assert not named.startswith(good[:6])
        shown = g.drsync("west", "snapshot", "show", good[:6])
        assert shown.code == 2, shown  # the s47 fix: ambiguous for show
        r = g.drsync("west", "promote", "--to-snapshot", good[:6], "--dry-run")
        plan = next((ln.strip() for ln in (r.out + r.err).splitlines() if "point" in ln), "")
        assert f"applies snapshot {named}" not in r.out + r.err and "ambiguous" in r.out + r.err, (
            f"`promote --to-snapshot {good[:6]} --dry-run` (the start of {good}, also the NAME of {named}) chose "
            f"the named snapshot: {plan!r} (exit {r.code}); `snapshot show {good[:6]}` says: {shown.err.strip()}")
        assert r.code != 0, r
    finally:
        g.stop_all()


# --- 2. a wiped ZooKeeper and an agent that never saw the epoch --------------------------------------------------


@pytest.mark.parametrize("when", ["after-status", "at-once"])
def test_a_wiped_group_is_not_promoted_at_an_epoch_another_primary_held(zk_server, tmp_path: Path, when: str) -> None:
    """ZooKeeper loses the group (/drsync/<group> wiped, or a rebuilt ensemble). east (primary at epoch 1) steps
    down and west refuses role changes: right. A third agent (north, added to the group after the loss, or one
    whose state directory was rebuilt) has seen no epoch. Observed on c88fae1: `drsync promote --config
    north.toml` exits 0, 'north is the primary at epoch 1' -- the epoch east already held (DESIGN rule 1: at
    most one primary per epoch) -- and west accepts north's shipments at that epoch (only the deletion guard
    stops them), although east and west's registrations report epoch 1 (`drsync status --json`).
    The working-tree fix (control._promotion_checks counting other live agents' registrations) closes the
    'after-status' case. 'at-once': after the loss the agents do not re-register until something re-creates
    /drsync/<group> (observed: none for 15 s); north's own start does, and a promote right after it still
    finds no registration of east or west: exit 0, epoch 1 again. Expected (promise: a ZooKeeper epoch lower
    than one an agent has already seen stops every role change, promote exit 4): refused."""
    g = _group(zk_server, tmp_path, ["east", "west", "north"])
    try:
        _bootstrap(g)
        assert g.primary() == ("east", 1)
        wait_for(lambda: _wipe(g), "the group's nodes to be wiped (agents write into it meanwhile)")
        wait_for(lambda: "stepped down as primary" in g.log("east"), "east to step down")
        if when == "after-status":
            r = g.drsync("west", "promote", "--json")
            assert r.code == 4, r  # the agents that saw epoch 1 refuse: right

            def relisted() -> bool:
                g.drsync("west", "status")  # (the agents re-register once the group's node is there again)
                east, west = g.record("east"), g.record("west")
                return east.get("epoch") == 1 and west.get("epoch") == 1 and east.get("role") != "primary"
            wait_for(relisted, "east and west to re-register (epoch 1) after the loss, east no longer primary")
        (g.data["north"] / "north.txt").write_text("the new site's data\n")
        g.start("north")
        r = g.promote("north")
        seen = {n: g.record(n).get("epoch") for n in ("east", "west")}
        if when == "at-once" and r.code == 0:
            # Nothing in ZooKeeper can tell north that the group had epoch 1 before the loss (the others have
            # not re-registered yet): north may be promoted. Rule 1 then holds at the standby, which saw east
            # hold epoch 1: it refuses north's shipments at that epoch and says why.
            wait_for(lambda: "two primaries at one epoch" in g.log("west"), "west to refuse north at epoch 1")
            assert not (g.data["west"] / "north.txt").exists(), "west applied north's data at east's epoch"
            return
        assert r.code == 4, (f"after ZooKeeper lost the group, `drsync promote --config north.toml` exited {r.code}: "
                             f"{(r.out + r.err).strip()[:200]!r}; ZooKeeper now says primary {g.primary()} while east "
                             f"was primary at epoch 1 (registrations now report epochs {seen})")
    finally:
        g.stop_all()


# --- 3. a restore onto the running standby's root under another name ----------------------------------------------


@pytest.mark.parametrize("kind", ["snapshot", "backup", "snapshot-repo"])
def test_restore_onto_the_running_standbys_root_through_a_symlink_is_refused(zk_server, tmp_path: Path,
                                                                              kind: str) -> None:
    """The s47 fix refuses `snapshot restore` / `backup restore` onto the config's own data root while its
    agent runs (exit 4), comparing the target with [cluster] data as an absolute path only
    (engine.data_root_url: os.path.abspath). The same root reached through a symlink (/srv/standby ->
    /srv/cluster/data, a mount alias, an operator's shortcut) is taken as a foreign target: with
    --delete-extra the restore goes ahead (exit 0, '1 removed') and rolls the running standby's root back
    under its agent, which keeps reporting the newer snapshot as applied. Expected: refused (exit 4), the
    root unchanged. (The symlink cases are fixed by 5a64c47; 'snapshot-repo' -- the same restore with --repo
    naming the running agent's repository and no --config -- still rolls the root back: exit 0, '1 removed'.)"""
    g = _group(zk_server, tmp_path)
    alias = tmp_path / "standby-alias"
    try:
        good = _bootstrap(g)
        (g.data["east"] / "catalog" / "after-good.txt").write_text("written after GOOD, applied on west\n")
        g.wait_synced("east", "west", "west to apply the new file", after=good)
        os.symlink(g.data["west"], alias)
        if kind == "snapshot":
            r = g.drsync("west", "snapshot", "restore", good, "--target", str(alias), "--delete-extra")
        elif kind == "snapshot-repo":
            # No --config: the running agent's own repository (its state directory <repository>/agent is
            # locked by the agent) and its data root, named as they are.
            from tests.conftest import run_drsync
            r = run_drsync("snapshot", "restore", good, "--repo", tmp_path / "west-repo", "--target", g.data["west"],
                           "--delete-extra")
        else:
            b = g.drsync("west", "backup", "create", "--snapshot", good, "--dest", str(tmp_path / "backups"),
                         "--json")
            assert b.code == 0, b.err
            r = g.drsync("west", "backup", "restore", b.json()["path"], "--target", str(alias), "--delete-extra")
        kept = (g.data["west"] / "catalog" / "after-good.txt").exists()
        assert r.code == 4 and kept, (
            f"{kind} restore of {good} onto {alias} -> {g.data['west']} (west's data root, its agent running) "
            f"exited {r.code}: {(r.out + r.err).strip()!r}; catalog/after-good.txt still there: {kept}; west reports "
            f"{g.hello('west').applied_snapshot} applied")
    finally:
        g.stop_all()


# --- 4. state.json with a negative or missing epoch -----------------------------------------------------------


@pytest.mark.parametrize("change", ["negative", "missing"])
def test_state_json_with_a_negative_or_missing_epoch_is_an_integrity_error(zk_server, tmp_path: Path,
                                                                           change: str) -> None:
    """Promise: state.json is read strictly; 'missing epoch, negative epoch' are integrity errors (exit 3, one
    line naming the file; docs/operations.md: the agent does not start, its fencing floor cannot be trusted).
    Observed: a state.json whose epoch is -1, or that has no epoch at all, is read (AgentState defaults the
    floor to 0) and the agent starts and serves. Expected: `drsync agent` exits 3 naming state.json."""
    g = _group(zk_server, tmp_path)
    try:
        _bootstrap(g)
        g.kill("west", signal.SIGTERM)
        path = tmp_path / "west-repo" / "agent" / "state.json"
        doc = json.loads(path.read_text())
        assert doc["epoch"] == 1
        if change == "negative":
            doc["epoch"] = -1
        else:
            del doc["epoch"]
        path.write_text(json.dumps(doc))
        started_before = g.log("west").count("agent west started")
        with open(tmp_path / "west-restart.log", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "drsync", "agent", "--config", str(g.cfg["west"])],
                                    stdout=out, stderr=out)
        try:
            wait_for(lambda: proc.poll() is not None
                     or (tmp_path / "west-restart.log").read_text(errors="replace").count("agent west started")
                     > 0, "the agent to exit or start")
            err = (tmp_path / "west-restart.log").read_text(errors="replace")
            assert proc.poll() == 3 and "state.json" in err, (
                f"state.json with the {change} epoch ({json.dumps(doc.get('epoch'))}) was accepted: the agent "
                f"started ({err.strip().splitlines()[0][:200] if err.strip() else ''!r}; exit {proc.poll()})")
            assert started_before >= 1
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    finally:
        g.stop_all()


# --- 5. a standby that cannot write its own state ---------------------------------------------------------------


def test_a_standby_that_cannot_record_a_shipment_says_could_not_take_it(zk_server, tmp_path: Path) -> None:
    """Promise 7: a standby that cannot take a shipment logs a WARNING itself ('could not take a shipment') and
    shows it. Its state directory is made immutable (chattr +i: a backup tool's snapshot lock, a read-only
    remount). Observed: every shipment fails with 'ERROR grpc._server: Exception calling application: [Errno
    1] Operation not permitted: .../agent/.tmp-...-state.json (PermissionError ...)'; the primary reports
    'UNKNOWN: Exception calling application'; the standby never logs 'could not take a shipment', and its
    status shows no refusal. Expected: the standby's WARNING naming its state directory and what to do."""
    g = _group(zk_server, tmp_path)
    state_dir = tmp_path / "west-repo" / "agent"
    try:
        _bootstrap(g)
        subprocess.run(["chattr", "+i", str(state_dir)], check=True)
        (g.data["east"] / "catalog" / "f003.txt").write_text("changed on production\n")
        wait_for(lambda: "Operation not permitted" in g.log("east") or "could not take" in g.log("west"),
                 "the shipment to fail")
        wait_for(lambda: g.log("west").count("Operation not permitted") >= 2 or "could not take" in g.log("west"),
                 "the standby to fail a second time")
        west = [ln for ln in g.log("west").splitlines() if "Operation not permitted" in ln or "could not take" in ln]
        assert any(" WARNING " in ln and "could not take a shipment" in ln for ln in west), (
            "the standby that cannot record the shipment does not say it could not take it: " + west[0][:300])
    finally:
        subprocess.run(["chattr", "-i", str(state_dir)], check=False)
        g.stop_all()
