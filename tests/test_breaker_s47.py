"""Breaker s47: hostile cases found by a newcomer driving real agents, real ZooKeeper and the CLI.

Each test failed on the code it was written against (its docstring says what was observed and what is
expected):

1. `snapshot restore` (no --target) with a standby's config rolls back the running standby's root; the
   standby keeps reporting the newer snapshot applied (lag 0), never repairs it while production is quiet, and
   a promotion takes the rolled-back root.
2. An apply that fails on the standby (immutable file, ENOSPC, ...) is logged only by the primary: the
   standby's own log, metrics and status say nothing.
3. Failback (`drsync rejoin`) removes from the ex-primary what no snapshot can carry (links leading outside
   the root, fifos), and the before-rejoin snapshot cannot keep them: lost for good.
4. The mass-change window's baseline is expired while a standby serves as primary; after failback the window
   is judged 'without it' (a WARNING per shipment) and a sweep spread over shipments is applied.
5. A snapshot named like another snapshot's id prefix wins over that prefix: `snapshot delete PREFIX` deletes
   the wrong snapshot instead of refusing an ambiguous reference.
6. A wrong volume mounted at the standby's root (300 foreign files) is wiped by the next apply, unguarded,
   logged as '1 removed'.
7. A snapshot that keeps unreadable paths stale reports files/bytes without them ('files 0', '0 B' for a
   snapshot holding everything).
8. A ZooKeeper password of the wrong TOML type is printed in the error (agent, config check, status).
9. One agent record of the wrong shape in ZooKeeper makes `drsync status` an internal error.
10. `backup create --dest` inside the repository is accepted; `repo gc` then deletes the backup (under packs/)
    or the repository is bricked (under snapshots/).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import run_drsync
from tests.group import Group, wait_for


def _group(zk_server, tmp: Path, **kw) -> Group:  # type: ignore[no-untyped-def]
    return Group(tmp, zk_server.hosts, f"g-{uuid.uuid4().hex[:12]}", ["east", "west"], **kw)


def _bootstrap(g: Group) -> str:
    for name in g.names:
        g.start(name)
    r = g.promote("east")
    assert r.code == 0, r.err
    return g.wait_synced("east", "west", "west to apply production")


# --- 1. a snapshot restore onto a running standby's own root --------------------------------------------------


def test_restore_onto_a_running_standbys_root_does_not_leave_it_silently_behind(zk_server, tmp_path: Path) -> None:
    """docs/operations.md 13 tells the operator to check a good snapshot with
    `drsync snapshot restore GOOD --config standby.toml --target /scratch/check`; without --target (a slip) the
    restore goes onto the standby's own data root while its agent runs. Observed: exit 0, the root is rolled
    back to GOOD, and nothing notices: the agent keeps reporting the newer snapshot as applied with lag 0,
    no later shipment repairs the root (the standby 'already holds the content'), `promote --dry-run` says ok
    and a promotion takes over with the rolled-back root, losing what the standby had applied (rule 2: 'a
    promotion always sees a whole snapshot'). Expected: the restore is refused while the standby's agent
    applies to that root (exit 4, nothing changed), or the standby's root is brought back to its applied
    snapshot before anything relies on it."""
    g = _group(zk_server, tmp_path)
    try:
        good = _bootstrap(g)
        (g.data["east"] / "catalog" / "after-good.txt").write_text("written after GOOD, applied on west\n")
        g.wait_synced("east", "west", "west to apply the new file", after=good)
        r = g.drsync("west", "snapshot", "restore", good)
        if r.code != 0:
            assert r.code == 4 and len(r.err.strip().splitlines()) == 1, r
            assert (g.data["west"] / "catalog" / "after-good.txt").exists()
            return
        # It went ahead: the standby must not stay silently behind what it reports as applied.
        try:
            wait_for(lambda: g.in_sync("east", "west"), "west's root to be its applied snapshot again", 6)
        except AssertionError:
            applied = g.hello("west").applied_snapshot
            pytest.fail(f"snapshot restore {good} onto west's root (its agent running) exited 0; west still "
                        f"reports {applied} applied (lag {g.hello('west').lag_s:.1f}s) but its root lacks "
                        f"catalog/after-good.txt")
    finally:
        g.stop_all()


# --- 2. a failing apply on the standby is not the standby's to report --------------------------------------------


def test_a_standby_whose_apply_fails_says_so_in_its_own_log(zk_server, tmp_path: Path) -> None:
    """A file on the standby's root is immutable (chattr +i: a backup tool, an operator's mistake); production
    changes it. Observed: every shipment fails ('INTERNAL: .../f003.txt is immutable or append-only (chattr);
    clear the flag ...'), and only the PRIMARY's log says so; the standby that refuses the apply logs nothing
    (its last line is 'received 1 chunks'), drsync_ship_failures_total there stays 0, and its /status.json and
    `drsync status --config standby.toml` do not name the failure. The operator of the standby, who must
    clear the flag, is told nothing on their machine. Expected (brief: refusals are logged at WARNING or
    above): the standby logs a WARNING naming the file and what to do."""
    g = _group(zk_server, tmp_path)
    victim = g.data["west"] / "catalog" / "f003.txt"
    try:
        _bootstrap(g)
        subprocess.run(["chattr", "+i", str(victim)], check=True)
        (g.data["east"] / "catalog" / "f003.txt").write_text("changed on production\n")
        wait_for(lambda: "is immutable or append-only" in g.log("east"), "east to report the failed apply")
        west = [ln for ln in g.log("west").splitlines() if "immutable" in ln]
        assert any(" WARNING " in ln or " ERROR " in ln for ln in west), (
            "the standby's own log does not mention the apply it keeps failing; east's log says: "
            + next(ln for ln in g.log("east").splitlines() if "immutable" in ln))
    finally:
        subprocess.run(["chattr", "-i", str(victim)], check=False)
        g.stop_all()


# --- 3. failback deletes, unrecoverably, what no snapshot can hold ------------------------------------------------


def test_rejoin_keeps_what_the_before_rejoin_snapshot_cannot_hold(zk_server, tmp_path: Path) -> None:
    """Production holds a link leading outside its root (`shared -> /srv/shared`, reported at capture as
    not carried) and a fifo. west is promoted (--force), the operator runs `drsync rejoin` on east. Observed:
    east's apply as a standby removes both ('6 removed' in its log) and the before-rejoin-epoch-N snapshot
    cannot hold them either: they are gone for good, though README promises that before an ex-primary's
    root is overwritten it is kept 'so that changes it never shipped can still be recovered', and lists
    such paths only as 'not carried', never as removed from production. Expected: what the capture said it
    cannot carry is left in place on the rejoining root (as drsync's own files are), or the rejoin refuses
    naming them."""
    g = _group(zk_server, tmp_path)
    outside = tmp_path / "shared"
    outside.mkdir()
    try:
        _bootstrap(g)
        os.symlink(str(outside), g.data["east"] / "shared")
        os.mkfifo(g.data["east"] / "catalog" / "pipe")
        wait_for(lambda: "shared: symlink to" in g.log("east") and "catalog/pipe: special file" in g.log("east"),
                 "east to capture with the link and the fifo reported as not carried")
        r = g.promote("west", "--force")
        assert r.code == 0, r.err
        g.wait_role("east", "ex-primary")
        (g.data["west"] / "catalog" / "from-west.txt").write_text("written on the new primary\n")
        r = g.drsync("east", "rejoin")
        assert r.code == 0, r.err
        wait_for(lambda: (g.data["east"] / "catalog" / "from-west.txt").exists()
                 and g.record("east").get("role") == "standby", "east to apply west's snapshot as a standby")
        lost = [p for p in ("shared", "catalog/pipe") if not os.path.lexists(g.data["east"] / p)]
        assert not lost, (f"rejoin removed {lost} from the ex-primary's root; the before-rejoin snapshot "
                          f"cannot hold them (not carried), so they are lost")
    finally:
        g.stop_all()


# --- 4. the mass-change window after a failover and failback ----------------------------------------------------


def _snapshot_ids(g: Group, name: str) -> set[str]:
    r = g.drsync(name, "snapshot", "list", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    rows = doc if isinstance(doc, list) else doc.get("snapshots", [])
    return {row["id"] for row in rows}


def _checkpoints(g: Group, name: str) -> list:
    return json.loads((g.tmp / f"{name}-repo" / "agent" / "state.json").read_text()).get("change_checkpoints", [])


def _rewrite(g: Group, names: list[str], text: str) -> None:
    for n in names:
        (g.data["east"] / "catalog" / n).write_text(text)


def test_the_mass_change_window_still_judges_after_a_failover_and_failback(zk_server, tmp_path: Path) -> None:
    """replication.mass_change_window = "1h": a sweep spread over several shipments, each under
    max_change_fraction (0.5), is held once the rewrites since the snapshot applied a window ago pass it
    (README, 'Mass-change guard'). west was a standby (its window starts at the first snapshot it applied),
    was promoted for a while (its retention as a primary expires that snapshot: the primary's retention
    keeps only [snapshots] keep), and was failed back to a standby (promote east, rejoin west). Observed: west
    keeps the expired snapshot as its window's baseline; every shipment logs 'deletion guard: cannot read
    snapshot ... the shipment is judged without it' and a sweep rewriting 10 of 26 files, then 10 more (77%
    within the window) is applied: the window guard is off for up to a whole window after a failback. The
    same sweep without the failover and failback is held (checked by hand on the same code).
    Expected: the sweep is held (the window judged against a snapshot the standby still holds)."""
    g = _group(zk_server, tmp_path, replication='mass_change_window = "1h"')
    for name in g.names:
        g.add_replication(name, "[snapshots]\nkeep = { last = 2 }")
    try:
        _bootstrap(g)
        first = _checkpoints(g, "west")[0][0]
        (g.data["east"] / "catalog" / "later.txt").write_text("a later change, applied on west\n")
        g.wait_synced("east", "west", "west to apply a later snapshot", after=first)
        assert g.promote("west", "--force").code == 0
        g.wait_role("west", "primary")
        wait_for(lambda: first not in _snapshot_ids(g, "west"), "west's retention as primary to expire " + first)
        g.wait_role("east", "ex-primary")
        assert g.drsync("east", "rejoin").code == 0
        g.wait_synced("west", "east", "east to follow west as a standby")
        assert g.promote("east", "--force").code == 0
        g.wait_role("west", "ex-primary")
        assert g.drsync("west", "rejoin").code == 0
        base = g.wait_synced("east", "west", "west to apply east's snapshot after rejoining")
        names = sorted(p.name for p in (g.data["east"] / "catalog").iterdir() if p.name.startswith("f"))
        _rewrite(g, names[:10], "encrypted, first pass\n")
        second = g.wait_synced("east", "west", "west to apply the first 10 rewrites (38%)", after=base)
        _rewrite(g, names[10:20], "encrypted, second pass\n")

        def decided() -> str:
            if json.loads(g.drsync("west", "apply", "--json").out or "{}").get("held"):
                return "held"
            return "applied" if g.in_sync("east", "west") and g.hello("west").applied_snapshot != second else ""

        outcome = wait_for(decided, "west to hold or apply the second pass of the sweep")
        assert outcome == "held", (
            f"a sweep rewriting 20 of 26 files within mass_change_window was applied on west after a failback; "
            f"its window baseline {first} was expired while it was primary (checkpoints {_checkpoints(g, 'west')})")
    finally:
        g.stop_all()



# --- 5. a name that is also another snapshot's id prefix ----------------------------------------------------------


def test_a_name_that_is_another_snapshots_id_prefix_is_ambiguous_not_the_named_one(tmp_path: Path) -> None:
    """An operator copies the first characters of an id from `snapshot list` (README: 'IDs may be a unique
    prefix, a name (its newest), or latest'); a later snapshot was named with those characters (a script
    naming snapshots by a git short hash, or a hostile user). Observed: `snapshot delete PREFIX` deletes the
    NAMED snapshot ('deleted <other id>', exit 0) and the snapshot whose id the operator typed stays; show,
    restore and diff resolve it the same way. Expected (docs/cli.md: exit 2 for 'an ambiguous prefix'): a
    reference that is both an id prefix and a name is refused as ambiguous, nothing deleted."""
    data, repo = tmp_path / "data", tmp_path / "repo"
    data.mkdir()
    (data / "f").write_text("1\n")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--json")
    assert r.code == 0, r.err
    meant = r.json()["id"]
    (data / "f").write_text("2\n")
    r = run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--name", meant[:7], "--json")
    assert r.code == 0, r.err
    other = r.json()["id"]
    r = run_drsync("snapshot", "delete", meant[:7], "--repo", repo)
    left = run_drsync("snapshot", "list", "--repo", repo, "--json")
    ids = {row["id"] for row in (left.json() if isinstance(left.json(), list) else left.json()["snapshots"])}
    assert other in ids, (f"`snapshot delete {meant[:7]}` (the first 7 characters of {meant}) deleted {other}, "
                          f"the snapshot NAMED {meant[:7]}: {r.out.strip()!r} (exit {r.code})")
    assert r.code == 2 and meant in ids, r


# --- 6. a wrong volume mounted at the standby's root is wiped without a guard --------------------------------------


def test_a_wrong_volume_mounted_at_the_standbys_root_is_not_wiped_unguarded(zk_server, tmp_path: Path) -> None:
    """The standby's root is a mount point and the operator mounts the wrong volume there (another database's:
    300 files drsync never wrote). README: 'A shipment that would remove more than
    replication.max_delete_fraction (default 0.5) of the standby's files ... is stored but held, not applied'.
    Observed: the next shipment is applied at once, every one of the 300 files is removed, and the standby logs
    'applied snapshot ... (N files written, 1 removed)' (the 300 files count as one removal, at INFO); the
    deletion guard only compares manifests, so what the apply really removes from the root is never judged.
    Expected: the apply does not silently remove the majority of what the standby's root holds (held by the
    deletion guard, or refused naming the foreign paths)."""
    g = _group(zk_server, tmp_path)
    volume = tmp_path / "other-database"
    (volume / "otherdb").mkdir(parents=True)
    for i in range(300):
        (volume / "otherdb" / f"t{i:03}").write_text(f"row {i}\n")
    mounted = False
    try:
        base = _bootstrap(g)
        subprocess.run(["mount", "--bind", str(volume), str(g.data["west"])], check=True)
        mounted = True
        (g.data["east"] / "catalog" / "trigger.txt").write_text("a change on production\n")

        def decided() -> str:
            if json.loads(g.drsync("west", "apply", "--json").out or "{}").get("held"):
                return "held"
            applied = g.hello("west").applied_snapshot
            return "applied" if applied and applied != base else ""

        outcome = wait_for(decided, "west to apply or hold the next shipment")
        left = len(os.listdir(volume / "otherdb")) if (volume / "otherdb").is_dir() else 0
        line = next((ln for ln in reversed(g.log("west").splitlines()) if "applied snapshot" in ln), "")
        assert outcome == "held" or left == 300, (
            f"the shipment was {outcome}: {300 - left} of the 300 files of the volume mounted at west's root were "
            f"removed, unguarded; west logged: {line.split('drsync.agent.standby: ')[-1]}")
    finally:
        if mounted:
            subprocess.run(["umount", str(g.data["west"])], check=False)
        g.stop_all()


# --- 7. a snapshot's file count and size leave out the paths it keeps stale -----------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to act as another user)")
def test_a_snapshot_that_keeps_unreadable_paths_counts_them(open_tmp: Path) -> None:
    """A capture by an agent that cannot read some paths keeps their last captured version (README: 'marked
    stale and counted in stale_paths'): the manifest holds them and a restore or standby writes them.
    Observed: the snapshot's `files` and `bytes` (`snapshot create --json`, `snapshot list` FILES/SIZE,
    `snapshot show`) count only what was read this time: a snapshot holding 11 files shows 'files 0' and
    '0 B' when everything was unreadable, 'taken: 1 file' when one file was readable -- an operator sees an
    empty snapshot of production where a whole one is kept. Expected: files and bytes describe what the
    snapshot holds (the stale paths included), as `snapshot show --files` lists them."""
    from tests.users import give_to_nobody, preload_everything, run_as_nobody

    preload_everything()
    src, repo = open_tmp / "src", open_tmp / "repo"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"f{i}").write_text(f"{i}\n")
    (src / "top").write_text("t\n")
    repo.mkdir()
    give_to_nobody(src, repo)
    assert run_as_nobody("init", "--repo", repo, "--cluster-id", "c", "--release", "1")[0] == 0
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "all")[0] == 0
    os.chmod(src / "d", 0o000)
    assert run_as_nobody("snapshot", "create", "--repo", repo, "--source", src, "--name", "stale")[0] == 0
    os.chmod(src / "d", 0o755)
    shown = run_drsync("snapshot", "show", "stale", "--files", "--repo", repo, "--json").json()
    held = [e for e in shown["entries"] if e["type"] == "file"]
    assert len(held) == 6, shown["entries"]
    assert shown["files"] == 6 and shown["bytes"] == 12, (
        f"snapshot 'stale' holds 6 files (12 B; 5 kept stale) but says files={shown['files']} "
        f"bytes={shown['bytes']} (stale_paths={shown.get('stale_paths')})")


# --- 8. a mistyped secret is printed in the error ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["98765432", '["s3cr3t-pw"]', "98765432.5"])
def test_a_password_of_the_wrong_type_is_not_printed(tmp_path: Path, value: str) -> None:
    """A numeric ZooKeeper password written without quotes (`password = 98765432`) is a wrong type (exit 2,
    naming the key: right). Observed: the error prints the secret -- 'coordination.password: expected a
    string, got int 98765432' -- on stderr of `drsync agent` (the journal of its unit), `config check` and
    every other command. DESIGN rule 6: 'secrets never appear in logs or metrics'. Expected: the key and the
    type are named, never the value."""
    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n'
                   f'[coordination]\nusername = "drsync"\npassword = {value}\n')
    secret = value.strip('[]"').split(".")[0]
    for args in (["agent"], ["config", "check"], ["status", "--json"]):
        r = run_drsync(*args, "--config", cfg, timeout=60)
        assert r.code == 2 and "coordination.password" in r.err, r
        assert secret not in r.err + r.out, f"`drsync {' '.join(args)}` prints the password: {r.err.strip()}"


# --- 9. one malformed agent record in ZooKeeper breaks drsync status ------------------------------------------------


@pytest.mark.parametrize("record", ['{"role": ["standby"]}', '{"role": "standby", "address": 7420}',
                                    '{"role": "standby", "applied_snapshot": {"id": "x"}}'])
def test_status_survives_an_agent_record_of_the_wrong_shape(zk_server, tmp_path: Path, record: str) -> None:
    """An agent record under /drsync/<group>/agents whose fields have the wrong JSON type (another drsync
    version in a rolling upgrade, a script, a hostile client of an ACL-less ZooKeeper). Observed: `drsync
    status` -- the operator's first command in an incident -- dies with 'drsync: internal error:
    AttributeError: 'list' object has no attribute 'encode'; rerun with --debug for details' (exit 1) and
    shows nothing of the group; `status --json` passes the values through (address 7420, applied_snapshot an
    object) where DESIGN gives strings. Expected (rule 5, 'bad input gets a clear error'): the table is shown
    with that record named as unreadable (or a one-line error naming the node), never an internal error."""
    from kazoo.client import KazooClient

    group = f"g-{uuid.uuid4().hex[:12]}"
    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n'
                   f'[agent]\nname = "ops"\n[coordination]\nzookeeper = "{zk_server.hosts}"\ngroup = "{group}"\n')
    zk = KazooClient(hosts=zk_server.hosts)
    zk.start()
    try:
        zk.create(f"/drsync/{group}/agents/odd", record.encode(), makepath=True)
        r = run_drsync("status", "--config", cfg)
        assert "internal error" not in r.err, r.err.strip()
        assert r.code == 0 or (len(r.err.strip().splitlines()) == 1 and "odd" in r.err), r
    finally:
        zk.stop()


# --- 10. a backup made inside the repository ----------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["packs", "snapshots"])
def test_a_backup_destination_inside_the_repository_is_refused(tmp_path: Path, inside: str) -> None:
    """`backup create --dest` naming a directory of the repository itself (an operator keeping backups
    'next to the repository'). Restores refuse such a target ('lies inside drsync's own ...'); backup create
    does not. Observed: exit 0 'backup ... created' -- then, under packs/, the next `repo gc` deletes every
    file of that backup ('freed ...: 7 packs deleted': its backup.json, checksum file, manifest and pack
    included; `backup verify` then says 'not a complete drsync backup'), and under snapshots/ the repository
    is bricked: `snapshot list`, `repo verify`, `repo gc` and every later backup exit 3 with 'snapshot
    snapshots/<backup>/backup.json is damaged: 'captured_at''. Expected: the destination is refused (exit 2,
    nothing written), or the backup survives and the repository keeps working."""
    data, repo = tmp_path / "data", tmp_path / "repo"
    data.mkdir()
    (data / "f").write_text("precious\n")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--name", "s").code == 0
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s", "--dest", repo / inside, "--json")
    if r.code != 0:
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r
        return
    backup = r.json()["path"]
    gc = run_drsync("repo", "gc", "--repo", repo)
    listed = run_drsync("snapshot", "list", "--repo", repo)
    verify = run_drsync("backup", "verify", backup)
    assert listed.code == 0 and gc.code == 0, (
        f"backup create --dest {repo / inside} exited 0; then the repository fails: snapshot list exit "
        f"{listed.code} ({listed.err.strip()}), repo gc exit {gc.code}")
    assert verify.code == 0, (f"backup create --dest {repo / inside} exited 0, then repo gc ({gc.out.strip()}) "
                              f"destroyed the backup: {verify.err.strip()}")


# --- 11. --repo and --config naming two repositories --------------------------------------------------------------


def test_repo_and_a_config_of_another_repository_are_never_mixed(tmp_path: Path) -> None:
    """Breaker s47's note: with DRSYNC_CONFIG set (or --config given), `snapshot create --repo X` captured the
    config's data root into X under X's cluster id: data crossed the cluster-id check. Now both naming two
    repositories is a usage error (exit 2, nothing written); naming the same one is fine."""
    data, repo, other = tmp_path / "data", tmp_path / "repo", tmp_path / "other"
    data.mkdir()
    (data / "f").write_text("production of cluster a\n")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "a", "--release", "1").code == 0
    assert run_drsync("init", "--repo", other, "--cluster-id", "b", "--release", "1").code == 0
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[cluster]\nid = "a"\nrelease = "1"\ndata = "{data}"\nrepository = "{repo}"\n')
    r = run_drsync("snapshot", "create", "--repo", other, env={"DRSYNC_CONFIG": str(cfg)})
    assert r.code == 2 and "name two repositories" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert run_drsync("snapshot", "list", "--repo", other, "--json").json() == [], "something was written"
    r = run_drsync("snapshot", "create", "--repo", f"{repo}/", "--config", cfg, "--json")
    assert r.code == 0, r.err


# --- 12. a drill's scratch directory inside the data root ----------------------------------------------------------


def test_a_drill_scratch_inside_the_data_root_is_a_configuration_error(tmp_path: Path) -> None:
    """Breaker s47's note: drills.scratch inside the data root was accepted; a drill's trial restore (the whole
    snapshot) then lands in production's tree, or in a standby root its apply rewrites."""
    data = tmp_path / "data"
    data.mkdir()
    base = f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n' \
           f'[agent]\nlisten = "127.0.0.1:1"\nmetrics = ""\n'
    bad, good = tmp_path / "bad.toml", tmp_path / "good.toml"
    bad.write_text(base + f'[drills]\nscratch = "{data / "scratch"}"\n')
    good.write_text(base + f'[drills]\nscratch = "{tmp_path / "scratch"}"\n')
    assert run_drsync("init", "--config", good).code == 0
    r = run_drsync("config", "check", "--config", bad, "--json")
    assert any(not c["ok"] and "drills.scratch" in c["detail"] for c in r.json()["checks"]), r.out
    r = run_drsync("agent", "--config", bad, timeout=60)
    assert r.code == 2 and "drills.scratch" in r.err and len(r.err.strip().splitlines()) == 1, r
    r = run_drsync("config", "check", "--config", good, "--json")
    assert not any("drills.scratch" in c["detail"] for c in r.json()["checks"]), r.out


# --- 13. a damaged checksum file line ----------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["", "zz  backup.json", "0" * 64 + "  ../../etc/hostname",
                                  "0" * 64 + "  /etc/hostname", "0" * 64])
def test_a_damaged_line_of_the_checksum_file_is_named_as_such(tmp_path: Path, line: str) -> None:
    """Breaker s47's note: a blank line of CHECKSUMS.b3 was reported as a missing file named ''; a line naming a
    path outside the backup as a missing file of that name. Each is damage of the checksum file, by line."""
    data, repo = tmp_path / "data", tmp_path / "repo"
    data.mkdir()
    (data / "f").write_text("x\n")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--name", "s").code == 0
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s", "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    sums = Path(r.json()["path"]) / "CHECKSUMS.b3"
    lines = sums.read_text().splitlines()
    sums.write_text("\n".join([*lines[:1], line, *lines[1:]]) + "\n")
    r = run_drsync("backup", "verify", r.json()["path"], "--json")
    assert r.code == 3, r
    damaged = r.json()["damaged_backup_files"] if "damaged_backup_files" in r.json() else r.json()
    reason = "line 2 is not '<BLAKE3 hex>  <path inside the backup>'"
    assert {"file": "CHECKSUMS.b3", "reason": reason} in damaged, r.out
    assert not any(d["file"] in ("", "../../etc/hostname", "/etc/hostname") for d in damaged), r.out


# --- 14. a backup destination given as a URL ---------------------------------------------------------------------


def test_a_backup_destination_url_is_a_local_directory_or_refused(tmp_path: Path) -> None:
    """Breaker s47b's note: `backup create --dest file:///abs/path` wrote the backup under a directory named
    `file:` in the current directory. file:// names the local directory; another scheme is refused (exit 2)."""
    data, repo = tmp_path / "data", tmp_path / "repo"
    data.mkdir()
    (data / "f").write_text("x\n")
    assert run_drsync("init", "--repo", repo, "--cluster-id", "c", "--release", "1").code == 0
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", data, "--name", "s").code == 0
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s", "--dest", f"file://{tmp_path / 'bk'}",
                   "--json", cwd=tmp_path)
    assert r.code == 0, r.err
    assert Path(r.json()["path"]).parent == tmp_path / "bk" and not (tmp_path / "file:").exists()
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s", "--dest", "hdfs://nn:9870/bk", cwd=tmp_path)
    assert r.code == 2 and "local directory" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert not (tmp_path / "hdfs:").exists()
