"""Kill -9 an apply right before its N-th mutating step (tests/test_apply_crash.py).

No fault hooks live in production code: this module wraps, in its own process only, the
mutating functions of the ``os`` module (rename, replace, mkdir, unlink, rmdir, symlink, chmod,
fchmod, chown, fchown, utime) and of :class:`drsync.storage.hdfs.HdfsFs` (delete, rename,
mkdirs, set_permission, set_times). Calls are counted only inside an apply or a recovery, each
labelled with the innermost region it is made in: ``stage`` (``apply_manifest`` before its commit:
the target's scan, the staging area, the journal's "commit" record), ``commit`` (a data root's
``commit``), ``close`` (``drsync.apply._close``: the journal's "done", the staging area's removal,
the journal's removal) or ``recover`` (the rest of ``recover_apply``). Right before the
``kill_at``-th counted call the process sends itself SIGKILL: nothing after that point runs, no
``finally``, no flush. With ``kill_at`` 0 nothing is killed, and each time a close ends the counts
so far (per region, with every step described) are written to ``count_file`` (JSON).

Usage (from the project's root directory, so that ``tests`` is importable)::

    python -m tests.crashdriver serve
        Imports drsync once, then reads one JSON job per line on stdin. Each job runs in a
        forked child (fast: no interpreter start per trial); one JSON line is answered per
        job: {"pid": child pid, "signal": the signal that ended it or null, "code": its exit
        code or null}. The children share the server's process group.
    python -m tests.crashdriver run JOB_JSON
        One job in this very process.
    python -m tests.crashdriver agent --kill-at N [--count-file F] [--note-file F] [--count-recovery] \
            -- DRSYNC_ARGS...
        The drsync command line (e.g. ``agent --config standby.toml``) with the hooks installed; the
        apply an agent completes at start is not counted unless --count-recovery is given.

A job: {"op": "apply" | "recover", "target": URL, "journal": path or null, "kill_at": N,
"count_file": path or null, "note_file": path or null (where the killed step is described),
"hdfs_workers": n or null, "uid"/"gid": the user to run as (after the imports), and for "apply"
"repo": URL and "snapshot": id}. "apply" applies the snapshot as the standby does
(``apply_manifest(..., journal=...)``); "recover" runs ``recover_apply(target, journal)``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

OS_CALLS = ("rename", "replace", "mkdir", "unlink", "rmdir", "symlink", "chmod", "fchmod", "chown", "fchown",
            "utime")
HDFS_CALLS = ("delete", "rename", "mkdirs", "set_permission", "set_times")
_ORIGINAL_OS = {name: getattr(os, name) for name in OS_CALLS}
_replace = os.replace  # for the count file, whatever is patched


def _short(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    parts = [oct(a) if isinstance(a, int) and 0 <= a <= 0o7777 and a > 7 else repr(a) for a in args]
    parts += [f"{k}={v!r}" for k, v in kwargs.items() if k not in ("dir_fd", "src_dir_fd", "dst_dir_fd")]
    return ", ".join(parts)[:160]


class Counter:
    """Counts mutating calls made inside the watched regions and kills the process at one of them.

    Regions nest: ``stage`` is a whole ``apply_manifest`` (what it does before the commit: the
    target's scan, the staging area, the journal's "commit" record), ``commit`` a data root's
    commit, ``close`` what follows it, ``recover`` a whole ``recover_apply``. A call counts for
    the innermost region it is made in."""

    def __init__(self, kill_at: int, count_file: str | None, note_file: str | None) -> None:
        self.kill_at = kill_at
        self.count_file = count_file
        self.note_file = note_file
        self.lock = threading.Lock()
        self.stack: list[str] = []
        self.n = 0
        self.by_region = {"stage": 0, "commit": 0, "close": 0, "recover": 0}
        self.applies = 0
        self.steps: list[str] = []
        self.paused = False  # an agent's recovery at start, when it is not what is being killed

    def tick(self, what: str) -> None:
        if not self.stack or self.paused:
            return
        with self.lock:
            self.n += 1
            region = self.stack[-1]
            self.by_region[region] += 1
            self.steps.append(f"{region}: {what}")
            if self.n == self.kill_at:
                if self.note_file:
                    with open(self.note_file, "w") as f:
                        f.write(f"step {self.n} ({region}) {what}\n")
                os.kill(os.getpid(), signal.SIGKILL)

    def enter(self, region: str) -> None:
        if self.paused:
            return
        with self.lock:
            if region == "commit":
                self.applies += 1
            self.stack.append(region)

    def leave(self) -> None:
        if self.paused:
            return
        with self.lock:
            region = self.stack.pop()
        if region == "close" and self.count_file:
            doc = {"total": self.n, **self.by_region, "applies": self.applies, "steps": self.steps}
            tmp = f"{self.count_file}.tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f)
            _replace(tmp, self.count_file)


def install(counter: Counter, *, count_recovery: bool = True) -> None:
    """Wrap the mutating calls and the commit region (this process only). Without ``count_recovery``
    the commit an agent replays at start (``Committer.recover``) is neither counted nor killed."""
    import drsync.apply as apply_mod
    from drsync.dataroot.hdfs import HdfsDataRoot
    from drsync.dataroot.local import LocalDataRoot
    from drsync.storage.hdfs import HdfsFs

    def os_wrapper(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            counter.tick(f"os.{name}({_short(args, kwargs)})")
            return fn(*args, **kwargs)
        return call

    for name, fn in _ORIGINAL_OS.items():
        setattr(os, name, os_wrapper(name, fn))

    def hdfs_wrapper(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.tick(f"HdfsFs.{name}({_short(args, kwargs)})")
            return fn(self, *args, **kwargs)
        return call

    for name in HDFS_CALLS:
        setattr(HdfsFs, name, hdfs_wrapper(name, getattr(HdfsFs, name)))

    def region(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            counter.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                counter.leave()
        return call

    LocalDataRoot.commit = region("commit", LocalDataRoot.commit)  # type: ignore[method-assign]
    HdfsDataRoot.commit = region("commit", HdfsDataRoot.commit)  # type: ignore[method-assign]
    apply_mod._close = region("close", apply_mod._close)
    import drsync.agent.committer  # noqa: F401 - holds the functions by name: patched below too

    for name, kind in (("apply_manifest", "stage"), ("recover_apply", "recover")):
        original = getattr(apply_mod, name)
        wrapped = region(kind, original)
        for mod in list(sys.modules.values()):
            if mod is not None and mod.__name__.startswith("drsync") and getattr(mod, name, None) is original:
                setattr(mod, name, wrapped)
    if not count_recovery:
        from drsync.agent.committer import Committer

        recover = Committer.recover

        @functools.wraps(recover)
        def uncounted(self: Any) -> bool:
            counter.paused = True
            try:
                return recover(self)
            finally:
                counter.paused = False

        Committer.recover = uncounted  # type: ignore[method-assign]


def _private_lock_dir(near: str | None) -> None:
    """A host lock directory of this process's own (DRSYNC_LOCK_DIR), beside ``near`` (a file of the test's
    work directory) when given: an apply takes its lock there and clears leftovers of killed applies there
    (drsync.flocks), so another trial's or another test's leftover never adds an unlink to the steps counted
    (the kills are placed by the count of an uninterrupted run). Made before the hooks count anything."""
    import tempfile

    base = os.path.dirname(near) if near else tempfile.gettempdir()
    path = os.path.join(base, f"drsync-crash-locks-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o1777)  # a job run as another user takes its lock there too
    os.environ["DRSYNC_LOCK_DIR"] = path


def run_job(job: dict[str, Any]) -> None:
    import drsync.apply as apply_mod
    from drsync.repository.repo import Repository
    from drsync.storage import open_storage

    if job.get("hdfs_workers"):
        import drsync.dataroot.hdfs as hdfs_root

        hdfs_root._COMMIT_WORKERS = int(job["hdfs_workers"])
    _private_lock_dir(job.get("note_file") or job.get("count_file"))
    install(Counter(int(job.get("kill_at", 0)), job.get("count_file"), job.get("note_file")))
    if job.get("uid") is not None:
        # The apply as another user, whose target it is. Imports are done: that user may not be
        # able to read the interpreter's own files.
        os.setgroups([])
        os.setgid(int(job["gid"]))
        os.setuid(int(job["uid"]))
        os.chdir("/")
    if job["op"] == "apply":
        repo = Repository.open(open_storage(job["repo"]))
        info = repo.find_snapshot(job["snapshot"])
        apply_mod.apply_manifest(repo.load_manifest(info), repo, job["target"], what=f"snapshot {info.id}",
                                 journal=job.get("journal"))
    elif job["op"] == "recover":
        apply_mod.recover_apply(job["target"], job.get("journal"))
    else:
        raise ValueError(f"unknown op {job['op']!r}")


def _child(job: dict[str, Any]) -> None:
    """In the forked child: run the job and leave without the parent's cleanup."""
    code = 0
    try:
        os.dup2(2, 1)  # stdout is the server's answer channel
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        run_job(job)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    # Everything a job needs is imported before the first fork; nothing here starts a thread.
    import concurrent.futures.thread
    import tomllib

    import pyarrow.compute
    import pyarrow.dataset
    import pyarrow.parquet

    import drsync.agent.committer
    import drsync.agent.standby
    import drsync.apply
    import drsync.dataroot.hdfs
    import drsync.dataroot.local
    import drsync.repository.repo
    import drsync.storage
    import drsync.storage.hdfs
    import drsync.storage.local  # noqa: F401

    del concurrent, tomllib, pyarrow

    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(job)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        out.write(json.dumps({"pid": pid, "signal": sig, "code": code}) + "\n")
        out.flush()


def agent(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.crashdriver agent")
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--count-file")
    p.add_argument("--note-file")
    p.add_argument("--count-recovery", action="store_true",
                   help="also count (and kill in) the apply an agent completes at start")
    p.add_argument("drsync_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = a.drsync_args[1:] if a.drsync_args[:1] == ["--"] else a.drsync_args
    _private_lock_dir(a.note_file or a.count_file)
    install(Counter(a.kill_at, a.count_file, a.note_file), count_recovery=a.count_recovery)
    from drsync.cli import run

    sys.argv = ["drsync", *args]
    run()


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd = sys.argv[1]
    if cmd == "serve":
        serve()
    elif cmd == "run":
        run_job(json.loads(sys.argv[2]))
    elif cmd == "agent":
        agent(sys.argv[2:])
    else:
        raise SystemExit(f"unknown command {cmd!r}\n{__doc__}")


class Driver:
    """The test side of ``serve``: one long-lived server, one forked child per job."""

    def __init__(self, log_path: str, cwd: str) -> None:
        import subprocess

        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.crashdriver", "serve"], cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)

    def run(self, job: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        import select

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close(kill=True)
            raise AssertionError(f"crash driver job did not end within {timeout:.0f}s: {job}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"crash driver server died (see its log): {job}")
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if kill:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and a child it is waiting for
            else:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


if __name__ == "__main__":
    main()
