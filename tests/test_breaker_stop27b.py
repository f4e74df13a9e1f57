"""Breaker findings (stop 27b): repo/backup verify on a valid-Parquet index file with the wrong
schema, restore on an index row with an out-of-range offset, a zero-length backup.json under
--json, and names that print the same way (or invisibly) in diff and verify output.
Real CLI processes, real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import init_repo_at, run_drsync


def _repo(tmp_path: Path) -> Path:
    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir()
    init_repo_at(repo, "c", "1")
    (src / "a").write_bytes(os.urandom(200_000))
    (src / "b").write_bytes(os.urandom(1000))
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1").code == 0
    return repo


def _wrong_schema(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), path)  # valid Parquet, not an index


def test_repo_verify_reports_index_file_with_wrong_schema(tmp_path: Path) -> None:
    """An index file replaced by a valid Parquet file with another schema is damage like a garbled
    one: exit 3, JSON report naming the files whose chunks it held. Actual: exit 1 'drsync: internal
    error: KeyError: b'pack'', nothing on stdout (restore fails the same way)."""
    repo = _repo(tmp_path)
    (index,) = list((repo / "index").iterdir())
    _wrong_schema(index)
    v = run_drsync("repo", "verify", "--repo", repo, "--json")
    assert "internal error" not in v.err, v.err
    assert v.code == 3, (v.code, v.err)
    doc = json.loads(v.out)
    assert doc["ok"] is False
    assert {f["path"] for f in doc["damaged_files"]} == {"a", "b"}, doc


def test_backup_verify_reports_index_file_with_wrong_schema(tmp_path: Path) -> None:
    """The same in a backup: expected exit 3 and a JSON report; actual exit 1 internal error
    KeyError: b'pack', no JSON."""
    repo = _repo(tmp_path)
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s1", "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    bk = Path(r.json()["path"])
    (index,) = list((bk / "index").iterdir())
    _wrong_schema(index)
    v = run_drsync("backup", "verify", bk, "--json")
    assert "internal error" not in v.err, v.err
    assert v.code == 3, (v.code, v.err)
    assert json.loads(v.out)["ok"] is False


def test_restore_with_out_of_range_index_offset_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """An index row whose offset is 2**64-1 (fits the uint64 column): repo verify correctly reports
    exit 3 naming the file, but snapshot restore (and backup restore) exit 1 'internal error:
    OverflowError: Python int too large to convert to C long' instead of exit 3 naming the damage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = _repo(tmp_path)
    (index,) = list((repo / "index").iterdir())
    t = pq.read_table(index)
    rows = t.to_pylist()
    for row in rows:
        row["offset"] = 2**64 - 1
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), index)
    v = run_drsync("repo", "verify", "--repo", repo, "--json")
    assert v.code == 3, (v.code, v.err)
    r = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", tmp_path / "t")
    assert "internal error" not in r.err, r.err
    assert r.code == 3, (r.code, r.err)


def test_backup_verify_json_report_for_zero_length_backup_json(tmp_path: Path) -> None:
    """A truncated backup.json: with --json, verify must still give its JSON report (exit 3).
    Actual: exit 3 with one line '.../backup.json is damaged: Expecting value ...', stdout empty."""
    repo = _repo(tmp_path)
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s1", "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    bk = Path(r.json()["path"])
    os.truncate(bk / "backup.json", 0)
    v = run_drsync("backup", "verify", bk, "--json")
    assert v.code == 3, (v.code, v.err)
    assert "Traceback" not in v.err
    doc = json.loads(v.out)
    assert doc["ok"] is False


def _two_snapshots_with(tmp_path: Path, names: list[bytes]) -> Path:
    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir()
    init_repo_at(repo, "c", "1")
    (src / "keep").write_bytes(b"k")
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1").code == 0
    for n in names:
        with open(os.path.join(os.fsencode(src), n), "wb") as f:
            f.write(os.urandom(3000))
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s2").code == 0
    return repo


def test_snapshot_diff_distinguishes_c1_control_from_invalid_byte(tmp_path: Path) -> None:
    """b'c1\\x85x' (0x85 alone: not UTF-8) and b'c1\\xc2\\x85x' (UTF-8 for the C1 control U+0085)
    are two different files, and both print as the line '+ c1\\x85x' (same for 0x9b vs U+009B).
    Expected: two different lines. 'snapshot show --files' shows the same collision."""
    repo = _two_snapshots_with(tmp_path, [b"c1\x85x", b"c1\xc2\x85x", b"c9\x9bx", b"c9\xc2\x9bx"])
    r = run_drsync("snapshot", "diff", "s1", "s2", "--repo", repo)
    assert r.code == 0, r.err
    lines = [line for line in r.out.splitlines() if line.startswith("+ ")]
    assert len(lines) == 4 and len(set(lines)) == 4, lines
    s = run_drsync("snapshot", "show", "s2", "--repo", repo, "--files")
    assert s.code == 0, s.err
    rows = [line for line in s.out.splitlines() if line.startswith("file ") and "keep" not in line]
    assert len(rows) == 4 and len(set(rows)) == 4, rows


def test_repo_verify_text_escapes_c1_control_characters(tmp_path: Path) -> None:
    """repo verify (text) names damaged files with a raw U+0085 (NEL, a line break on some
    terminals) in stderr, while the same name is escaped by snapshot diff. Expected: no C0/C1
    control character in what verify prints."""
    repo = _two_snapshots_with(tmp_path, [b"c1\xc2\x85x", b"c9\xc2\x9bx"])
    for dirpath, _dirs, files in os.walk(repo / "packs"):
        for f in files:
            os.truncate(os.path.join(dirpath, f), 0)
    v = run_drsync("repo", "verify", "--repo", repo)
    assert v.code == 3, (v.code, v.err)
    bad = [c for c in v.err if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    assert not bad, f"raw control characters in verify output: {bad!r}\n{v.err!r}"


def test_snapshot_diff_escapes_invisible_format_characters(tmp_path: Path) -> None:
    """'zw' + U+200B (zero-width space) + 'x' and 'zwx' are two files; diff prints the first with a
    raw U+200B, so on a terminal both lines read '+ zwx' (likewise U+FEFF, and U+2028 which breaks
    the line; U+202E reorders it). Expected: invisible/format characters escaped like controls."""
    repo = _two_snapshots_with(tmp_path, [b"zw\xe2\x80\x8bx", b"zwx", b"ls\xe2\x80\xa8x"])
    r = run_drsync("snapshot", "diff", "s1", "s2", "--repo", repo)
    assert r.code == 0, r.err
    for ch in ("\u200b", "\u2028"):
        assert ch not in r.out, f"{ch!r} printed raw: {r.out!r}"


def _edit_manifest(repo: Path, snap_id: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrite a snapshot's manifest and record its new hash, as a faulty writer would: the
    snapshot document and its manifest agree with each other."""
    import blake3
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = repo / "manifests" / f"{snap_id}.parquet"
    t = pq.read_table(f)
    rows = edit(t.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), f)
    doc_file = repo / "snapshots" / f"{snap_id}.json"
    doc = json.loads(doc_file.read_text())
    doc["manifest_hash"] = blake3.blake3(f.read_bytes()).hexdigest()
    doc["files"] = len(rows)
    doc_file.write_text(json.dumps(doc))


def _set(i: int, **kw):  # type: ignore[no-untyped-def]
    def edit(rows):  # type: ignore[no-untyped-def]
        rows[i].update(kw)
        return rows
    return edit


@pytest.mark.parametrize("edit", [
    _set(0, path=b"../escape"),
    _set(0, path=b"nodir/a"),
    _set(0, path=b"b"),                     # 'b appears twice'
    _set(0, hardlink=b"nonexistent"),
    _set(0, size=123),                      # chunks add up to 200000 bytes, size says 123
    _set(0, type="weird"),
], ids=["dotdot", "no-parent", "duplicate", "hardlink-missing", "size", "type"])
def test_repo_verify_passes_manifest_that_restore_refuses(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """A manifest whose hash matches its snapshot document but whose entries 'snapshot restore'
    refuses (unsafe path, missing parent, duplicate, dangling hard link, size vs chunks, unknown
    type). Restore exits 3 ('nothing was changed'), so repo verify must not call the repository
    intact. Actual: repo verify exit 0, ok true, no problem for any of them."""
    repo = _repo(tmp_path)
    (doc_file,) = list((repo / "snapshots").iterdir())
    _edit_manifest(repo, doc_file.stem, edit)
    r = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", tmp_path / "t")
    assert r.code == 3, (r.code, r.err)  # restore refuses the snapshot ...
    v = run_drsync("repo", "verify", "--repo", repo, "--json")
    assert v.code == 3, f"repo verify passes a snapshot restore refuses: {v.code} {v.out} / {r.err}"
    assert v.json()["ok"] is False


@pytest.mark.parametrize("edit", [
    _set(0, path=b"../escape"),
    _set(0, path=b"b"),
    _set(0, size=5),
], ids=["dotdot", "duplicate", "size"])
def test_backup_verify_passes_manifest_that_restore_refuses(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """A backup written consistently by a faulty writer: its manifest's entries are refused by
    'backup restore' (exit 3), yet manifest hash, snapshot document, backup.json and CHECKSUMS.b3
    all agree. Expected: backup verify exit 3. Actual: 'ok': true, exit 0."""
    import blake3

    repo = _repo(tmp_path)
    r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s1", "--dest", tmp_path / "bk", "--json")
    assert r.code == 0, r.err
    bk = Path(r.json()["path"])
    (doc_file,) = list((bk / "snapshots").iterdir())
    _edit_manifest(bk, doc_file.stem, edit)
    meta = json.loads((bk / "backup.json").read_text())
    meta["snapshot"]["manifest_hash"] = json.loads(doc_file.read_text())["manifest_hash"]
    (bk / "backup.json").write_text(json.dumps(meta))
    lines = []
    for line in (bk / "CHECKSUMS.b3").read_text().splitlines():
        _h, name = line.split("  ", 1)
        lines.append(f"{blake3.blake3((bk / name).read_bytes()).hexdigest()}  {name}")
    (bk / "CHECKSUMS.b3").write_text("\n".join(lines) + "\n")
    rr = run_drsync("backup", "restore", bk, "--target", tmp_path / "t")
    assert rr.code == 3, (rr.code, rr.err)  # restore refuses the backup ...
    v = run_drsync("backup", "verify", bk, "--json")
    assert v.code == 3, f"backup verify passes a backup restore refuses: {v.code} / {rr.err}"  # ... so verify must fail


def _damaged_lines(err: str, snap_marker: str = "snapshot ") -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"  {snap_marker}")]


@pytest.mark.parametrize("kind", ["repo", "backup"])
def test_verify_text_names_distinct_paths_distinctly(tmp_path: Path, kind: str) -> None:
    """repo verify / backup verify (text) print damaged file names unescaped: b'a\\xff' (non-UTF-8)
    and b'a\\\\xff' (backslash, x, f, f) both print 'snapshot ID: a\\xff: chunk ...', and b'n\\nx'
    prints a raw newline that splits its line ('n' / 'x: chunk ...'), so an operator cannot tell
    which file is damaged. snapshot diff escapes the same names correctly. Expected: one line per
    damaged file, all different, no raw newline/tab inside a line."""
    names = [b"a\xff", b"a\\xff", b"n\nx", b"n\\nx", b"t\tx"]
    src, repo = tmp_path / "src", tmp_path / "repo"
    src.mkdir()
    init_repo_at(repo, "c", "1")
    for n in names:
        with open(os.path.join(os.fsencode(src), n), "wb") as f:
            f.write(os.urandom(3000))
    assert run_drsync("snapshot", "create", "--repo", repo, "--source", src, "--name", "s1").code == 0
    target = repo
    if kind == "backup":
        r = run_drsync("backup", "create", "--repo", repo, "--snapshot", "s1", "--dest", tmp_path / "bk", "--json")
        assert r.code == 0, r.err
        target = Path(r.json()["path"])
    for dirpath, _dirs, files in os.walk(target / "packs"):
        for f in files:
            os.truncate(os.path.join(dirpath, f), 0)
    v = (run_drsync("repo", "verify", "--repo", target) if kind == "repo"
         else run_drsync("backup", "verify", target))
    assert v.code == 3, (v.code, v.err)
    lines = _damaged_lines(v.err)
    assert len(lines) == len(names), f"expected {len(names)} lines, one per file: {lines}"
    named = [line.split(": ")[1] for line in lines]
    assert len(set(named)) == len(names), f"two files printed the same way: {named}"
    assert "\t" not in v.err and "n\nx" not in v.err, v.err


def test_restore_with_pack_replaced_by_directory_names_the_pack(tmp_path: Path) -> None:
    """A pack file replaced by a directory: repo verify reports it (exit 3, 'pack ... is missing'),
    but snapshot restore exits 1 with 'the operation failed:: Is a directory' — no pack, no file,
    not the damage exit code. Expected: exit 3 naming the pack (as for a missing/truncated pack)."""
    repo = _repo(tmp_path)
    (pack,) = [p for p in (repo / "packs").rglob("*.pack")]
    pack.unlink()
    pack.mkdir()
    v = run_drsync("repo", "verify", "--repo", repo, "--json")
    assert v.code == 3, (v.code, v.err)
    r = run_drsync("snapshot", "restore", "s1", "--repo", repo, "--target", tmp_path / "t")
    assert r.code == 3, (r.code, r.err)
    assert pack.stem in r.err, r.err
