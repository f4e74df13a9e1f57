"""The WAN part of ``make bench`` (``--only wan``): a standby across a 100 Mbit/s link of 50 ms round trip.

drsync (a primary cycle, ``agent --once``, to a standby agent) against ``rsync -az --fsync`` to its
daemon, both through the same emulated link (:mod:`wanlink`; network namespaces with ``tc netem`` need
``sch_netem``, which this kernel may lack, so a delaying, rate-limiting proxy stands in and the output
says which one ran): full sync and 1 % incremental sync of

- the incompressible tree (``gen_big``: 1 GiB in 256 files; --quick 64 MiB), and
- an analytics export (:func:`gen_export`: CSV events and JSON-lines sessions with timestamps, ids,
  categories and floats, 1 GiB; --quick 64 MiB), whose 1 % change re-exports one file and appends to
  the newest partitions, and
- 50,000 small files (``gen_small``), whose 1 % change rewrites 500 of them, removes 10 and adds 10, and
  a no-change cycle after it: where the file list (rsync's) and the manifest (drsync's: a patch of the
  standby's over a far link, and only its name when nothing changed) are most of what crosses the link.

Each sync reports its wall time and the bytes that crossed the link (payload, both directions, counted
by the proxy). Then the gRPC tuning for the link's bandwidth-delay product (100 Mbit/s x 50 ms = 625 KB):
the full sync of the incompressible tree again with other gRPC options and upload message sizes, injected
into both agents by a start-up shim (:data:`SHIM`), against the options drsync ships with.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from wanlink import WanLink

from bench import (
    DRSYNC,
    AgentPair,
    Report,
    RsyncDaemon,
    Run,
    age,
    change_one_percent,
    drop_caches,
    free_port,
    gen_big,
    gen_small,
    run,
    vm_hwm_mib,
)

# --- The analytics export ------------------------------------------------------------------------
COUNTRIES = ["US", "DE", "GB", "FR", "IN", "BR", "JP", "CA", "NL", "ES", "IT", "SE", "PL", "MX", "AU", "KR",
             "CH", "BE", "AT", "NO", "DK", "FI", "IE", "PT", "ZA"]
DEVICES = ["mobile", "desktop", "tablet", "tv", "bot"]
EVENTS = ["page_view", "click", "search", "add_to_cart", "purchase", "login", "logout", "scroll", "video_play",
          "share"]
REFERRERS = ["", "https://www.google.com/", "https://www.bing.com/", "https://t.co/", "https://news.ycombinator.com/",
             "https://www.facebook.com/", "https://duckduckgo.com/", "android-app://com.example.shop"]
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _pick(rng: np.random.Generator, values: list[str], n: int, skew: float = 1.2) -> pa.Array:
    """``n`` draws from ``values``, the first ones most frequent (Zipf-like)."""
    w = 1.0 / np.arange(1, len(values) + 1) ** skew
    return pc.take(pa.array(values), pa.array(rng.choice(len(values), n, p=w / w.sum())))


def _events(rng: np.random.Generator, n: int, t0_ms: int, first_id: int) -> pa.Table:
    """Click-stream rows: time, ids, categories, a URL, prices and latencies."""
    ts = t0_ms + np.cumsum(rng.exponential(40.0, n)).astype(np.int64)
    user = rng.zipf(1.4, n) % 3_000_000 + 1
    kind_idx = rng.choice(len(EVENTS), n, p=np.array([40, 25, 12, 8, 3, 3, 2, 4, 2, 1]) / 100)
    buying = np.isin(kind_idx, (3, 4))
    price = np.where(buying, np.round(rng.lognormal(3.2, 1.0, n), 2), 0.0)
    pages = [f"/c/{c}/item/{i}" for c in ("shoes", "books", "garden", "toys", "audio", "kitchen") for i in range(90)]
    return pa.table({
        "event_time": pa.array(ts, pa.timestamp("ms", tz="UTC")),
        "event_id": pa.array(first_id + np.arange(n, dtype=np.int64)),
        "user_id": pa.array(user),
        "session_id": pa.array(user * 1000 + rng.integers(0, 40, n)),
        "event_type": pc.take(pa.array(EVENTS), pa.array(kind_idx)),
        "country": _pick(rng, COUNTRIES, n),
        "device": _pick(rng, DEVICES, n, 1.5),
        "page": _pick(rng, pages, n, 0.9),
        "referrer": _pick(rng, REFERRERS, n, 1.0),
        "quantity": pa.array(np.where(buying, rng.integers(1, 5, n), 0)),
        "price": pa.array(price),
        "latency_ms": pa.array(np.round(rng.gamma(2.0, 40.0, n), 1)),
    })


def _sessions_jsonl(rng: np.random.Generator, n: int, t0_ms: int) -> bytes:
    """JSON lines of session summaries, built column-wise (no Python loop per row)."""
    user = pa.array(rng.zipf(1.4, n) % 3_000_000 + 1)
    start = pc.strftime(pa.array(t0_ms + np.cumsum(rng.exponential(300.0, n)).astype(np.int64),
                                 pa.timestamp("ms", tz="UTC")), format="%Y-%m-%dT%H:%M:%SZ")
    cols = ['{"session_id":', s(pc.add(pc.multiply(user, 1000), pa.array(rng.integers(0, 40, n)))),
            ',"user_id":', s(user), ',"start":"', start,
            '","duration_s":', s(pa.array(np.round(rng.gamma(1.5, 200.0, n), 1))),
            ',"pages":', s(pa.array(rng.geometric(0.2, n))), ',"country":"', _pick(rng, COUNTRIES, n),
            '","device":"', _pick(rng, DEVICES, n, 1.5), '","revenue":',
            s(pa.array(np.where(rng.random(n) < 0.04, np.round(rng.lognormal(3.5, 1.0, n), 2), 0.0))), "}\n"]
    line = pc.binary_join_element_wise(*cols, "")
    # A string array's data buffer is its values back to back: the file's bytes, without a copy per row.
    offsets = np.frombuffer(line.buffers()[1], dtype=np.int32)[line.offset:line.offset + len(line) + 1]
    return line.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]]


def s(a: pa.Array) -> pa.Array:
    return pc.cast(a, pa.string())


def _write_rows(f, rng: np.random.Generator, jsonl: bool, n: int, t0_ms: int, first_id: int, header: bool) -> None:
    if jsonl:
        f.write(_sessions_jsonl(rng, n, t0_ms))
    else:
        pacsv.write_csv(_events(rng, n, t0_ms, first_id), f, pacsv.WriteOptions(include_header=header))


def _fill(path: Path, size: int, seed: int, append: bool = False) -> int:
    """Write (or append) rows to ``path`` until it grew by about ``size`` bytes; returns the growth."""
    rng = np.random.default_rng(seed)
    jsonl = path.suffix == ".jsonl"
    start = path.stat().st_size if append else 0
    with open(path, "ab" if append else "wb") as f:
        row_bytes, rows = (170 if jsonl else 150), 0
        while f.tell() - start < size:
            n = max(20, int((size - (f.tell() - start)) / row_bytes) + 1)
            _write_rows(f, rng, jsonl, n, T0_MS + seed * 3_600_000, seed * 10_000_000 + rows,
                        header=not append and f.tell() == 0)
            rows += n
            row_bytes = max(1, (f.tell() - start) // rows)
        return f.tell() - start


def export_files(root: Path, files: int = 128) -> list[Path]:
    """The export's files: day partitions of events (CSV) and sessions (JSON lines), 8 files a day."""
    return [root / ("sessions" if i % 4 == 3 else "events") / f"dt=2026-01-{1 + i // 8:02}" /
            f"part-{i:04}.{'jsonl' if i % 4 == 3 else 'csv'}" for i in range(files)]


def gen_export(root: Path, mib: int, files: int = 128) -> None:
    """An analytics export of about ``mib`` MiB in ``files`` files (compressible text)."""
    each = (mib << 20) // files
    for i, p in enumerate(export_files(root, files)):
        p.parent.mkdir(parents=True, exist_ok=True)
        _fill(p, each, seed=i + 1)


def change_export(root: Path, files: int = 128) -> int:
    """About 1 % of the export changes: one file re-exported (new rows, same size) and rows appended to the
    newest files for the rest. Returns the bytes written."""
    paths = export_files(root, files)
    total = sum(p.stat().st_size for p in paths)
    budget = total // 100
    redo = paths[5]
    changed = _fill(redo, redo.stat().st_size, seed=10_000 + 5)
    rest = max(0, budget - changed)
    for k, p in enumerate(paths[-4:]):
        changed += _fill(p, max(1, rest // 4), seed=20_000 + k, append=True)
    return changed


# --- Measuring through the link -------------------------------------------------------------------
# Both agents of a tuning run start through this shim: it adds gRPC options (``options``, replacing ones of
# the same name) and sets the primary's upload message size, from $DRSYNC_BENCH_TUNING (JSON).
SHIM = ("import json, os\n"
        "import drsync.agent.primary as p, drsync.transport.grpc as g\n"
        "t = json.loads(os.environ.get('DRSYNC_BENCH_TUNING') or '{}')\n"
        "extra = [tuple(o) for o in t.get('options', [])]\n"
        "base = g.channel_options\n"
        "g.channel_options = lambda: [o for o in base() if o[0] not in dict(extra)] + extra\n"
        "p.UPLOAD_MESSAGE_BYTES = t.get('upload_message_bytes', p.UPLOAD_MESSAGE_BYTES)\n"
        "from drsync.cli import run\n"
        "run()\n")
SHIMMED = [sys.executable, "-c", SHIM]

# The variants the tuning step tries, against drsync's own options (None: as shipped). Measured 2026-12-01
# (1 GiB, 2 shared cores): as shipped, gRPC's BDP probe grows the HTTP/2 windows past the link's 625 KB and
# a full sync's shipment ran at 97 Mbit/s of the link's 100 (upload alone 98); turning the probe off cost
# 1.5x; larger stream windows (lookahead 4 or 16 MiB) and 4 MiB or 256 KiB upload messages changed nothing
# measurable but the primary's peak memory (+30 and +70 MiB). So drsync keeps its options.
TUNINGS: list[tuple[str, dict | None]] = [
    ("as shipped", None),
    ("bdp_probe 0", {"options": [["grpc.http2.bdp_probe", 0]]}),
    ("lookahead 4M, msg 4M", {"options": [["grpc.http2.lookahead_bytes", 4 << 20]], "upload_message_bytes": 4 << 20}),
    ("lookahead 16M, msg 256K",
     {"options": [["grpc.http2.lookahead_bytes", 16 << 20]], "upload_message_bytes": 256 << 10}),
]


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


class WanStandby:
    """An agent pair whose primary reaches the standby through a :class:`WanLink` (its own configuration
    ``primary-wan.toml`` names the link's address); with ``tuning``, both agents run through :data:`SHIM`."""

    def __init__(self, work: Path, name: str, data: Path, tuning: dict | None = None) -> None:
        self.pair = AgentPair(work, name, data)
        self.env = dict(os.environ, DRSYNC_BENCH_TUNING=json.dumps(tuning)) if tuning else None
        port = int(self.pair.address.rsplit(":", 1)[1])
        if tuning:  # the standby again, with the options under test
            self.pair.stop()
            with open(self.pair.dir / "standby.log", "ab") as log:
                self.pair.proc = subprocess.Popen([*SHIMMED, "agent", "--config", str(self.pair.standby)],
                                                  stdout=log, stderr=log, env=self.env)
            wait_listening(port)
        self.link = WanLink(("127.0.0.1", port))
        self.primary = self.pair._config("primary-wan", "primary", data, free_port(),
                                         f'[replication]\nstandbys = ["{self.link.address}"]\n')

    def cycle(self) -> tuple[Run, dict, tuple[int, int]]:
        """One primary cycle through the link: the process, its shipment's figures, bytes (up, down)."""
        drop_caches()
        before = self.link.counters()
        cmd = [*(SHIMMED if self.env else DRSYNC), "agent", "--config", str(self.primary), "--once", "--json"]
        r = run_env(cmd, self.env)
        after = self.link.counters()
        doc = json.loads(r.out)
        return r, {**next(iter(doc["results"].values())), "cycle_s": doc["duration_s"]}, \
            (after[0] - before[0], after[1] - before[1])

    def standby_peak_mib(self) -> float:
        return vm_hwm_mib(self.pair.proc.pid)

    def stop(self) -> None:
        self.pair.stop()
        self.link.close()


def run_env(cmd: list[str], env: dict[str, str] | None) -> Run:
    """:func:`bench.run` with an environment (wall time, peak RSS from wait4)."""
    if env is None:
        return run(cmd)
    saved = os.environ.get("DRSYNC_BENCH_TUNING")
    os.environ["DRSYNC_BENCH_TUNING"] = env["DRSYNC_BENCH_TUNING"]
    try:
        return run(cmd)
    finally:
        if saved is None:
            os.environ.pop("DRSYNC_BENCH_TUNING", None)
        else:
            os.environ["DRSYNC_BENCH_TUNING"] = saved


def wait_listening(port: int, timeout_s: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"bench: nothing listens on 127.0.0.1:{port}")


def rsync_through(link: WanLink, src: Path, dest: str) -> tuple[Run, tuple[int, int]]:
    """``rsync -az --fsync`` to the daemon behind ``link``; the run and the bytes (up, down) on the link."""
    drop_caches()
    before = link.counters()
    r = run(["rsync", "-az", "--fsync", f"{src}/", f"rsync://{link.address}/bench/{dest}/"])
    after = link.counters()
    return r, (after[0] - before[0], after[1] - before[1])


def change_small(root: Path) -> int:
    """Rewrite 1 % of the small files (``gen_small``'s), remove a few and add a few. Returns bytes written."""
    files = sorted(root.rglob("*.dat"))
    rnd = random.Random(17)
    written = 0
    for f in rnd.sample(files, k=max(1, len(files) // 100)):
        data = rnd.randbytes(rnd.randrange(256, 4096))
        f.write_bytes(data)
        written += len(data)
    for f in rnd.sample(files, k=10):
        f.unlink(missing_ok=True)
    for i in range(10):
        (root / "d0000" / f"new-{i}.dat").write_bytes(rnd.randbytes(1000))
        written += 1000
    return written


def bench_wan(work: Path, big_mib: int, export_mib: int, rep: Report, tune: bool = True,
              small_files: int = 50_000) -> None:
    probe = WanLink(("127.0.0.1", 9))
    method = probe.describe()
    probe.close()
    print(f"wan: link = {method}")
    big, export, small = work / "w-big", work / "w-export", work / "w-small"
    print(f"wan: generating {big_mib} MiB in 256 files, {small_files} small files and a {export_mib} MiB "
          f"analytics export ...")
    gen_big(big, big_mib)
    gen_small(small, small_files)
    t = time.perf_counter()
    gen_export(export, export_mib)
    export_bytes = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    print(f"wan: export of {mib(export_bytes)} in {time.perf_counter() - t:.1f}s")
    age(big)
    age(export)
    age(small)
    os.sync()
    daemon = RsyncDaemon(work)
    rlink = WanLink(("127.0.0.1", daemon.port))
    rep.results["wan: link"] = method
    floor = 1e8 / 8  # the link's payload rate, bytes/s
    sets: list[tuple[str, Path, Callable[[Path], int]]] = [
        (f"incompressible {big_mib} MiB", big, change_one_percent),
        (f"export {export_bytes / (1 << 20):.0f} MiB", export, change_export),
        (f"small files {small_files}", small, change_small)]
    try:
        for i, (label, tree, change) in enumerate(sets):
            ws = WanStandby(work, f"wan-{i}", tree)
            try:
                peer, peer_wire = rsync_through(rlink, tree, f"wan-{i}")
                first, figures, wire = ws.cycle()
                wan_rows(rep, f"wan: {label}, full sync", first, figures, wire, peer, peer_wire, floor,
                         ws.standby_peak_mib())
                changed = change(tree)
                peer, peer_wire = rsync_through(rlink, tree, f"wan-{i}")
                inc, figures, wire = ws.cycle()
                wan_rows(rep, f"wan: {label.split()[0]}, 1 % incremental ({mib(changed)})", inc, figures, wire,
                         peer, peer_wire, floor, ws.standby_peak_mib())
                if tree is small:  # where the file list is most of what crosses the link
                    peer, peer_wire = rsync_through(rlink, tree, f"wan-{i}")
                    noop, figures, wire = ws.cycle()
                    wan_rows(rep, f"wan: {label.split()[0]}, no-change cycle", noop, figures, wire, peer, peer_wire,
                             floor, ws.standby_peak_mib())
            finally:
                ws.stop()
                shutil.rmtree(work / f"wan-{i}", ignore_errors=True)
                shutil.rmtree(daemon.root / f"wan-{i}", ignore_errors=True)
        if tune:
            tuning(work, big, big_mib, floor, rep)
    finally:
        rlink.close()
        daemon.stop()
        shutil.rmtree(big, ignore_errors=True)
        shutil.rmtree(export, ignore_errors=True)
        shutil.rmtree(small, ignore_errors=True)


def wan_rows(rep: Report, what: str, r: Run, figures: dict, wire: tuple[int, int], peer: Run,
             peer_wire: tuple[int, int], floor: float, standby_peak: float) -> None:
    ours, theirs = sum(wire), sum(peer_wire)
    rep.add(what, r.seconds, peer.seconds, 1.0, r.peak_mib,
            f"(shipment {figures['duration_s']:.2f}s, cycle {figures['cycle_s']:.2f}s; the link alone needs "
            f"{ours / floor:.1f}s for drsync's bytes, {theirs / floor:.1f}s for rsync's; standby peak "
            f"{standby_peak:.0f} MiB, rsync {peer.peak_mib:.0f} MiB)")
    rep.add(f"{what}: wire", ours / (1 << 20), theirs / (1 << 20), 1.0, 0.0,
            f"(drsync up {mib(wire[0])} / down {mib(wire[1])}, rsync up {mib(peer_wire[0])} / down "
            f"{mib(peer_wire[1])}; drsync's shipment {mib(figures['shipped_bytes'])} stored bytes, "
            f"{figures.get('delta_chunks', 0)} of {figures.get('missing_chunks', 0)} chunks sent as deltas; "
            f"manifest {figures.get('manifest_sent', '?')} {mib(figures.get('manifest_bytes', 0))})",
            unit="MiB")


def transport_mbit_s(t: dict | None, mib_: int = 64) -> float:
    """gRPC alone through the link: ``mib_`` MiB of 256 KiB chunks uploaded, in messages of the tuning's size,
    to a standby servicer that only counts them (no disk, no apply), with the tuning's options on both ends
    (patched in this process for the duration). Payload Mbit/s."""
    import drsync.agent.primary as primary
    import drsync.transport.grpc as g
    from drsync.transport import ReceivedChunk

    class Sink:
        state = None

        def admit(self, caller: object) -> None:
            pass

        def receive(self, caller: object, batches: Iterator[list[ReceivedChunk]]) -> tuple[int, int, int]:
            n = size = 0
            for b in batches:
                n, size = n + len(b), size + sum(len(c.data) for c in b)
            return n, n, size

    extra = [tuple(o) for o in (t or {}).get("options", [])]
    base = g.channel_options
    g.channel_options = lambda: [o for o in base() if o[0] not in dict(extra)] + extra
    try:
        listen = f"127.0.0.1:{free_port()}"
        server = g.start_server(g.ReplicationServicer(Sink(), agent="sink", role="standby",
                                                      cluster_id="bench", release="1"), listen)
        link = WanLink(("127.0.0.1", int(listen.rsplit(":", 1)[1])))
        client = g.GrpcStandbyLink(link.address)
    finally:
        g.channel_options = base
    try:
        client.health()
        chunk = 256 << 10
        blobs = [os.urandom(chunk) for _ in range(16)]
        per = max(1, (t or {}).get("upload_message_bytes", primary.UPLOAD_MESSAGE_BYTES) // chunk)
        count = (mib_ << 20) // chunk

        def batches() -> Iterator[list[ReceivedChunk]]:
            for i in range(0, count, per):
                yield [ReceivedChunk(bytes(32), 0, chunk, blobs[k % 16]) for k in range(i, min(count, i + per))]

        start = time.perf_counter()
        client.upload(1, batches())
        return (count * chunk) * 8 / (time.perf_counter() - start) / 1e6
    finally:
        client.close()
        server.stop(0)
        link.close()


def tuning(work: Path, big: Path, big_mib: int, floor: float, rep: Report) -> None:
    """A fresh full sync of the incompressible tree with each of :data:`TUNINGS`, one after the other in one
    run, each against the first (drsync's options as shipped)."""
    rep.results["wan: tuning"] = {}
    base = base_alone = 0.0
    for k, (label, t) in enumerate(TUNINGS):
        ws = WanStandby(work, f"wan-t{k}", big, t)
        try:
            r, figures, _ = ws.cycle()
        finally:
            ws.stop()
            shutil.rmtree(work / f"wan-t{k}", ignore_errors=True)
        shipment = figures["duration_s"]
        base = base or shipment
        rate = figures["shipped_bytes"] * 8 / shipment / 1e6
        rep.add(f"wan gRPC: full sync {big_mib} MiB, {label}: shipment", shipment, base, None, r.peak_mib,
                f"(vs as shipped; negotiate, upload, commit and apply: {rate:.1f} Mbit/s of stored bytes on a "
                f"{floor * 8 / 1e6:.0f} Mbit/s link; the process {r.seconds:.2f}s; "
                f"{json.dumps(t) if t else 'nothing changed'})")
        alone = transport_mbit_s(t)
        secs = 64 * 8 * 1.048576 / alone
        base_alone = base_alone or secs
        rep.add(f"wan gRPC:   upload alone, 64 MiB, {label}", secs, base_alone, None, 0.0,
                f"(vs as shipped; {alone:.1f} Mbit/s of payload through the link to a servicer that only counts)")
        rep.results["wan: tuning"][label] = {"tuning": t, "process_s": round(r.seconds, 3),
                                             "shipment_s": round(shipment, 3),
                                             "mbit_s": round(rate, 1), "upload_alone_mbit_s": round(alone, 1)}
