"""Breaking issue 15's "every size that comes from a peer is checked against a documented limit
before anything is allocated" (docs/FORMAT.md, "Limits") with what the existing limits leave open.

1. A manifest's *bytes* are limited (``MANIFEST_MAX_BYTES``), but Parquet is compressed: a commit of
   a few hundred KiB (one path of 1,000 bytes repeated by dictionary and run-length encoding) decodes
   into gigabytes inside the standby (measured: 690 KiB of manifest, 4 million rows, an Arrow
   allocation of 1 GiB failing under a 3 GB address-space limit; without one, the standby's memory).
   The hostile peer speaks the real protocol to a real server in this process (as
   tests/test_peer_limits.py); Arrow allocates outside Python, so its memory pool's peak is measured.
2. A lock file in ``locks/`` is the repository file other hosts write by design; its size is checked
   against nothing, so a huge one (a damaged disk, a hostile host on a shared HDFS repository) makes
   every writer, ``repo gc`` and even ``repo unlock`` die with ``internal error: MemoryError``
   instead of the documented one-line IntegrityError (exit 3).
"""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drsync.repository import format as fmt
from drsync.repository.manifest import SCHEMA
from tests.test_peer_limits import Standby, _doc, commit, refused

MiB = 1024 * 1024


@pytest.fixture
def standby(tmp_path: Path) -> Iterator[Standby]:
    s = Standby(tmp_path)
    yield s
    s.close()


def _bomb(rows_per_group: int, groups: int, path_len: int) -> bytes:
    """A manifest with the right columns whose every row names the same long path: tiny when
    dictionary- and run-length-encoded, ``rows * path_len`` bytes once decoded."""
    n = rows_per_group
    arrays = []
    for f in SCHEMA:
        t = f.type
        if pa.types.is_list(t):
            a = pa.array([[]] * n, type=t)
        elif pa.types.is_fixed_size_binary(t):
            a = pa.array([bytes(32)] * n, type=t)
        elif pa.types.is_string(t):
            a = pa.array(["f"] * n, type=t)
        elif pa.types.is_binary(t):
            a = pa.array([(b"p" * 99 + b"/") * (path_len // 100) if f.name == "path" else b""] * n, type=t)
        elif pa.types.is_boolean(t):
            a = pa.array([False] * n)
        else:
            a = pa.array([0] * n, type=t)
        arrays.append(a)
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    out = io.BytesIO()
    with pq.ParquetWriter(out, SCHEMA, compression="zstd", use_dictionary=True) as w:
        for _ in range(groups):
            w.write_table(table)
    return out.getvalue()


def test_a_small_manifest_that_decodes_into_gigabytes_is_refused_before_it_is_decoded(
        standby: Standby, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is lowered to 16 MiB (as tests/test_peer_limits.py does) so that the decoded
    manifest of 256 MiB shows the fault without taking the machine's memory: the real numbers are
    2 GiB of limit and a 7 MiB commit that decodes into 40 GiB."""
    monkeypatch.setattr(fmt, "MANIFEST_MAX_BYTES", 16 * MiB)
    data = _bomb(1 << 13, 32, 1000)  # 262,144 rows of a 1,000-byte path: 250 MiB decoded
    assert len(data) < MiB, len(data)
    out = commit(standby, _doc(data), iter([data]))
    assert isinstance(out, grpc.RpcError), f"the standby accepted it: {out}"
    # Refused for its decoded size (before this limit, it was decoded whole and then refused for its path).
    refused(out, grpc.StatusCode.RESOURCE_EXHAUSTED, "decodes into more than")
    assert standby.repo.list_snapshots() == []


def _as_limited(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("command", [("snapshot", "create"), ("repo", "gc"), ("repo", "unlock")])
def test_a_huge_lock_file_is_refused_with_a_clear_error_not_read(tmp_path: Path, command: tuple[str, str]) -> None:
    """A 3 GiB lock file (sparse: it costs no disk) in ``locks/``. The command runs with 2 GB of
    address space, far more than it needs, so reading the file whole shows as a MemoryError."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(b"hello\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cluster]\nid = "x"\nrelease = "1"\ndata = "{data}"\nrepository = "{tmp_path / "repo"}"\n')
    drsync = [sys.executable, "-m", "drsync"]
    assert subprocess.run([*drsync, "init", "--config", str(cfg)], capture_output=True).returncode == 0
    (tmp_path / "repo" / "locks").mkdir(exist_ok=True)
    with open(tmp_path / "repo" / "locks" / ("0" * 32 + ".json"), "wb") as f:
        f.truncate(3 << 30)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    r = subprocess.run([*drsync, *command, "--config", str(cfg)], capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: _as_limited(2_000_000_000), env=env)
    assert "MemoryError" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "lock" in r.stderr and "\n" not in r.stderr.strip(), r.stderr
