"""The committed gRPC code must match proto/drsync.proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate(tmp_path)
    committed = ROOT / "drsync" / "transport" / "pb"
    for name in ("drsync_pb2.py", "drsync_pb2_grpc.py", "__init__.py"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"{name} is stale: run 'make proto' and commit the result")


def test_only_the_transport_imports_grpc() -> None:
    offenders = []
    for path in (ROOT / "drsync").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("drsync/transport/"):
            continue
        text = path.read_text()
        if "import grpc" in text or "from grpc" in text:
            offenders.append(rel)
    assert offenders == []
