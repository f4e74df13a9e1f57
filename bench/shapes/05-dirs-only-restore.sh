#!/bin/bash
# 05-dirs-only-restore: peak RSS of drsync operations on a "dirsonly" tree.
# usage: 05-dirs-only-restore.sh [N]   (default N=200000 entries)
# Builds the tree at N/4 and at N entries, runs each operation under
# /usr/bin/time -v, prints peak RSS at both sizes, the per-entry slope, and the
# linear extrapolation to 1,000,000 entries: est = peak(N) + slope*(1e6-N).
# Exits 1 when any operation's peak or estimate exceeds 300 MiB.
set -u
N=${1:-200000}
DR=${DRSYNC:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/drsync}

mkdir -p "${TMPDIR:-/tmp}"
W0=$(mktemp -d "${TMPDIR:-/tmp}"/drsync-shape-XXXXXX)
trap 'rm -rf "$W0"' EXIT
cat > "$W0/gen.py" <<'PYEOF'
#!/usr/bin/env python3
"""gen.py SHAPE N OUTDIR : build a test tree fast."""
import os, sys
shape, N, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(out, exist_ok=True)
root = os.open(out, os.O_RDONLY | os.O_DIRECTORY)

def wfile(dfd, name, data=b""):
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dfd)
    if data:
        os.write(fd, data)
    os.close(fd)

def mkd(dfd, name):
    os.mkdir(name, 0o755, dir_fd=dfd)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)

PER = 1000
if shape in ("ordinary", "empty"):
    # N files in dirs of 1000, short names, unique ~60-byte content (one chunk each) or empty
    for d in range((N + PER - 1) // PER):
        dfd = mkd(root, "d%05d" % d)
        for i in range(min(PER, N - d * PER)):
            k = d * PER + i
            wfile(dfd, "f%04d" % i, b"" if shape == "empty" else b"content of file %d\n" % k)
        os.close(dfd)
elif shape == "bigdir":
    dfd = mkd(root, "big")
    for k in range(N):
        wfile(dfd, "f%07d" % k, b"content of file %d\n" % k)
elif shape == "dirsonly":
    for d in range((N + PER - 1) // PER):
        dfd = mkd(root, "d%05d" % d)
        for i in range(min(PER, N - d * PER) - 1):
            os.mkdir("e%04d" % i, dir_fd=dfd)
        os.close(dfd)
elif shape == "longpath":
    # chain of DEPTH dirs with 200-byte names, then N entries below in dirs of 1000, each 200-byte names
    DEPTH = int(os.environ.get("DEPTH", "50"))
    cur = root
    for lvl in range(DEPTH):
        nfd = mkd(cur, ("L%03d" % lvl).ljust(200, "x"))
        if cur != root:
            os.close(cur)
        cur = nfd
    for d in range((N + PER - 1) // PER):
        dfd = mkd(cur, ("D%05d" % d).ljust(200, "y"))
        for i in range(min(PER, N - d * PER)):
            k = d * PER + i
            wfile(dfd, ("F%04d" % i).ljust(200, "z"), b"content of file %d\n" % k)
        os.close(dfd)
elif shape in ("hardgroups", "hardpairs"):
    # N names; hardgroups: on N/300 inodes; hardpairs: N/2 inodes
    G = 300 if shape == "hardgroups" else 2
    names = 0; inode = 0
    for d in range((N + PER - 1) // PER):
        dfd = mkd(root, "d%05d" % d)
        os.close(dfd)
    # place each group's members spread across dirs
    ninodes = (N + G - 1) // G
    ndirs = (N + PER - 1) // PER
    for g in range(ninodes):
        first = None
        for m in range(G):
            k = g * G + m
            if k >= N:
                break
            # spread: member m of group g goes to dir (k % ndirs)
            p = "%s/d%05d/h%07d" % (out, k % ndirs, k)
            if first is None:
                with open(p, "wb") as f:
                    f.write(b"group %d\n" % g)
                first = p
            else:
                os.link(first, p)
elif shape == "symlinks":
    # N symlinks with long (~3000 byte) targets resolving inside the root to a file
    T = int(os.environ.get("TLEN", "3000"))
    for d in range((N + PER - 1) // PER):
        dfd = mkd(root, "d%05d" % d)
        wfile(dfd, "target", b"t\n")
        for i in range(min(PER, N - d * PER) - 1):
            pre = "./" * ((T - 20) // 2)
            os.symlink(pre + "target%05d" % 0 if False else pre + "target", "s%04d" % i, dir_fd=dfd)
        os.close(dfd)
elif shape == "xattrs":
    # ordinary files each with 3 user xattrs (~100 bytes) + an access ACL
    import struct
    # posix acl xattr: header version 2, entries (tag u16, perm u16, id u32)
    def acl(uid):
        ents = [(1, 6, 0xffffffff), (2, 6, uid), (4, 4, 0xffffffff), (0x10, 6, 0xffffffff), (0x20, 4, 0xffffffff)]
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in ents)
    for d in range((N + PER - 1) // PER):
        dfd = mkd(root, "d%05d" % d)
        for i in range(min(PER, N - d * PER)):
            k = d * PER + i
            n = "f%04d" % i
            wfile(dfd, n, b"content of file %d\n" % k)
            fd = os.open(n, os.O_RDONLY, dir_fd=dfd)
            for a in range(3):
                os.setxattr(fd, "user.attr%d" % a, (b"value-%d-%d-" % (k, a)).ljust(100, b"v"))
            os.setxattr(fd, "system.posix_acl_access", acl(1000 + k % 50))
            os.close(fd)
        os.close(dfd)
elif shape == "nonutf8":
    for d in range((N + PER - 1) // PER):
        dfd = mkd(root, b"d\xff\xfe%05d" % d)
        for i in range(min(PER, N - d * PER)):
            k = d * PER + i
            wfile(dfd, b"f\x80\xc3(%04d\xed\xa0\x80" % i, b"content of file %d\n" % k)
        os.close(dfd)
elif shape == "sparse":
    # N = number of GiB total, in 4 files
    per = N // 4
    for i in range(4):
        fd = os.open("huge%d" % i, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root)
        os.write(fd, b"head %d" % i)
        os.ftruncate(fd, per << 30)
        os.close(fd)
else:
    sys.exit("unknown shape " + shape)
PYEOF
declare -A PEAK
fail=0
run() {  # run LABEL cmd...
  local label=$1; shift
  /usr/bin/time -v "$@" >"$W/out" 2>"$W/time" ; local rc=$?
  local kb; kb=$(awk '/Maximum resident/ {print $NF}' "$W/time")
  local mib=$((kb/1024))
  echo "  $label N=$SIZE rc=$rc peak=${mib}MiB"
  if [ "$rc" -ne 0 ]; then tail -2 "$W/time"; fi
  PEAK["$SIZE|$label"]=$mib
  LABELS+=("$label")
}
body() {
SIZE=$1; W=$W0/$SIZE; mkdir -p "$W"; LABELS=()
python3 "$W0/gen.py" dirsonly "$SIZE" "$W/src" || exit 2
"$DR" init --repo "$W/repo" --cluster-id c1 --release r1 >/dev/null || exit 2
S="$W/src"; R="$W/repo"
run "snapshot create (first)" $DR snapshot create --repo $R --source $S --name first
run "snapshot restore (empty target)" $DR snapshot restore first --repo $R --target $W/tgt
run "snapshot restore (same target)" $DR snapshot restore first --repo $R --target $W/tgt
rm -rf "$W"
}
N1=$((N/4))
body $N1
body $N
echo "--- extrapolation to 1,000,000 entries (linear between N=$N1 and N=$N)"
for label in "${LABELS[@]}"; do
  a=${PEAK["$N1|$label"]}; b=${PEAK["$N|$label"]}
  read slope est <<<"$(python3 -c "s=($b-$a)*1048576/($N-$N1); print(int(s), int($b+s*(1e6-$N)/1048576))")"
  v=ok; if [ "$b" -gt 300 ] || [ "$est" -gt 300 ]; then v=OVER; fail=1; fi
  echo "$label: ${a}MiB@$N1 ${b}MiB@$N slope=${slope}B/entry est@1M=${est}MiB $v"
done
exit $fail
