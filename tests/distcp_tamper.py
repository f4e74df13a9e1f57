"""Test-only: after a real DistCp, rewrite one staged file with other bytes of the same length.

Called as ``distcp_tamper.py DISTCP-ARGS...`` by a wrapper around ``scripts/hadoop-cluster distcp``;
its last argument is DistCp's target (``<scheme>://host:port/<root>/.drsync-staging/...``). It stands
for a copy gone wrong (a fault a healthy DistCp cannot be made to produce).
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from drsync.storage.hdfs import HdfsFs, parse_hdfs_url

target = urlsplit(sys.argv[-1])
# The target may be an RPC URI (hdfs://host:rpc-port): drsync's client speaks WebHDFS, whose address
# the wrapper passes in DRSYNC_TAMPER_WEBHDFS (host:port).
webhdfs = os.environ.get("DRSYNC_TAMPER_WEBHDFS") or target.netloc
fs = HdfsFs(parse_hdfs_url(f"hdfs://{webhdfs}{target.path}?user={os.environ.get('HADOOP_USER_NAME', 'drsync')}"))
staged = sorted((s for s in fs.list_dir(target.path) if s["type"] == "FILE" and s["length"] > 0),
                key=lambda s: s["pathSuffix"])
victim = f"{target.path}/{staged[0]['pathSuffix']}"
data = bytearray(fs.read(victim))
data[len(data) // 2] ^= 0xFF
fs.write(victim, bytes(data), overwrite=True)
