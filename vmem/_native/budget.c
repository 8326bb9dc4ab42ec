/* Note [Shared KV budget]
 *
 * Rationale. Several engines (different models, different processes) on one machine or GPU want one
 * amount of KV memory between them: each takes pages when its traffic bursts and gives them back when
 * idle, instead of a static split that leaves one starved while the other sits on idle pages. Taking
 * memory must be atomic (a "check free, then allocate" pair lets two tenants both pass the check), and a
 * tenant that dies, SIGKILL included, must not keep its share forever.
 *
 * Approach. A small file (the user names it, e.g. /dev/shm/vmem-kv) mapped MAP_SHARED by every tenant
 * holds the limit and a table of leases: pid + process start time, bytes held, an optional guaranteed
 * minimum and maximum, waiting demand and reclaimable bytes. Every change happens under ONE
 * process-shared robust mutex in the segment, so a take compares and adds in one critical section:
 *
 *     take(i, n) ok  <=>  n <= limit - sum_j held_j - sum_{j != i} max(0, min_j - held_j)
 *                         and (max_i == 0 or held_i + n <= max_i)
 *
 * i.e. others' unmet minimums are headroom i may not use; a lease opens only when its minimum fits in
 * what is free now, so a minimum is a guarantee from then on. Pools created with a lease
 * (vmem_pool_create_elastic) charge it inside vmem_map, before the OS or driver call, for each page that
 * gains memory, and give the charge back when vmem_pool_trim returns the memory (or the pool is freed):
 * no window between the check and the allocation, and a failed map gives its charge back with its
 * rollback (same status codes: VMEM_ERR_OOM with needed/available in bytes).
 * A refused take records the shortfall as the lease's waiting demand (with a time stamp); the other
 * tenants read it (vmem_lease_info) and give reclaimable pages back; that policy lives above
 * (vmem/allocator), this file only keeps the numbers.
 *
 * Implementation. Staleness: a lease is dead when /proc/PID/stat is gone, names a zombie (state Z/X), or
 * shows a different start time (field 22: the pid was reused). Every operation that would refuse, every
 * info query (at most every 100 ms) and every lease open scans the table and frees dead leases, so the
 * next tenant that touches the budget recovers a dead tenant's share (its memfd or CUDA context died
 * with it, so the memory is really gone). A holder that dies inside the critical section leaves the
 * mutex EOWNERDEAD: the next locker marks it consistent and repairs (slots left half-written are freed,
 * held bytes clamped to >= 0; totals are always sums over the table, never stored). Every lock is a
 * timed lock (VMEM_BUDGET_LOCK_MS, default 2000 ms): a stopped holder gives VMEM_ERR_BUSY, not a hang.
 * The segment is created whole in a temporary file and link()ed into place, so nobody sees a
 * half-initialised one; its header (magic, version, header and segment size, tenant count) is checked
 * on open, so a corrupt or foreign file is VMEM_ERR_INVALID / VMEM_DETAIL_BUDGET_SEGMENT.
 *
 * Limitations. Tenants must share one pid namespace (the pid is what identifies them) and one ABI
 * (pthread_mutex_t lives in the segment; the header size check refuses a mismatch). A lease is used by
 * the process that opened it: after fork() the child's takes are refused (VMEM_DETAIL_LEASE_PROCESS).
 * At most VMEM_BUDGET_MAX_TENANTS leases. A live tenant that never gives pages back cannot be forced to:
 * minimums are honoured by refusing others, not by taking pages away. Demand older than 2 s (not
 * renewed by another refusal) is not reported.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "internal.h"

#define BUDGET_MAGIC 0x31544744424d4d56ull /* "VMMBDGT1" */
#define BUDGET_VERSION 1u
#define LEASE_FREE 0u
#define LEASE_CLAIMING 1u                  /* being written: freed by a repair */
#define LEASE_ACTIVE 2u
#define DEMAND_TTL_NS 2000000000ll
#define SCAN_EVERY_NS 100000000ll

typedef struct {
    uint32_t state;
    int32_t pid;
    uint64_t start_time;
    uint64_t lease_id;
    int64_t held_bytes;
    int64_t min_bytes;
    int64_t max_bytes;                     /* 0: none */
    int64_t waiting_bytes;
    int64_t demand_ns;                     /* CLOCK_MONOTONIC of the last refusal */
    int64_t reclaimable_bytes;             /* published by the tenant */
    int64_t peak_bytes;
    char name[VMEM_BUDGET_NAME_LEN];
} lease_rec_t;

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t header_bytes;                 /* sizeof(seg_t) of the writer */
    uint64_t segment_bytes;
    uint32_t max_tenants;
    uint32_t pad;
    pthread_mutex_t lock;
    int64_t limit_bytes;
    uint64_t next_lease_id;
    int64_t last_scan_ns;
    int64_t recovered_leases;
    int64_t recovered_bytes;
    lease_rec_t leases[VMEM_BUDGET_MAX_TENANTS];
} seg_t;

struct vmem_budget {
    atomic_int refs;
    int fd;
    seg_t *seg;
};

struct vmem_lease {
    atomic_int refs;
    vmem_budget_t *bd;
    int32_t slot;
    int32_t pid;
    uint64_t lease_id;
    int closed;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* pre: none. Start time (clock ticks after boot, /proc/PID/stat field 22) of a live, non-zombie process;
 * 0 when it is gone or a zombie. */
static uint64_t proc_start_time(int32_t pid)
{
    char path[64], buf[1024], *p;
    unsigned long long start = 0;
    size_t n;
    int field;
    FILE *f;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if (!(f = fopen(path, "r"))) return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    if (!(p = strrchr(buf, ')'))) return 0;   /* the command name may hold spaces and parentheses */
    p += 2;                                    /* field 3: state */
    if (*p == 'Z' || *p == 'X' || *p == 'x') return 0;
    for (field = 3; field < 22 && p; field++) {
        p = strchr(p, ' ');
        if (p) p++;
    }
    if (!p || sscanf(p, "%llu", &start) != 1) return 0;
    return start ? (uint64_t)start : 1;
}

static int lease_alive(const lease_rec_t *l)
{
    return proc_start_time(l->pid) == l->start_time;
}

static int64_t lock_timeout_ms(void)
{
    const char *env = getenv("VMEM_BUDGET_LOCK_MS");
    long long v = env && *env ? atoll(env) : 2000;
    return v > 0 ? v : 2000;
}

/* pre: s locked. Free dead and half-written leases; count what came back. */
static void recover_stale(seg_t *s, int repair)
{
    uint32_t i;
    for (i = 0; i < VMEM_BUDGET_MAX_TENANTS; i++) {
        lease_rec_t *l = &s->leases[i];
        if (l->state == LEASE_FREE) continue;
        if (l->held_bytes < 0) l->held_bytes = 0;
        if ((l->state == LEASE_CLAIMING && repair) || (l->state != LEASE_FREE && !lease_alive(l))) {
            s->recovered_leases++;
            s->recovered_bytes += l->held_bytes;
            memset(l, 0, sizeof(*l));
        }
    }
    s->last_scan_ns = now_ns();
}

/* pre: bd open. Lock the segment (timed); repair after a holder died. VMEM_OK or VMEM_ERR_BUSY / DRIVER. */
static int seg_lock(vmem_budget_t *bd, vmem_err_t *err)
{
    struct timespec ts;
    int64_t ms = lock_timeout_ms();
    int rc;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    rc = pthread_mutex_timedlock(&bd->seg->lock, &ts);
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(&bd->seg->lock);
        recover_stale(bd->seg, 1);
        return VMEM_OK;
    }
    if (rc == 0) return VMEM_OK;
    if (rc == ETIMEDOUT) {
        _vmem_err_set(err, VMEM_ERR_BUSY, VMEM_DETAIL_BUDGET_LOCK, rc, -1);
        return VMEM_ERR_BUSY;
    }
    _vmem_err_set(err, VMEM_ERR_DRIVER, VMEM_DETAIL_BUDGET_LOCK, rc, -1);
    return VMEM_ERR_DRIVER;
}

static void seg_unlock(vmem_budget_t *bd) { pthread_mutex_unlock(&bd->seg->lock); }

/* pre: s locked. */
static int64_t total_held(const seg_t *s)
{
    int64_t t = 0;
    uint32_t i;
    for (i = 0; i < VMEM_BUDGET_MAX_TENANTS; i++)
        if (s->leases[i].state != LEASE_FREE) t += s->leases[i].held_bytes;
    return t;
}

/* pre: s locked. Headroom kept for the unmet minimums of every lease but `self` (-1: all). */
static int64_t reserved_for_others(const seg_t *s, int32_t self)
{
    int64_t t = 0;
    uint32_t i;
    for (i = 0; i < VMEM_BUDGET_MAX_TENANTS; i++) {
        const lease_rec_t *l = &s->leases[i];
        if (l->state != LEASE_FREE && (int32_t)i != self && l->min_bytes > l->held_bytes)
            t += l->min_bytes - l->held_bytes;
    }
    return t;
}

/* pre: s locked; slot active. Bytes lease `slot` may take now. */
static int64_t free_for(const seg_t *s, int32_t slot)
{
    const lease_rec_t *l = &s->leases[slot];
    int64_t f = s->limit_bytes - total_held(s) - reserved_for_others(s, slot);
    if (l->max_bytes > 0 && l->max_bytes - l->held_bytes < f) f = l->max_bytes - l->held_bytes;
    return f > 0 ? f : 0;
}

/* ------------------------------------------------------------------ segment */

/* pre: s points at a mapping of at least sizeof(seg_t) bytes, private to the caller. */
static int seg_init(seg_t *s, int64_t limit_bytes)
{
    pthread_mutexattr_t a;
    memset(s, 0, sizeof(*s));
    if (pthread_mutexattr_init(&a)) return -1;
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    if (pthread_mutex_init(&s->lock, &a)) return -1;
    pthread_mutexattr_destroy(&a);
    s->version = BUDGET_VERSION;
    s->header_bytes = (uint32_t)sizeof(seg_t);
    s->segment_bytes = sizeof(seg_t);
    s->max_tenants = VMEM_BUDGET_MAX_TENANTS;
    s->limit_bytes = limit_bytes;
    s->next_lease_id = 1;
    __atomic_store_n(&s->magic, BUDGET_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

/* pre: path != NULL. Write a complete segment to a temporary file beside path and link it into place:
 * VMEM_OK, or EEXIST in *exists when another tenant created it first. */
static int seg_create(const char *path, int64_t limit_bytes, int *exists, vmem_err_t *err)
{
    char tmp[PATH_MAX];
    seg_t *s;
    int fd, e;
    if (snprintf(tmp, sizeof tmp, "%s.XXXXXX", path) >= (int)sizeof tmp)
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_BUDGET_SEGMENT, -1);
    if ((fd = mkstemp(tmp)) < 0) {
        _vmem_err_set(err, VMEM_ERR_DRIVER, VMEM_DETAIL_NONE, errno, -1);
        return VMEM_ERR_DRIVER;
    }
    if (ftruncate(fd, (off_t)sizeof(seg_t)) != 0 ||
        (s = mmap(NULL, sizeof(seg_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        e = errno;
        close(fd);
        unlink(tmp);
        _vmem_err_set(err, VMEM_ERR_DRIVER, VMEM_DETAIL_NONE, e, -1);
        return VMEM_ERR_DRIVER;
    }
    e = seg_init(s, limit_bytes);
    munmap(s, sizeof(seg_t));
    close(fd);
    if (e == 0 && link(tmp, path) != 0) e = errno;
    unlink(tmp);
    if (e == EEXIST) {
        *exists = 1;
        return VMEM_OK;
    }
    if (e) {
        _vmem_err_set(err, VMEM_ERR_DRIVER, VMEM_DETAIL_NONE, e < 0 ? 0 : e, -1);
        return VMEM_ERR_DRIVER;
    }
    return VMEM_OK;
}

/* pre: path, out != NULL; limit_bytes >= 0 (0: the segment must exist). */
int vmem_budget_open(const char *path, int64_t limit_bytes, vmem_budget_t **out, vmem_err_t *err)
{
    vmem_budget_t *bd;
    struct stat st;
    seg_t *s;
    int fd, exists = 0, rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!path || !*path || !out || limit_bytes < 0) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT && limit_bytes > 0) {
        if ((rc = seg_create(path, limit_bytes, &exists, err)) != VMEM_OK) return rc;
        fd = open(path, O_RDWR | O_CLOEXEC);
    }
    if (fd < 0) {
        int e = errno, st = e == ENOENT ? VMEM_ERR_INVALID : VMEM_ERR_DRIVER;
        _vmem_err_set(err, st, e == ENOENT ? VMEM_DETAIL_BUDGET_SEGMENT : VMEM_DETAIL_NONE, e, -1);
        return st;
    }
    if (fstat(fd, &st) != 0 || st.st_size != (off_t)sizeof(seg_t)) {
        close(fd);
        _vmem_err_set(err, VMEM_ERR_INVALID, VMEM_DETAIL_BUDGET_SEGMENT, 0, -1);
        if (err) err->needed = (int64_t)sizeof(seg_t), err->available = (int64_t)st.st_size;
        return VMEM_ERR_INVALID;
    }
    s = mmap(NULL, sizeof(seg_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (s == MAP_FAILED) {
        int e = errno;
        close(fd);
        _vmem_err_set(err, VMEM_ERR_DRIVER, VMEM_DETAIL_NONE, e, -1);
        return VMEM_ERR_DRIVER;
    }
    if (__atomic_load_n(&s->magic, __ATOMIC_ACQUIRE) != BUDGET_MAGIC || s->version != BUDGET_VERSION ||
        s->header_bytes != sizeof(seg_t) || s->segment_bytes != sizeof(seg_t) ||
        s->max_tenants != VMEM_BUDGET_MAX_TENANTS || s->limit_bytes < 0) {
        munmap(s, sizeof(seg_t));
        close(fd);
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_BUDGET_SEGMENT, -1);
    }
    if (!(bd = calloc(1, sizeof(*bd)))) {
        munmap(s, sizeof(seg_t));
        close(fd);
        return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    }
    atomic_init(&bd->refs, 1);
    bd->fd = fd;
    bd->seg = s;
    *out = bd;
    return VMEM_OK;
}

static void budget_drop(vmem_budget_t *bd)
{
    if (atomic_fetch_sub(&bd->refs, 1) != 1) return;
    munmap(bd->seg, sizeof(seg_t));
    close(bd->fd);
    free(bd);
}

/* pre: bd from vmem_budget_open. Leases opened on it keep the mapping alive. */
int vmem_budget_close(vmem_budget_t *bd)
{
    if (!bd) return VMEM_ERR_INVALID;
    budget_drop(bd);
    return VMEM_OK;
}

/* pre: bd open; limit_bytes > 0. BUSY (VMEM_DETAIL_BUDGET_HELD) when below what is held plus unmet
 * minimums: nothing changes. */
int vmem_budget_set_limit(vmem_budget_t *bd, int64_t limit_bytes, vmem_err_t *err)
{
    int64_t need;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!bd || limit_bytes <= 0) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if ((rc = seg_lock(bd, err))) return rc;
    recover_stale(bd->seg, 0);
    need = total_held(bd->seg) + reserved_for_others(bd->seg, -1);
    if (limit_bytes < need) {
        rc = _vmem_fail(err, VMEM_ERR_BUSY, VMEM_DETAIL_BUDGET_HELD, -1);
        if (err) err->needed = need, err->available = limit_bytes;
    } else {
        bd->seg->limit_bytes = limit_bytes;
    }
    seg_unlock(bd);
    return rc;
}

/* pre: bd, out != NULL. Scans for dead leases (at most every 100 ms). */
int vmem_budget_info(vmem_budget_t *bd, vmem_budget_info_t *out, vmem_err_t *err)
{
    seg_t *s;
    int64_t now = now_ns();
    uint32_t i;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!bd || !out) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if ((rc = seg_lock(bd, err))) return rc;
    s = bd->seg;
    if (now - s->last_scan_ns > SCAN_EVERY_NS) recover_stale(s, 0);
    memset(out, 0, sizeof(*out));
    out->limit_bytes = s->limit_bytes;
    out->max_tenants = VMEM_BUDGET_MAX_TENANTS;
    out->recovered_leases = s->recovered_leases;
    out->recovered_bytes = s->recovered_bytes;
    out->reserved_bytes = reserved_for_others(s, -1);
    for (i = 0; i < VMEM_BUDGET_MAX_TENANTS; i++) {
        const lease_rec_t *l = &s->leases[i];
        if (l->state != LEASE_ACTIVE) continue;
        out->num_tenants++;
        out->held_bytes += l->held_bytes;
        out->reclaimable_bytes += l->reclaimable_bytes;
        if (l->waiting_bytes && now - l->demand_ns < DEMAND_TTL_NS) out->waiting_bytes += l->waiting_bytes;
    }
    seg_unlock(bd);
    return VMEM_OK;
}

/* pre: bd, out, num_out != NULL; out holds max_out records. Active leases, slot order. */
int vmem_budget_tenants(vmem_budget_t *bd, vmem_tenant_info_t *out, int32_t max_out, int32_t *num_out,
                        vmem_err_t *err)
{
    int64_t now = now_ns();
    int32_t k = 0;
    uint32_t i;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!bd || !num_out || max_out < 0 || (max_out && !out))
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if ((rc = seg_lock(bd, err))) return rc;
    recover_stale(bd->seg, 0);
    for (i = 0; i < VMEM_BUDGET_MAX_TENANTS && k < max_out; i++) {
        const lease_rec_t *l = &bd->seg->leases[i];
        if (l->state != LEASE_ACTIVE) continue;
        out[k].slot = (int32_t)i;
        out[k].pid = l->pid;
        out[k].held_bytes = l->held_bytes;
        out[k].min_bytes = l->min_bytes;
        out[k].max_bytes = l->max_bytes;
        out[k].waiting_bytes = now - l->demand_ns < DEMAND_TTL_NS ? l->waiting_bytes : 0;
        out[k].reclaimable_bytes = l->reclaimable_bytes;
        out[k].peak_bytes = l->peak_bytes;
        memcpy(out[k].name, l->name, VMEM_BUDGET_NAME_LEN);
        k++;
    }
    *num_out = k;
    seg_unlock(bd);
    return VMEM_OK;
}

/* ------------------------------------------------------------------ lease */

/* pre: bd open; 0 <= min_bytes; max_bytes == 0 or max_bytes >= min_bytes. OOM when min_bytes is not
 * free now (needed/available in bytes); VMEM_ERR_BUSY (VMEM_DETAIL_BUDGET_TENANTS) when the table is full. */
int vmem_lease_open(vmem_budget_t *bd, const char *name, int64_t min_bytes, int64_t max_bytes,
                    vmem_lease_t **out, vmem_err_t *err)
{
    seg_t *s;
    vmem_lease_t *ls;
    lease_rec_t *l = NULL;
    uint64_t start = proc_start_time((int32_t)getpid());
    int32_t slot = -1;
    int64_t avail;
    uint32_t i;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!bd || !out || min_bytes < 0 || max_bytes < 0 || (max_bytes && max_bytes < min_bytes))
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if (!start) return _vmem_fail(err, VMEM_ERR_DRIVER, VMEM_DETAIL_NONE, -1);  /* no /proc */
    if (!(ls = calloc(1, sizeof(*ls)))) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    if ((rc = seg_lock(bd, err))) {
        free(ls);
        return rc;
    }
    s = bd->seg;
    recover_stale(s, 0);
    avail = s->limit_bytes - total_held(s) - reserved_for_others(s, -1);
    for (i = 0; i < VMEM_BUDGET_MAX_TENANTS && slot < 0; i++)
        if (s->leases[i].state == LEASE_FREE) slot = (int32_t)i;
    if (slot < 0) {
        rc = _vmem_fail(err, VMEM_ERR_BUSY, VMEM_DETAIL_BUDGET_TENANTS, -1);
    } else if (min_bytes > avail) {
        rc = _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_BUDGET, -1);
        if (err) err->needed = min_bytes, err->available = avail > 0 ? avail : 0;
    } else {
        l = &s->leases[slot];
        l->state = LEASE_CLAIMING;   /* a death from here to ACTIVE leaves a slot the repair frees */
        l->pid = (int32_t)getpid();
        l->start_time = start;
        l->lease_id = s->next_lease_id++;
        l->min_bytes = min_bytes;
        l->max_bytes = max_bytes;
        if (name) strncpy(l->name, name, VMEM_BUDGET_NAME_LEN - 1);
        __atomic_store_n(&l->state, LEASE_ACTIVE, __ATOMIC_RELEASE);
        ls->lease_id = l->lease_id;
    }
    seg_unlock(bd);
    if (rc) {
        free(ls);
        return rc;
    }
    atomic_init(&ls->refs, 1);
    atomic_fetch_add(&bd->refs, 1);
    ls->bd = bd;
    ls->slot = slot;
    ls->pid = (int32_t)getpid();
    *out = ls;
    return VMEM_OK;
}

/* pre: s locked. The lease's record, or NULL when it was recovered (we were thought dead) or closed. */
static lease_rec_t *rec_of(vmem_lease_t *ls)
{
    lease_rec_t *l = &ls->bd->seg->leases[ls->slot];
    return l->state == LEASE_ACTIVE && l->lease_id == ls->lease_id ? l : NULL;
}

/* pre: ls open, in the process that opened it. */
static int lease_usable(vmem_lease_t *ls, vmem_err_t *err)
{
    if (ls->closed) return _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
    if (ls->pid != (int32_t)getpid()) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_LEASE_PROCESS, -1);
    return VMEM_OK;
}

void _vmem_lease_retain(vmem_lease_t *ls) { atomic_fetch_add(&ls->refs, 1); }

/* pre: the caller holds a reference; the last one frees the record (gives back what it still holds). */
void _vmem_lease_drop(vmem_lease_t *ls)
{
    if (atomic_fetch_sub(&ls->refs, 1) != 1) return;
    if (ls->pid == (int32_t)getpid() && seg_lock(ls->bd, NULL) == VMEM_OK) {
        lease_rec_t *l = rec_of(ls);
        if (l) memset(l, 0, sizeof(*l));
        seg_unlock(ls->bd);
    }
    budget_drop(ls->bd);
    free(ls);
}

/* pre: ls from vmem_lease_open. Pools created with it keep the record until they are freed. */
int vmem_lease_close(vmem_lease_t *ls)
{
    if (!ls) return VMEM_ERR_INVALID;
    if (ls->closed) return VMEM_ERR_CLOSED;
    ls->closed = 1;
    _vmem_lease_drop(ls);
    return VMEM_OK;
}

/* pre: s locked, l = rec_of(ls). */
static int take_locked(vmem_lease_t *ls, lease_rec_t *l, int64_t bytes, vmem_err_t *err)
{
    seg_t *s = ls->bd->seg;
    int64_t f = free_for(s, ls->slot);
    if (bytes > f) {
        recover_stale(s, 0);             /* a dead tenant's share is what we may be missing */
        f = free_for(s, ls->slot);
    }
    if (bytes > f) {
        l->waiting_bytes = bytes - f;
        l->demand_ns = now_ns();
        _vmem_err_set(err, VMEM_ERR_OOM, VMEM_DETAIL_BUDGET, 0, -1);
        if (err) err->needed = bytes, err->available = f;
        return VMEM_ERR_OOM;
    }
    l->held_bytes += bytes;
    if (l->held_bytes > l->peak_bytes) l->peak_bytes = l->held_bytes;
    l->waiting_bytes = 0;
    return VMEM_OK;
}

/* Charge `bytes` to the lease, all or nothing. pre: ls open; bytes >= 0. OOM (VMEM_DETAIL_BUDGET,
 * needed/available in bytes) records the shortfall as waiting demand. */
int vmem_lease_take(vmem_lease_t *ls, int64_t bytes, vmem_err_t *err)
{
    lease_rec_t *l;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!ls || bytes < 0) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if ((rc = lease_usable(ls, err))) return rc;
    if ((rc = seg_lock(ls->bd, err))) return rc;
    if (!(l = rec_of(ls))) rc = _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_LEASE_LOST, -1);
    else if (bytes) rc = take_locked(ls, l, bytes, err);
    seg_unlock(ls->bd);
    return rc;
}

/* Give back `bytes` charged before (clamped at what is held). pre: ls from vmem_lease_open; bytes >= 0.
 * Never refused for lack of anything; a lock timeout leaves the charge (the budget then over-counts). */
int vmem_lease_give(vmem_lease_t *ls, int64_t bytes)
{
    lease_rec_t *l;
    int rc;
    if (!ls || bytes < 0) return VMEM_ERR_INVALID;
    if (ls->pid != (int32_t)getpid()) return VMEM_ERR_INVALID;
    if (bytes == 0) return VMEM_OK;
    if ((rc = seg_lock(ls->bd, NULL))) return rc;
    if ((l = rec_of(ls))) l->held_bytes = bytes < l->held_bytes ? l->held_bytes - bytes : 0;
    seg_unlock(ls->bd);
    return VMEM_OK;
}

/* vmem_lease_take, retried every millisecond until it succeeds or timeout_ms passed (then OOM as
 * vmem_lease_take; the demand stays recorded while waiting). pre: timeout_ms >= 0. */
int vmem_lease_wait(vmem_lease_t *ls, int64_t bytes, int64_t timeout_ms, vmem_err_t *err)
{
    int64_t deadline = now_ns() + (timeout_ms < 0 ? 0 : timeout_ms) * 1000000;
    struct timespec pause = {0, 1000000};
    int rc;
    if (timeout_ms < 0) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    for (;;) {
        rc = vmem_lease_take(ls, bytes, err);
        if (rc != VMEM_ERR_OOM || now_ns() >= deadline) return rc;
        nanosleep(&pause, NULL);
    }
}

/* pre: ls open; bytes >= 0. What the tenant could give back now (idle pages), for the others' view. */
int vmem_lease_set_reclaimable(vmem_lease_t *ls, int64_t reclaimable_bytes)
{
    lease_rec_t *l;
    int rc;
    if (!ls || reclaimable_bytes < 0) return VMEM_ERR_INVALID;
    if ((rc = lease_usable(ls, NULL))) return rc;
    if ((rc = seg_lock(ls->bd, NULL))) return rc;
    if ((l = rec_of(ls))) l->reclaimable_bytes = reclaimable_bytes;
    seg_unlock(ls->bd);
    return l ? VMEM_OK : VMEM_ERR_CLOSED;
}

/* pre: ls open; bytes >= 0. Record (or, with 0, forget) waiting demand without taking anything: a
 * scheduler that waits for memory says so, and the other tenants see it in vmem_lease_info. */
int vmem_lease_set_demand(vmem_lease_t *ls, int64_t bytes)
{
    lease_rec_t *l;
    int rc;
    if (!ls || bytes < 0) return VMEM_ERR_INVALID;
    if ((rc = lease_usable(ls, NULL))) return rc;
    if ((rc = seg_lock(ls->bd, NULL))) return rc;
    if ((l = rec_of(ls))) {
        l->waiting_bytes = bytes;
        l->demand_ns = now_ns();
    }
    seg_unlock(ls->bd);
    return l ? VMEM_OK : VMEM_ERR_CLOSED;
}

/* pre: ls, out != NULL. The lease's numbers and what the others wait for / could give back. */
int vmem_lease_info(vmem_lease_t *ls, vmem_lease_info_t *out, vmem_err_t *err)
{
    seg_t *s;
    lease_rec_t *l;
    int64_t now = now_ns();
    uint32_t i;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!ls || !out) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if (ls->closed) return _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
    if ((rc = seg_lock(ls->bd, err))) return rc;
    s = ls->bd->seg;
    if (now - s->last_scan_ns > SCAN_EVERY_NS) recover_stale(s, 0);
    memset(out, 0, sizeof(*out));
    if (!(l = rec_of(ls))) {
        seg_unlock(ls->bd);
        return _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_LEASE_LOST, -1);
    }
    out->slot = ls->slot;
    out->limit_bytes = s->limit_bytes;
    out->total_held_bytes = total_held(s);
    out->free_bytes = free_for(s, ls->slot);
    out->held_bytes = l->held_bytes;
    out->min_bytes = l->min_bytes;
    out->max_bytes = l->max_bytes;
    out->peak_bytes = l->peak_bytes;
    out->waiting_bytes = now - l->demand_ns < DEMAND_TTL_NS ? l->waiting_bytes : 0;
    out->recovered_leases = s->recovered_leases;
    for (i = 0; i < VMEM_BUDGET_MAX_TENANTS; i++) {
        const lease_rec_t *o = &s->leases[i];
        if (o->state != LEASE_ACTIVE || (int32_t)i == ls->slot) continue;
        out->num_others++;
        out->others_reclaimable_bytes += o->reclaimable_bytes;
        if (o->waiting_bytes && now - o->demand_ns < DEMAND_TTL_NS) out->others_waiting_bytes += o->waiting_bytes;
    }
    seg_unlock(ls->bd);
    return VMEM_OK;
}

/* Testing: take the segment's lock and return without releasing it (the caller then dies, or calls
 * vmem_budget_debug_unlock), to exercise EOWNERDEAD repair and lock timeouts. pre: bd open. */
int vmem_budget_debug_lock(vmem_budget_t *bd)
{
    return bd ? seg_lock(bd, NULL) : VMEM_ERR_INVALID;
}

int vmem_budget_debug_unlock(vmem_budget_t *bd)
{
    if (!bd) return VMEM_ERR_INVALID;
    seg_unlock(bd);
    return VMEM_OK;
}
