"""replication.mode = "continuous": the pure cadence, the watcher on real directories (and a kernel that
misbehaves for it alone), and real agents whose interval is an hour, so that only notification can
bring a change to the standby."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from drsync import engine
from drsync.agent.cadence import CHANGE, FIRST, HEARTBEAT, INTERVAL, POLL, REQUEST, RETRY, Cadence, next_capture
from drsync.agent.watcher import RootWatcher, WatchError
from drsync.config import config_from_dict
from drsync.errors import ConfigError
from tests.conftest import run_drsync
from tests.group import SLOW, wait_for
from tests.test_agents import Pair

# --- the cadence: pure ------------------------------------------------------------------------------

CONT = Cadence("continuous", interval=60.0, min_interval=1.0, settle=0.2)


def test_the_first_capture_and_a_request_are_due_at_once() -> None:
    first = next_capture(CONT, now=5.0, last_start=None)
    assert first.due and first.trigger == FIRST
    asked = next_capture(CONT, now=5.0, last_start=4.9, first_change=None, watching=True, requested=True)
    assert asked.due and asked.trigger == REQUEST


def test_interval_mode_captures_every_interval_whatever_changes() -> None:
    c = Cadence("interval", interval=300.0)
    n = next_capture(c, now=110.0, last_start=100.0, first_change=101.0, watching=True)
    assert (n.wait_s, n.trigger) == (290.0, INTERVAL)
    assert next_capture(c, now=400.0, last_start=100.0).due


def test_a_change_is_captured_a_settle_delay_after_it() -> None:
    n = next_capture(CONT, now=110.0, last_start=100.0, first_change=110.0, watching=True)
    assert n.trigger == CHANGE and n.wait_s == pytest.approx(0.2)
    # Later events of the burst do not push it back: the first change counts.
    assert next_capture(CONT, now=110.2, last_start=100.0, first_change=110.0, watching=True).due


def test_min_interval_is_the_floor_and_a_busy_root_is_captured_every_min_interval() -> None:
    # A change right after a capture waits for min_interval from that capture's start.
    n = next_capture(CONT, now=100.1, last_start=100.0, first_change=100.05, watching=True)
    assert n.trigger == CHANGE and n.wait_s == pytest.approx(0.9)
    # A root that never goes quiet: the change pending since before the last capture ended is due
    # min_interval after that capture started, never starved by newer events.
    starts = [0.0]
    for _ in range(5):
        first = starts[-1] + 0.01  # events never stop
        n = next_capture(CONT, now=first, last_start=starts[-1], first_change=first, watching=True)
        starts.append(first + n.wait_s)
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [1.0] * 5


def test_without_changes_the_heartbeat_is_the_interval() -> None:
    n = next_capture(CONT, now=130.0, last_start=100.0, first_change=None, watching=True)
    assert (n.wait_s, n.trigger) == (30.0, HEARTBEAT)
    # A change so late that the heartbeat comes first is captured by the heartbeat.
    n = next_capture(CONT, now=159.9, last_start=100.0, first_change=159.9, watching=True)
    assert n.trigger == HEARTBEAT and n.wait_s == pytest.approx(0.1)


def test_without_notification_continuous_mode_polls_every_min_interval() -> None:
    n = next_capture(CONT, now=100.25, last_start=100.0, first_change=None, watching=False)
    assert n.trigger == POLL and n.wait_s == pytest.approx(0.75)


def test_a_failed_capture_waits_for_its_backoff_whatever_changes() -> None:
    n = next_capture(CONT, now=100.0, last_start=99.0, first_change=99.5, watching=True, retry_at=104.0)
    assert (n.wait_s, n.trigger) == (4.0, RETRY)


# --- configuration -----------------------------------------------------------------------------------

def _cfg(replication: dict[str, object]) -> dict[str, object]:
    return {"cluster": {"id": "a", "release": "1", "data": "/srv/data", "repository": "/srv/repo"},
            "replication": replication}


def test_mode_keys_are_validated_and_named(tmp_path: Path) -> None:
    cfg = config_from_dict(_cfg({"mode": "continuous", "interval": "1h", "min_interval": "2s", "settle": "150ms"}))
    assert Cadence.of(cfg) == Cadence("continuous", 3600.0, 2.0, 0.15)
    assert config_from_dict(_cfg({})).replication.mode == "interval"
    with pytest.raises(ConfigError, match=r"replication\.mode: 'streaming' is not one of interval, continuous"):
        config_from_dict(_cfg({"mode": "streaming"}))
    with pytest.raises(ConfigError, match=r"^replication\.min_interval \(600s\) is longer than replication\.interval"):
        config_from_dict(_cfg({"mode": "continuous", "interval": "5m", "min_interval": "10m"}))
    with pytest.raises(ConfigError, match=r"replication\.min_interval: must be longer than 0"):
        config_from_dict(_cfg({"min_interval": "0s"}))
    with pytest.raises(ConfigError, match=r"^replication\.min_interval \(0\.001s\) is below 100ms"):
        config_from_dict(_cfg({"mode": "continuous", "min_interval": "1ms"}))
    with pytest.raises(ConfigError, match=r"^replication\.settle \(600s\) is longer than replication\.interval"):
        config_from_dict(_cfg({"mode": "continuous", "interval": "5m", "settle": "10m"}))
    # The command line: exit 2, one line naming the key.
    p = tmp_path / "bad.toml"
    p.write_text('[cluster]\nid = "a"\nrelease = "1"\ndata = "/srv/data"\nrepository = "/srv/repo"\n'
                 '[replication]\nmode = "continuous"\ninterval = "5s"\nmin_interval = "1m"\n')
    r = run_drsync("agent", "--config", p)
    assert r.code == 2 and "replication.min_interval" in r.err and len(r.err.strip().splitlines()) == 1
    r = run_drsync("config", "check", "--config", p, "--json")
    assert r.code == 2 and any("replication.min_interval" in c["detail"] for c in json.loads(r.out)["checks"])


# --- the watcher on a real directory -------------------------------------------------------------------

@pytest.fixture
def watched(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    (root / "data" / "deep").mkdir(parents=True)
    (root / "data" / "deep" / "old.txt").write_text("old")
    (root / ".state").mkdir()
    (root / "repo" / "packs").mkdir(parents=True)
    woke = threading.Event()
    w = RootWatcher(str(root), exclude=[str(root / ".state"), str(root / "repo")], on_change=woke.set)
    w.start()
    yield root, w, woke
    w.stop()


def test_the_watcher_sees_changes_anywhere_in_the_tree_and_wakes_once_per_batch(watched) -> None:  # type: ignore[no-untyped-def]
    root, w, woke = watched
    assert w.take() is None and w.coverage_problem() is None and w.problem() is None
    (root / "data" / "deep" / "old.txt").write_text("new")
    wait_for(woke.is_set, "a write deep in the tree to be notified", 10)
    first = w.first_change
    assert first is not None
    woke.clear()
    os.chmod(root / "data" / "deep" / "old.txt", 0o600)
    os.rename(root / "data" / "deep" / "old.txt", root / "data" / "moved.txt")
    wait_for(lambda: w.changes >= 3, "more changes of the batch", 10)
    assert not woke.is_set() and w.first_change == first  # the batch keeps its first change
    assert w.take() == first and w.take() is None
    (root / "data" / "moved.txt").unlink()
    wait_for(lambda: w.first_change is not None, "a deletion to be notified", 10)


def test_a_change_of_metadata_alone_is_a_change(watched) -> None:  # type: ignore[no-untyped-def]
    """chmod, chown, utime and an extended attribute change what a capture records, and nothing else
    happens to the file: each alone must wake the agent (watchdog 7 reports them as Attrib events)."""
    root, w, _ = watched
    f, d = root / "data" / "deep" / "old.txt", root / "data" / "deep"
    uid = 1 if os.geteuid() == 0 else os.getuid()
    steps = [("chmod of a file", f, lambda: os.chmod(f, 0o600)),
             ("chmod of a directory", d, lambda: os.chmod(d, 0o700)),
             ("utime of a file", f, lambda: os.utime(f, (1, 1))),
             ("chown of a file", f, lambda: os.chown(f, uid, uid)),
             ("an extended attribute", f, lambda: os.setxattr(f, "user.drsync-test", b"1"))]
    for what, path, change in steps:
        wait_for(lambda: w.take() is None, f"quiet before {what}", 10)  # what came before belongs to no step
        change()
        wait_for(lambda: w.first_change is not None, f"{what} to be notified", 10)
        assert w.first_path == str(path), what


def test_new_directories_are_watched_and_a_burst_inside_them_is_seen(watched) -> None:  # type: ignore[no-untyped-def]
    root, w, _ = watched
    (root / "burst" / "a" / "b").mkdir(parents=True)
    wait_for(lambda: w.first_change is not None, "the new directories", 10)
    # Once the new directories hold watches, a write inside them is a change of its own.
    wait_for(lambda: w.coverage_problem() is None, "watches on the new directories", 10)
    w.take()
    for i in range(20):
        (root / "burst" / "a" / "b" / f"f{i}").write_bytes(b"x" * i)
    wait_for(lambda: w.first_change is not None, "writes in a new subdirectory", 10)


def test_drsyncs_own_paths_and_reads_are_no_change(watched) -> None:  # type: ignore[no-untyped-def]
    root, w, _ = watched
    (root / ".state" / "state.json").write_text("{}")
    (root / "repo" / "packs" / "p1").write_bytes(b"chunk" * 1000)
    (root / "repo" / "new-dir").mkdir()
    (root / "data" / "deep" / "old.txt").read_text()
    os.listdir(root / "data" / "deep")
    # A sentinel change last: events come in order, so a change before it would have been the first.
    (root / "sentinel").write_text("!")
    wait_for(lambda: w.first_change is not None, "the sentinel", 10)
    assert w.first_path == str(root / "sentinel"), "a read or drsync's own path counted as a change"


def test_a_replaced_root_ends_notification(watched) -> None:  # type: ignore[no-untyped-def]
    root, w, _ = watched
    os.rename(root, root.parent / "old-root")
    (root).mkdir()
    problem = w.problem()
    assert problem and "replaced" in problem


def test_notification_comes_back_after_a_fallback_without_a_restart(tmp_path: Path) -> None:
    """A replaced root ends notification (captures every min_interval); WATCH_RETRY_S later the schedule
    watches the root again by itself, and captures at once what changed meanwhile."""
    from drsync.agent.continuous import WATCH_RETRY_S, CaptureSchedule
    from drsync.metrics import AgentMetrics, new_registry

    root = tmp_path / "root"
    root.mkdir()
    now = [1000.0]
    cfg = config_from_dict(_cfg({"mode": "continuous", "interval": "1h"}))
    metrics = AgentMetrics(new_registry(), group="g", agent="a")
    s = CaptureSchedule(cfg, data_root=str(root), exclude=[], metrics=metrics, wake=lambda: None, name="a",
                        clock=lambda: now[0])
    try:
        s.set_active(True)
        assert s.watcher is not None and metrics.change_watch._value.get() == 1
        os.rename(root, tmp_path / "old-root")
        root.mkdir()
        s.next()
        assert s.watcher is None and "replaced" in s.fallback
        now[0] += WATCH_RETRY_S - 1
        s.set_active(True)
        assert s.watcher is None, "retried before WATCH_RETRY_S"
        now[0] += 1
        s.set_active(True)
        assert s.watcher is not None and not s.fallback and s.requested
        assert metrics.change_watch._value.get() == 1
        (root / "new.txt").write_text("seen again")
        wait_for(lambda: s.watcher.first_change is not None, "a change in the new root", 10)
    finally:
        s.set_active(False)


def test_each_watcher_knows_its_own_inotify_descriptor(tmp_path: Path) -> None:
    """Two watchers in one process (two groups of one agent): each tells its descriptor apart, whatever
    watchdog release opens it when (6: at start, 7: when the tree is scheduled), and checks its own
    directories against its own watches. Without it, coverage falls back to all of the process's
    watches, where another watcher's watch on the same directory would hide a missing one."""
    from drsync.agent.watcher import _inotify_fds

    (tmp_path / "one" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir(parents=True)
    first, second = RootWatcher(str(tmp_path / "one")), RootWatcher(str(tmp_path / "two"))
    first.start()
    second.start()
    try:
        fds = _inotify_fds()
        assert first._fd in fds and second._fd in fds and first._fd != second._fd
        assert first.coverage_problem() is None and second.coverage_problem() is None
        assert (tmp_path / "two" / "b").stat().st_ino not in (first._watched() or set())
    finally:
        first.stop()
        second.stop()


def test_an_unwatchable_root_is_a_watch_error(tmp_path: Path) -> None:
    with pytest.raises(WatchError, match="cannot watch data root .*missing"):
        RootWatcher(str(tmp_path / "missing")).start()


def _probe(root: Path, *, watch_limit: int | None = None, also: Path | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.watchprobe", str(root)]
    if watch_limit is not None:
        if not shutil.which("unshare") or subprocess.run(["unshare", "-U", "-r", "true"]).returncode != 0:
            pytest.skip("no user namespaces here (unshare -U -r): the watch limit cannot be lowered for one process")
        cmd = ["unshare", "-U", "-r", "sh", "-c",
               f"echo {watch_limit} > /proc/sys/user/max_inotify_watches && exec {' '.join(cmd)}"]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                                 "DRSYNC_PROBE_ALSO": str(also or "")})


def _ask(p: subprocess.Popen[str]) -> dict[str, object]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("?\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def test_the_watch_limit_is_found_at_start_and_for_directories_made_later(tmp_path: Path) -> None:
    """In a user namespace of its own the watcher may hold 4 inotify watches: the root and 3 directories."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    p = _probe(root, watch_limit=4)
    try:
        assert p.stdout is not None
        start = json.loads(p.stdout.readline())
        assert start == {"started": True, "coverage": None}
        (root / "c").mkdir()  # the fourth watch
        wait_for(lambda: _ask(p)["coverage"] is None, "c to be watched", 10)
        (root / "c" / "d" / "e").mkdir(parents=True)  # beyond the limit: watchdog skips them silently
        wait_for(lambda: _ask(p)["coverage"], "the unwatched directories to be found", 10)
        coverage = str(_ask(p)["coverage"])
        assert "2 directories of data root" in coverage and "fs.inotify.max_user_watches" in coverage
    finally:
        p.kill()
        p.wait()
    p = _probe(root, watch_limit=0)
    try:
        assert p.stdout is not None
        start = json.loads(p.stdout.readline())
        assert start["started"] is False and "inotify watch limit reached" in start["error"]
        assert "sysctl -w fs.inotify.max_user_watches=" in start["error"]
    finally:
        p.kill()
        p.wait()


def _mountprobe(base: Path, case: str) -> dict[str, object]:
    if not shutil.which("unshare") or subprocess.run(["unshare", "-U", "-r", "-m", "true"]).returncode != 0:
        pytest.skip("no user and mount namespaces here (unshare -U -r -m): tmpfs cannot be mounted in a test")
    limit = "echo 5 > /proc/sys/user/max_inotify_watches && " if case == "limit" else ""
    done = subprocess.run(["unshare", "-U", "-r", "-m", "sh", "-c",
                           f"{limit}exec {sys.executable} -m tests.mountprobe {base} {case}"],
                          capture_output=True, text=True, timeout=60 * SLOW,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_unwatched_directory_is_found_on_a_tree_spanning_filesystems(tmp_path: Path) -> None:
    """Inode numbers repeat across filesystems: a directory past the watch limit on a second filesystem,
    with the inode number of a watched directory on the first, is still found (by device and inode)."""
    out = _mountprobe(tmp_path, "limit")
    assert out["coverage_at_start"] is None and out["problem_at_start"] is None
    assert out["same_inode_number"], "the case needs an inode number shared across the two filesystems"
    for key in ("new_dirs", "coverage"):
        assert "1 directory of data root" in str(out[key]) and "(first: m/new)" in str(out[key]), (key, out)


@pytest.mark.parametrize("case", ["mount-later", "umount-later"])
def test_a_mount_or_unmount_inside_the_root_ends_notification(tmp_path: Path, case: str) -> None:
    """inotify sees nothing of a filesystem mounted over a watched directory, nor of the directories an
    unmount uncovers: the watcher says so at once (problem(), no walk), naming where."""
    out = _mountprobe(tmp_path, case)
    assert out["coverage_at_start"] is None and out["problem_at_start"] is None
    assert "mounted or unmounted inside data root" in str(out["problem"]) and "(at m)" in str(out["problem"]), out
    if case == "mount-later":  # the mounted filesystem's root is not watched (the unmount's: maybe not found)
        assert "not watched (first: m" in str(out["coverage"]), out


def test_a_queue_overflow_is_reported(tmp_path: Path) -> None:
    """The watcher's process is stopped while more events than the kernel queues happen. Only that watcher's
    queue overflowed: another watcher in the same process (a second agent's root) keeps its notification
    (one overflow made every watcher of the process fall back to scanning)."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "quiet").mkdir()
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to overflow it in a test")
    p = _probe(root, also=tmp_path / "quiet")
    try:
        assert p.stdout is not None
        assert json.loads(p.stdout.readline())["started"]
        os.kill(p.pid, signal.SIGSTOP)
        try:
            for i in range(limit + 1000):
                os.close(os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY))
        finally:
            os.kill(p.pid, signal.SIGCONT)
        wait_for(lambda: _ask(p)["problem"], "the overflow to be reported", 30)
        answer = _ask(p)
        problem = str(answer["problem"])
        assert "overflowed" in problem and "fs.inotify.max_queued_events" in problem
        assert answer["also_problem"] is None, answer
    finally:
        p.kill()
        p.wait()


# --- real agents: interval = "1h", so only notification moves a change -----------------------------------

def continuous_pair(tmp: Path, *, hooks: str = "", standby_keep: str = "") -> Pair:
    p = Pair(tmp)
    text = p.primary_cfg.read_text()
    assert 'interval = "1s"' in text
    p.primary_cfg.write_text(text.replace('interval = "1s"', 'interval = "1h"\nmode = "continuous"\n'
                                          'min_interval = "1s"\nsettle = "100ms"') + hooks)
    if standby_keep:
        p.standby_cfg.write_text(p.standby_cfg.read_text() + standby_keep)
    return p


def metric(address: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def cpair(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = continuous_pair(tmp_path)
    yield p
    p.stop_all()


def test_a_change_reaches_the_standby_without_waiting_for_the_interval(cpair: Pair) -> None:
    p = cpair
    p.start("standby")
    p.start("primary")
    wait_for(p.in_sync, "the first shipment", 60)
    (p.prod / "catalog" / "f003.txt").write_text("changed on production")
    wait_for(p.in_sync, "a write to reach the standby (interval is 1h)", 20)
    # A burst of writes in a new subdirectory, then one more change inside it.
    burst = p.prod / "incoming" / "2024" / "batch"
    burst.mkdir(parents=True)
    for i in range(50):
        (burst / f"part-{i:03}.csv").write_text(f"row {i}\n" * (i + 1))
    (p.prod / "tables" / "orders" / "part-0.bin").unlink()
    wait_for(p.in_sync, "a burst in a new subdirectory to reach the standby", 20)
    (burst / "part-007.csv").write_text("rewritten")
    wait_for(p.in_sync, "a change in the new subdirectory to reach the standby", 20)
    primary = p.metrics["primary"]
    assert (metric(primary, "drsync_captures_total", trigger="change") or 0) >= 3
    assert metric(primary, "drsync_change_watch") == 1.0
    with urllib.request.urlopen(f"http://{primary}/status.json", timeout=10) as r:
        doc = json.loads(r.read())
    assert doc["replication"]["mode"] == "continuous" and doc["replication"]["watching"] is True
    with urllib.request.urlopen(f"http://{primary}/", timeout=10) as r:
        assert 'id="replication-mode">continuous: on change (inotify)' in r.read().decode()
    r = run_drsync("status", "--config", p.primary_cfg, "--json")
    assert r.code == 0 and r.json()["replication"]["mode"] == "continuous", r.err


# The writer pauses between its steps while a capture runs: the pre-hook asks and, while the writer
# runs, waits until it pauses; the post-hook lets it go on. Every capture then sees a state the writer made.
PRE_HOOK = 'touch "{d}/pause"; while [ -e "{d}/running" ] && [ ! -e "{d}/paused" ]; do sleep 0.005; done'
POST_HOOK = 'rm -f "{d}/pause"'


class PairWriter:
    """Steps without end, each a whole state: a pair of files that always hold the same step number, a
    file rewritten at every step, and a new file every few steps (in new subdirectories too). A step
    takes as long as the pause after it: a capture that did not quiesce the writer would often see
    half a step."""

    def __init__(self, root: Path, control: Path) -> None:
        self.root, self.control = root / "busy", control
        self.root.mkdir()
        self.states: set[str] = set()
        self.steps = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def state(self) -> str:
        return state_of(self.root)

    def _run(self) -> None:
        try:
            self.states.add(self.state())
            (self.control / "running").touch()
            while not self.stop.is_set():
                if (self.control / "pause").exists():
                    (self.control / "paused").touch()
                    while (self.control / "pause").exists() and not self.stop.is_set():
                        self.stop.wait(0.002)
                    (self.control / "paused").unlink()
                    continue
                self.steps += 1
                n = self.steps
                body = f"step {n}\n".encode() * (1 + n % 50)
                (self.root / "pair-a").write_bytes(body)
                self.stop.wait(0.005)  # half of the time the tree is between two states
                (self.root / "rewritten").write_bytes(os.urandom(4096) + body)
                if n % 7 == 0:
                    sub = self.root / f"dir-{n // 70}"
                    sub.mkdir(exist_ok=True)
                    (sub / f"new-{n}").write_bytes(body)
                (self.root / "pair-b").write_bytes(body)
                self.states.add(self.state())
                self.stop.wait(0.005)
        except BaseException as e:  # the test reports it
            self.error = e
        finally:
            (self.control / "running").unlink(missing_ok=True)  # after the last step: captures go on alone


def state_of(root: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            f = Path(dirpath) / name
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
        for name in dirs:
            h.update(((Path(dirpath) / name).relative_to(root).as_posix() + "/\0").encode())
    return h.hexdigest()


def test_a_busy_writer_yields_whole_snapshots_on_the_standby(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    hooks = (f'\n[snapshots]\npre_hook = \'{PRE_HOOK.format(d=control)}\'\n'
             f'post_hook = \'{POST_HOOK.format(d=control)}\'\n')
    p = continuous_pair(tmp_path, hooks=hooks, standby_keep='\n[snapshots]\nkeep = { last = 100000 }\n')
    writer = PairWriter(p.prod, control)
    try:
        p.start("standby")
        p.start("primary")
        wait_for(p.in_sync, "the first shipment", 60)
        standby_repo = engine.open_repository(str(tmp_path / "standby-repo"))
        before = len(standby_repo.list_snapshots())
        writer.thread.start()
        # The root never goes quiet, and still the standby receives snapshot after snapshot.
        wait_for(lambda: len(standby_repo.list_snapshots()) >= before + 6 or writer.error,
                 "snapshots of a root that never goes quiet", 60)
        writer.stop.set()
        writer.thread.join(30)
        assert writer.error is None, writer.error
        final = writer.state()
        assert final in writer.states
        wait_for(lambda: p.in_sync() and state_of(p.standby_data / "busy") == final, "the last state", 30)
        p.stop_all()
        snaps = standby_repo.list_snapshots()
        assert len(snaps) >= before + 6
        for s in snaps[before:]:
            target = tmp_path / f"restored-{s.id}"
            engine.restore_snapshot(standby_repo, s.id, str(target), cluster_id="analytics", release="6.2.1")
            assert state_of(target / "busy") in writer.states, f"snapshot {s.id} holds a state the writer never made"
            shutil.rmtree(target)
    finally:
        writer.stop.set()
        p.stop_all()


def test_config_check_counts_the_directories_to_watch_and_the_snapshots_protect_keeps(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "a" / "b").mkdir(parents=True)
    p = tmp_path / "c.toml"
    p.write_text(f'[cluster]\nid = "a"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n'
                 '[replication]\nmode = "continuous"\ninterval = "1h"\n[snapshots]\nprotect = "7d"\n')
    checks = {c["name"]: c for c in json.loads(run_drsync("config", "check", "--config", p, "--json").out)["checks"]}
    mode = checks["replication mode"]
    assert mode["ok"] and not mode["warn"] and "3 directories to watch" in mode["detail"]
    assert "fs.inotify.max_user_watches" in mode["detail"]
    count = checks["snapshot count"]
    assert count["warn"] and "604,800 snapshots kept" in count["detail"]


def test_config_check_bounds_the_directory_count_of_a_root_that_stops_answering(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount below the data root that stops answering (a stand-in: a real hung NFS mount is beyond a
    test) holds the count's walk: config check reports what it counted within its --timeout bound and
    goes on to its other checks."""
    from drsync.agent import configcheck

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    released = threading.Event()
    real_walk = os.walk

    def hanging_walk(top: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        for item in real_walk(top):
            yield item
            released.wait()  # the next directory's listing never answers

    monkeypatch.setattr(configcheck.os, "walk", hanging_walk)
    p = tmp_path / "c.toml"
    p.write_text(f'[cluster]\nid = "a"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n'
                 '[replication]\nmode = "continuous"\ninterval = "1h"\n')
    try:
        checks = {c.name: c for c in configcheck.check_config(p, timeout_s=0.1)}
    finally:
        released.set()
    mode = checks["replication mode"]
    assert mode.ok and mode.warn
    assert "at least 2 directories (counted for 1s, the --timeout bound" in mode.detail
    assert {"nesting", "listen address", "zookeeper"} <= set(checks)  # the checks after it still ran
