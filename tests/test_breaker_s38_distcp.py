"""Breaker s38 (DistCp listing files): hostile cases for remove_orphaned_listings and the listing's life.

Each test fails on the fault named in its docstring; the last ones are controls that hold."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from drsync.dataroot.distcp import listing_prefix, remove_orphaned_listings
from drsync.liveness import ProcessRef, process_start

REPO_ROOT = Path(__file__).resolve().parent.parent


def _prefix(**change: object) -> str:
    """The listing prefix of a process like this one but for ``change`` (pid, start, host)."""
    return listing_prefix(dataclasses.replace(ProcessRef.current(), **change))  # type: ignore[arg-type]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_s38_an_agent_in_another_pid_namespace_keeps_a_live_listing(tmp_path: Path) -> None:
    """Fault: the commit says a pid of another pid namespace sharing the directory says nothing here,
    but the name carries only host and pid: an agent in a container with the host's hostname (host
    network) and a shared temporary directory sees a live agent's pid as gone and deletes its listing
    while DistCp reads it."""
    script = ("import sys, time\nfrom drsync.dataroot.distcp import listing_prefix\n"
              "open(sys.argv[1] + '/' + listing_prefix() + 'live0001.lst', 'w').write('a\\t0\\n')\n"
              "print('written', flush=True)\ntime.sleep(120)\n")
    live = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "written"
        subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                        "import sys; from drsync.dataroot.distcp import remove_orphaned_listings as r; "
                        "print(r(sys.argv[1]))", str(tmp_path)], cwd=REPO_ROOT, check=True, timeout=60)
        assert live.poll() is None
        kept = f"{_prefix(pid=live.pid, start=process_start(live.pid))}live0001.lst"
        assert [p.name for p in tmp_path.iterdir()] == [kept]
    finally:
        live.kill()
        live.wait()


def test_s38_a_host_whose_name_differs_only_in_a_hyphen_keeps_its_listing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: the host in the name is not injective ('a-1', 'a_1', 'a 1' all become 'a_1'): an agent on
    host 'a-1' removes the listing of a live agent on host 'a_1' sharing the directory, reading its pid
    as one of its own host's."""
    monkeypatch.setattr(socket, "gethostname", lambda: "a_1")
    (tmp_path / f"{_prefix(pid=_dead_pid())}x1y2.lst").write_text("a\t0\n")  # host 'a_1', its agent gone
    monkeypatch.setattr(socket, "gethostname", lambda: "a-1")
    assert remove_orphaned_listings(str(tmp_path)) == []
    monkeypatch.setattr(socket, "gethostname", lambda: "a_1")  # its own host does remove it
    assert len(remove_orphaned_listings(str(tmp_path))) == 1


def test_s38_a_listing_whose_write_fails_is_not_left_behind(tmp_path: Path) -> None:
    """Fault: when the listing cannot be written whole (a full temporary directory: here a file-size
    limit), the partial file (production's file names) is left, named after this live agent, so no
    later stage removes it while the agent runs; every retry leaves one more. (And a raw OSError
    escapes stage, not OperationFailed.)"""
    fake = tmp_path / "fake-distcp"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = (
        "import os, resource, signal, sys, tempfile\n"
        "tempfile.tempdir = sys.argv[1]\n"
        "from drsync.dataroot.distcp import DistCpSettings, DistCpStager\n"
        "from drsync.repository.manifest import Entry\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "s = DistCpSettings((sys.argv[2],), sys.argv[2], 'hdfs://127.0.0.1:1/standby')\n"
        "items = [(i, Entry(f'd/file-{i:06d}-' + 'n' * 100, 'file', 0o644, 0, 0, 5, 0, None, [], [5],\n"
        "                   content=b'x' * 32)) for i in range(2000)]\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))\n"
        "for attempt in range(3):\n"
        "    try:\n"
        "        DistCpStager(s, 'hdfs://127.0.0.1:1/prod/.snapshot/x').stage(object(), items)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e, file=sys.stderr)\n"
        "print(sorted(os.listdir(sys.argv[1])))\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp), str(fake)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"listings left while the agent runs: {r.stdout.strip()} ({r.stderr.strip()})"


def test_s38_a_listing_older_than_the_process_now_holding_its_pid_is_removed(tmp_path: Path) -> None:
    """Fault: pid reuse. A SIGKILLed agent's listing whose pid now belongs to an unrelated long-lived
    process is kept for as long as that process lives (production's file names left in the temporary
    directory, what the commit set out to stop); the locks guard against this with the process's
    start time, the listing's name and mtime do not."""
    reused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # written by an earlier process with this pid (another start time)
        name = tmp_path / f"{_prefix(pid=reused.pid, start='1')}old00001.lst"
        name.write_text("a\t0\n")
        live = tmp_path / f"{_prefix(pid=reused.pid, start=process_start(reused.pid))}new00001.lst"
        live.write_text("a\t0\n")
        assert remove_orphaned_listings(str(tmp_path)) == [str(name)] and live.exists()
    finally:
        reused.kill()
        reused.wait()


def test_s38_names_drsync_never_writes_are_left(tmp_path: Path) -> None:
    """Fault: the pid is read with \\d (any Unicode digit) and with leading zeros: names drsync never
    writes ('...-０１２-...', '...-0<live pid>-...') are taken for listings and removed (the second
    one while the process with that pid is alive: /proc/0123 is not /proc/123)."""
    mine = listing_prefix()
    names = [mine.replace(f"-{os.getpid()}-", "-\uff10\uff11\uff12-") + "a.lst",
             mine.replace(f"-{os.getpid()}-", f"-0{os.getpid()}-") + "a.lst"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert remove_orphaned_listings(str(tmp_path)) == []


def test_s38_controls_that_hold(tmp_path: Path) -> None:
    """Holds: a symlink named like a dead agent's listing is removed, never its target (file or
    directory); a directory is left; a live agent's, another host's and a hyphenated random part are left;
    an unreadable or missing directory is no error."""
    dead = _dead_pid()
    target = tmp_path / "important"
    target.write_text("keep")
    d = tmp_path / "tmp"
    d.mkdir()
    gone = _prefix(pid=dead)
    (d / f"{gone}sym.lst").symlink_to(target)
    (d / f"{gone}symdir.lst").symlink_to(tmp_path)
    (d / f"{gone}dir.lst").mkdir()
    kept = [f"{listing_prefix()}live.lst", f"{_prefix(pid=dead, host=socket.gethostname() + 'x')}a.lst",
            f"{gone}a-1-2.lst"]
    for n in kept:
        (d / n).write_text("x")
    removed = remove_orphaned_listings(str(d))
    assert sorted(removed) == sorted(str(d / f"{gone}{s}.lst") for s in ("sym", "symdir"))
    assert target.read_text() == "keep" and tmp_path.is_dir()
    assert sorted(p.name for p in d.iterdir()) == sorted([*kept, f"{gone}dir.lst"])
    assert remove_orphaned_listings(str(tmp_path / "missing")) == []
