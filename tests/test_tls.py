"""Mutual TLS between agents: a throwaway CA, certificates for both agents, and an intruder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drsync.errors import OperationFailed
from drsync.transport.grpc import GrpcStandbyLink
from tests.test_agents import Pair, wait_for


def openssl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, env=env)


def make_ca(d: Path, name: str, env: dict[str, str] | None = None) -> None:
    """A CA valid for two days from now (``env``: openssl's environment, e.g. a clock set back a day with
    libfaketime, for certificates that agents whose clocks are behind accept too)."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d, env=env)


def make_cert(d: Path, ca: str, name: str, env: dict[str, str] | None = None) -> None:
    (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=d, env=env)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d, env=env)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    for name in ("primary", "standby"):
        make_cert(d, "ca", name)
    make_cert(d, "rogue-ca", "intruder")
    return d


def test_mutual_tls_ships_and_refuses_strangers(tmp_path: Path, pki: Path) -> None:
    pair = Pair(tmp_path)
    for cfg, name in ((pair.standby_cfg, "standby"), (pair.primary_cfg, "primary")):
        cfg.write_text(cfg.read_text() + f'[tls]\nca = "{pki / "ca.pem"}"\ncert = "{pki / name}.pem"\n'
                                         f'key = "{pki / name}.key"\n')
    try:
        # The fixture's readiness probe speaks plaintext; start the standby and probe with TLS.
        tls = (str(pki / "ca.pem"), str(pki / "primary.pem"), str(pki / "primary.key"))
        with open(tmp_path / "standby.log", "ab") as log:
            pair.procs["standby"] = subprocess.Popen(
                [sys.executable, "-m", "drsync", "agent", "--config", str(pair.standby_cfg)], stdout=log,
                stderr=log)
        good = GrpcStandbyLink(pair.standby_addr, tls=tls)
        wait_for(good.health, "the TLS standby to serve")
        assert good.hello("primary", 1).role == "standby"
        good.close()
        # No certificate, or one from another CA: refused before any request is served.
        for link in (GrpcStandbyLink(pair.standby_addr),
                     GrpcStandbyLink(pair.standby_addr, tls=(str(pki / "ca.pem"), str(pki / "intruder.pem"),
                                                             str(pki / "intruder.key")))):
            with pytest.raises(OperationFailed):
                link.hello("intruder", 99, timeout_s=5)
            link.close()
        pair.start("primary")
        wait_for(pair.in_sync, "the standby to match production over mutual TLS")
    finally:
        pair.stop_all()
