"""drsync's DistCp copy listing (java/distcp: ``drsync.distcp.ListedCopyListing``) on the real HDFS.

The listing names each file of a snapshot and the name drsync gives its copy in a flat staging
directory (``SOURCE<TAB>TARGET``, both percent-encoded). DistCp runs as drsync's
``replication.distcp_command`` runs it in tests: ``scripts/hadoop-cluster distcp DIR ARGS`` (a new
JVM, like ``hadoop distcp``) with the listing jar on ``HADOOP_CLASSPATH``. What was copied is read
back by Hadoop's own client (``admin tree``: its listing and SHA-256 of every file), never by drsync.
Refusals with many cases run in one JVM (``cluster.distcp_runs``): a JVM per DistCp run costs seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.hadoop import cluster as hc
from tests.realhdfs import RealHdfs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "hadoop-cluster"
LISTING_CLASS = "-Ddistcp.copy.listing.class=drsync.distcp.ListedCopyListing"
COMPOSITE = "-Ddfs.checksum.combine.mode=COMPOSITE_CRC"
MIB = 1 << 20

# The snapshot's files (the cluster has 1 MiB blocks): the same basename in several directories, an
# empty file, a file of four blocks, and names with what a listing must carry intact.
FILES: dict[str, bytes] = {
    "tables/orders/part-00000": b"orders " * 700,
    "tables/users/part-00000": b"users " * 900,
    "tables/users/2024/part-00000": b"old users " * 300,
    "empty": b"",
    "big.bin": bytes(range(256)) * (3 * MIB // 256) + b"tail" * 3000,
    "with space/100% sure+plus": b"spaces, percent and plus",
    "ünïcödé/日本語.txt": "contenu non-ASCII: 日本語".encode(),
    "tab\there": b"a tab",
    "new\nline": b"a newline",
}


def line(source: str, target: str) -> str:
    """One listing line as drsync writes it."""
    return f"{quote(source, safe='')}\t{quote(target, safe='')}\n"


@pytest.fixture(scope="module")
def snap(hdfs_cluster) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The files above in a snapshottable directory, snapshot ``s1`` taken, then one more file
    written (it is not in the snapshot)."""
    h = RealHdfs(hdfs_cluster)
    data = f"{h.test_dir}/data"
    for rel, body in FILES.items():
        h.mkdirs(os.path.dirname(f"{data}/{rel}"))
        h.fs.write(f"{data}/{rel}", body)
    h.allow_snapshot(data)
    h.fs.create_snapshot(data, "s1")
    h.fs.write(f"{data}/after-the-snapshot", b"later")
    snapshot = f"{data}/.snapshot/s1"
    assert {p for p, e in h.tree(snapshot).items() if e["type"] == "file"} == set(FILES)
    return {"h": h, "data": data, "snapshot": snapshot, "rpc": hdfs_cluster.info["hdfs"]}


def distcp(cluster: hc.HadoopCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command: scripts/hadoop-cluster distcp, the listing jar on HADOOP_CLASSPATH."""
    env = {**os.environ, "HADOOP_CLASSPATH": str(hc.DISTCP_JAR)}
    return subprocess.run([sys.executable, str(SCRIPT), "distcp", str(cluster.dir), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_each_listed_file_is_copied_to_its_chosen_name_with_other_blocks(snap, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    h: RealHdfs = snap["h"]
    staging = f"{h.test_dir}/root/.drsync-staging"
    chosen = {rel: str(i) for i, rel in enumerate(FILES)}
    chosen["with space/100% sure+plus"] = "names/100% sure+plus ü"  # a TARGET below a directory, odd characters
    listing = tmp_path / "listing"
    text = "".join(line(rel, target) for rel, target in chosen.items())
    # '+' written as itself (not %2B) is a plus, not a space as java.net.URLDecoder would make it.
    text += "with%20space%2F100%25%20sure+plus\tplus-as-is\n"
    listing.write_text(text, encoding="utf-8")
    r = distcp(h.cluster, LISTING_CLASS, f"-Ddrsync.distcp.listing=file://{listing}", COMPOSITE,
               f"-Ddfs.blocksize={2 * MIB}", f"{snap['rpc']}{snap['snapshot']}", f"{snap['rpc']}{staging}")
    assert r.returncode == 0, r.stderr[-5000:]
    assert f"Number of paths in the copy list: {len(chosen) + 1}" in r.stderr

    source = h.tree(snap["snapshot"])
    copied = h.tree(f"{h.test_dir}/root")
    expected = {f".drsync-staging/{t}": source[rel]["sha256"] for rel, t in chosen.items()}
    expected[".drsync-staging/plus-as-is"] = source["with space/100% sure+plus"]["sha256"]
    # Exactly the targets (and the directories they need): no temporary file, log or listing left.
    assert {p: e.get("sha256") for p, e in copied.items() if e["type"] == "file"} == expected
    assert {p for p, e in copied.items() if e["type"] == "dir"} == {".drsync-staging", ".drsync-staging/names"}
    after = {p for p in h.tree(h.test_dir) if not p.startswith("root")}
    assert after == {"data", *(f"data/{p}" for p in h.tree(snap["data"]))}  # the source side as it was

    # The copy of the four-block file has 2 MiB blocks: its MD5-of-CRCs checksum (what WebHDFS gives,
    # block-size dependent) differs from the source's, yet DistCp's checksum check (on: no
    # -skipcrccheck) passed, comparing COMPOSITE_CRC checksums.
    big = f"{staging}/{chosen['big.bin']}"
    assert h.fs.status(big)["blockSize"] == 2 * MIB
    assert h.fs.status(f"{snap['snapshot']}/big.bin")["blockSize"] == MIB
    assert "skipCRC=false" in r.stderr

    def md5_of_crcs(path: str) -> str:
        got = requests.get(f"{h.namenode_urls[0]}/webhdfs/v1{path}",
                           params={"op": "GETFILECHECKSUM", "user.name": h.superuser}, timeout=30)
        got.raise_for_status()
        return str(got.json()["FileChecksum"]["bytes"])

    assert md5_of_crcs(big) != md5_of_crcs(f"{snap['snapshot']}/big.bin")


@pytest.mark.parametrize("case", ["not in the snapshot", "a directory", "malformed line"])
def test_a_bad_listing_copies_nothing(snap, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    h: RealHdfs = snap["h"]
    target = f"{h.test_dir}/refused-{case.replace(' ', '-')}"
    good = line("tables/orders/part-00000", "0")
    bad, reason = {
        "not in the snapshot": (line("after-the-snapshot", "1"), 'SOURCE "after-the-snapshot" does not exist in'),
        "a directory": (line("tables/users", "1"), 'SOURCE "tables/users" is a directory'),
        "malformed line": ("tables%2Fusers%2Fpart-00000 1\n", "line 2 of file:"),
    }[case]
    listing = tmp_path / "listing"
    listing.write_text(good + bad, encoding="utf-8")
    r = distcp(h.cluster, LISTING_CLASS, f"-Ddrsync.distcp.listing=file://{listing}", COMPOSITE,
               f"{snap['rpc']}{snap['snapshot']}", f"{snap['rpc']}{target}")
    assert r.returncode == 255, r.stderr[-5000:]  # DistCp's INVALID_ARGUMENT (-1)
    assert "Invalid input" in r.stderr and reason in r.stderr, r.stderr[-5000:]
    if case == "malformed line":
        assert "is not SOURCE<TAB>TARGET (1 tab-separated fields)" in r.stderr
    assert h.fs.status(target) is None  # not even the target directory


def test_every_kind_of_bad_listing_is_refused_with_its_reason(snap, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    h: RealHdfs = snap["h"]
    src = f"{snap['rpc']}{snap['snapshot']}"
    target = f"{h.test_dir}/refused"
    ok = line("empty", "0")
    cases: list[tuple[str, list[str], str]] = [  # listing text (the first run: no listing key), extra arguments, reason
        ("", [], "set drsync.distcp.listing to the listing file"),
        ("", [], "lists no file"),
        (ok + "empty\t1\textra\n", [], "line 2 of file:"),
        (ok + "%2Fetc%2Fpasswd\t1\n", [], 'SOURCE "/etc/passwd" is absolute'),
        (ok + "tables%2F..%2F..%2Fx\t1\n", [], "SOURCE \"tables/../../x\" has a '..' component"),
        (ok + "empty\t\n", [], 'TARGET "" is empty'),
        (ok + "empty\t%2Ftmp%2Fx\n", [], 'TARGET "/tmp/x" is absolute'),
        (ok + "empty\t..%2Fx\n", [], "TARGET \"../x\" has a '..' component"),
        (ok + "empty\ta%2F%2Fb\n", [], "TARGET \"a//b\" has an empty or '.' component"),
        (ok + "big.bin\t0\n", [], 'lines 1 and 2 of file:'),
        (ok + "big.bin\t0%2Fsub\n", [], 'has TARGET "0", the directory of TARGET "0/sub"'),
        (ok + "empty\t%zz\n", [], "has a '%' that is not followed by two hex digits"),
        (ok + "empty\t%ff\n", [], 'TARGET "%ff" does not decode to UTF-8'),
        (ok + "empty\tcarriage\rreturn\n", [], "has a control character: percent-encode it"),
        (ok, [f"{src}/tables"], "give exactly one source path"),
        (ok, ["-f", f"file://{tmp_path}/sources"], "not -f"),
    ]
    runs = []
    for i, (text, extra, _) in enumerate(cases):
        listing = tmp_path / f"listing-{i}"
        listing.write_text(text, encoding="utf-8")
        key = [] if i == 0 else [f"-Ddrsync.distcp.listing={listing}"]  # a local path, no scheme
        if "-f" in extra:
            (tmp_path / "sources").write_text(f"{src}/empty\n")
            runs.append([LISTING_CLASS, *key, *extra, target])
        else:
            runs.append([LISTING_CLASS, *key, src, *extra, target])
    results = hc.distcp_runs(h.cluster.dir, runs, hadoop_classpath=str(hc.DISTCP_JAR))
    for (text, _, reason), (rc, log) in zip(cases, results, strict=True):
        refusal = [x for x in log.splitlines() if "InvalidInputException: drsync listing" in x]
        assert rc == -1 and len(refusal) == 1 and reason in refusal[0], (text, rc, log[-3000:])
    assert h.fs.status(target) is None
