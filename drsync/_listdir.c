/*
 * drsync._listdir: one directory's listing, examined and sorted, as columns.
 *
 * The capture scans the whole data root on every snapshot; in Python the
 * per-entry work (a DirEntry, an lstat result, a tuple) costs several times
 * the system calls themselves. This lists one directory through a descriptor
 * the caller opened (O_NOFOLLOW, its device and inode checked by the caller),
 * examines each entry with fstatat(AT_SYMLINK_NOFOLLOW) and readlinkat
 * relative to that descriptor, never by path, and returns the entries sorted
 * by name bytes as buffers that become Arrow columns without a Python object
 * per entry. The system calls run without the GIL.
 *
 * list_dir(fd, prefix, reserved, excluded, xattr_dir=None) -> tuple:
 *   count      int: entries returned as rows (files, directories, symlinks)
 *   offsets    bytes: count + 1 int64 offsets into data
 *   lens       bytes: count uint32 lengths of the paths in data
 *   data       bytes: each row's relative path (prefix + name), concatenated
 *   meta       bytes: count records of struct rec (RECORD in drsync.native_walk)
 *   dirs       list of (row, position, name, dev, ino), by the key name + "/": a directory's
 *              contents come after the first `position` rows of this listing
 *   events     list, in readdir's order (the Python listing's), of (kind, name, value):
 *              K_LINK (row, target) for each symlink row; K_PROBLEM errno for an entry that
 *              exists but could not be examined; K_SPECIAL None for a fifo, socket or device,
 *              K_RESERVED None for a name in `reserved` (neither is a row)
 *
 * Entries removed while listed (ENOENT) are left out. `excluded` names are left
 * out without being examined (a reserved name is reported even when excluded). With
 * `xattr_dir` (the directory's absolute path, bytes), each file's and directory's
 * record says whether it has extended attributes (listxattrat, or llistxattr of
 * xattr_dir/name before Linux 6.13: an apply compares them; most have none, and
 * asking costs one call without the GIL). Raises OSError when the directory
 * cannot be read.
 *
 * open_beneath(root, rel, flags) -> fd: root/rel opened with openat2(RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS) from root, one system call for the whole path where
 * drsync.fsutil.open_beneath opens each component: no symlink is followed on the
 * way or at the end (ELOOP), nothing above root is reached. O_NOFOLLOW and
 * O_CLOEXEC are added to flags. OSError as open(2) gives it; ENOSYS (or EPERM
 * from a seccomp filter) when the kernel has no openat2 (the caller then opens
 * component by component).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

struct rec {
    uint64_t ino, nlink, dev;
    int64_t size, mtime_s, ctime_s, blocks;
    uint32_t mtime_nsec, ctime_nsec, mode, uid, gid, kind;
    uint32_t xattrs; /* with xattr_dir: 0 none, 1 some, 2 not known (read them another way) */
    uint32_t reserved_;
};

enum { K_FILE = 0, K_DIR = 1, K_LINK = 2, K_SPECIAL = 3, K_PROBLEM = 4, K_RESERVED = 5, K_GONE = 6 };

struct ent {
    char *name;
    size_t len;
    Py_ssize_t seq; /* its place in readdir's order: events are reported in it */
    int err;
    struct rec r;
    char *target;
    ssize_t target_len;
};

struct names {
    PyObject *fast; /* owns the items the pointers below point into */
    char **name;
    size_t *len;
    Py_ssize_t n;
};

static int in_names(const struct names *set, const char *name, size_t len) {
    for (Py_ssize_t i = 0; i < set->n; i++)
        if (set->len[i] == len && memcmp(set->name[i], name, len) == 0)
            return 1;
    return 0;
}

static int cmp_bytes(const char *a, size_t la, const char *b, size_t lb) {
    int c = memcmp(a, b, la < lb ? la : lb);
    if (c)
        return c;
    return la < lb ? -1 : la > lb;
}

static int cmp_ent(const void *x, const void *y) {
    const struct ent *a = x, *b = y;
    return cmp_bytes(a->name, a->len, b->name, b->len);
}

/* name + "/" against other + "/": equal to comparing the names, except that a name that is a
 * proper prefix of the other compares by the other's next byte against '/'. */
static int cmp_dirkey(const char *a, size_t la, const char *b, size_t lb) {
    size_t m = la < lb ? la : lb;
    int c = memcmp(a, b, m);
    if (c)
        return c;
    if (la == lb)
        return 0;
    if (la < lb)
        return (unsigned char)'/' < (unsigned char)b[m] ? -1 : 1;
    return (unsigned char)a[m] < (unsigned char)'/' ? -1 : 1;
}

struct dirpos {
    Py_ssize_t row, pos;
    const char *name;
    size_t len;
};

static int cmp_dirpos(const void *x, const void *y) {
    const struct dirpos *a = x, *b = y;
    return cmp_dirkey(a->name, a->len, b->name, b->len);
}

/* How many of the sorted rows have names below name + "/". */
static Py_ssize_t contents_position(struct ent **rows, Py_ssize_t n, const char *name, size_t len) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        /* rows[mid]->name < name + "/" ? */
        const char *o = rows[mid]->name;
        size_t lo_len = rows[mid]->len, m = lo_len < len ? lo_len : len;
        int c = memcmp(o, name, m);
        int below;
        if (c)
            below = c < 0;
        else if (lo_len <= len)
            below = 1; /* a prefix of name (or name itself) is below name + "/" */
        else
            below = (unsigned char)o[m] < (unsigned char)'/';
        if (below)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void free_names(struct names *s) {
    PyMem_Free(s->name);
    PyMem_Free(s->len);
    Py_XDECREF(s->fast);
    s->name = NULL;
    s->len = NULL;
    s->fast = NULL;
    s->n = 0;
}

static int load_names(PyObject *seq, struct names *out) {
    out->n = 0;
    out->name = NULL;
    out->len = NULL;
    out->fast = PySequence_Fast(seq, "a sequence of bytes is expected");
    if (!out->fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(out->fast);
    out->name = PyMem_Calloc(n ? n : 1, sizeof(char *));
    out->len = PyMem_Calloc(n ? n : 1, sizeof(size_t));
    if (!out->name || !out->len) {
        free_names(out);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        char *buf;
        Py_ssize_t blen;
        if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(out->fast, i), &buf, &blen) < 0) {
            free_names(out);
            return -1;
        }
        out->name[i] = buf; /* alive while out->fast is */
        out->len[i] = (size_t)blen;
    }
    out->n = n;
    return 0;
}

static void free_ents(struct ent *ents, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        free(ents[i].name);
        free(ents[i].target);
    }
    free(ents);
}

static void examine(int fd, struct ent *e) {
    struct stat s;
    if (fstatat(fd, e->name, &s, AT_SYMLINK_NOFOLLOW) != 0) {
        e->r.kind = errno == ENOENT ? K_GONE : K_PROBLEM;
        e->err = errno;
        return;
    }
    struct rec *r = &e->r;
    r->ino = (uint64_t)s.st_ino;
    r->nlink = (uint64_t)s.st_nlink;
    r->dev = (uint64_t)s.st_dev;
    r->mtime_s = (int64_t)s.st_mtim.tv_sec;
    r->mtime_nsec = (uint32_t)s.st_mtim.tv_nsec;
    r->ctime_s = (int64_t)s.st_ctim.tv_sec;
    r->ctime_nsec = (uint32_t)s.st_ctim.tv_nsec;
    r->mode = (uint32_t)s.st_mode;
    r->uid = (uint32_t)s.st_uid;
    r->gid = (uint32_t)s.st_gid;
    r->blocks = (int64_t)s.st_blocks;
    r->size = 0;
    if (S_ISREG(s.st_mode)) {
        r->kind = K_FILE;
        r->size = (int64_t)s.st_size;
    } else if (S_ISDIR(s.st_mode)) {
        r->kind = K_DIR;
    } else if (S_ISLNK(s.st_mode)) {
        r->kind = K_LINK;
        size_t cap = s.st_size > 0 && s.st_size < PATH_MAX ? (size_t)s.st_size + 1 : PATH_MAX;
        for (;;) {
            char *buf = malloc(cap);
            if (!buf) {
                e->r.kind = K_PROBLEM;
                e->err = ENOMEM;
                return;
            }
            ssize_t got = readlinkat(fd, e->name, buf, cap);
            if (got < 0) {
                free(buf);
                e->r.kind = errno == ENOENT ? K_GONE : K_PROBLEM;
                e->err = errno;
                return;
            }
            if ((size_t)got < cap) {
                e->target = buf;
                e->target_len = got;
                return;
            }
            free(buf); /* the link grew since fstatat: read it again with more room */
            cap *= 2;
        }
    } else {
        r->kind = K_SPECIAL;
    }
}

#ifndef SYS_listxattrat
#if defined(__x86_64__) || defined(__aarch64__)
#define SYS_listxattrat 465 /* Linux 6.13 */
#endif
#endif
static int listxattrat_missing; /* ENOSYS seen once: the kernel is older */

/* Whether name (in the directory fd, or xattr_dir/name by path on kernels before 6.13) has extended
 * attributes: 0 none (or not supported), 1 some, 2 not known. */
static uint32_t has_xattrs(int fd, const char *dir, size_t dir_len, const char *name, size_t len) {
#ifdef SYS_listxattrat
    if (!listxattrat_missing) {
        long got = syscall(SYS_listxattrat, fd, name, AT_SYMLINK_NOFOLLOW, NULL, (size_t)0);
        if (got > 0)
            return 1;
        if (got == 0 || errno == ENOTSUP || errno == ENOENT)
            return 0;
        if (errno != ENOSYS)
            return 2;
        listxattrat_missing = 1;
    }
#else
    (void)fd;
#endif
    char path[PATH_MAX];
    if (dir_len + 1 + len + 1 > sizeof(path))
        return 2;
    memcpy(path, dir, dir_len);
    path[dir_len] = '/';
    memcpy(path + dir_len + 1, name, len + 1);
    ssize_t got = llistxattr(path, NULL, 0);
    if (got > 0)
        return 1;
    if (got == 0 || errno == ENOTSUP || errno == ENOENT)
        return 0;
    return 2;
}

static PyObject *build(struct ent *ents, Py_ssize_t n, const char *prefix, size_t prefix_len);

static PyObject *list_dir(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    const char *prefix;
    Py_ssize_t prefix_len;
    PyObject *reserved_seq, *excluded_seq;
    const char *xattr_dir = NULL;
    Py_ssize_t xattr_dir_len = 0;
    if (!PyArg_ParseTuple(args, "iy#OO|z#", &fd, &prefix, &prefix_len, &reserved_seq, &excluded_seq, &xattr_dir,
                          &xattr_dir_len))
        return NULL;
    struct names reserved, excluded;
    if (load_names(reserved_seq, &reserved) < 0)
        return NULL;
    if (load_names(excluded_seq, &excluded) < 0) {
        free_names(&reserved);
        return NULL;
    }

    struct ent *ents = NULL;
    Py_ssize_t n = 0, cap = 0;
    int fail = 0; /* errno of a failure to read the directory */
    int nomem = 0;

    Py_BEGIN_ALLOW_THREADS
    int dfd = dup(fd);
    DIR *d = dfd < 0 ? NULL : fdopendir(dfd);
    if (!d) {
        fail = errno;
        if (dfd >= 0)
            close(dfd);
    } else {
        rewinddir(d);
        for (;;) {
            errno = 0;
            struct dirent *de = readdir(d);
            if (!de) {
                fail = errno;
                break;
            }
            const char *nm = de->d_name;
            if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0)))
                continue;
            size_t len = strlen(nm);
            int is_reserved = in_names(&reserved, nm, len); /* before exclusions, as the Python listing */
            if (!is_reserved && in_names(&excluded, nm, len))
                continue;
            if (n == cap) {
                Py_ssize_t ncap = cap ? cap * 2 : 256;
                struct ent *grown = realloc(ents, (size_t)ncap * sizeof(struct ent));
                if (!grown) {
                    nomem = 1;
                    break;
                }
                ents = grown;
                cap = ncap;
            }
            struct ent *e = &ents[n];
            memset(e, 0, sizeof(*e));
            e->name = malloc(len + 1);
            if (!e->name) {
                nomem = 1;
                break;
            }
            memcpy(e->name, nm, len + 1);
            e->len = len;
            e->seq = n;
            n++;
            if (is_reserved)
                e->r.kind = K_RESERVED;
            else
                examine(fd, e);
            if (xattr_dir && (e->r.kind == K_FILE || e->r.kind == K_DIR))
                e->r.xattrs = has_xattrs(fd, xattr_dir, (size_t)xattr_dir_len, nm, len);
        }
        closedir(d);
    }
    if (!fail && !nomem && n > 1)
        qsort(ents, (size_t)n, sizeof(struct ent), cmp_ent);
    Py_END_ALLOW_THREADS

    free_names(&reserved);
    free_names(&excluded);
    if (nomem) {
        free_ents(ents, n);
        return PyErr_NoMemory();
    }
    if (fail) {
        free_ents(ents, n);
        errno = fail;
        return PyErr_SetFromErrno(PyExc_OSError);
    }

    PyObject *result = build(ents, n, prefix, (size_t)prefix_len);
    free_ents(ents, n);
    return result;
}

static int cmp_seq(const void *x, const void *y) {
    const struct ent *a = *(struct ent *const *)x, *b = *(struct ent *const *)y;
    return (a->seq > b->seq) - (a->seq < b->seq);
}

static int append_new(PyObject *list, PyObject *item) {
    if (!item)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* The listing's tuple from its sorted entries (see the top of this file). */
static PyObject *build(struct ent *ents, Py_ssize_t n, const char *prefix, size_t prefix_len) {
    PyObject *result = NULL, *offsets = NULL, *lens = NULL, *data = NULL, *meta = NULL;
    PyObject *dirs = PyList_New(0), *events = PyList_New(0);
    struct ent **rows = malloc(sizeof(struct ent *) * (size_t)(n ? n : 1));
    struct ent **evs = malloc(sizeof(struct ent *) * (size_t)(n ? n : 1));
    Py_ssize_t *row_of = malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    struct dirpos *dp = NULL;
    if (!dirs || !events || !rows || !evs || !row_of) {
        if (!rows || !evs || !row_of)
            PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t count = 0, ndirs = 0, nevs = 0;
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        struct ent *e = &ents[i];
        row_of[i] = -1;
        switch (e->r.kind) {
        case K_GONE:
            continue;
        case K_PROBLEM:
        case K_SPECIAL:
        case K_RESERVED:
            evs[nevs++] = e;
            continue;
        case K_LINK:
            evs[nevs++] = e;
            break;
        case K_DIR:
            ndirs++;
            break;
        default:
            break;
        }
        row_of[i] = count;
        rows[count++] = e;
        total += prefix_len + e->len;
    }
    offsets = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((size_t)(count + 1) * sizeof(int64_t)));
    lens = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((size_t)count * sizeof(uint32_t)));
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    meta = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((size_t)count * sizeof(struct rec)));
    dp = malloc(sizeof(struct dirpos) * (size_t)(ndirs ? ndirs : 1));
    if (!offsets || !lens || !data || !meta || !dp) {
        if (!dp)
            PyErr_NoMemory();
        goto done;
    }
    int64_t *off = (int64_t *)PyBytes_AS_STRING(offsets);
    uint32_t *len_out = (uint32_t *)PyBytes_AS_STRING(lens);
    char *out = PyBytes_AS_STRING(data);
    struct rec *recs = (struct rec *)PyBytes_AS_STRING(meta);
    size_t at = 0;
    Py_ssize_t di = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        struct ent *e = rows[i];
        off[i] = (int64_t)at;
        len_out[i] = (uint32_t)(prefix_len + e->len);
        memcpy(out + at, prefix, prefix_len);
        memcpy(out + at + prefix_len, e->name, e->len);
        at += prefix_len + e->len;
        recs[i] = e->r;
        if (e->r.kind == K_DIR) {
            dp[di].row = i;
            dp[di].name = e->name;
            dp[di].len = e->len;
            dp[di].pos = contents_position(rows, count, e->name, e->len);
            di++;
        }
    }
    off[count] = (int64_t)at;
    if (ndirs > 1)
        qsort(dp, (size_t)ndirs, sizeof(struct dirpos), cmp_dirpos);
    for (Py_ssize_t i = 0; i < ndirs; i++) {
        const struct rec *r = &recs[dp[i].row];
        if (append_new(dirs, Py_BuildValue("(nny#KK)", dp[i].row, dp[i].pos, dp[i].name, (Py_ssize_t)dp[i].len,
                                           (unsigned long long)r->dev, (unsigned long long)r->ino)) < 0)
            goto done;
    }
    if (nevs > 1)
        qsort(evs, (size_t)nevs, sizeof(struct ent *), cmp_seq);
    for (Py_ssize_t i = 0; i < nevs; i++) {
        struct ent *e = evs[i];
        PyObject *item;
        switch (e->r.kind) {
        case K_LINK:
            item = Py_BuildValue("(iy#(ny#))", K_LINK, e->name, (Py_ssize_t)e->len, row_of[e - ents], e->target,
                                 (Py_ssize_t)e->target_len);
            break;
        case K_PROBLEM:
            item = Py_BuildValue("(iy#i)", K_PROBLEM, e->name, (Py_ssize_t)e->len, e->err);
            break;
        default: /* K_SPECIAL, K_RESERVED */
            item = Py_BuildValue("(iy#O)", (int)e->r.kind, e->name, (Py_ssize_t)e->len, Py_None);
            break;
        }
        if (append_new(events, item) < 0)
            goto done;
    }
    result = Py_BuildValue("(nOOOOOO)", count, offsets, lens, data, meta, dirs, events);
done:
    free(dp);
    free(rows);
    free(evs);
    free(row_of);
    Py_XDECREF(offsets);
    Py_XDECREF(lens);
    Py_XDECREF(data);
    Py_XDECREF(meta);
    Py_XDECREF(dirs);
    Py_XDECREF(events);
    return result;
}

static PyObject *open_beneath(PyObject *self, PyObject *args) {
    (void)self;
    const char *root, *rel;
    int flags;
    if (!PyArg_ParseTuple(args, "yyi", &root, &rel, &flags))
        return NULL;
    int fd = -1, err = 0;
    Py_BEGIN_ALLOW_THREADS
    int rfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (rfd < 0) {
        err = errno;
    } else {
        struct open_how how;
        memset(&how, 0, sizeof how);
        how.flags = (uint64_t)(unsigned)(flags | O_NOFOLLOW | O_CLOEXEC);
        how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS;
        fd = (int)syscall(SYS_openat2, rfd, rel, &how, sizeof how);
        if (fd < 0)
            err = errno;
        close(rfd);
    }
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, rel);
    }
    return PyLong_FromLong(fd);
}

static PyMethodDef methods[] = {
    {"open_beneath", open_beneath, METH_VARARGS,
     "open_beneath(root, rel, flags) -> fd: root/rel opened with openat2, no symlink followed, nothing above root."},
    {"list_dir", list_dir, METH_VARARGS,
     "list_dir(fd, prefix, reserved, excluded, xattr_dir=None) -> (count, offsets, data, meta, dirs, links, problems, "
     "specials, reserved): one directory's entries examined and sorted by name bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "drsync._listdir",
    "One directory's listing as columns (see drsync.native_walk).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__listdir(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(struct rec)) < 0 ||
        PyModule_AddIntConstant(m, "K_LINK", K_LINK) < 0 || PyModule_AddIntConstant(m, "K_PROBLEM", K_PROBLEM) < 0 ||
        PyModule_AddIntConstant(m, "K_SPECIAL", K_SPECIAL) < 0 ||
        PyModule_AddIntConstant(m, "K_RESERVED", K_RESERVED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
