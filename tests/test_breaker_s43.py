"""Breaker s43: the environment drsync sets for itself vs. the environment of the commands it runs.

Promises under test (drsync/allocators.py, engine.run_hook, agent/fencing.run_command, dataroot/distcp):
1. every drsync process asks OpenBLAS for one thread and Arrow for the system pool unless the operator
   set the variable to a non-empty (non-whitespace) value;
2. a command drsync runs for the operator (pre/post snapshot hook, switchover hook, fence/demote command,
   DistCp) gets the environment drsync was started with (drsync's own settings removed or put back as the
   operator had them), plus the variables documented for that command;
3. nothing else in that environment changes.

Real processes only: the CLI is run with subprocess; fencing/DistCp are driven in a child interpreter that
imports drsync the way the agent does. Cases marked ``FOUND:`` failed when written and are fixed
(allocators.set_for_this_process for GRPC_VERBOSITY; the startup environment for LC_CTYPE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("OPENBLAS_NUM_THREADS", "ARROW_DEFAULT_MEMORY_POOL", "GRPC_VERBOSITY")
SHELL_NOISE = {b"PWD", b"_", b"SHLVL", b"OLDPWD"}  # /bin/sh (dash) sets these itself
HOOK_VARS = {b"DRSYNC_DATA", b"DRSYNC_SNAPSHOT_NAME", b"DRSYNC_REPOSITORY"}


def _base() -> dict[bytes, bytes]:
    env = {k: v for k, v in os.environb.items() if k.decode(errors="replace") not in OURS}
    env.setdefault(b"LANG", b"C.UTF-8")  # keeps CPython's locale coercion out of the cases that are not about it
    env.pop(b"LC_ALL", None)
    env[b"PYTHONPATH"] = str(ROOT).encode()
    return env


def _read_env0(path: Path) -> dict[bytes, bytes]:
    out = {}
    for item in path.read_bytes().split(b"\0"):
        if item:
            k, _, v = item.partition(b"=")
            out[k] = v
    return out


def _hook_envs(tmp_path: Path, env: dict[bytes, bytes], *, post_fails: bool = False,
               pre_extra: str = "") -> tuple[subprocess.CompletedProcess[str], dict[bytes, bytes], dict[bytes, bytes]]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "f").write_text("x")
    pre, post = tmp_path / "pre.env", tmp_path / "post.env"
    post_cmd = f"env -0 > {post}" + ("; echo boom >&2; exit 7" if post_fails else "")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cluster]\nid="c"\nrelease="1"\ndata="data"\nrepository="repo"\n[snapshots]\n'
                   f'pre_hook = {json.dumps(f"env -0 > {pre}" + pre_extra)}\npost_hook = {json.dumps(post_cmd)}\n')
    py = sys.executable
    if not (tmp_path / "repo").exists():
        r = subprocess.run([py, "-m", "drsync", "init", "--config", str(cfg)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, errors="replace", timeout=120)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([py, "-m", "drsync", "snapshot", "create", "--config", str(cfg)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, errors="replace", timeout=120)
    return r, _read_env0(pre), _read_env0(post)


def _diff(operator: dict[bytes, bytes], child: dict[bytes, bytes], documented: set[bytes]) -> dict[str, object]:
    """What the child's environment has that the operator's did not (documented variables and the shell's own
    left out)."""
    skip = SHELL_NOISE | documented
    added = {k: child[k] for k in child.keys() - operator.keys() if k not in skip}
    removed = {k for k in operator.keys() - child.keys() if k not in skip}
    changed = {k: (operator[k], child[k]) for k in operator.keys() & child.keys()
               if k not in skip and operator[k] != child[k]}
    return {k: v for k, v in (("added", added), ("removed", removed), ("changed", changed)) if v}


# --- promise 2/3 through the real CLI: snapshot pre_hook / post_hook -----------------------------------

def test_hooks_get_exactly_the_operator_environment_when_unset(tmp_path: Path) -> None:
    """Held: OPENBLAS/ARROW unset by the operator -> absent in both hooks; nothing else differs."""
    env = _base()
    r, pre, post = _hook_envs(tmp_path, env)
    assert r.returncode == 0, r.stderr
    for child in (pre, post):
        assert _diff(env, child, HOOK_VARS) == {}
        assert child.keys() >= HOOK_VARS


@pytest.mark.parametrize("value", [b"", b"   ", b"\t", b"\n", b" \n "])
def test_hooks_see_the_operators_empty_or_blank_value_not_drsyncs(tmp_path: Path, value: bytes) -> None:
    """Held: an empty/whitespace/newline value is no choice for drsync but is put back for the hooks verbatim."""
    env = {**_base(), b"OPENBLAS_NUM_THREADS": value, b"ARROW_DEFAULT_MEMORY_POOL": value}
    r, pre, post = _hook_envs(tmp_path, env)
    assert r.returncode == 0, r.stderr
    for child in (pre, post):
        assert child[b"OPENBLAS_NUM_THREADS"] == value and child[b"ARROW_DEFAULT_MEMORY_POOL"] == value
        assert _diff(env, child, HOOK_VARS) == {}


@pytest.mark.parametrize("blas,pool", [(b"0", b"jemalloc"), (b"4=5", b"a=b=c"), (b" 2 ", b"mimalloc\n"),
                                       (b"\xc3\xa9", b"\xff\xfe")])
def test_operator_chosen_odd_values_pass_through_unchanged(tmp_path: Path, blas: bytes, pool: bytes) -> None:
    """Held: '0', values with '=', padded values, unicode and non-UTF-8 bytes all reach the hooks as given."""
    env = {**_base(), b"OPENBLAS_NUM_THREADS": blas, b"ARROW_DEFAULT_MEMORY_POOL": pool,
           b"HADOOP_CONF_DIR": b"/etc/h\xc3\xa4doop", b"ODD_S43": b"v=\xfe\n2",
           b"DRSYNC_S43_UNI": "\u2603=\U0001f600".encode()}
    r, pre, post = _hook_envs(tmp_path, env)
    assert r.returncode == 0, r.stderr
    for child in (pre, post):
        assert (child[b"OPENBLAS_NUM_THREADS"], child[b"ARROW_DEFAULT_MEMORY_POOL"]) == (blas, pool)
        assert _diff(env, child, HOOK_VARS) == {}


def test_a_hook_that_imports_numpy_gets_the_operators_blas_setting(tmp_path: Path) -> None:
    """Held: a hook running Python+NumPy sees OPENBLAS_NUM_THREADS unset (operator left it unset), so its
    NumPy starts OpenBLAS's default thread count, exactly as outside drsync."""
    out = tmp_path / "numpy.out"
    probe = ("import os, numpy; print(os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task')))")
    env = _base()
    r, _, _ = _hook_envs(tmp_path, env, pre_extra=f"; {sys.executable} -c {json.dumps(probe)} > {out}")
    assert r.returncode == 0, r.stderr
    outside = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout
    assert out.read_text() == outside


def test_a_failing_post_hook_still_got_the_operator_environment(tmp_path: Path) -> None:
    """Held: post_hook exits 7 -> the snapshot command exits 1 naming it; its environment was still right."""
    env = {**_base(), b"OPENBLAS_NUM_THREADS": b""}
    r, _pre, post = _hook_envs(tmp_path, env, post_fails=True)
    assert r.returncode == 1 and "exited with 7: boom" in r.stderr
    assert post[b"OPENBLAS_NUM_THREADS"] == b"" and b"ARROW_DEFAULT_MEMORY_POOL" not in post
    assert _diff(env, post, HOOK_VARS) == {}


def test_no_locale_in_the_environment_hooks_get_no_invented_LC_CTYPE(tmp_path: Path) -> None:
    """FOUND (promise 3): with no LANG/LC_* (e.g. a systemd unit, `env -i`) or LANG=C, CPython's locale
    coercion (PEP 538) writes LC_CTYPE=C.UTF-8 into drsync's os.environ at start, and
    allocators.environ_for_children passes it on: the hook sees LC_CTYPE=C.UTF-8, which the operator never
    set. Expected: the hook's environment == the operator's (+ DRSYNC_*)."""
    env = {b"PATH": os.environb[b"PATH"], b"HOME": os.environb.get(b"HOME", b"/"), b"PYTHONPATH": str(ROOT).encode()}
    r, pre, _post = _hook_envs(tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert _diff(env, pre, HOOK_VARS) == {}, f"observed {_diff(env, pre, HOOK_VARS)}"


def test_lang_c_hooks_get_no_invented_LC_CTYPE(tmp_path: Path) -> None:
    """FOUND (promise 3): same as above with LANG=C set by the operator: hook gets LC_CTYPE=C.UTF-8 too."""
    env = {**_base(), b"LANG": b"C"}
    env.pop(b"LC_CTYPE", None)
    r, pre, _post = _hook_envs(tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert _diff(env, pre, HOOK_VARS) == {}, f"observed {_diff(env, pre, HOOK_VARS)}"


# --- promise 1: the drsync process itself ---------------------------------------------------------------

@pytest.mark.parametrize("value,expect_blas", [(None, "1"), ("", "1"), ("  ", "1"), ("\n", "1"), ("0", "0"),
                                               ("3", "3")])
def test_the_drsync_process_itself_asks_for_one_blas_thread_unless_chosen(value: str | None, expect_blas: str) -> None:
    """Held: blank values count as no choice (drsync uses 1 / system); an operator's '0' or '3' is kept."""
    env = {k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape") for k, v in _base().items()}
    if value is not None:
        env["OPENBLAS_NUM_THREADS"] = value
        env["ARROW_DEFAULT_MEMORY_POOL"] = value
    # counted before pyarrow is imported: pyarrow starts a thread of its own
    code = ("import os, drsync, numpy; t = len(os.listdir('/proc/self/task')); import pyarrow as pa; "
            "print(repr(os.environ['OPENBLAS_NUM_THREADS']), os.environ['ARROW_DEFAULT_MEMORY_POOL'].strip() or '-', "
            "pa.default_memory_pool().backend_name, t)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    blas, pool, backend, threads = out.stdout.split()
    assert blas == repr(expect_blas)
    if expect_blas == "1":
        assert threads == "1" and pool == "system" and backend == "system"


# --- fencing / demote / switchover / DistCp, run the way the agent runs them ------------------------------

_AGENT_CHILD = textwrap.dedent("""
    import json, os, sys
    import drsync
    if sys.argv[1] == "agent":
        import drsync.agent.supervisor  # what `drsync agent` imports (it brings drsync.transport along)
    elif sys.argv[1] == "control":
        import drsync.agent.control  # what `drsync group promote` imports before it runs fence_command
    from drsync.agent.fencing import run_command, fence_env, demote_env
    from drsync import engine
    out = sys.argv[2]
    fe = fence_env(group="g", agent="a", fenced_agent="b", fenced_address="h:1", epoch=3, data="/d")
    de = demote_env(group="g", agent="a", epoch=3, reason="lost", data="/d")
    r1 = run_command("fence_command", f"env -0 > {out}.fence", fe, 30)
    r2 = run_command("demote_command", f"env -0 > {out}.demote; exit 2", de, 30)
    engine.run_hook("pre-switchover", f"env -0 > {out}.switch", {"DRSYNC_SWITCHOVER_TO": "b", "DRSYNC_DATA": "/d"}, 30)
    print(json.dumps([r1.ok, r2.ok, r2.exit_code]))
""")


def _agent_children(tmp_path: Path, env: dict[bytes, bytes], mode: str) -> dict[str, dict[bytes, bytes]]:
    script = tmp_path / "agent_child.py"
    script.write_text(_AGENT_CHILD)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(script), mode, str(out)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [True, False, 2]
    return {k: _read_env0(Path(f"{out}.{k}")) for k in ("fence", "demote", "switch")}


FENCE_VARS = {b"DRSYNC_GROUP", b"DRSYNC_AGENT", b"DRSYNC_FENCE_AGENT", b"DRSYNC_FENCE_ADDRESS", b"DRSYNC_EPOCH",
              b"DRSYNC_DATA", b"DRSYNC_REASON", b"DRSYNC_SWITCHOVER_TO", b"DRSYNC_FENCE_RUN"}


def test_fence_demote_switchover_in_a_plain_drsync_process(tmp_path: Path) -> None:
    """Held: in a process that imports only drsync, fence/demote(failing)/switchover commands get the
    operator's environment (blank OPENBLAS put back, ARROW removed) plus their documented variables."""
    env = {**_base(), b"OPENBLAS_NUM_THREADS": b" ", b"HADOOP_HOME": b"/opt/hadoop"}
    for what, child in _agent_children(tmp_path, env, "plain").items():
        assert _diff(env, child, FENCE_VARS) == {}, what
        assert child[b"OPENBLAS_NUM_THREADS"] == b" " and b"ARROW_DEFAULT_MEMORY_POOL" not in child


@pytest.mark.parametrize("mode", ["agent", "control"])
def test_the_agents_fence_demote_switchover_commands_get_no_GRPC_VERBOSITY(tmp_path: Path, mode: str) -> None:
    """FOUND (promise 2/3): drsync/transport/__init__.py did os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    for its own process; it is not recorded in allocators._SET_BY_DRSYNC, so in the agent (which imports
    drsync.transport via drsync.agent.supervisor/standby) fence_command, demote_command and the switchover
    hook see GRPC_VERBOSITY=NONE although the operator left it unset. Observed: added {GRPC_VERBOSITY: NONE};
    expected: no such variable (a fence tool built on gRPC would have its own diagnostics silenced).
    The same in `drsync group promote` (drsync.agent.control runs fence_command; it imports drsync.transport)."""
    env = _base()
    seen = {what: _diff(env, child, FENCE_VARS) for what, child in _agent_children(tmp_path, env, mode).items()}
    assert seen == {"fence": {}, "demote": {}, "switch": {}}, f"observed {seen}"


def test_the_agents_commands_keep_an_operators_GRPC_VERBOSITY(tmp_path: Path) -> None:
    """Held: an operator's own GRPC_VERBOSITY (empty or ERROR) passes through unchanged."""
    for value in (b"", b"ERROR"):
        env = {**_base(), b"GRPC_VERBOSITY": value}
        for what, child in _agent_children(tmp_path, env, "agent").items():
            assert child[b"GRPC_VERBOSITY"] == value, what
            assert _diff(env, child, FENCE_VARS) == {}, what


_DISTCP_CHILD = textwrap.dedent("""
    import sys
    import drsync
    if sys.argv[1] == "agent":
        import drsync.agent.standby  # a standby agent runs DistCp; this is what it has imported
    from drsync.dataroot.distcp import DistCpSettings, DistCpStager
    fake, jar, listing = sys.argv[2:5]
    s = DistCpSettings.from_strings(fake, jar, "hdfs://ns/data", "/data")
    DistCpStager(s, "hdfs://prod/data/.snapshot/x")._run(listing, "hdfs://ns/data/.drsync-staging/d",
                                                         sys.argv[5] or None)
""")


def _distcp_env(tmp_path: Path, env: dict[bytes, bytes], mode: str, user: str = "") -> tuple[dict[bytes, bytes], str]:
    out = tmp_path / "distcp.env"
    fake = tmp_path / "fake-distcp"
    # not a shell script: dash drops variables whose names are not shell names; /proc/self/environ is
    # exactly the block DistCp was started with
    fake.write_text(f"#!{sys.executable}\nopen({str(out)!r}, 'wb').write(open('/proc/self/environ', 'rb').read())\n")
    fake.chmod(0o755)
    jar = tmp_path / "drsync-distcp.jar"
    jar.write_bytes(b"PK")
    listing = tmp_path / "listing.lst"
    listing.write_text("")
    script = tmp_path / "distcp_child.py"
    script.write_text(_DISTCP_CHILD)
    r = subprocess.run([sys.executable, str(script), mode, str(fake), str(jar), str(listing), user], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return _read_env0(out), str(jar)


def test_distcp_in_a_plain_drsync_process(tmp_path: Path) -> None:
    """Held: DistCp gets the operator's environment; HADOOP_CLASSPATH gets the jar put in front of the
    operator's value; an operator's HADOOP_USER_NAME (even empty) wins over the URL's user."""
    env = {**_base(), b"ARROW_DEFAULT_MEMORY_POOL": b"", b"HADOOP_CLASSPATH": b"/x/*:/y",
           b"HADOOP_USER_NAME": b"", b"HADOOP_OPTS": b"-Da=b -Dc=d",
           b"ODD\xff": b"v=\xfe\n2"}  # no shell: any name survives
    child, jar = _distcp_env(tmp_path, env, "plain", user="hdfs")
    assert child[b"HADOOP_CLASSPATH"] == f"{jar}:/x/*:/y".encode()
    assert _diff(env, child, {b"HADOOP_CLASSPATH"}) == {}


def test_distcp_in_the_standby_agent_gets_no_GRPC_VERBOSITY(tmp_path: Path) -> None:
    """FOUND (promise 2/3): in the standby agent (drsync.transport imported) DistCp's environment gets
    GRPC_VERBOSITY=NONE, which the operator never set. Expected: only HADOOP_CLASSPATH (and HADOOP_USER_NAME
    where the URL names a user) differ from the operator's environment."""
    env = _base()
    child, _ = _distcp_env(tmp_path, env, "agent", user="hdfs")
    assert child[b"HADOOP_USER_NAME"] == b"hdfs"
    seen = _diff(env, child, {b"HADOOP_CLASSPATH", b"HADOOP_USER_NAME"})
    assert seen == {}, f"observed {seen}"
