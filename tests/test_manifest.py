"""Manifests: validation of hostile input, and diff as a join (pure, no I/O)."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from drsync.errors import IntegrityError
from drsync.pathglob import compile_globs
from drsync.repository.manifest import EMPTY_CONTENT, Manifest, content_digest
from drsync.repository.manifest_check import (
    NAME_MAX,
    RESERVED_NAME,
    suspect_paths,
    symlink_stays_inside,
    unsafe_path_reason,
    validate,
)
from drsync.repository.manifest_diff import diff

CID = b"\x01" * 32


def build(rows: list[dict]) -> Manifest:
    cols: dict[str, list] = {k: [] for k in ("path", "type", "mode", "uid", "gid", "size", "mtime_ns",
                                             "ctime_ns", "inode", "target", "content", "chunks",
                                             "chunk_sizes", "hardlink")}
    for r in rows:
        typ = r.get("type", "file")
        chunks = r.get("chunks", [CID] if typ == "file" and r.get("size", 5) else [])
        sizes = r.get("chunk_sizes", [r.get("size", 5)] if chunks else [])
        full = {"type": typ, "mode": 0o644, "uid": 0, "gid": 0, "size": r.get("size", 5 if typ == "file" else 0),
                "mtime_ns": 1, "ctime_ns": 1, "inode": 1, "target": None,
                "content": (content_digest(chunks) if chunks else EMPTY_CONTENT) if typ == "file" else None,
                "chunks": chunks, "chunk_sizes": sizes, "hardlink": None, **r}
        for k in cols:
            cols[k].append(full[k])
    return Manifest.from_columns(cols)


def test_valid_manifest_passes() -> None:
    validate(build([{"path": "d", "type": "dir"}, {"path": "d/f"},
                    {"path": "d/l", "type": "symlink", "target": "f"}]))


@pytest.mark.parametrize("rows, message", [
    ([{"path": "/etc/passwd"}], "unsafe path"),
    ([{"path": "../escape"}], "unsafe path"),
    ([{"path": "d", "type": "dir"}, {"path": "d/../../x"}], "unsafe path"),
    ([{"path": ""}], "unsafe path"),
    ([{"path": "l", "type": "symlink", "target": "/etc/shadow"}], "points outside the data root"),
    ([{"path": "l", "type": "symlink", "target": "../../etc"}], "points outside the data root"),
    ([{"path": "f"}, {"path": "f"}], "appears twice"),
    ([{"path": "nodir/f"}], "has no parent directory entry"),
    ([{"path": "f", "size": 10, "chunk_sizes": [4]}], "chunks add up to 4 bytes, size says 10"),
    ([{"path": "f", "type": "fifo"}], "unknown entry type"),
])
def test_hostile_manifests_are_refused(rows: list[dict], message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        validate(build(rows))


def test_every_path_the_rule_refuses_is_judged_by_it() -> None:
    """validate judges in Python only the paths :func:`suspect_paths` names: every path the rule refuses
    must be among them (soundness), over hostile pieces put together at random and plain names."""
    rnd = random.Random(17)
    pieces = ["a", "b", ".", "..", "", "/", "//", ".hidden", "x.", "a.b", RESERVED_NAME, RESERVED_NAME + "x",
              "\x00", "n" * NAME_MAX, "n" * (NAME_MAX + 1), "\u00e9" * 128, "\udcff", "\\", " ", "-"]
    paths = {"".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 6))) for _ in range(20000)}
    paths |= {"/".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 5))) for _ in range(20000)}
    paths |= {"a/.", "./a", "a/./b", "a/..", "../a", "a//b", "a/", "/a", ".", "..", RESERVED_NAME,
              f"a/{RESERVED_NAME}", f"{RESERVED_NAME}/a", "a/" + "n" * (NAME_MAX + 1), "a\x00b"}
    ordered = sorted(paths)
    column = pa.array([p.encode("utf-8", "surrogateescape") for p in ordered], pa.binary())
    refused = [unsafe_path_reason(p) is not None for p in ordered]
    assert sum(refused) > 1000 and sum(not r for r in refused) > 1000  # both kinds are well represented
    missed = [p for p, r, s in zip(ordered, refused, suspect_paths(column), strict=True) if r and not s]
    assert missed == []
    assert suspect_paths(pa.array([b"a/b", b"data/part-0001.parquet", b"x" * NAME_MAX], pa.binary())) == \
        [False, False, False]


def test_symlink_containment() -> None:
    assert symlink_stays_inside("a/b/link", "../c")
    assert symlink_stays_inside("a/link", "./x/../y")
    assert not symlink_stays_inside("a/link", "../../x")
    assert not symlink_stays_inside("link", "/abs")
    assert not symlink_stays_inside("link", "..")


def test_truncated_manifest_is_an_integrity_error() -> None:
    data = build([{"path": "f"}]).to_bytes()
    with pytest.raises(IntegrityError, match="damaged or truncated"):
        Manifest.from_bytes(data[: len(data) // 2])


def test_newer_format_is_refused() -> None:
    m = build([{"path": "f"}])
    t = m.table.replace_schema_metadata({b"drsync.format": b"99"})
    with pytest.raises(IntegrityError, match="format 99, newer than this drsync"):
        Manifest.from_bytes(Manifest(t).to_bytes())


def test_diff_added_removed_changed() -> None:
    other = b"\x02" * 32
    a = build([{"path": "d", "type": "dir"}, {"path": "d/same"}, {"path": "d/gone"}, {"path": "d/content"},
               {"path": "d/mode"}, {"path": "l", "type": "symlink", "target": "d"}])
    b = build([{"path": "d", "type": "dir"}, {"path": "d/same"}, {"path": "d/new"},
               {"path": "d/content", "chunks": [other]}, {"path": "d/mode", "mode": 0o600},
               {"path": "l", "type": "symlink", "target": "d/same"}])
    d = diff(a, b)
    assert d.added == ["d/new"]
    assert d.removed == ["d/gone"]
    assert d.changed == ["d/content", "d/mode", "l"]
    assert diff(a, a).as_dict() == {"added": [], "removed": [], "changed": []}


def test_diff_type_change_counts_as_changed() -> None:
    a = build([{"path": "x"}])
    b = build([{"path": "x", "type": "dir"}])
    assert diff(a, b).changed == ["x"]


@pytest.mark.parametrize("pattern, path, hit", [
    ("tables/**", "tables/a/b.bin", True),
    ("tables/**", "tables", False),
    ("tables/**", "x/tables/a", False),
    ("*.tmp", "a/b/c.tmp", True),
    ("*.tmp", "c.tmp", True),
    ("logs/*.log", "logs/a.log", True),
    ("logs/*.log", "logs/x/a.log", False),
    ("**/cache", "a/b/cache", True),
    ("**/cache", "cache", True),
    # A match of a directory is a match of everything below it; a longer name is not a match.
    ("b", "b/f0", True),
    ("b", "a/b/c/d", True),
    ("b", "bb/f", False),
    ("*.tmp", "x.tmp/inner", True),
    ("logs/*.log", "logs/a.log/x", True),
    ("tables/**", "tables", False),
    ("b", "x\ny/b/c", True),  # a name holding a newline
    ("b", "a\nb/c", False),
])
def test_globs(pattern: str, path: str, hit: bool) -> None:
    assert compile_globs([pattern])(path) is hit


def _random_tree(rng: random.Random, n: int) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    dirs = [f"d{i:02d}" for i in range(12)]
    for d in dirs:
        rows[d] = {"path": d, "type": "dir"}
    while len(rows) < n:
        d = rng.choice(dirs)
        name = f"{d}/{rng.choice(['a', 'b', 'ü', 'x y', 'z'])}{rng.randrange(10**6)}"
        rows[name] = {"path": name, "size": rng.randrange(1, 9)}
    return rows


def _oracle(a: dict[str, dict], b: dict[str, dict]) -> dict[str, list[str]]:
    key = ("type", "mode", "size", "target", "chunks")
    return {"added": sorted((p for p in b if p not in a), key=lambda p: p.encode()),
            "removed": sorted((p for p in a if p not in b), key=lambda p: p.encode()),
            "changed": sorted((p for p in a if p in b and any(a[p].get(k) != b[p].get(k) for k in key)),
                              key=lambda p: p.encode())}


@pytest.mark.parametrize("seed", range(6))
def test_diff_merges_row_groups_of_stored_manifests_like_a_whole_join(seed: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The diff a row group at a time (two stored manifests, groups of 97 rows that end at different
    paths on each side) equals an independent comparison, and the whole-table comparison."""
    import drsync.repository.manifest as mf

    rng = random.Random(seed)
    a = _random_tree(rng, 900)
    b = {p: dict(r) for p, r in a.items() if rng.random() > 0.1}  # removed
    for p in rng.sample(sorted(k for k in b if b[k].get("type") != "dir"), 60):
        b[p] = {**b[p], "mode": 0o600} if rng.random() < 0.5 else {**b[p], "chunks": [b"\x07" * 32]}
    b.update(_random_tree(random.Random(seed + 100), 1000))  # added (and some the same)
    monkeypatch.setattr(mf, "ROW_GROUP", 97)
    ma, mb = build(sorted(a.values(), key=lambda r: r["path"].encode())), build(
        sorted(b.values(), key=lambda r: r["path"].encode()))
    fa, fb = mf.ManifestFile(ma.to_bytes()), mf.ManifestFile(mb.to_bytes())
    assert fa.num_groups > 5 and fb.num_groups > 5
    want = _oracle(a, b)
    assert diff(fa, fb).as_dict() == want
    assert diff(ma, mb).as_dict() == want
    assert diff(fb, fa).as_dict() == {"added": want["removed"], "removed": want["added"], "changed": want["changed"]}
    assert diff(fa, mf.ManifestFile(mf.Manifest.empty().to_bytes())).removed == sorted(a, key=str.encode)
    # the same paths on both sides (row groups alike: compared row by row, without a join), some rows changed
    c = {p: dict(r) for p, r in a.items()}
    for p in rng.sample(sorted(k for k in c if c[k].get("type") != "dir"), 40):
        c[p] = {**c[p], "size": 99} if rng.random() < 0.5 else {**c[p], "chunks": [b"\x09" * 32]}
    fc = mf.ManifestFile(build(sorted(c.values(), key=lambda r: r["path"].encode())).to_bytes())
    assert diff(fa, fc).as_dict() == _oracle(a, c) and len(_oracle(a, c)["changed"]) == 40
    assert diff(fa, fa).as_dict() == {"added": [], "removed": [], "changed": []}


def test_diff_of_a_manifest_out_of_path_order_compares_it_whole() -> None:
    """A manifest whose rows are not sorted by path (none that drsync writes, but a hostile one can be)
    still gets a correct diff, not a merge that misses rows."""
    import pyarrow as pa

    sorted_one = build([{"path": "a"}, {"path": "b"}, {"path": "c"}])
    shuffled = Manifest(sorted_one.table.take(pa.array([2, 0, 1])))
    other = build([{"path": "a"}, {"path": "c", "mode": 0o600}, {"path": "d"}])
    assert diff(shuffled, other).as_dict() == {"added": ["d"], "removed": ["b"], "changed": ["c"]}
    assert diff(other, shuffled).as_dict() == {"added": ["b"], "removed": ["d"], "changed": ["c"]}
    changed = build([{"path": "a", "mode": 0o600}, {"path": "b"}, {"path": "c", "size": 7}])
    both = Manifest(changed.table.take(pa.array([2, 0, 1])))  # the same paths, in the same wrong order
    assert diff(shuffled, both).as_dict() == {"added": [], "removed": [], "changed": ["a", "c"]}


def test_chunks_in_order_names_each_chunk_once_in_manifest_order_across_row_groups(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What a backup copies: every chunk once, in the order files name them (ids ending in NUL bytes kept
    whole), from a stored manifest read a row group at a time; the counts agree with the whole table."""
    import drsync.repository.manifest as mf
    from drsync.repository.ids import id_list

    ids = [bytes([i]) + b"\x00" * 31 for i in range(1, 40)]  # trailing NULs: numpy would strip them
    rng = random.Random(3)
    rows, want, seen = [{"path": "d", "type": "dir"}], [], set()
    for n in range(300):
        chunks = [rng.choice(ids) for _ in range(rng.randrange(0, 4))]
        rows.append({"path": f"d/f{n:04d}", "chunks": chunks, "chunk_sizes": [3] * len(chunks),
                     "size": 3 * len(chunks)})
        for c in chunks:
            if c not in seen:
                seen.add(c)
                want.append(c)
    monkeypatch.setattr(mf, "ROW_GROUP", 13)
    m = build(rows)
    stored = mf.ManifestFile(m.to_bytes())
    assert stored.num_groups > 10
    assert id_list(mf.chunks_in_order(stored)) == want == id_list(mf.chunks_in_order(m))
    counts = mf.manifest_counts(stored)
    assert (counts.files, counts.bytes, counts.external) == (m.file_count(), m.total_bytes(), m.external_count())
    assert counts.bytes == sum(3 * len(r.get("chunks", [])) for r in rows[1:])


def test_without_leaves_a_whole_tree_and_relinks_a_group_whose_first_file_goes() -> None:
    """What a light backup keeps: a left-out directory takes what is below it; a hard-link group whose
    first file is left out gets its first kept member as first file; the result validates."""
    m = build([{"path": "bulk", "type": "dir"}, {"path": "bulk/deep", "type": "dir"}, {"path": "bulk/deep/y"},
               {"path": "bulk/x"}, {"path": "keep", "type": "dir"}, {"path": "keep/x", "hardlink": "bulk/x"},
               {"path": "keep/y", "hardlink": "bulk/x"}, {"path": "keep/z"}])
    validate(m)
    out = m.without(lambda p: p == "bulk")
    validate(out)
    rows = {e.path: e.hardlink for e in out.entries()}
    assert rows == {"keep": None, "keep/x": None, "keep/y": "keep/x", "keep/z": None}
    assert [e.path for e in m.without(lambda p: p == "nothing").entries()] == [e.path for e in m.entries()]


@pytest.mark.parametrize("at", [0, 1, 4094, 4095, 4096, 9000, 12287])
@pytest.mark.parametrize("fault, message", [
    ("twice", "appears twice"),
    ("sum", "chunks add up to 4 bytes, size says 10"),
    ("counts", "chunk list and chunk sizes differ in length"),
])
def test_validate_finds_a_fault_in_any_slice(monkeypatch: pytest.MonkeyPatch, at: int, fault: str,
                                             message: str) -> None:
    """validate decodes a row group a slice at a time (its rows as Python values): a fault is found
    wherever it lies, also across a slice's edge, and with many-chunk files before it."""
    import drsync.repository.manifest as mf
    import drsync.repository.manifest_check as mc

    monkeypatch.setattr(mc, "_SLICE_ROWS", 4096)
    monkeypatch.setattr(mf, "ROW_GROUP", 8192)
    rows: list[dict] = [{"path": f"f{i:05}", "size": 6, "chunks": [CID, CID], "chunk_sizes": [2, 4]}
                        for i in range(12288)]
    if fault == "twice":
        rows.insert(at + 1, dict(rows[at]))
    elif fault == "sum":
        rows[at] = {"path": rows[at]["path"], "size": 10, "chunk_sizes": [4]}
    else:
        rows[at] = {"path": rows[at]["path"], "size": 5, "chunks": [CID, CID], "chunk_sizes": [5]}
    bad = build(rows)
    for m in (bad, mf.ManifestFile(bad.to_bytes())):
        with pytest.raises(IntegrityError, match=message):
            validate(m)
    validate(build([r for i, r in enumerate(rows) if i not in (at, at + 1)]))  # the rest is sound


def _raw_manifest(rows: list[dict]) -> Manifest:
    """A manifest of ``rows`` in the order given (:func:`build` sorts them as drsync writes them)."""
    sorted_rows = build(rows).table
    order = {p: i for i, p in enumerate(sorted_rows.column("path").to_pylist())}
    return Manifest(sorted_rows.take(pa.array([order[r["path"].encode()] for r in rows], pa.int64())))


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """validate judges three rows at a time, so that faults fall on both sides of a slice's edge."""
    import drsync.repository.manifest_check as check

    monkeypatch.setattr(check, "_SLICE_ROWS", 3)


@pytest.mark.usefixtures("small_slices")
@pytest.mark.parametrize("rows, message", [
    # Two faults: the one in the earlier row is named, whichever check finds it and in whichever slice.
    ([{"path": "a", "type": "dir"}, {"path": "a/1"}, {"path": "a/2"}, {"path": "a/3", "size": 9, "chunk_sizes": [4]},
      {"path": "a/4"}, {"path": "a/5", "type": "symlink", "target": "../../x"}],
     "a/3: chunks add up to 4 bytes, size says 9"),
    ([{"path": "a", "type": "dir"}, {"path": "a/1"}, {"path": "a/2", "type": "symlink", "target": "/etc"},
      {"path": "a/3", "size": 9, "chunk_sizes": [4]}],
     "symlink a/2 -> /etc points outside"),
    ([{"path": "a", "type": "dir"}, {"path": "a/1"}, {"path": "a/2"}, {"path": "a/3", "mode": 0o10000},
      {"path": "a/4", "type": "fifo"}],
     "a/3: mode 4096 is not a permission mode"),
    ([{"path": "a", "type": "dir"}, {"path": "a/1"}, {"path": "a/2"}, {"path": "a/3", "type": "dir",
                                                                        "hardlink": "a/1"}],
     "a/3: a dir cannot be a hard link"),
])
def test_the_first_fault_in_row_order_is_named(rows: list[dict], message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        validate(build(rows))


@pytest.mark.usefixtures("small_slices")
@pytest.mark.parametrize("at", [1, 2, 3, 4, 5])
def test_a_duplicate_is_found_at_any_row_of_a_slice(at: int) -> None:
    paths = ["a", "b", "c", "d", "e", "f"]
    rows = [{"path": p} for p in paths[:at]] + [{"path": paths[at - 1]}] + [{"path": p} for p in paths[at:]]
    with pytest.raises(IntegrityError, match=f"{paths[at - 1]} appears twice"):
        validate(_raw_manifest(rows))


@pytest.mark.usefixtures("small_slices")
def test_out_of_order_rows_are_checked_for_duplicates_the_slow_way() -> None:
    rows = [{"path": p} for p in ("c", "d", "a", "e", "f", "b", "g", "d")]
    with pytest.raises(IntegrityError, match="d appears twice"):
        validate(_raw_manifest(rows))
    validate(_raw_manifest([{"path": p} for p in ("c", "d", "a", "e", "f", "b", "g")]))  # unordered, unique


@pytest.mark.usefixtures("small_slices")
def test_a_missing_parent_is_named_with_the_first_path_under_it() -> None:
    rows = [{"path": "a", "type": "dir"}, {"path": "a/1"}, {"path": "b/x"}, {"path": "b/y"}, {"path": "c/z"}]
    with pytest.raises(IntegrityError, match="b/x has no parent directory entry 'b'"):
        validate(build(rows))
    # Parents found in every slice, by runs (a/1, a/2 ... then a/b/1 back to a/3): all present, so no fault.
    validate(build([{"path": "a", "type": "dir"}, {"path": "a/1"}, {"path": "a/2"}, {"path": "a/b", "type": "dir"},
                    {"path": "a/b/1"}, {"path": "a/c"}, {"path": "a\udcff", "type": "dir"},
                    {"path": "a\udcff/x"}]))
    with pytest.raises(IntegrityError, match=r"a\\xff/x has no parent directory entry"):
        validate(build([{"path": "a", "type": "dir"}, {"path": "a/1"}, {"path": "a\udcff/x"}]))
