/* core.c — what every backend shares outside the map path: the version stamp, error records,
 * opening and closing a backend (dispatch to host.c / cuda.c through vmem_ops_t), the mapping budget
 * (vm.max_map_count minus what the process holds; see Note [Host backend] in host.c for why
 * mappings are counted), reservations and their virt->phys table (entries, reference counts, info,
 * read-out) and fault injection per reservation. Batched map/unmap, run coalescing and rollback are
 * in map.c; pools in pool.c. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "internal.h"

#ifndef VMEM_VERSION
#define VMEM_VERSION "unknown"
#endif

/* pre: none. The version this extension was built for (vmem/_version.py). */
const char *vmem_version(void) { return VMEM_VERSION; }

/* pre: none (err may be NULL). */
void _vmem_err_set(vmem_err_t *err, int status, int detail, int64_t os_error, int64_t index)
{
    if (!err) return;
    err->status = status;
    err->detail = detail;
    err->os_error = os_error;
    err->index = index;
}

/* pre: status != VMEM_OK. Fills err, returns status. */
int _vmem_fail(vmem_err_t *err, int status, int detail, int64_t index)
{
    _vmem_err_set(err, status, detail, 0, index);
    return status;
}

/* pre: path names a file holding one integer; -1 when unreadable. */
int64_t _vmem_read_sysctl(const char *path)
{
    FILE *f = fopen(path, "r");
    long long v = -1;
    if (!f) return -1;
    if (fscanf(f, "%lld", &v) != 1) v = -1;
    fclose(f);
    return v;
}

/* ------------------------------------------------------------------ backend */

/* pre: none; NULL for an unknown kind. */
static const vmem_ops_t *ops_for(int kind)
{
    if (kind == VMEM_KIND_HOST) return &vmem_host_ops;
    if (kind == VMEM_KIND_CUDA) return &vmem_cuda_ops;
    return NULL;
}

/* pre: out != NULL. */
int vmem_backend_open(int kind, int device, vmem_backend_t **out, vmem_err_t *err)
{
    const vmem_ops_t *ops = ops_for(kind);
    vmem_backend_t *b;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!out || !ops) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    b = calloc(1, sizeof(*b));
    if (!b) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    b->ops = ops;
    b->kind = kind;
    b->device = kind == VMEM_KIND_HOST ? -1 : device;
    atomic_init(&b->refs, 1);
    pthread_mutex_init(&b->lock, NULL);
    pthread_mutex_init(&b->budget_lock, NULL);
    rc = ops->open(b, device, err);
    if (rc != VMEM_OK) {
        pthread_mutex_destroy(&b->budget_lock);
        pthread_mutex_destroy(&b->lock);
        free(b);
        return rc;
    }
    b->map_budget_os = b->map_budget;
    b->map_budget_cap = INT64_MAX;
    *out = b;
    return VMEM_OK;
}

/* pre: the caller holds a reference to b; frees b with the last one. */
void _vmem_backend_drop(vmem_backend_t *b)
{
    if (atomic_fetch_sub(&b->refs, 1) != 1) return;
    b->ops->close(b);
    pthread_mutex_destroy(&b->budget_lock);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

/* pre: b from vmem_backend_open, not closed before. Objects made from b keep it alive. */
int vmem_backend_close(vmem_backend_t *b)
{
    if (!b) return VMEM_ERR_INVALID;
    _vmem_backend_drop(b);
    return VMEM_OK;
}

/* pre: b, out != NULL. */
int vmem_backend_info(vmem_backend_t *b, vmem_backend_info_t *out)
{
    if (!b || !out) return VMEM_ERR_INVALID;
    memset(out, 0, sizeof(*out));
    out->kind = b->kind;
    out->device = b->device;
    out->granularity_bytes = b->granularity;
    out->max_map_count = b->max_map_count;
    pthread_mutex_lock(&b->budget_lock);
    out->map_budget = b->map_budget;
    pthread_mutex_unlock(&b->budget_lock);
    out->mappings_used = b->mappings_used ? atomic_load(b->mappings_used) : 0;
    out->hugetlb_available = b->hugetlb_available;
    return VMEM_OK;
}

/* pre: b != NULL, budget >= 0. */
int vmem_backend_set_map_budget(vmem_backend_t *b, int64_t budget)
{
    if (!b || budget < 0) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&b->budget_lock);
    b->map_budget_cap = budget;
    b->map_budget = budget < b->map_budget_os ? budget : b->map_budget_os;
    pthread_mutex_unlock(&b->budget_lock);
    return VMEM_OK;
}

/* pre: b != NULL. Undo a successful _vmem_budget_take(b, delta): never refused. */
void _vmem_budget_give(vmem_backend_t *b, int64_t delta)
{
    if (b->mappings_used) atomic_fetch_sub(b->mappings_used, delta);
}

/* Take `delta` mappings from the budget (delta may be negative: gives back). The count is atomic; the
 * budget it is held against (and its refresh) sits under b->budget_lock. */
int _vmem_budget_take(vmem_backend_t *b, int64_t delta, vmem_err_t *err)
{
    long long used;
    int64_t budget;
    if (!b->mappings_used || delta == 0) return VMEM_OK;
    if (delta < 0) {
        atomic_fetch_add(b->mappings_used, delta);
        return VMEM_OK;
    }
    used = atomic_load(b->mappings_used);
    pthread_mutex_lock(&b->budget_lock);
    if (used + delta > b->map_budget && b->ops->refresh_budget) {
        /* the rest of the process may have dropped mappings since open: look again before refusing
         * (at most once a second: reading /proc/self/maps near the limit takes milliseconds) */
        struct timespec ts;
        int64_t now;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        if (now - b->last_refresh_ns > 1000000000) {
            b->last_refresh_ns = now;
            b->ops->refresh_budget(b);
            b->map_budget = b->map_budget_cap < b->map_budget_os ? b->map_budget_cap : b->map_budget_os;
        }
    }
    budget = b->map_budget;
    pthread_mutex_unlock(&b->budget_lock);
    do {
        if (used + delta > budget) {
            _vmem_err_set(err, VMEM_ERR_MAP_LIMIT, VMEM_DETAIL_NONE, 0, -1);
            if (err) err->needed = delta, err->available = budget - used;
            return VMEM_ERR_MAP_LIMIT;
        }
    } while (!atomic_compare_exchange_weak(b->mappings_used, &used, used + delta));
    return VMEM_OK;
}

/* ------------------------------------------------------------------ reservation */

/* pre: the caller holds a reference to r. */
void _vmem_resv_retain(vmem_resv_t *r) { atomic_fetch_add(&r->refs, 1); }

/* pre: the caller holds a reference to r; frees r with the last one. */
void _vmem_resv_drop(vmem_resv_t *r)
{
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    free(r->table);
    pthread_mutex_destroy(&r->lock);
    _vmem_backend_drop(r->b);
    free(r);
}

/* pre: b != NULL. */
int _vmem_check_page_bytes(vmem_backend_t *b, uint64_t page_bytes, vmem_err_t *err)
{
    if (page_bytes == 0 || page_bytes % b->granularity != 0)
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_UNALIGNED, -1);
    return VMEM_OK;
}

/* pre: b, out != NULL; page_bytes a positive multiple of the granularity; 0 < num_bytes <= 2^47. */
int vmem_reserve(vmem_backend_t *b, uint64_t num_bytes, uint64_t page_bytes, vmem_resv_t **out,
                 vmem_err_t *err)
{
    vmem_resv_t *r;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!b || !out) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if ((rc = _vmem_check_page_bytes(b, page_bytes, err))) return rc;
    if (num_bytes == 0 || num_bytes > ((uint64_t)1 << 47))
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_TOO_LARGE, -1);
    num_bytes = (num_bytes + page_bytes - 1) / page_bytes * page_bytes;
    r = calloc(1, sizeof(*r));
    if (!r) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    r->num_pages = (int64_t)(num_bytes / page_bytes);
    /* calloc: untouched parts of the table cost no memory */
    r->table = calloc((size_t)r->num_pages, sizeof(uint64_t));
    if (!r->table) {
        free(r);
        _vmem_err_set(err, VMEM_ERR_OOM, VMEM_DETAIL_TOO_LARGE, ENOMEM, -1);
        if (err) err->needed = (int64_t)num_bytes;
        return VMEM_ERR_OOM;
    }
    if ((rc = _vmem_budget_take(b, 1, err)) != VMEM_OK) {
        free(r->table);
        free(r);
        return rc;
    }
    rc = b->ops->reserve(b, num_bytes, page_bytes, &r->addr, err);
    if (rc != VMEM_OK) {
        _vmem_budget_take(b, -1, NULL);
        free(r->table);
        free(r);
        if (err) err->needed = (int64_t)num_bytes;
        return rc;
    }
    r->b = b;
    atomic_fetch_add(&b->refs, 1);
    atomic_init(&r->refs, 1);
    pthread_mutex_init(&r->lock, NULL);
    r->num_bytes = num_bytes;
    r->page_bytes = page_bytes;
    *out = r;
    return VMEM_OK;
}

vmem_pool_t *_vmem_pool_of(vmem_backend_t *b, uint64_t entry)
{
    return b->pools[(entry >> VMEM_ENTRY_SHIFT) - 1];
}

int64_t _vmem_phys_of(uint64_t entry)
{
    return (int64_t)(entry & (((uint64_t)1 << VMEM_ENTRY_SHIFT) - 1));
}

/* pre: entries[0..n) were pinned by vmem_map and are no longer in any table; no resv lock needed. Give
 * back the pins of `n` mappings of pool pages listed in entries[]. */
void _vmem_unpin_entries(vmem_backend_t *b, const uint64_t *entries, int64_t n)
{
    int64_t i = 0;
    while (i < n) {
        vmem_pool_t *p = _vmem_pool_of(b, entries[i]);
        int64_t j = i, drops = 0;
        pthread_mutex_lock(&p->lock);
        for (; j < n && _vmem_pool_of(b, entries[j]) == p; j++) {
            int64_t ph = _vmem_phys_of(entries[j]);
            if (--p->mapcount[ph] == 0) p->mapped_pages--;
            p->mappings--;
            drops++;
        }
        pthread_mutex_unlock(&p->lock);
        for (; drops > 0; drops--) _vmem_pool_drop(p);
        i = j;
    }
}

/* pre: r from vmem_reserve. Drops the caller's reference. */
int vmem_release(vmem_resv_t *r)
{
    int64_t i, k = 0, breaks;
    uint64_t *entries;
    if (!r) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&r->lock);
    if (r->closed) {
        pthread_mutex_unlock(&r->lock);
        return VMEM_ERR_CLOSED;
    }
    r->closed = 1;
    r->b->ops->release(r);
    entries = malloc((size_t)(r->mapped_pages ? r->mapped_pages : 1) * sizeof(uint64_t));
    for (i = 0; i < r->num_pages && k < r->mapped_pages; i++)
        if (r->table[i]) {
            if (entries) entries[k] = r->table[i];
            k++;
            r->table[i] = 0;
        }
    breaks = r->num_breaks;
    r->num_breaks = 0;
    r->mapped_pages = 0;
    pthread_mutex_unlock(&r->lock);
    if (entries) _vmem_unpin_entries(r->b, entries, k);  /* without memory the pools leak pins, never worse */
    free(entries);
    _vmem_budget_take(r->b, -(breaks + 1), NULL);
    _vmem_resv_drop(r);
    return VMEM_OK;
}

/* pre: r, out != NULL. */
int vmem_resv_info(vmem_resv_t *r, vmem_resv_info_t *out)
{
    int64_t runs = 0;
    if (!r || !out) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&r->lock);
    out->address = r->addr;
    out->num_bytes = r->num_bytes;
    out->page_bytes = r->page_bytes;
    out->num_pages = r->num_pages;
    out->mapped_pages = r->mapped_pages;
    if (r->b->ops->coalesce_phys) {
        out->num_mappings = r->closed ? 0 : r->num_breaks + 1;
    } else {
        /* cuda: breaks only separate mapped from unmapped; count the mapped segments */
        int64_t segments = r->num_breaks + 1;
        if (r->num_pages > 0 && r->mapped_pages > 0) {
            int first_mapped = r->table[0] != 0;
            runs = first_mapped ? (segments + 1) / 2 : segments / 2;
        }
        out->num_mappings = runs;
    }
    out->map_calls = r->map_calls;
    out->unmap_calls = r->unmap_calls;
    out->map_ops = r->map_ops;
    out->unmap_ops = r->unmap_ops;
    out->pages_mapped_total = r->pages_mapped_total;
    out->pages_unmapped_total = r->pages_unmapped_total;
    pthread_mutex_unlock(&r->lock);
    return VMEM_OK;
}

/* pre: r, out_phys != NULL; 0 <= first, n >= 0, first + n <= num_pages. */
int vmem_resv_read_table(vmem_resv_t *r, int64_t first, int64_t n, int64_t *out_phys, int32_t *out_pool)
{
    int64_t i;
    if (!r || !out_phys || first < 0 || n < 0) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&r->lock);
    if (r->closed) {
        pthread_mutex_unlock(&r->lock);
        return VMEM_ERR_CLOSED;
    }
    if (n > r->num_pages - first) {   /* not first + n: that can overflow */
        pthread_mutex_unlock(&r->lock);
        return VMEM_ERR_INVALID;
    }
    for (i = 0; i < n; i++) {
        uint64_t e = r->table[first + i];
        out_phys[i] = e ? _vmem_phys_of(e) : -1;
        if (out_pool) out_pool[i] = e ? (int32_t)((e >> VMEM_ENTRY_SHIFT) - 1) : -1;
    }
    pthread_mutex_unlock(&r->lock);
    return VMEM_OK;
}

/* pre: r != NULL, nth >= 0, status one of VMEM_ERR_*. */
int vmem_resv_inject_fault(vmem_resv_t *r, int64_t nth, int status)
{
    if (!r || nth < 0 || status <= 0) return VMEM_ERR_INVALID;
    pthread_mutex_lock(&r->lock);
    r->fault_nth = nth;
    r->fault_status = status;
    pthread_mutex_unlock(&r->lock);
    return VMEM_OK;
}

