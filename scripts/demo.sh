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
step "replication: a primary agent ships to a standby agent over gRPC on loopback"
PORTS=($(.venv/bin/python -c "
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in socks))"))
mkdir -p "$WORK/standby-data"
for role in primary standby; do
    if [ "$role" = primary ]; then data="$WORK/data"; listen=${PORTS[0]}; metrics=${PORTS[1]}
        extra="[replication]
interval = \"2s\"
standbys = [\"127.0.0.1:${PORTS[2]}\"]"
    else data="$WORK/standby-data"; listen=${PORTS[2]}; metrics=${PORTS[3]}; extra=""; fi
    cat > "$WORK/$role.toml" <<TOML
[cluster]
id = "analytics-east"
release = "6.2.1"
data = "$data"
repository = "$WORK/$role-repo"

[agent]
name = "$role"
role = "$role"
listen = "127.0.0.1:$listen"
metrics = "127.0.0.1:$metrics"

$extra
TOML
    "$DRSYNC" init --config "$WORK/$role.toml" >/dev/null
done
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$DRSYNC" agent --config "$WORK/standby.toml" 2>"$WORK/standby.log" & PIDS+=($!)
"$DRSYNC" agent --config "$WORK/primary.toml" 2>"$WORK/primary.log" & PIDS+=($!)
echo "standby agent pid ${PIDS[0]}, primary agent pid ${PIDS[1]} (logs in $WORK/*.log)"

# A writer that keeps changing the production data root for a while.
.venv/bin/python - "$WORK/data" <<'PY' & PIDS+=($!)
import os, random, sys, time
root = sys.argv[1]
rnd = random.Random(3)
end = time.time() + 12
n = 0
while time.time() < end:
    with open(os.path.join(root, "logs", f"ingest-{n % 5}.log"), "a") as f:
        f.write(f"event {n} {rnd.random()}\n" * 200)
    n += 1
    time.sleep(0.5)
PY
echo "a writer changes the production data root twice a second for 12 s"
for i in $(seq 1 9); do
    sleep 2
    "$DRSYNC" status --config "$WORK/primary.toml" --json | .venv/bin/python -c "
import json, sys
d = json.load(sys.stdin)
sb = [a for a in d['agents'] if a['role'] == 'standby']
lag = sb[0]['lag_s'] if sb else None
print(f'  t+{2 * $i:>2}s  primary={d[\"primary\"]} epoch={d[\"epoch\"]} standby lag=' +
      ('(nothing applied yet)' if lag is None else f'{lag:5.1f}s') +
      f'  applied={sb[0][\"applied_snapshot\"] if sb else None}')"
done

step "writer stopped: the standby converges to production"
for i in $(seq 1 30); do
    if diff -r --no-dereference "$WORK/data" "$WORK/standby-data" >/dev/null 2>&1; then break; fi
    sleep 1
done
if diff -r --no-dereference "$WORK/data" "$WORK/standby-data"; then
    echo "standby data root matches production"
else
    echo "standby did not converge" >&2
    exit 1
fi
"$DRSYNC" status --config "$WORK/primary.toml"
step "stopping the agents by PID"
cleanup
trap - EXIT
echo
echo "demo files are in $WORK"
