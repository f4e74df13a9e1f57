"""Alert rules under real promtool, the Grafana dashboard against real metrics, and the status page
in real headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from drsync.agent.statuspage import lag_chart, render
from tests.conftest import ROOT
from tests.group import Group, scrape, wait_for

PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "drsync-dashboard.json"
ARTIFACTS = ROOT / "test-artifacts"

# Every metric DESIGN.md names (prefix drsync_, labels group and agent).
DESIGN_METRICS = ["is_primary", "epoch", "zookeeper_connected", "replication_lag_seconds",
                  "last_snapshot_timestamp_seconds", "last_applied_snapshot_timestamp_seconds",
                  "snapshot_duration_seconds", "ship_duration_seconds", "shipped_bytes_total",
                  "deduplicated_bytes_total", "ship_failures_total", "backup_last_success_timestamp_seconds",
                  "drill_last_success_timestamp_seconds", "drill_last_result", "drill_rto_seconds",
                  "drill_rpo_seconds"]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run the tests with make test, which installs prometheus")
    return path


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run([promtool(), "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], cwd=PROM, capture_output=True, text=True)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_every_rule_is_actionable_and_has_a_firing_unit_test() -> None:
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"DrsyncReplicationLagHigh", "DrsyncNoPrimary", "DrsyncTwoPrimaries", "DrsyncZooKeeperDisconnected",
            "DrsyncAgentDown", "DrsyncDrillFailed", "DrsyncDrillStale", "DrsyncBackupStale"} <= names
    for r in rules:
        assert "for" in r and r["labels"]["severity"] in ("page", "warning"), r["alert"]
        assert r["annotations"]["summary"] and len(r["annotations"]["description"]) > 80, r["alert"]
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    firing = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c.get("exp_alerts")}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c.get("exp_alerts")}
    assert firing == names, f"rules without a firing test: {names - firing}"
    assert len(quiet) >= 6


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, zk_server) -> Iterator[Group]:  # type: ignore[no-untyped-def]
    """A primary and a standby with ZooKeeper roles, a drill run, and a backup taken."""
    tmp = tmp_path_factory.mktemp("monitoring")
    g = Group(tmp, zk_server.hosts, "monitoring", ["east", "west"])
    cfg = g.cfg["east"]
    cfg.write_text(cfg.read_text() + f'[backups]\ndestination = "{tmp / "backups"}"\ninterval = "1h"\n')
    for name in g.names:
        g.start(name)
    assert g.promote("east").code == 0
    wait_for(lambda: g.in_sync("east", "west") and g.record("west").get("applied_snapshot"), "west to sync")
    assert g.drsync("west", "drill", "run").code == 0
    wait_for(lambda: not math.isnan(scrape(g.metrics["east"], g.group, "east")
                                    ["drsync_backup_last_success_timestamp_seconds"]), "the first backup")
    yield g
    g.stop_all()


def _families(address: str) -> dict[str, list[dict[str, str]]]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s.labels)
    return out


def test_every_design_metric_is_exported_with_group_and_agent(running: Group) -> None:
    for name in running.names:
        fams = _families(running.metrics[name])
        for m in DESIGN_METRICS:
            key = f"drsync_{m}_count" if m.endswith("duration_seconds") else f"drsync_{m}"
            assert key in fams, f"{name} does not export {key}"
            assert all(lbl.get("group") == "monitoring" and lbl.get("agent") == name for lbl in fams[key]), key
    wait_for(lambda: scrape(running.metrics["west"], "monitoring", "west")["drsync_drill_last_result"] == 1,
             "west to export the drill it ran")
    west = scrape(running.metrics["west"], "monitoring", "west")
    east = scrape(running.metrics["east"], "monitoring", "east")
    assert east["drsync_backup_last_success_timestamp_seconds"] > 0 and west["drsync_drill_rpo_seconds"] >= 0
    assert east["drsync_is_primary"] == 1 and west["drsync_zookeeper_connected"] == 1


def test_alerts_and_dashboard_only_use_exported_metrics(running: Group) -> None:
    exported = set(_families(running.metrics["east"])) | set(_families(running.metrics["west"]))
    rules = (PROM / "alerts.yml").read_text()
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set(re.findall(r"drsync_[a-z_]+", rules + "\n".join(exprs)))
    assert used and used <= exported, f"not exported: {used - exported}"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("lag", "shipped", "snapshot duration", "ship duration", "primary", "epoch", "drill"):
        assert topic in titles, topic
    assert dash["templating"]["list"][1]["name"] == "group"


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: run the tests with make test, which installs it")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", *args], capture_output=True, text=True, timeout=120)


def ocr(image: Path) -> str:
    """The text tesseract reads in ``image`` (Debian's tesseract-ocr; make system-deps installs it)."""
    exe = shutil.which("tesseract")
    if exe is None:
        pytest.fail("tesseract is not installed: run the tests with make test, which installs tesseract-ocr")
    r = subprocess.run([exe, str(image), "stdout"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # The one confusion that matters here: a zero in a duration read as the letter O ("1m0Os", "Os").
    return re.sub(r"(?<=\d)O|O(?=\d)|(?<![A-Za-z])O(?=[smh](?![A-Za-z]))", "0", r.stdout)


def _status(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "status.json", timeout=10).read())


def test_status_page_in_headless_chromium(running: Group) -> None:
    g = running
    url = f"http://{g.metrics['west']}/"
    # Wait until the in-memory lag history has a measured sample, so the chart has a line to draw.
    wait_for(lambda: any(p["lag_s"] is not None for p in _status(url)["lag_history"]), "a lag sample", timeout=30)
    doc = _status(url)  # issue 20: one time format in /status.json, no bare Unix floats
    assert all(p["at"].endswith("Z") and isinstance(p["at_unix"], float) for p in doc["lag_history"])
    assert doc["cycles"] and all(c["at"].endswith("Z") and c["at_unix"] > 0 for c in doc["cycles"])
    # Byte counts a human reads are in binary units ("293.0 KiB"), never "300006 B".
    ships = [c["summary"] for c in _status(f"http://{g.metrics['east']}/")["cycles"] if "chunks sent" in c["summary"]]
    assert ships and all(re.search(r"chunks sent, \d+(\.\d)? (B|KiB|MiB|GiB) in", x) for x in ships), ships
    assert not any(re.search(r"\d{4,} B\b", x) for x in ships), ships
    assert "(0.0 MiB)" not in g.log("west") and "chunks, stored" in g.log("west")  # 2 bytes were "0.0 MiB"
    # Shipments go on all the time (a new snapshot every second): the page would show whatever west
    # had applied when it was rendered. Hold west's applies, so that what it shows cannot move on.
    assert g.drsync("west", "apply", "--hold").code == 0
    try:
        def settled() -> str | None:
            """West's applied snapshot, once the page's source (west's view of the group) shows it too."""
            applied = g.hello("west").applied_snapshot
            rows = {a["name"]: a for a in _status(url)["agents"]}
            return applied if applied and rows.get("west", {}).get("applied_snapshot") == applied else None

        applied = wait_for(settled, "west's status to show the snapshot it holds applied")
        dom = chromium("--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        text = re.sub(r"<[^>]+>", " ", html)
        assert re.search(r'id="group">monitoring<', html) and re.search(r'id="primary">east<', html)
        assert re.search(r'id="epoch">1<', html) and re.search(r'id="role">standby<', html)
        rows = dict(re.findall(r'data-agent="(\w+)">.*?class="role role-(\w+)"', html))
        assert rows == {"east": "primary", "west": "standby"}
        assert '<svg id="lag-chart"' in html and "<polyline" in html
        assert re.search(r'class="drill ok"><td>west</td><td>1</td>', html) and "passed" in text
        assert 'id="apply-hold"' in html  # the operator's hold is on the page
        # The standby's row names exactly the snapshot it holds applied, one its repository keeps.
        shown = re.search(r'data-agent="west">.*?</tr>', html, re.S)
        assert shown is not None and f"<td>{applied}</td>" in shown.group(0), (applied, shown.group(0))
        assert applied in {s["id"] for s in g.drsync("west", "snapshot", "list", "--json").json()}
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        r = chromium(f"--screenshot={shot}", "--window-size=1200,1400", url)
        assert r.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        assert g.drsync("west", "apply", "--resume").code == 0


def test_primary_page_shows_last_known_lag_while_shipments_fail_and_the_groups_drills(running: Group) -> None:
    """The primary's page: its standby's lag while every shipment is refused (here: west holds applies
    and east's agent restarted, so no shipment reached west since), the group's drill history (run on
    west), a chart heading that names the span the chart shows, and sizes in binary units."""
    g = running
    url = f"http://{g.metrics['east']}/"
    assert g.drsync("west", "apply", "--hold").code == 0
    try:
        g.kill("east", signal.SIGTERM)
        g.start("east")
        g.wait_role("east", "primary")
        wait_for(lambda: "refused" in str(_status(url)["cycles"]), "east's shipments to be refused")
        doc = _status(url)
        assert doc["lag_s"] is not None, doc  # the last lag west published, not "unknown"
        # The refusal is a warning whose message starts with what went wrong.
        assert re.search(r" WARNING group=monitoring agent=east drsync\.agent: refused[: ]", g.log("east")), \
            g.log("east")[-3000:]
        dom = chromium("--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert not re.search(r'id="lag-now">-<', html), re.search(r'id="lag-now">[^<]*<', html)
        assert re.search(r'class="drill ok"><td>west</td>', html)  # west's drill, on east's page
        heading = re.search(r'id="lag-heading">Replication lag, last ([^<]+)<', html)
        label = re.search(r'aria-label="replication lag over the last ([^"]+)"', html)
        assert heading and label and heading.group(1) == label.group(1), (heading, label)
        assert re.search(r"<td>\d+\.\d (KiB|MiB|GiB)</td>", html)  # snapshot sizes, human units
        ARTIFACTS.mkdir(exist_ok=True)
        # The screenshot, read back with OCR: the chart's heading and axis name one span, and the primary's lag
        # is shown. One fetch of the page is both what is drawn and what the image is compared with (the lag
        # moves between two requests).
        page = ARTIFACTS / "status-page-primary-failing.html"
        page.write_bytes(urllib.request.urlopen(url, timeout=10).read())
        shown = page.read_text()
        lag_now = re.search(r'id="lag-now">([^<]*)<', shown)
        span = re.search(r'id="lag-heading">Replication lag, last ([^<]+)<', shown)
        assert lag_now and lag_now.group(1) != "-" and span, shown
        shot = ARTIFACTS / "status-page-primary-failing.png"
        shot.unlink(missing_ok=True)
        # At 1.25 times the size the chart's 12px axis labels are large enough for tesseract to read.
        r = chromium(f"--screenshot={shot}", "--window-size=1200,1400", "--force-device-scale-factor=1.25",
                     page.as_uri())
        assert r.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
        text = ocr(shot)
        assert f"Replication lag, last {span.group(1)}" in text, text  # the chart's heading, as drawn
        assert f"{span.group(1)} ago" in text, text  # the chart's time axis names the same span
        assert f"now: {lag_now.group(1)};" in text, (lag_now.group(1), text)  # the primary's last known lag
    finally:
        assert g.drsync("west", "apply", "--resume").code == 0


def test_status_page_escapes_what_it_shows() -> None:
    doc = {"group": "<script>alert(1)</script>", "agent": "a&b", "agents": [{"name": "<b>x</b>", "role": "standby"}],
           "lag_history": [], "drills": [], "cycles": [], "snapshots": []}
    page = render(doc, now=1_800_000_000)
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert 'id="lag-chart-empty"' in page


def test_lag_chart_keeps_the_window_and_scales() -> None:
    now = 1_800_000_000.0
    svg = lag_chart([(now - 7200, 50.0), (now - 60, 100.0), (now - 30, None), (now, 20.0)], now, 3600)
    pts = re.search(r'points="([^"]+)"', svg).group(1).split()  # type: ignore[union-attr]
    assert len(pts) == 2  # the sample outside the window and the missing one are left out
    ys = [float(p.split(",")[1]) for p in pts]
    assert ys[0] < ys[1]  # 100 s is drawn higher (smaller y) than 20 s
