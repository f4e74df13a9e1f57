#!/usr/bin/env bash
# The snapshot/backup demo: generate a data tree, snapshot it, change it, snapshot
# again, pull a portable backup, restore it elsewhere and show that it matches.
set -euo pipefail
cd "$(dirname "$0")/.."
DRSYNC="$PWD/.venv/bin/drsync"
WORK="$PWD/demo-work"
rm -rf "$WORK"
mkdir -p "$WORK"
cat > "$WORK/drsync.toml" <<TOML
[cluster]
id = "analytics-east"
release = "6.2.1"
data = "data"
repository = "repo"

[backups]
destination = "backups"
light_exclude = ["tables/**"]
TOML
export DRSYNC_CONFIG="$WORK/drsync.toml"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "generate a data tree (catalog, tables, logs)"
.venv/bin/python - "$WORK/data" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(7)
for d in ("catalog", "tables/orders", "tables/customers", "logs", "tmp/empty"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
for i in range(200):
    with open(os.path.join(root, "catalog", f"schema-{i:03}.json"), "w") as f:
        f.write('{"table": %d, "columns": %d}\n' % (i, rnd.randrange(3, 40)))
for t in ("orders", "customers"):
    for p in range(8):
        with open(os.path.join(root, "tables", t, f"part-{p:02}.bin"), "wb") as f:
            f.write(rnd.randbytes(2 * 1024 * 1024))
with open(os.path.join(root, "logs", "server.log"), "w") as f:
    f.writelines(f"line {n} ok\n" for n in range(20000))
os.symlink("../catalog/schema-000.json", os.path.join(root, "logs", "first-schema"))
PY
du -sh "$WORK/data"

step "drsync init"
"$DRSYNC" init

step "first snapshot"
"$DRSYNC" snapshot create --name nightly --reason "demo: first capture"

step "change the data: append to a table, edit the catalog, delete a log"
.venv/bin/python - "$WORK/data" <<'PY'
import os, random, sys
root = sys.argv[1]
with open(os.path.join(root, "tables/orders/part-03.bin"), "ab") as f:
    f.write(random.Random(1).randbytes(300_000))
with open(os.path.join(root, "catalog/schema-010.json"), "w") as f:
    f.write('{"table": 10, "columns": 41}\n')
os.remove(os.path.join(root, "logs/server.log"))
PY

step "second snapshot (only changed files are read; only new chunks are stored)"
"$DRSYNC" snapshot create --name after-change --ttl 7d
"$DRSYNC" snapshot list

step "what changed between them (diffed from the two Parquet manifests)"
"$DRSYNC" snapshot diff nightly after-change

step "pull the latest snapshot out as a portable backup"
"$DRSYNC" backup create --snapshot latest --mode full
"$DRSYNC" backup list
BACKUP=$(ls -d "$WORK"/backups/*/ | head -n 1)

step "verify the backup (re-read and re-hash everything)"
"$DRSYNC" backup verify "$BACKUP"

step "restore it onto another data root"
"$DRSYNC" backup restore "$BACKUP" --target "$WORK/restored"

step "compare: the restored tree equals the live data"
if diff -r --no-dereference "$WORK/data" "$WORK/restored"; then
    echo "restored tree matches the data root: $(find "$WORK/restored" | wc -l) paths"
else
    echo "MISMATCH" >&2
    exit 1
fi
echo
echo "demo files are in $WORK"
