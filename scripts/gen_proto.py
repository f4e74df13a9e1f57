"""Generate the gRPC code for proto/drsync.proto into drsync/transport/pb (or --out DIR).

The generated code is committed, so a fresh clone needs no protoc step;
tests/test_proto.py regenerates it into a temporary directory and fails when
the committed copy is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
                        f"--grpc_python_out={out}", str(ROOT / "proto" / "drsync.proto")])
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")
    grpc_file = out / "drsync_pb2_grpc.py"
    # protoc writes an absolute import; make it relative to the package.
    text = re.sub(r"^import drsync_pb2 as", "from . import drsync_pb2 as", grpc_file.read_text(), flags=re.M)
    grpc_file.write_text(text)
    (out / "__init__.py").write_text('"""Generated from proto/drsync.proto by scripts/gen_proto.py; do not edit."""\n')


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "drsync" / "transport" / "pb")
    generate(ap.parse_args().out)
    sys.exit(0)
