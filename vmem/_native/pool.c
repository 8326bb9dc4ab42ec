/* pool.c — physical page pools: ids, pins (mapcount), backing, trim. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"


/* pre: the caller holds a reference to p. */
void _vmem_pool_retain(vmem_pool_t *p) { atomic_fetch_add(&p->refs, 1); }

/* pre: the caller holds a reference to p; frees p (and drops its backend) with the last one. */
void _vmem_pool_drop(vmem_pool_t *p)
{
    vmem_backend_t *b;
    if (atomic_fetch_sub(&p->refs, 1) != 1) return;
    b = p->b;
    pthread_mutex_lock(&b->lock);
    b->pools[p->id] = NULL;
    pthread_mutex_unlock(&b->lock);
    if (p->lease) {   /* no mapping is left: every charge goes back */
        vmem_lease_give(p->lease, p->charged_pages * (int64_t)p->page_bytes);
        _vmem_lease_drop(p->lease);
    }
    free(p->mapcount);
    free(p->backed);
    free(p->charged);
    pthread_mutex_destroy(&p->lock);
    free(p);
    _vmem_backend_drop(b);
}

/* pre: p->lock held; ph[0..n) just pinned by the caller's map. Charge the lease for the pages that are
 * not charged yet (each once, whatever the repeats), all or nothing. OOM: err->needed / available in pages. */
int _vmem_pool_charge(vmem_pool_t *p, const int64_t *ph, int64_t n, vmem_err_t *err)
{
    int64_t i, k = 0;
    int rc;
    if (!p->lease) return VMEM_OK;
    for (i = 0; i < n; i++)
        if (!p->charged[ph[i]]) p->charged[ph[i]] = 2, k++;   /* 2: counted in this call */
    rc = k ? vmem_lease_take(p->lease, k * (int64_t)p->page_bytes, err) : VMEM_OK;
    for (i = 0; i < n; i++)
        if (p->charged[ph[i]] == 2) p->charged[ph[i]] = rc == VMEM_OK;
    if (rc == VMEM_OK) {
        p->charged_pages += k;
    } else if (err) {
        err->needed = k;
        err->available = err->available / (int64_t)p->page_bytes;
    }
    return rc;
}

/* pre: p->lock held. Give back the charge of the listed pages that hold no memory and are not pinned. */
void _vmem_pool_uncharge(vmem_pool_t *p, const int64_t *ph, int64_t n)
{
    int64_t i, k = 0;
    if (!p->lease) return;
    for (i = 0; i < n; i++)
        if (p->charged[ph[i]] && !p->backed[ph[i]] && !p->mapcount[ph[i]]) p->charged[ph[i]] = 0, k++;
    p->charged_pages -= k;
    if (k) vmem_lease_give(p->lease, k * (int64_t)p->page_bytes);
}

/* Make mapcount/backed hold at least n pages. pre: p->lock held or p private. */
static int pool_reserve_arrays(vmem_pool_t *p, int64_t n)
{
    int64_t cap = p->cap_pages ? p->cap_pages : 64;
    uint32_t *mc;
    uint8_t *bk;
    if (n <= p->cap_pages) return VMEM_OK;
    while (cap < n) cap *= 2;
    if (p->max_pages && cap > p->max_pages) cap = p->max_pages;
    mc = realloc(p->mapcount, (size_t)cap * sizeof(uint32_t));
    if (!mc) return VMEM_ERR_OOM;
    p->mapcount = mc;
    bk = realloc(p->backed, (size_t)cap);
    if (!bk) return VMEM_ERR_OOM;
    p->backed = bk;
    if (p->lease) {
        uint8_t *ch = realloc(p->charged, (size_t)cap);
        if (!ch) return VMEM_ERR_OOM;
        p->charged = ch;
        memset(p->charged + p->cap_pages, 0, (size_t)(cap - p->cap_pages));
    }
    memset(p->mapcount + p->cap_pages, 0, (size_t)(cap - p->cap_pages) * sizeof(uint32_t));
    memset(p->backed + p->cap_pages, 0, (size_t)(cap - p->cap_pages));
    p->cap_pages = cap;
    return VMEM_OK;
}

/* pre: b, out != NULL; page_bytes a positive multiple of the granularity; 0 <= num_pages;
 *      max_pages == 0 (unbounded) or max_pages >= num_pages. lease: NULL, or an open lease (elastic). */
static int pool_create(vmem_backend_t *b, uint64_t page_bytes, int64_t num_pages, int64_t max_pages,
                       vmem_lease_t *lease, vmem_pool_t **out, vmem_err_t *err)
{
    vmem_pool_t *p;
    int rc, id;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!b || !out || num_pages < 0 || max_pages < 0 || (max_pages && max_pages < num_pages))
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if ((rc = _vmem_check_page_bytes(b, page_bytes, err))) return rc;
    if (num_pages >= VMEM_MAX_PHYS || max_pages >= VMEM_MAX_PHYS ||
        (uint64_t)num_pages > ((uint64_t)1 << 62) / page_bytes)
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_TOO_LARGE, -1);
    p = calloc(1, sizeof(*p));
    if (!p) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    p->b = b;
    p->page_bytes = page_bytes;
    p->num_pages = num_pages;
    p->max_pages = max_pages;
    p->fd = -1;
    p->lease = lease;
    atomic_init(&p->refs, 1);
    pthread_mutex_init(&p->lock, NULL);
    if (pool_reserve_arrays(p, num_pages > 0 ? num_pages : 1) != VMEM_OK) goto oom;
    pthread_mutex_lock(&b->lock);
    for (id = 0; id < VMEM_MAX_POOLS && b->pools[id]; id++) {}
    if (id < VMEM_MAX_POOLS) b->pools[id] = p;
    pthread_mutex_unlock(&b->lock);
    if (id == VMEM_MAX_POOLS) {   /* a limit of this layer, not out of memory: say which */
        free(p->mapcount);
        free(p->backed);
        pthread_mutex_destroy(&p->lock);
        free(p);
        _vmem_err_set(err, VMEM_ERR_INVALID, VMEM_DETAIL_TOO_MANY_POOLS, 0, -1);
        if (err) err->needed = 1, err->available = 0;
        return VMEM_ERR_INVALID;
    }
    p->id = id;
    rc = b->ops->pool_open(p, err);
    if (rc != VMEM_OK) {
        pthread_mutex_lock(&b->lock);
        b->pools[id] = NULL;
        pthread_mutex_unlock(&b->lock);
        free(p->mapcount);
        free(p->backed);
        free(p->charged);
        free(p);
        return rc;
    }
    atomic_fetch_add(&b->refs, 1);
    if (lease) _vmem_lease_retain(lease);
    *out = p;
    return VMEM_OK;
oom:
    free(p->mapcount);
    free(p->backed);
    free(p->charged);
    free(p);
    return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
}

int vmem_pool_create(vmem_backend_t *b, uint64_t page_bytes, int64_t num_pages, int64_t max_pages,
                     vmem_pool_t **out, vmem_err_t *err)
{
    return pool_create(b, page_bytes, num_pages, max_pages, NULL, out, err);
}

/* pre: as vmem_pool_create; lease open (Note [Shared KV budget] in budget.c). */
int vmem_pool_create_elastic(vmem_backend_t *b, uint64_t page_bytes, int64_t num_pages, int64_t max_pages,
                             vmem_lease_t *lease, vmem_pool_t **out, vmem_err_t *err)
{
    if (!lease) {
        if (err) memset(err, 0, sizeof(*err)), err->index = -1;
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    }
    return pool_create(b, page_bytes, num_pages, max_pages, lease, out, err);
}

/* pre: p open; num_pages >= 0 more pages; stays within max_pages, below VMEM_MAX_PHYS ids and 2^62 bytes
 * (as vmem_pool_create). */
int vmem_pool_grow(vmem_pool_t *p, int64_t num_pages, vmem_err_t *err)
{
    int rc;
    int64_t want;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!p || num_pages < 0) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    pthread_mutex_lock(&p->lock);
    /* saturate instead of overflowing: a wrapped sum (or sum * page_bytes) once truncated the memfd */
    want = num_pages < VMEM_MAX_PHYS - p->num_pages ? p->num_pages + num_pages : VMEM_MAX_PHYS;
    if (p->closed) rc = _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
    else if (p->max_pages && want > p->max_pages)
        rc = _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_POOL_FULL, -1);
    else if (want >= VMEM_MAX_PHYS || (uint64_t)want > ((uint64_t)1 << 62) / p->page_bytes)
        rc = _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_TOO_LARGE, -1);
    else if (num_pages == 0) rc = VMEM_OK;
    else if (pool_reserve_arrays(p, want) != VMEM_OK) rc = _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    else if ((rc = p->b->ops->pool_grow(p, want, err)) == VMEM_OK) p->num_pages = want;
    pthread_mutex_unlock(&p->lock);
    return rc;
}

/* pre: p open; every phys in [0, num_pages) and unmapped. All or nothing for the checks; the
 * memory of pages released before an OS failure stays released (it held nothing anyone maps). */
int vmem_pool_trim(vmem_pool_t *p, const int64_t *phys, int64_t n, vmem_err_t *err)
{
    int64_t i;
    int rc = VMEM_OK;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!p || n < 0 || (n && !phys)) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    pthread_mutex_lock(&p->lock);
    if (p->closed) rc = _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
    for (i = 0; rc == VMEM_OK && i < n; i++) {
        if (phys[i] < 0 || phys[i] >= p->num_pages)
            rc = _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_PHYS_RANGE, i);
        else if (p->mapcount[phys[i]])
            rc = _vmem_fail(err, VMEM_ERR_BUSY, VMEM_DETAIL_PAGE_IN_USE, i);
    }
    for (i = 0; rc == VMEM_OK && i < n; i++) {
        int64_t j = i;
        if (!p->backed[phys[i]]) continue;
        /* one OS call per run of consecutive backed pages */
        while (j + 1 < n && phys[j + 1] == phys[j] + 1 && p->backed[phys[j + 1]]) j++;
        rc = p->b->ops->pool_trim(p, phys[i], j - i + 1, err);
        if (rc == VMEM_OK) {
            int64_t k;
            for (k = i; k <= j; k++) p->backed[phys[k]] = 0;
            p->backed_pages -= j - i + 1;
        } else if (err) {
            err->index = i;
        }
        i = j;
    }
    if (rc == VMEM_OK || rc == VMEM_ERR_DRIVER) _vmem_pool_uncharge(p, phys, n);
    pthread_mutex_unlock(&p->lock);
    return rc;
}

/* pre: p from vmem_pool_create. Drops the caller's reference. */
int vmem_pool_close(vmem_pool_t *p)
{
    if (!p) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&p->lock);
    if (p->closed) {
        pthread_mutex_unlock(&p->lock);
        return VMEM_ERR_CLOSED;
    }
    p->closed = 1;
    p->b->ops->pool_close(p);
    pthread_mutex_unlock(&p->lock);
    _vmem_pool_drop(p);
    return VMEM_OK;
}

/* pre: p, out != NULL. */
int vmem_pool_info(vmem_pool_t *p, vmem_pool_info_t *out)
{
    if (!p || !out) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&p->lock);
    out->page_bytes = p->page_bytes;
    out->num_pages = p->num_pages;
    out->max_pages = p->max_pages;
    out->backed_pages = p->backed_pages;
    out->mapped_pages = p->mapped_pages;
    out->mappings = p->mappings;
    out->resident_bytes = p->closed ? -1 : p->b->ops->pool_resident(p);
    out->hugetlb = p->hugetlb;
    out->closed = p->closed;
    out->fd = p->fd;
    out->charged_pages = p->lease ? p->charged_pages : -1;
    pthread_mutex_unlock(&p->lock);
    return VMEM_OK;
}

int32_t vmem_pool_id(vmem_pool_t *p) { return p ? p->id : -1; }

/* pre: p != NULL, nth >= 0, status one of VMEM_ERR_*. */
int vmem_pool_inject_fault(vmem_pool_t *p, int64_t nth, int status)
{
    if (!p || nth < 0 || status <= 0) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&p->lock);
    p->fault_nth = nth;
    p->fault_status = status;
    pthread_mutex_unlock(&p->lock);
    return VMEM_OK;
}
