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
 *   count      int: entries returned (files, directories, symlinks)
 *   offsets    bytes: count + 1 int32 offsets into data
 *   data       bytes: each entry's relative path (prefix + name), concatenated
 *   meta       bytes: count records of struct rec (RECORD_FIELDS in drsync.native_walk)
 *   dirs       list of (row, position), by the key name + "/": a directory's contents
 *              come after the first `position` entries of this listing
 *   links      list of (row, target bytes)
 *   problems   list of (name bytes, errno): entries that exist but could not be examined
 *   specials   list of name bytes: fifos, sockets, devices (not returned as rows)
 *   reserved   list of name bytes: entries whose names are in `reserved` (not returned)
 *
 * Entries removed while listed (ENOENT) are left out. `excluded` names are left
 * out without being examined. With `xattr_dir` (the directory's absolute path,
 * bytes), each file's and directory's record says whether it has extended
 * attributes (llistxattr of xattr_dir/name: an apply compares them; most have
 * none, and a listing costs one call without the GIL). Raises OSError when the directory cannot be read,
 * OverflowError when the paths exceed 2 GiB (the caller lists it another way).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
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
    int err;
    struct rec r;
    char *target;
    ssize_t target_len;
};

struct names {
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

static int load_names(PyObject *seq, struct names *out) {
    out->n = 0;
    out->name = NULL;
    out->len = NULL;
    PyObject *fast = PySequence_Fast(seq, "a sequence of bytes is expected");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    out->name = PyMem_Calloc(n ? n : 1, sizeof(char *));
    out->len = PyMem_Calloc(n ? n : 1, sizeof(size_t));
    if (!out->name || !out->len) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        char *buf;
        Py_ssize_t blen;
        if (PyBytes_AsStringAndSize(item, &buf, &blen) < 0) {
            Py_DECREF(fast);
            return -1;
        }
        out->name[i] = buf; /* borrowed: the caller's tuple keeps it alive for the call */
        out->len[i] = (size_t)blen;
    }
    out->n = n;
    Py_DECREF(fast);
    return 0;
}

static void free_names(struct names *s) {
    PyMem_Free(s->name);
    PyMem_Free(s->len);
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
            if (in_names(&excluded, nm, len))
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
            n++;
            if (in_names(&reserved, nm, len))
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

    PyObject *problems = PyList_New(0), *specials = PyList_New(0), *reserved_hit = PyList_New(0);
    PyObject *links = PyList_New(0), *dirs = PyList_New(0);
    struct ent **rows = malloc(sizeof(struct ent *) * (size_t)(n ? n : 1));
    PyObject *result = NULL, *offsets = NULL, *data = NULL, *meta = NULL;
    struct dirpos *dp = NULL;
    if (!problems || !specials || !reserved_hit || !links || !dirs || !rows) {
        if (!rows)
            PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t count = 0, ndirs = 0;
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        struct ent *e = &ents[i];
        PyObject *nm = NULL, *item = NULL;
        switch (e->r.kind) {
        case K_GONE:
            continue;
        case K_PROBLEM:
            nm = PyBytes_FromStringAndSize(e->name, (Py_ssize_t)e->len);
            item = nm ? Py_BuildValue("(Ni)", nm, e->err) : NULL;
            if (!item || PyList_Append(problems, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
            continue;
        case K_SPECIAL:
        case K_RESERVED:
            nm = PyBytes_FromStringAndSize(e->name, (Py_ssize_t)e->len);
            if (!nm || PyList_Append(e->r.kind == K_SPECIAL ? specials : reserved_hit, nm) < 0) {
                Py_XDECREF(nm);
                goto done;
            }
            Py_DECREF(nm);
            continue;
        default:
            break;
        }
        if (e->r.kind == K_DIR)
            ndirs++;
        rows[count++] = e;
        total += (size_t)prefix_len + e->len;
    }
    if (total > (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "the listing's paths exceed 2 GiB");
        goto done;
    }
    offsets = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((size_t)(count + 1) * sizeof(int32_t)));
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    meta = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((size_t)count * sizeof(struct rec)));
    if (!offsets || !data || !meta)
        goto done;
    int32_t *off = (int32_t *)PyBytes_AS_STRING(offsets);
    char *out = PyBytes_AS_STRING(data);
    struct rec *recs = (struct rec *)PyBytes_AS_STRING(meta);
    size_t at = 0;
    dp = malloc(sizeof(struct dirpos) * (size_t)(ndirs ? ndirs : 1));
    if (!dp) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t di = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        struct ent *e = rows[i];
        off[i] = (int32_t)at;
        memcpy(out + at, prefix, (size_t)prefix_len);
        memcpy(out + at + prefix_len, e->name, e->len);
        at += (size_t)prefix_len + e->len;
        recs[i] = e->r;
        if (e->r.kind == K_DIR) {
            dp[di].row = i;
            dp[di].name = e->name;
            dp[di].len = e->len;
            dp[di].pos = contents_position(rows, count, e->name, e->len);
            di++;
        } else if (e->r.kind == K_LINK) {
            PyObject *item = Py_BuildValue("(ny#)", i, e->target, (Py_ssize_t)e->target_len);
            if (!item || PyList_Append(links, item) < 0) {
                Py_XDECREF(item);
                goto done;
            }
            Py_DECREF(item);
        }
    }
    off[count] = (int32_t)at;
    if (ndirs > 1)
        qsort(dp, (size_t)ndirs, sizeof(struct dirpos), cmp_dirpos);
    for (Py_ssize_t i = 0; i < ndirs; i++) {
        PyObject *item = Py_BuildValue("(nn)", dp[i].row, dp[i].pos);
        if (!item || PyList_Append(dirs, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    result = Py_BuildValue("(nOOOOOOOO)", count, offsets, data, meta, dirs, links, problems, specials,
                           reserved_hit);
done:
    free(dp);
    free(rows);
    free_ents(ents, n);
    Py_XDECREF(offsets);
    Py_XDECREF(data);
    Py_XDECREF(meta);
    Py_XDECREF(problems);
    Py_XDECREF(specials);
    Py_XDECREF(reserved_hit);
    Py_XDECREF(links);
    Py_XDECREF(dirs);
    return result;
}

static PyMethodDef methods[] = {
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
    if (PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(struct rec)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
