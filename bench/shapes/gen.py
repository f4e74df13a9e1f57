#!/usr/bin/env python3
# ruff: noqa: UP031  (names are formatted as bytes and str alike, with the same % patterns)
"""Tree shapes for measure.sh (breaker s50).

``gen.py SHAPE N OUTDIR`` builds a tree of about N entries; ``gen.py rename DIR`` renames every file and
directory of an ordinary tree; ``gen.py chmodown DIR`` gives every file of one mode 0600 and owner 1234.
Shapes: ordinary, empty, bigdir, dirsonly, longpath (DEPTH), hardgroups, hardpairs, symlinks (TLEN),
xattrs, nonutf8, sparse (N GiB in 4 files)."""
import os
import sys

if sys.argv[1] == "rename":
    top = sys.argv[2]
    for d in os.listdir(top):
        dfd = os.open(os.path.join(top, d), os.O_RDONLY)
        for f in os.listdir(dfd):
            os.rename(f, "renamed_" + f, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.close(dfd)
        os.rename(os.path.join(top, d), os.path.join(top, "R" + d))
    sys.exit(0)
if sys.argv[1] == "chmodown":
    top = sys.argv[2]
    for d in (x for x in os.listdir(top) if not x.startswith(".")):
        for f in os.listdir(os.path.join(top, d)):
            os.chmod(os.path.join(top, d, f), 0o600)
            os.chown(os.path.join(top, d, f), 1234, 1234)
    sys.exit(0)
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
    names = inode = 0
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
