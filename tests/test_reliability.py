"""The reliability suite: randomised fault trials that try to lose data or break the safety rules.

Every scenario draws its faults from one printed seed (tests/reliability.py),
checks the safety rules of DESIGN.md after every trial, counts violations and
lost data instead of stopping at the first, and asserts both are zero at the
end. `make test` runs a short version; `make reliability` the full one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsync.repository import format as fmt
from drsync.repository.repo import Repository
from drsync.storage.local import LocalStorage
from drsync.transport.grpc import GrpcStandbyLink
from tests.conftest import run_drsync, tree_state
from tests.faultproxy import FaultProxy
from tests.group import Group, PrimaryWatcher
from tests.reliability import SEED, record, trials
from tests.test_agents import Pair, wait_for


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    yield p
    p.stop_all()


def hello(address: str):  # type: ignore[no-untyped-def]
    link = GrpcStandbyLink(address)
    try:
        return link.hello("reliability", 0)
    finally:
        link.close()


def root_is_whole_snapshot(cfg: Path, root: Path, snapshot: str, scratch: Path) -> bool:
    """Safety rule 2: the data root is exactly the snapshot recorded as applied."""
    shutil.rmtree(scratch, ignore_errors=True)
    r = run_drsync("snapshot", "restore", snapshot, "--config", cfg, "--target", scratch)
    return r.code == 0 and tree_state(root) == tree_state(scratch)


def random_change(rnd: random.Random, root: Path, n: int) -> None:
    kind = rnd.choice(["big", "small", "delete", "rewrite"])
    if kind == "big":
        (root / "tables" / "orders" / f"r-{n}.bin").write_bytes(rnd.randbytes(rnd.randrange(1, 12) << 20))
    elif kind == "small":
        for i in range(rnd.randrange(1, 40)):
            (root / "catalog" / f"r-{n}-{i}.txt").write_text(f"trial {n} file {i}\n" * rnd.randrange(1, 50))
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        if files:
            victim = rnd.choice(files)
            if kind == "delete":
                victim.unlink()
            else:
                victim.write_bytes(rnd.randbytes(rnd.randrange(1, 2 << 20)))


def test_kill_9_either_agent_at_random_moments(pair: Pair) -> None:
    """kill -9 of the primary or the standby during snapshot, upload, commit or apply."""
    rnd = random.Random(SEED)
    n = trials("kill")
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    violations = lost = 0
    for trial in range(n):
        random_change(rnd, pair.prod, trial)
        acked = hello(pair.standby_addr).applied_captured_at  # what the standby has acknowledged so far
        victim = rnd.choice(["primary", "standby"])
        time.sleep(rnd.uniform(0.0, 1.5))  # the random moment of the cycle is the point of the trial
        pair.kill(victim)
        # Rule 2 is about the root after a restart, so look at it with no apply running: the other
        # agent goes down too (a kill -9 of its own), the standby restarts alone and recovers, and
        # only after the check does the primary come back and ship again.
        pair.kill("standby" if victim == "primary" else "primary")
        pair.start("standby")
        h = hello(pair.standby_addr)
        if h.applied_captured_at < acked:
            lost += 1
        if h.applied_snapshot and not root_is_whole_snapshot(pair.standby_cfg, pair.standby_data, h.applied_snapshot,
                                                            pair.tmp / "scratch"):
            violations += 1
        pair.start("primary")
        wait_for(pair.in_sync, f"the next cycle to complete after trial {trial} (seed {SEED})", timeout=120)
    record("kill -9 primary/standby at random moments", n, n, violations, lost)
    assert violations == 0 and lost == 0, f"seed {SEED}: {violations} torn roots, {lost} lost acknowledgements"


def _flip(path: Path, offset: int) -> int:
    data = bytearray(path.read_bytes())
    old = data[offset]
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    return old


def _unflip(path: Path, offset: int, old: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = old
    path.write_bytes(bytes(data))


def test_bit_flips_on_both_sides_are_always_detected(pair: Pair) -> None:
    """A flipped bit in a chunk or a manifest, on either side: verify, drills and restore all catch it."""
    rnd = random.Random(SEED + 1)
    n = trials("bitflip")
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    pair.stop_all()
    # What the standby records as applied once it is stopped (drills check that one).
    applied = json.loads((pair.tmp / "standby-repo" / "agent" / "state.json").read_text())["applied_snapshot"]
    sides = {"primary": (pair.primary_cfg, pair.tmp / "primary-repo"),
             "standby": (pair.standby_cfg, pair.tmp / "standby-repo")}
    missed = 0
    for trial in range(n):
        side = rnd.choice(sorted(sides))
        cfg, repo_dir = sides[side]
        repo = Repository.open(LocalStorage(str(repo_dir)))
        snap = repo.find_snapshot(applied) if side == "standby" else repo.list_snapshots()[-1]
        if rnd.random() < 0.7:
            cid = rnd.choice(sorted(repo.load_manifest(snap).chunk_ids()))
            loc = repo.index.get(cid)
            assert loc is not None
            path = repo_dir / fmt.pack_name(loc.pack_id)
            offset = loc.offset + rnd.randrange(loc.stored_length)
            what = f"chunk {cid.hex()[:12]} in pack {loc.pack_id}"
        else:
            path = repo_dir / fmt.manifest_name(snap.id)
            offset = rnd.randrange(path.stat().st_size)
            what = f"manifest of {snap.id}"
        old = _flip(path, offset)
        try:
            v = run_drsync("repo", "verify", "--config", cfg)
            checks = {"verify": v.code == 3}
            target = pair.tmp / f"restore-{trial}"
            r = run_drsync("snapshot", "restore", snap.id, "--config", cfg, "--target", target)
            checks["restore"] = r.code == 3 and not (target.exists() and any(target.iterdir()))
            if side == "standby":
                d = run_drsync("drill", "run", "--config", cfg, "--json")
                checks["drill"] = d.code == 1 and json.loads(d.out)["passed"] is False
            if not all(checks.values()):
                missed += 1
                print(f"seed {SEED} trial {trial}: a flipped bit in {what} ({side}) went unnoticed by "
                      f"{[k for k, ok in checks.items() if not ok]}: verify {v.code} {v.err.strip()[:200]}; "
                      f"restore {r.code} {r.err.strip()[:200]}; drill {d.code if side == 'standby' else '-'} "
                      f"{d.err.strip()[:300] if side == 'standby' else ''}")
        finally:
            _unflip(path, offset, old)
        assert run_drsync("repo", "verify", "--config", cfg).code == 0  # and the undone flip is clean again
    record("bit flips in chunks and manifests, both sides", n, n, missed, 0)
    assert missed == 0, f"seed {SEED}: {missed} undetected bit flips"


def test_disk_full_on_the_standby_during_apply(pair: Pair, tmp_path: Path) -> None:
    rnd = random.Random(SEED + 2)
    n = trials("diskfull")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        pair.standby_data = mnt / "data"
        pair.standby_data.mkdir()
        pair.standby_cfg.write_text(pair.standby_cfg.read_text().replace(str(tmp_path / "standby-data"),
                                                                         str(pair.standby_data)))
        pair.start("standby")
        pair.start("primary")
        wait_for(pair.in_sync, "the first shipment")
        violations = 0
        for trial in range(n):
            # The primary's agent is down while the applied snapshot is read and the big file written:
            # every cycle records a new applied snapshot (unchanged content too), and a capture of the
            # file half-written could fit the disk.
            pair.kill("primary", signal.SIGTERM)
            before = hello(pair.standby_addr).applied_snapshot
            failures = pair_log(pair, "primary").count("failed:")
            big = pair.prod / "tables" / f"too-big-{trial}.bin"
            big.write_bytes(rnd.randbytes(rnd.randrange(26, 40) << 20))
            pair.start("primary")
            wait_for(lambda f=failures: pair_log(pair, "primary").count("failed:") > f, "an apply to fail", 60)
            h = hello(pair.standby_addr)  # the standby is alive and serves
            if h.applied_snapshot != before or not root_is_whole_snapshot(pair.standby_cfg, pair.standby_data,
                                                                          before, tmp_path / "scratch"):
                violations += 1
            if "No space left" not in pair_log(pair, "primary") and "space" not in pair_log(pair, "primary"):
                violations += 1  # the error must say what is wrong
            big.unlink()
            wait_for(pair.in_sync, f"recovery once space returns (trial {trial})", 60)
        record("disk full on the standby during apply", n, n, violations, 0)
        assert violations == 0
    finally:
        pair.stop_all()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def pair_log(pair: Pair, name: str) -> str:
    return (pair.tmp / f"{name}.log").read_text(errors="replace")


def test_network_faults_between_agents_and_to_zookeeper(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Drop, delay and cut the primary's shipments and its ZooKeeper connection: never two primaries,
    never a torn apply, and replication resumes."""
    rnd = random.Random(SEED + 3)
    n = trials("network")
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"], session_timeout="2s")
    ship = FaultProxy(g.addr["west"])
    zk = FaultProxy(zk_server.hosts.split(",")[0])
    g.cfg["west"].write_text(g.cfg["west"].read_text().replace('role = "auto"\n',
                                                               f'role = "auto"\nadvertise = "{ship.address}"\n'))
    g.cfg["east"].write_text(g.cfg["east"].read_text().replace(f'zookeeper = "{zk_server.hosts}"',
                                                               f'zookeeper = "{zk.address}"'))
    watcher = PrimaryWatcher(zk_server.hosts, group)
    violations = faults = 0
    try:
        g.start("east")
        g.start("west")
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west"), "the first shipment")
        for trial in range(n):
            random_change(rnd, g.data["east"], trial)
            proxy, mode = rnd.choice([(ship, "drop"), (ship, "cut"), (ship, "delay"), (zk, "drop"), (zk, "cut")])
            proxy.set(mode, delay_s=0.2)
            faults += 1
            time.sleep(rnd.uniform(0.5, 3.5))  # how long the fault lasts is the point of the trial
            proxy.set("pass")
            if mode == "drop":
                proxy.set("cut")  # connections held in the black hole are dead to their peers: drop them
                proxy.set("pass")
            # Look at the standby's root at rest: shipments held off at the proxy, the standby killed
            # and restarted (it finishes or rolls back whatever apply the fault interrupted).
            ship.set("cut")
            g.kill("west")
            g.start("west")
            g.wait_serving("west")
            applied = g.hello("west").applied_snapshot
            if applied and not root_is_whole_snapshot(g.cfg["west"], g.data["west"], applied, tmp_path / "scratch"):
                violations += 1
            ship.set("pass")
            wait_for(lambda: g.in_sync("east", "west"), f"replication to resume after trial {trial} (seed {SEED})",
                     timeout=120)
        holders: dict[int, set[str]] = {}
        for p in watcher.primary:
            if p is not None:
                holders.setdefault(p[1], set()).add(p[0])
        violations += sum(1 for v in holders.values() if len(v) > 1)  # split brain
        violations += sum(1 for who in holders.values() if "west" in who)  # nobody promoted west
        violations += int(watcher.epochs != sorted(watcher.epochs))
    finally:
        watcher.close()
        g.stop_all()
        ship.close()
        zk.close()
    record("network faults (agents and ZooKeeper)", n, faults, violations, 0)
    assert violations == 0, f"seed {SEED}: {violations} violations"


# --- fuzzing every parser and handler that takes outside input -----------------------------------

def _fuzz_settings():  # type: ignore[no-untyped-def]
    from hypothesis import HealthCheck, settings

    return settings(max_examples=trials("fuzz"), deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def test_fuzz_manifests_configs_and_documents(tmp_path: Path) -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    from drsync.config import config_from_dict
    from drsync.errors import DrsyncError
    from drsync.repository.manifest import Manifest
    from drsync.repository.manifest_check import validate
    from drsync.repository.snapshots import SnapshotInfo

    counted = {"n": 0}
    valid = Manifest.from_columns({"path": ["a", "a/b"], "type": ["dir", "file"], "mode": [0o755, 0o644],
                                   "uid": [0, 0], "gid": [0, 0], "size": [0, 3], "mtime_ns": [0, 0],
                                   "ctime_ns": [0, 0], "inode": [0, 0], "content": [None, None],
                                   "target": [None, None], "chunks": [[], [b"\x01" * 32]],
                                   "chunk_sizes": [[], [3]]}).to_bytes()

    @_fuzz_settings()
    @given(st.one_of(st.binary(max_size=2048),
                     st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)).map(
                         lambda t: valid[:t[0]] + bytes([valid[t[0]] ^ t[1]]) + valid[t[0] + 1:])))
    def manifests(data: bytes) -> None:
        counted["n"] += 1
        try:
            validate(Manifest.from_bytes(data, "fuzzed manifest"), "fuzzed manifest")
        except DrsyncError:
            pass

    paths = st.text(alphabet="ab/.\x00 ", min_size=0, max_size=12)

    @_fuzz_settings()
    @given(st.lists(st.tuples(paths, st.sampled_from(["file", "dir", "symlink", "x"]), paths), max_size=5))
    def manifest_paths(rows: list[tuple[str, str, str]]) -> None:
        counted["n"] += 1
        try:
            m = Manifest.from_columns({
                "path": [r[0] for r in rows], "type": [r[1] for r in rows], "mode": [0o644] * len(rows),
                "uid": [0] * len(rows), "gid": [0] * len(rows), "size": [0] * len(rows),
                "mtime_ns": [0] * len(rows), "ctime_ns": [0] * len(rows), "inode": [0] * len(rows),
                "content": [None] * len(rows), "target": [r[2] for r in rows], "chunks": [[] for _ in rows],
                "chunk_sizes": [[] for _ in rows]})
            validate(m, "fuzzed manifest")
        except DrsyncError:
            return
        for r in rows:  # what validation lets through never leaves the root
            assert not r[0].startswith("/") and ".." not in r[0].split("/")

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                        st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3))
    sections = st.sampled_from(["cluster", "agent", "coordination", "replication", "snapshots", "backups",
                                "drills", "tls", "bogus"])
    keys = st.sampled_from(["id", "release", "data", "repository", "name", "role", "listen", "interval", "keep",
                            "session_timeout", "failover", "sample", "full_every", "ca", "mode", "zookeeper"])

    @_fuzz_settings()
    @given(st.dictionaries(sections, st.one_of(scalars, st.dictionaries(keys, scalars, max_size=6)), max_size=5))
    def configs(doc: dict) -> None:  # type: ignore[type-arg]
        counted["n"] += 1
        try:
            config_from_dict(doc)
        except DrsyncError:
            pass

    @_fuzz_settings()
    @given(st.one_of(st.binary(max_size=512), st.dictionaries(st.sampled_from(
        ["id", "captured_at", "cluster_id", "release", "manifest_hash", "format", "kind", "files"]), scalars,
        max_size=8).map(lambda d: json.dumps(d).encode())))
    def snapshot_docs(data: bytes) -> None:
        counted["n"] += 1
        try:
            SnapshotInfo.from_bytes(data, "fuzzed snapshot document")
        except DrsyncError:
            pass

    for fuzz in (manifests, manifest_paths, configs, snapshot_docs):
        fuzz()
    record("fuzz: manifests, paths, configs, snapshot docs", counted["n"], counted["n"], 0, 0)


def test_fuzz_the_standby_rpc_handlers(pair: Pair) -> None:
    """Random shipments over real gRPC: only clean refusals, and the standby keeps serving and stays whole."""
    from hypothesis import given
    from hypothesis import strategies as st

    from drsync.errors import DrsyncError
    from drsync.transport import ReceivedChunk

    pair.start("standby")
    before = tree_state(pair.standby_data)
    counted = {"n": 0}
    link = GrpcStandbyLink(pair.standby_addr)
    ids = st.binary(min_size=0, max_size=40)
    chunk = st.builds(ReceivedChunk, ids, st.integers(-1, 4), st.integers(-5, 1 << 21), st.binary(max_size=256))

    @_fuzz_settings()
    @given(st.integers(0, 3), st.lists(ids, max_size=4), st.lists(chunk, max_size=3), st.binary(max_size=300),
           st.binary(max_size=300))
    def shipments(epoch: int, ask: list[bytes], upload: list[ReceivedChunk], doc: bytes, manifest: bytes) -> None:
        counted["n"] += 1
        for call in (lambda: list(link.missing(epoch, iter([ask]))),
                     lambda: link.upload(epoch, iter([upload])),
                     lambda: link.commit(epoch, "fuzzer", doc, iter([manifest]))):
            try:
                call()
            except DrsyncError:
                pass

    try:
        shipments()
    finally:
        link.close()
    assert GrpcStandbyLink(pair.standby_addr).health()
    assert tree_state(pair.standby_data) == before  # nothing fuzzed was ever applied
    assert pair.procs["standby"].poll() is None
    record("fuzz: standby gRPC handlers", counted["n"], counted["n"], 0, 0)


WRITER = """
import os, sys, time
root, log, pidfile = sys.argv[1], sys.argv[2], sys.argv[3]
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
os.makedirs(os.path.join(root, "writes"), exist_ok=True)
n = 0
while True:
    name = f"w-{os.getpid()}-{n}.txt"
    with open(os.path.join(root, "writes", name), "w") as f:
        f.write(f"write {n} of writer {os.getpid()}\\n")
        f.flush()
        os.fsync(f.fileno())
    with open(log, "a") as f:  # logged only once the file is durable: a logged write must never be lost
        f.write(name + "\\n")
    n += 1
    time.sleep(0.02)
"""

FENCE = """#!/bin/sh
# The trial's fence: 'ok' stops production's writer for sure (kills it by pid), 'fail' cannot reach it.
dir=$(dirname "$0")
if [ "$(cat "$dir/fence-mode")" = ok ]; then
    kill -9 "$(cat "$dir/writer.pid")" 2>/dev/null
    echo "$DRSYNC_FENCE_AGENT $DRSYNC_EPOCH" >> "$dir/fenced.log"
    exit 0
fi
echo "fence target unreachable" >&2
exit 1
"""


class Writer:
    """Production's application: a process that keeps writing files into the primary's data root."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / "writer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, root: Path) -> None:
        import sys

        self.stop()
        pidfile = self.tmp / "writer.pid"
        pidfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(self.log), str(pidfile)])
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the writer to start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def written(self) -> set[str]:
        return set(self.log.read_text().split()) if self.log.exists() else set()


def _held(g: Group, name: str) -> str:
    """The snapshot the deletion guard holds on ``name`` ("" when none)."""
    r = g.drsync(name, "apply", "--json")
    return str(r.json().get("snapshot") or "") if r.code == 0 and r.json().get("held") else ""


def _kept_snapshots(g: Group, name: str, scratch: Path) -> set[str]:
    """File names under writes/ in every before-rejoin snapshot of ``name``."""
    found: set[str] = set()
    for s in g.drsync(name, "snapshot", "list", "--json").json():
        if s["name"].startswith("before-rejoin"):
            target = scratch / s["id"]
            if not target.exists():
                assert g.drsync(name, "snapshot", "restore", s["id"], "--target", str(target)).code == 0
            found |= {p.name for p in (target / "writes").glob("*")} if (target / "writes").exists() else set()
    return found


def test_agent_stops_kills_and_freezes_under_automatic_failover(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Safety rule 7 with production writing: SIGTERM, kill -9 or SIGSTOP of the primary's agent, with a
    fence that works or fails. A promotion without a successful fence, a promotion after a clean stop,
    two primaries at one epoch, or a write that is neither on the new primary nor kept on the old one
    count as violations / lost data."""
    rnd = random.Random(SEED + 7)
    n = trials("fencing")
    fence = tmp_path / "fence.sh"
    fence.write_text(FENCE)
    (tmp_path / "fence-mode").write_text("ok")
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"], session_timeout="2s", failover="automatic",
              extra=f'failover_cooldown = "0s"\nfence_command = "sh {fence}"\nfence_timeout = "10s"\n'
                    f'demote_command = "true"')
    watcher = PrimaryWatcher(zk_server.hosts, group)
    writer = Writer(tmp_path)
    violations = lost = faults = 0
    current, other = "east", "west"
    try:
        g.start("east")
        g.start("west")
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west"), "the first shipment")
        writer.start(g.data[current])
        for trial in range(n):
            fault = rnd.choice(["sigterm", "kill9-fence-fails", "kill9", "freeze"])
            print(f"trial {trial}: {fault} of {current}")
            faults += 1
            epoch = g.coord.read_epoch().epoch
            fenced_before = len((tmp_path / "fenced.log").read_text().split("\n")) if \
                (tmp_path / "fenced.log").exists() else 1
            wait_for(lambda o=other: g.record(o).get("role") == "standby" and g.record(o).get("applied_snapshot"),
                     f"{other} to be a caught-up standby (trial {trial}, seed {SEED})")
            if fault == "sigterm":
                g.kill(current, signal.SIGTERM)
                wait_for(lambda o=other: "stopped on purpose" in g.log(o), f"{other} to see the maintenance marker")
                violations += int(g.coord.read_epoch().epoch != epoch)
                g.start(current)
                wait_for(lambda c=current, e=epoch: g.primary() == (c, e), f"{current} back as primary")
                violations += int(g.coord.read_maintenance() is not None)
                continue
            if fault == "kill9-fence-fails":
                (tmp_path / "fence-mode").write_text("fail")
                before = g.log(other).count("automatic failover refused")
                g.kill(current)
                wait_for(lambda o=other, b=before: g.log(o).count("automatic failover refused") >= b + 2,
                         f"{other} to try the failing fence twice", timeout=90)
                violations += int(g.coord.read_epoch().epoch != epoch)  # no promotion without a fence
                (tmp_path / "fence-mode").write_text("ok")
                g.start(current)
                wait_for(lambda c=current: g.primary() is not None, "a primary again")
                if g.primary() == (current, epoch):
                    continue
                # The fence now works and the standby got there first: a real failover after all.
            elif fault == "kill9":
                g.kill(current)
            else:
                g.procs[current].send_signal(signal.SIGSTOP)
            wait_for(lambda o=other, e=epoch: g.primary() == (o, e + 1), f"{other} to take over (trial {trial})",
                     timeout=60)
            fenced_now = len((tmp_path / "fenced.log").read_text().split("\n"))
            violations += int(fenced_now <= fenced_before)  # promoted without a successful fence
            if fault == "freeze":
                g.procs[current].send_signal(signal.SIGCONT)
            else:
                g.start(current)
            g.wait_role(current, "standby", timeout=90)  # demote_command succeeded: it rejoins by itself
            writer.stop()  # the fence killed it already; make sure
            # Its root held the writer's unshipped files: when they are many next to the rest, the deletion
            # guard holds the resync (they are kept in the before-rejoin snapshot); an operator confirms it.
            wait_for(lambda c=current, o=other: g.in_sync(o, c) or _held(g, c), f"{current} to resync or hold "
                     f"(trial {trial})", timeout=90)
            if not g.in_sync(other, current) and _held(g, current):
                held = _held(g, current)
                assert g.drsync(current, "apply", "--confirm", held).code == 0
            wait_for(lambda c=current, o=other: g.in_sync(o, c), f"{current} to resync (trial {trial})", timeout=90)
            # Kept means on the new primary, or in a before-rejoin snapshot of either agent (writes
            # after an earlier failover's last shipment stay in that earlier ex-primary's snapshot).
            have = {p.name for p in (g.data[other] / "writes").glob("*")}
            for name in g.names:
                have |= _kept_snapshots(g, name, tmp_path / "scratch")
            lost += len(writer.written() - have)
            current, other = other, current
            writer.start(g.data[current])
        holders: dict[int, set[str]] = {}
        for p in watcher.primary:
            if p is not None:
                holders.setdefault(p[1], set()).add(p[0])
        violations += sum(1 for v in holders.values() if len(v) > 1)
        violations += int(watcher.epochs != sorted(watcher.epochs))
    finally:
        writer.stop()
        watcher.close()
        g.stop_all()
    record("agent stop/kill/freeze, automatic failover", n, faults, violations, lost)
    assert violations == 0 and lost == 0, f"{violations} violations, {lost} writes lost (seed {SEED})"


def test_rogue_peers_with_random_senders_and_epochs_are_refused(tmp_path: Path, zk_server, group: str) -> None:  # type: ignore[no-untyped-def]
    """Safety rule 1 against peers that lie: a shipping request (Negotiate, Upload, Commit) from any sender
    at any epoch is accepted only when it is the agent ZooKeeper's epoch names at that epoch, and no
    request moves the standby's epoch floor away from ZooKeeper's epoch."""
    from drsync.errors import DrsyncError
    from drsync.repository.chunks import chunk_id
    from drsync.transport import ReceivedChunk

    rnd = random.Random(SEED + 11)
    n = trials("rogue")
    g = Group(tmp_path, zk_server.hosts, group, ["east", "west"])
    violations = faults = 0
    try:
        g.start("east")
        g.start("west")
        assert g.promote("east").code == 0
        wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"),
                 "west to apply production")
        for trial in range(n):
            zk = g.coord.read_epoch()
            current, named = zk.epoch, zk.promoted_by
            sender = rnd.choice(["rogue", "east", "west", "", "EAST"])
            epoch = rnd.choice([0, current - 1, current, current + 1, 2**62, 2**63 - 1])
            rpc = rnd.choice(["negotiate", "upload", "commit"])
            allowed = (sender, epoch) == (named, current)
            faults += int(not allowed)
            data = f"rogue trial {trial} (seed {SEED})".encode()
            link = GrpcStandbyLink(g.addr["west"], sender=sender)
            try:
                try:
                    if rpc == "negotiate":
                        list(link.missing(epoch, iter([[b"\0" * 32]])))
                    elif rpc == "upload":
                        link.upload(epoch, iter([[ReceivedChunk(chunk_id(data), fmt.ENC_RAW, len(data), data)]]))
                    else:
                        link.commit(epoch, sender, b"{}", iter([b"x"]))
                    outcome = "accepted"
                except DrsyncError as e:
                    outcome = f"refused: {type(e).__name__}: {str(e)[:160]}"
                floor = link.hello("t", 0).epoch
            finally:
                link.close()
            now = g.coord.read_epoch().epoch
            print(f"trial {trial}: {rpc} from {sender!r} at epoch {epoch} (ZooKeeper: {named}@{current}): "
                  f"{outcome}; west's floor {floor}")
            if outcome == "accepted" and not allowed:
                violations += 1
                print(f"  VIOLATION (seed {SEED}): a {rpc} from {sender!r}@{epoch} was accepted")
            if floor != now:
                violations += 1
                print(f"  VIOLATION (seed {SEED}): west's epoch floor is {floor}, ZooKeeper's epoch {now}")
        # The real primary still ships.
        (g.data["east"] / "catalog" / "after-rogues.txt").write_text("written after the rogue requests\n")
        wait_for(lambda: (g.data["west"] / "catalog" / "after-rogues.txt").exists(),
                 f"west to receive a change after the rogue requests (seed {SEED})")
        wait_for(lambda: g.in_sync("east", "west"), "west to match east again")
    finally:
        g.stop_all()
    record("rogue peers: epochs and senders", n, faults, violations, 0)
    assert violations == 0, f"seed {SEED}: {violations} violations"


def _non_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def _standby_apply_state(pair: Pair) -> dict:  # type: ignore[type-arg]
    r = run_drsync("apply", "--json", "--config", pair.standby_cfg)
    assert r.code == 0, r.err
    return r.json()  # type: ignore[no-any-return]


def test_deletion_guard_with_random_deletion_fractions(pair: Pair) -> None:
    """Safety rule 8: a shipment that removes more than max_delete_fraction (0.5) of the files of the standby's
    applied snapshot is held, one that removes at most that is applied, and the root never moves while held."""
    from tests.group import scrape
    from tests.group import wait_for as until  # returns what the condition returned

    rnd = random.Random(SEED + 12)
    n = trials("deletion")
    shutil.rmtree(pair.prod)
    (pair.prod / "files").mkdir(parents=True)
    made = {"n": 0}

    def add(count: int) -> None:  # fresh files, each with its own content (never taken for a rename)
        for _ in range(count):
            i = made["n"]
            (pair.prod / "files" / f"g{i:05}.txt").write_text(f"file {i} of the deletion-fraction trials\n")
            made["n"] += 1

    def held() -> bool:
        return scrape(pair.metrics["standby"], "default", "standby").get("drsync_apply_held") == 1

    add(40)
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    violations = faults = 0
    for trial in range(n):
        f = 0.5 if rnd.random() < 0.25 else rnd.random()
        before = tree_state(pair.standby_data)
        total = len(_non_dirs(pair.standby_data))
        k = min(total - 1, round(f * total))  # an emptied root is never captured (test_capture)
        over = k / total > 0.5
        faults += int(over)
        # One change, never captured half-way: the primary's agent is down while production loses its files.
        pair.kill("primary", signal.SIGTERM)
        for p in rnd.sample(_non_dirs(pair.prod), k):
            p.unlink()
        pair.start("primary")
        outcome = until(lambda: "applied" if pair.in_sync() else "held" if held() else "",
                           f"the standby to apply or hold trial {trial} (seed {SEED})", timeout=90)
        print(f"trial {trial}: removed {k} of {total} files ({k / total:.1%}): {outcome}")
        if outcome == "held":
            state = _standby_apply_state(pair)
            refused = state["refused"]
            wait_for(lambda r=refused: _standby_apply_state(pair)["refused"] > r, "a later shipment refused too")
            if not over:
                violations += 1
                print(f"  VIOLATION (seed {SEED}): held at {k / total:.1%}: {state.get('message')}")
            if tree_state(pair.standby_data) != before:
                violations += 1
                print(f"  VIOLATION (seed {SEED}): the standby's root changed while held")
            r = run_drsync("apply", "--confirm", state["snapshot"], "--config", pair.standby_cfg)
            assert r.code == 0, r.err
        elif over:
            violations += 1
            print(f"  VIOLATION (seed {SEED}): applied a shipment removing {k / total:.1%} of the files")
        wait_for(pair.in_sync, f"the standby to match production after trial {trial}")
        add(k)
        wait_for(pair.in_sync, f"the standby to follow the restored production (trial {trial})")
    record("deletion guard: random deletion fractions", n, faults, violations, 0)
    assert violations == 0, f"seed {SEED}: {violations} violations"


def test_lag_with_one_agent_restarted_under_a_random_clock_skew(pair: Pair) -> None:
    """The standby's lag metric stays within 2 s of the truth (the primary's clock minus the capture time of
    the applied snapshot) when one agent at a time restarts with its clock up to 10 minutes off."""
    from tests.group import scrape
    from tests.test_clock_skew import ACCURACY_S, faketime_env
    from tests.users import start_agent

    rnd = random.Random(SEED + 13)
    n = trials("skew")
    skew = {"primary": 0.0, "standby": 0.0}
    pair.start("standby")
    pair.start("primary")
    wait_for(pair.in_sync, "the first shipment")
    violations = 0
    for trial in range(n):
        victim = rnd.choice(["standby", "primary"])
        skew[victim] = rnd.uniform(-600, 600)
        pair.kill(victim, signal.SIGTERM)
        cfg = pair.standby_cfg if victim == "standby" else pair.primary_cfg
        env = {**faketime_env(0), "FAKETIME": f"{skew[victim]:+.3f}"}
        pair.procs[victim] = start_agent(cfg, pair.tmp / f"{victim}.log", env)
        if victim == "standby":
            wait_for(lambda: GrpcStandbyLink(pair.standby_addr).health(), "the restarted standby to serve")
        # The next applied snapshot: one captured after the restart (it holds this change).
        (pair.prod / "catalog" / f"skew-{trial}.txt").write_text(f"trial {trial}\n")
        wait_for(pair.in_sync, f"the change of trial {trial} to be applied (seed {SEED})")
        # The truth, as test_clock_skew reads it: the primary's clock (this one plus its skew) minus the
        # capture time of the applied snapshot, read just before and after the scrape.
        t0 = time.time()
        m = scrape(pair.metrics["standby"], "default", "standby")
        t1 = time.time()
        lag, captured = m["drsync_replication_lag_seconds"], m["drsync_last_applied_snapshot_timestamp_seconds"]
        lo, hi = t0 + skew["primary"] - captured, t1 + skew["primary"] - captured
        err = max(lo - lag, lag - hi, 0.0)
        print(f"trial {trial}: {victim} restarted at {skew[victim]:+.3f}s (primary {skew['primary']:+.3f}s, "
              f"standby {skew['standby']:+.3f}s): lag {lag:.3f}s, {err:.3f}s off the truth")
        if err > ACCURACY_S:
            violations += 1
            print(f"  VIOLATION (seed {SEED}): lag {lag:.3f}s is {err:.3f}s off the truth")
    record("clock skew on one agent", n, n, violations, 0)
    assert violations == 0, f"seed {SEED}: {violations} lag errors over {ACCURACY_S} s"


def test_reliability_table_is_printed_with_the_seed() -> None:
    from tests import reliability

    lines = reliability.table()
    assert str(SEED) in lines[0] and "violations" in lines[1]
    assert os.environ.get("DRSYNC_SEED", str(SEED)) == str(SEED)





def test_snapshot_documents_cannot_name_paths() -> None:
    """A snapshot id from a peer becomes a file name: one that is a path is refused before any write."""
    from drsync.errors import IntegrityError
    from drsync.repository.snapshots import SnapshotInfo

    doc = {"id": "../../outside", "captured_at": "2026-11-24T10:00:00Z", "cluster_id": "a", "release": "1",
           "manifest_hash": "00"}
    with pytest.raises(IntegrityError, match="id has the wrong type or form"):
        SnapshotInfo.from_bytes(json.dumps(doc).encode(), "shipped snapshot document")
    doc["id"] = "0123456789abcdef"
    assert SnapshotInfo.from_bytes(json.dumps(doc).encode(), "ok").id == "0123456789abcdef"


def test_fuzz_webhdfs_responses() -> None:
    """Whatever a namenode or datanode answers, the HDFS client ends in a drsync error, never a crash."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from hypothesis import given
    from hypothesis import strategies as st

    from drsync.dataroot.hdfs import walk
    from drsync.errors import DrsyncError
    from drsync.storage.hdfs import HdfsFs, HdfsStorage, parse_hdfs_url

    answer: dict[str, object] = {"status": 200, "body": b"", "location": None}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            elif self.headers.get("Transfer-Encoding") == "chunked":
                while (size := int(self.rfile.readline().strip() or b"0", 16)) != 0:
                    self.rfile.read(size + 2)
                self.rfile.readline()
            body = answer["body"]
            assert isinstance(body, bytes)
            self.send_response(int(answer["status"]))  # type: ignore[call-overload]
            if answer["location"]:
                self.send_header("Location", str(answer["location"]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = _any

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    here = f"http://127.0.0.1:{srv.server_address[1]}"
    fs = HdfsFs(parse_hdfs_url(f"hdfs://127.0.0.1:{srv.server_address[1]}/r?user=f"), retry_s=0, timeout_s=5)
    counted = {"n": 0, "errors": 0}

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.text(max_size=8),
                       st.sampled_from(["FILE", "DIRECTORY", "SYMLINK", "755", "9", "../x", "a/b"]))
    status_doc = st.fixed_dictionaries({}, optional={
        k: scalar for k in ("pathSuffix", "type", "length", "modificationTime", "permission", "fileId", "symlink")})
    docs = st.one_of(
        st.binary(max_size=64),
        st.builds(lambda s: {"FileStatus": s}, status_doc),
        st.builds(lambda e, r: {"DirectoryListing": {"partialListing": {"FileStatuses": {"FileStatus": e}},
                                                     "remainingEntries": r}}, st.lists(status_doc, max_size=3),
                  scalar),
        st.builds(lambda e, m: {"RemoteException": {"exception": e, "message": m}},
                  st.sampled_from(["StandbyException", "SafeModeException", "AccessControlException",
                                   "FileNotFoundException", "DSQuotaExceededException", "Weird", 7]), scalar),
        st.builds(lambda b: {"boolean": b}, scalar),
        st.builds(lambda d: {"SnapshotDiffReport": {"diffList": d}},
                  st.lists(st.fixed_dictionaries({}, optional={"type": scalar, "sourcePath": scalar}), max_size=2)),
        st.dictionaries(st.text(max_size=6), scalar, max_size=3),
    ).map(lambda d: d if isinstance(d, bytes) else json.dumps(d).encode())
    calls = [
        lambda: fs.status("/r/x"), lambda: list(fs.list_dir("/r")), lambda: fs.read("/r/x"),
        lambda: fs.write("/r/x", b"data"), lambda: fs.rename("/r/a", "/r/b"), lambda: fs.mkdirs("/r/d"),
        lambda: fs.delete("/r/x"), lambda: fs.create_snapshot("/r", "s"), lambda: fs.snapshot_diff("/r", "a", "b"),
        lambda: walk(fs, "/r"), lambda: HdfsStorage(fs.location, fs=fs).list("p/"),
    ]

    @_fuzz_settings()
    @given(st.sampled_from([200, 201, 307, 400, 401, 403, 404, 500]), docs, st.booleans(), st.integers(0, 10))
    def responses(status: int, body: bytes, redirect: bool, which: int) -> None:
        counted["n"] += 1
        answer.update(status=status, body=body, location=f"{here}/webhdfs/v1/dn" if redirect else None)
        try:
            calls[which]()
        except DrsyncError:
            counted["errors"] += 1

    try:
        responses()
    finally:
        srv.shutdown()
    assert counted["errors"] > 0  # the fuzzer did reach the error paths
    record("fuzz: WebHDFS responses", counted["n"], counted["n"], 0, 0)
