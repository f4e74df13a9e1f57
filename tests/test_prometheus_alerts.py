"""Alerts through a real Prometheus (issue 17): Debian's ``prometheus`` server evaluates the project's
alert rules (deploy/prometheus/alerts.yml) on what it scrapes from a real agent pair, and Debian's
``prometheus-alertmanager`` delivers them to a webhook receiver served by this test.

The rules run in a test copy whose clock goes SCALE times faster: every ``for:`` duration and range
window, and the replication-lag thresholds (seconds of lag: 900 s pages, 300 s warns), are divided by
SCALE; the expressions are otherwise the project's. The test cuts the link the primary ships over
(a proxy in front of the standby), waits until the lag alert reaches the receiver firing, heals the
link, and waits until it arrives resolved.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.faultproxy import FaultProxy
from tests.group import Group, wait_for
from tests.zk import free_port

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = "/usr/bin/prometheus"  # Debian package prometheus
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"  # Debian package prometheus-alertmanager
SCALE = 60  # the test copy's clock: 5m -> 5s, a lag of 900 s -> 15 s
LAG_RULES = ("DrsyncReplicationLagHigh", "DrsyncReplicationLagWarning")

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def _seconds(text: str) -> float:
    parts = _DURATION.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Prometheus duration: {text!r}"
    return sum(int(n) * _UNITS[u] for n, u in parts)


def _duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def fast_rules(text: str, scale: int = SCALE) -> dict[str, Any]:
    """alerts.yml with its clock ``scale`` times faster: ``for:`` durations, range windows and the lag
    rules' thresholds (seconds of lag) divided by ``scale``; everything else as it is."""
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = _duration(_seconds(str(rule.get("for", "0s"))) / scale)
            expr = re.sub(r"\[([0-9a-z]+)\]", lambda m: f"[{_duration(_seconds(m.group(1)) / scale)}]",
                          rule["expr"])
            if rule["alert"] in LAG_RULES:
                expr, n = re.subn(r">\s*(\d+)\s*$", lambda m: f"> {int(m.group(1)) / scale:g}", expr)
                assert n == 1, f"{rule['alert']}: no '> seconds' threshold at the end of {rule['expr']!r}"
            rule["expr"] = expr
    return doc


def test_the_test_copy_of_the_rules_only_runs_faster() -> None:
    doc = fast_rules(RULES.read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    high = rules["DrsyncReplicationLagHigh"]
    assert high["for"] == "5s" and high["expr"].endswith("> 15"), high
    original = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert set(rules) == set(original)

    def shape(expr: str) -> str:  # an expression without its range windows and lag threshold
        return re.sub(r"\[[0-9a-z]+\]|>\s*[0-9.]+\s*$", "#", expr)

    for name, r in rules.items():
        o = original[name]
        assert _seconds(r["for"]) * SCALE == _seconds(str(o.get("for", "0s"))), name
        assert shape(r["expr"]) == shape(o["expr"]), name
        assert r["labels"] == o["labels"] and r["annotations"] == o["annotations"], name


# --- the servers -------------------------------------------------------------------------------------


def _binary(path: str, package: str) -> str:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run the tests with make test, which installs the Debian package {package}")
    return path


class Daemon:
    """A server process of this test, its output in a log file; stopped by its own PID."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.log_path = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def check(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _get(address: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://{address}{path}{query}", timeout=10) as r:
        body = r.read()
    return json.loads(body)["data"] if path.startswith("/api/") else body


def _ready(d: Daemon, address: str) -> bool:
    d.check()
    try:
        _get(address, "/-/ready")
        return True
    except OSError:
        return False


class Receiver:
    """Alertmanager's webhook receiver: records every notification POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        lock = self._lock = threading.Lock()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with lock:
                    posts.append(doc)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def mark(self) -> int:
        with self._lock:
            return len(self.posts)

    def alerts(self, since: int, alertname: str, status: str) -> list[dict[str, Any]]:
        """The alerts named ``alertname`` with ``status`` in the notifications received since ``mark()``."""
        with self._lock:
            posts = self.posts[since:]
        return [a for p in posts for a in p["alerts"]
                if a["labels"].get("alertname") == alertname and a["status"] == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Monitoring:
    """Prometheus with the fast test copy of the rules, scraping ``targets`` (job drsync), and an
    Alertmanager that sends every alert to ``receiver`` (firing and resolved). Started when made;
    ``stop()`` ends both."""

    def __init__(self, tmp: Path, targets: list[str], receiver: Receiver) -> None:
        self.receiver = receiver
        self.daemons: list[Daemon] = []
        self.am = f"127.0.0.1:{free_port()}"
        self.prom = f"127.0.0.1:{free_port()}"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "alertmanager.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "test", "group_by": ["alertname", "group"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "5s"},
            "receivers": [{"name": "test", "webhook_configs": [{"url": receiver.url, "send_resolved": True}]}],
        }))
        (tmp / "alerts.yml").write_text(yaml.safe_dump(fast_rules(RULES.read_text()), sort_keys=False))
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "alerts.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [self.am]}]}]},
            "scrape_configs": [{"job_name": "drsync", "static_configs": [{"targets": targets}]}],
        }))
        self.daemons.append(Daemon("alertmanager", [
            _binary(ALERTMANAGER, "prometheus-alertmanager"), f"--config.file={tmp / 'alertmanager.yml'}",
            f"--storage.path={tmp / 'alertmanager-data'}", f"--web.listen-address={self.am}",
            "--cluster.listen-address=", "--log.level=debug"], tmp / "alertmanager.log"))
        self.daemons.append(Daemon("prometheus", [
            _binary(PROMETHEUS, "prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'prometheus-data'}", f"--web.listen-address={self.prom}",
            "--rules.alert.resend-delay=1s", "--log.level=debug"], tmp / "prometheus.log"))

    def wait_ready(self) -> None:
        wait_for(lambda: _ready(self.daemons[0], self.am), "alertmanager to be ready")
        wait_for(lambda: _ready(self.daemons[1], self.prom), "prometheus to be ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(_get(self.prom, "/api/v1/query", query=expr)["result"])

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        """Prometheus's own view: the alerts named ``alertname`` that are pending or firing."""
        return [a for a in _get(self.prom, "/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == alertname]

    def explain(self) -> str:
        """What a failure needs: both servers' view and logs, and what the receiver got."""
        out = []
        for expr in ('up{job="drsync"}', "drsync_replication_lag_seconds", "drsync_apply_delay_seconds"):
            try:
                out.append(f"{expr}: {[(r['metric'], r['value']) for r in self.query(expr)]}")
            except Exception as e:
                out.append(f"{expr}: {e}")
        try:
            out.append(f"prometheus alerts: {_get(self.prom, '/api/v1/alerts')['alerts']}")
        except Exception as e:
            out.append(f"prometheus alerts: {e}")
        out.append(f"received: {self.receiver.posts}")
        out += [f"--- {d.name} log:\n{d.log()}" for d in self.daemons]
        return "\n".join(out)

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# --- the test ----------------------------------------------------------------------------------------


def test_lag_alert_is_delivered_through_prometheus_and_alertmanager_and_resolves(
        make_group: Any, receiver: Receiver, tmp_path: Path) -> None:
    _binary(PROMETHEUS, "prometheus")
    _binary(ALERTMANAGER, "prometheus-alertmanager")
    g: Group = make_group(["east", "west"])
    link = FaultProxy(g.addr["west"])  # the primary ships to west through it (west advertises it)
    cfg = g.cfg["west"]
    cfg.write_text(cfg.read_text().replace(f'listen = "{g.addr["west"]}"\n',
                                           f'listen = "{g.addr["west"]}"\nadvertise = "{link.address}"\n'))
    mon = None
    try:
        g.start_all("east")
        g.wait_synced("east", "west", "west's first sync through the proxy")
        mon = Monitoring(tmp_path / "monitoring", [g.metrics["east"], g.metrics["west"]], receiver)
        try:
            mon.wait_ready()
            run(g, link, mon, receiver)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{mon.explain()}") from None
    finally:
        if mon is not None:
            mon.stop()
        link.close()


def run(g: Group, link: FaultProxy, mon: Monitoring, receiver: Receiver) -> None:
    alert = "DrsyncReplicationLagHigh"
    group = f'group="{g.group}"'
    # Prometheus scrapes both agents and has a lag to judge; the rule is quiet while shipments flow.
    wait_for(lambda: len([r for r in mon.query('up{job="drsync"}') if r["value"][1] == "1"]) == 2,
             "prometheus to scrape both agents")
    wait_for(lambda: len(mon.query(f"drsync_replication_lag_seconds{{{group}}} >= 0")) == 2,
             "a lag from both agents in prometheus")
    wait_for(lambda: _get(mon.prom, "/api/v1/alertmanagers")["activeAlertmanagers"],
             "prometheus to find the alertmanager")
    wait_for(lambda: not mon.firing(alert), f"{alert} to be quiet while shipments flow")

    # Shipments stop: every connection to west is refused, both agents stay up (and scraped).
    stopped = receiver.mark()
    link.set("cut")
    fired = wait_for(lambda: [a for a in receiver.alerts(stopped, alert, "firing")
                              if a["labels"].get("group") == g.group],
                     f"{alert} to be delivered firing after shipments stopped", timeout=120)
    assert fired[0]["labels"] == {"alertname": alert, "group": g.group, "severity": "page"}, fired[0]
    assert f"drsync group {g.group}: replication lag" in fired[0]["annotations"]["summary"], fired[0]
    assert "drsync promote refuses" in fired[0]["annotations"]["description"], fired[0]
    assert g.record("east").get("role") == "primary" and g.record("west").get("role") == "standby"

    # Shipments resume: west catches up, and the alert arrives resolved.
    before = g.hello("west").applied_snapshot  # direct, not through the proxy
    resumed = receiver.mark()
    link.set("pass")
    resolved = wait_for(lambda: [a for a in receiver.alerts(resumed, alert, "resolved")
                                 if a["labels"].get("group") == g.group],
                        f"{alert} to be delivered resolved after shipments resumed", timeout=120)
    assert resolved[0]["labels"] == fired[0]["labels"] and resolved[0]["startsAt"] == fired[0]["startsAt"]
    assert g.hello("west").applied_snapshot != before  # resolved because west applied again
    assert not mon.firing(alert)
