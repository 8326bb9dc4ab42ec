/* map.c — batched map / unmap: validation of a batch, run coalescing (one OS/driver call per
 * contiguous run), the mapping-budget check, and rollback inside the same call.
 *
 * Interval picture of one map batch (pages of a reservation, half-open):
 *
 *     virt   0   1   2   3   4   5   6   7
 *     table  .   A7  A8  .   .   B2  .   .      (pool A page 7 at virt 1, ...)
 *     batch          {3->A9, 4->A10}            sorted by virt
 *     runs           [3, 5) over A[9, 11)       one OS call; merges with [1, 3) into one mapping
 *
 * A boundary i|i+1 is a "break" when pages i and i+1 sit in different mappings; the reservation then
 * holds num_breaks + 1 mappings (host VMAs). A batch changes only the boundaries next to its pages,
 * so the budget check is O(n) in the batch, not in the reservation.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "internal.h"


typedef struct {
    int64_t virt;
    int64_t phys;     /* map: physical page; unmap: index into the saved entries */
    int64_t index;    /* position in the caller's batch, for error reports */
} pair_t;

/* pre: a, b point to pair_t (qsort comparator by virt). */
static int cmp_pair(const void *a, const void *b)
{
    int64_t x = ((const pair_t *)a)->virt, y = ((const pair_t *)b)->virt;
    return x < y ? -1 : x > y;
}

/* Is boundary i|i+1 a break between two mappings? pre: 0 <= i < num_pages - 1. */
static int is_break(const vmem_resv_t *r, int64_t i)
{
    uint64_t a = r->table[i], c = r->table[i + 1];
    if (!r->b->ops->coalesce_phys) return (a == 0) != (c == 0);
    if (a == 0 && c == 0) return 0;
    return !(a != 0 && c == a + 1);
}

/* Sum of breaks over the boundaries next to the sorted pages (each boundary once). */
static int64_t breaks_near(const vmem_resv_t *r, const pair_t *s, int64_t n)
{
    int64_t i, total = 0, last = -1;
    for (i = 0; i < n; i++) {
        int64_t v = s[i].virt, bnd;
        for (bnd = v - 1; bnd <= v; bnd++) {
            if (bnd < 0 || bnd >= r->num_pages - 1 || bnd <= last) continue;
            total += is_break(r, bnd);
            last = bnd;
        }
    }
    return total;
}

/* pre: r->lock held; n > 0; phys may be NULL (unmap). Copy the batch into pairs sorted by virt; reject
 * out-of-range and duplicate virtual pages. */
static int sorted_pairs(const vmem_resv_t *r, const int64_t *virt, const int64_t *phys, int64_t n,
                        pair_t **out, vmem_err_t *err)
{
    pair_t *s = malloc((size_t)n * sizeof(pair_t));
    int64_t i;
    int sorted = 1;
    if (!s) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    for (i = 0; i < n; i++) {
        if (virt[i] < 0 || virt[i] >= r->num_pages) {
            free(s);
            return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_VIRT_RANGE, i);
        }
        s[i].virt = virt[i];
        s[i].phys = phys ? phys[i] : 0;
        s[i].index = i;
        if (i && virt[i] <= virt[i - 1]) sorted = 0;
    }
    if (!sorted) {
        qsort(s, (size_t)n, sizeof(pair_t), cmp_pair);
        for (i = 1; i < n; i++)
            if (s[i].virt == s[i - 1].virt) {
                int64_t idx = s[i].index > s[i - 1].index ? s[i].index : s[i - 1].index;
                free(s);
                return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_DUPLICATE, idx);
            }
    }
    *out = s;
    return VMEM_OK;
}

/* pre: the owner's lock held. Count one OS/driver op against the injected faults; nonzero: fail this op
 * with that status. */
static int injected(int64_t *nth, int status)
{
    if (*nth <= 0) return 0;
    return --*nth == 0 ? status : 0;
}

/* pre: r->lock held; p may be NULL (unmap). */
static int op_fault(vmem_resv_t *r, vmem_pool_t *p, vmem_err_t *err, int64_t index)
{
    int st = injected(&r->fault_nth, r->fault_status);
    if (!st && p && __atomic_load_n(&p->fault_nth, __ATOMIC_RELAXED) > 0) {  /* lock only when armed */
        pthread_mutex_lock(&p->lock);
        st = injected(&p->fault_nth, p->fault_status);
        pthread_mutex_unlock(&p->lock);
    }
    if (st) _vmem_err_set(err, st, VMEM_DETAIL_INJECTED, 0, index);
    return st;
}

/* pre: 0 <= i < n; s sorted by virt; ph[k] is the physical page of s[k]. Length of the run starting at
 * s[i]: consecutive virt (and phys, when the backend needs it). */
static int64_t run_length(const vmem_resv_t *r, const pair_t *s, int64_t i, int64_t n, const int64_t *ph)
{
    int64_t j = i + 1;
    while (j < n && s[j].virt == s[j - 1].virt + 1 &&
           (!r->b->ops->coalesce_phys || ph[j] == ph[j - 1] + 1))
        j++;
    return j - i;
}

/* pre: r, p open, same backend and page_bytes; virt distinct, in range, unmapped; phys in the pool.
 * All or nothing. */
int vmem_map(vmem_resv_t *r, vmem_pool_t *p, const int64_t *virt, const int64_t *phys, int64_t n,
             vmem_err_t *err)
{
    pair_t *s = NULL;
    int64_t *ph = NULL, *runs = NULL, i, old_breaks, delta = 0, done = 0, num_runs = 0, populated = 0;
    int taken = 0;
    uint64_t tag;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!r || !p || n < 0 || (n && (!virt || !phys)))
        return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    if (r->b != p->b) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_BACKEND, -1);
    if (r->page_bytes != p->page_bytes) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_PAGE_SIZE, -1);
    pthread_mutex_lock(&r->lock);
    if (r->closed) {
        rc = _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
        goto out;
    }
    if (n == 0) {
        rc = VMEM_OK;
        goto out;
    }
    if ((rc = sorted_pairs(r, virt, phys, n, &s, err))) goto out;
    ph = malloc((size_t)n * sizeof(int64_t));
    if (!ph) {
        rc = _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
        goto out;
    }
    for (i = 0; i < n; i++) {
        ph[i] = s[i].phys;
        if (r->table[s[i].virt]) {
            rc = _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_ALREADY_MAPPED, s[i].index);
            goto out;
        }
    }
    /* pin the pool pages: trim refuses them and the pool outlives the mappings */
    pthread_mutex_lock(&p->lock);
    if (p->closed) rc = _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
    for (i = 0; rc == VMEM_OK && i < n; i++)
        if (ph[i] < 0 || ph[i] >= p->num_pages)
            rc = _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_PHYS_RANGE, s[i].index);
    if (rc == VMEM_OK)
        for (i = 0; i < n; i++) {
            if (p->mapcount[ph[i]]++ == 0) p->mapped_pages++;
            p->mappings++;
        }
    /* elastic pools: charge the budget before any page gains memory (Note [Shared KV budget]) */
    if (rc == VMEM_OK && p->lease && (rc = _vmem_pool_charge(p, ph, n, err)) != VMEM_OK)
        for (i = 0; i < n; i++) {
            if (--p->mapcount[ph[i]] == 0) p->mapped_pages--;
            p->mappings--;
        }
    pthread_mutex_unlock(&p->lock);
    if (rc) goto out;
    atomic_fetch_add(&p->refs, n);
    /* budget: write the new entries, count, and undo if it does not fit */
    tag = (uint64_t)(p->id + 1) << VMEM_ENTRY_SHIFT;
    old_breaks = breaks_near(r, s, n);
    for (i = 0; i < n; i++) r->table[s[i].virt] = tag | (uint64_t)ph[i];
    delta = breaks_near(r, s, n) - old_breaks;
    rc = _vmem_budget_take(r->b, delta, err);
    taken = rc == VMEM_OK;
    /* the OS calls, one per run; on failure undo the runs before it, last first */
    runs = malloc((size_t)n * sizeof(int64_t));
    if (!runs && rc == VMEM_OK) rc = _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    for (i = 0; rc == VMEM_OK && i < n; i += done) {
        done = run_length(r, s, i, n, ph);
        rc = op_fault(r, p, err, s[i].index);
        if (!rc) rc = r->b->ops->map_run(r, s[i].virt, p, ph + i, done, err);
        if (rc) {
            if (err && err->index < 0) err->index = s[i].index;
            populated = i;
            while (num_runs > 0) {
                int64_t a = runs[--num_runs];
                r->b->ops->unmap_run(r, s[a].virt, i - a, NULL);
                r->unmap_ops++;
                i = a;
            }
            break;
        }
        runs[num_runs++] = i;
        r->map_ops++;
    }
    if (rc && taken) _vmem_budget_give(r->b, delta);
    free(runs);
    if (rc) {
        for (i = 0; i < n; i++) r->table[s[i].virt] = 0;
        pthread_mutex_lock(&p->lock);
        for (i = 0; i < n; i++) {
            if (--p->mapcount[ph[i]] == 0) p->mapped_pages--;
            p->mappings--;
        }
        /* the runs mapped before the failure gave their pages memory: give it back unless
         * someone else maps the page now, so the pool ends as it began */
        for (i = 0; i < populated; i++) {
            if (p->backed[ph[i]]) continue;
            if (p->mapcount[ph[i]] || p->closed || p->b->ops->pool_trim(p, ph[i], 1, NULL)) {
                p->backed[ph[i]] = 1;
                p->backed_pages++;
            }
        }
        _vmem_pool_uncharge(p, ph, n);
        pthread_mutex_unlock(&p->lock);
        atomic_fetch_sub(&p->refs, n);     /* the owner's reference is still there */
        goto out;
    }
    pthread_mutex_lock(&p->lock);
    for (i = 0; i < n; i++)
        if (!p->backed[ph[i]]) {
            p->backed[ph[i]] = 1;
            p->backed_pages++;
        }
    pthread_mutex_unlock(&p->lock);
    r->num_breaks += delta;
    r->mapped_pages += n;
    r->map_calls++;
    r->pages_mapped_total += n;
out:
    pthread_mutex_unlock(&r->lock);
    free(s);
    free(ph);
    return rc;
}

/* pre: r open; virt distinct, in range, mapped. All or nothing. */
int vmem_unmap(vmem_resv_t *r, const int64_t *virt, int64_t n, vmem_err_t *err)
{
    pair_t *s = NULL;
    uint64_t *saved = NULL;
    int64_t i, old_breaks, delta, len = 0;
    int rc;
    if (err) memset(err, 0, sizeof(*err)), err->index = -1;
    if (!r || n < 0 || (n && !virt)) return _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NONE, -1);
    pthread_mutex_lock(&r->lock);
    if (r->closed) {
        rc = _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
        goto out;
    }
    if (n == 0) {
        rc = VMEM_OK;
        goto out;
    }
    if ((rc = sorted_pairs(r, virt, NULL, n, &s, err))) goto out;
    saved = malloc((size_t)n * sizeof(uint64_t));
    if (!saved) {
        rc = _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
        goto out;
    }
    for (i = 0; i < n; i++) {
        saved[i] = r->table[s[i].virt];
        if (!saved[i]) {
            rc = _vmem_fail(err, VMEM_ERR_INVALID, VMEM_DETAIL_NOT_MAPPED, s[i].index);
            goto out;
        }
    }
    /* unmapping the middle of a merged run splits it: that can need budget too */
    old_breaks = breaks_near(r, s, n);
    for (i = 0; i < n; i++) r->table[s[i].virt] = 0;
    delta = breaks_near(r, s, n) - old_breaks;
    rc = _vmem_budget_take(r->b, delta, err);
    if (rc) {
        for (i = 0; i < n; i++) r->table[s[i].virt] = saved[i];
        goto out;
    }
    for (i = 0; i < n; i += len) {
        for (len = 1; i + len < n && s[i + len].virt == s[i + len - 1].virt + 1; len++) {}
        rc = op_fault(r, NULL, err, s[i].index);
        if (!rc) rc = r->b->ops->unmap_run(r, s[i].virt, len, err);
        if (rc) break;
        r->unmap_ops++;
    }
    if (rc) {
        /* put back what this call unmapped, [0, i), run by run as the backend maps them */
        int64_t a = 0, ok = 1;
        int64_t *ph = malloc((size_t)n * sizeof(int64_t));
        if (err && err->index < 0) err->index = s[i].index;
        for (a = 0; a < n; a++) r->table[s[a].virt] = saved[a];
        for (a = 0; ph && a < n; a++) ph[a] = _vmem_phys_of(saved[a]);
        a = 0;
        while (ph && a < i) {
            int64_t l = 1;
            while (a + l < i && s[a + l].virt == s[a + l - 1].virt + 1 &&
                   (!r->b->ops->coalesce_phys || saved[a + l] == saved[a + l - 1] + 1))
                l++;
            if (r->b->ops->map_run(r, s[a].virt, _vmem_pool_of(r->b, saved[a]), ph + a, l, NULL)) ok = 0;
            r->map_ops++;
            a += l;
        }
        if (!ph || !ok) {
            /* could not restore: the table must say what is true, so forget [0, i) */
            for (a = 0; a < i; a++) r->table[s[a].virt] = 0;
            {
                int64_t before = r->num_breaks;
                r->num_breaks = 0;
                for (a = 0; a + 1 < r->num_pages; a++) r->num_breaks += is_break(r, a);
                _vmem_budget_give(r->b, delta);
                if (r->b->mappings_used)
                    atomic_fetch_add(r->b->mappings_used, r->num_breaks - before);
            }
            _vmem_unpin_entries(r->b, saved, i);
            r->mapped_pages -= i;
            if (err) err->status = rc = VMEM_ERR_DRIVER;
        } else {
            _vmem_budget_give(r->b, delta);
        }
        free(ph);
        goto out;
    }
    r->num_breaks += delta;
    r->mapped_pages -= n;
    r->unmap_calls++;
    r->pages_unmapped_total += n;
    pthread_mutex_unlock(&r->lock);
    _vmem_unpin_entries(r->b, saved, n);
    free(s);
    free(saved);
    return VMEM_OK;
out:
    pthread_mutex_unlock(&r->lock);
    free(s);
    free(saved);
    return rc;
}
