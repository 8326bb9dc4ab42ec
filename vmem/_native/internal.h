/* internal.h — what core.c shares with the backends (host.c, cuda.c) and worker.c. Not part of the
 * contract; Python never sees it. */
#ifndef VMEM_INTERNAL_H
#define VMEM_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <stdatomic.h>
#include "vmem.h"

/* table entry: 0 = unmapped, else ((pool id + 1) << 48) | phys; consecutive phys of one pool are
 * consecutive integers, so "entry[i+1] == entry[i] + 1" is the merge test. */
#define VMEM_ENTRY_SHIFT 48
#define VMEM_MAX_PHYS ((int64_t)1 << 47)

typedef struct vmem_ops {
    int kind;
    int coalesce_phys;     /* host: one OS call needs contiguous physical pages too */
    int (*open)(vmem_backend_t *b, int device, vmem_err_t *err);
    /* recompute b->map_budget_os from the OS now (may be NULL) */
    void (*refresh_budget)(vmem_backend_t *b);
    void (*close)(vmem_backend_t *b);
    int (*reserve)(vmem_backend_t *b, uint64_t num_bytes, uint64_t page_bytes, uint64_t *addr,
                   vmem_err_t *err);
    /* unmap whatever r->table says is mapped and free the range; r->lock held */
    void (*release)(vmem_resv_t *r);
    int (*pool_open)(vmem_pool_t *p, vmem_err_t *err);
    int (*pool_grow)(vmem_pool_t *p, int64_t new_num_pages, vmem_err_t *err);
    int (*pool_trim)(vmem_pool_t *p, int64_t phys, int64_t n, vmem_err_t *err);
    void (*pool_close)(vmem_pool_t *p);
    int64_t (*pool_resident)(vmem_pool_t *p);
    /* map n virtually consecutive pages starting at virt onto phys[0..n) (contiguous if coalesce_phys);
     * called with r->lock held and p->lock not (map_run takes it: the pool may close meanwhile), pool pages
     * pinned. On failure nothing of this run stays mapped. */
    int (*map_run)(vmem_resv_t *r, int64_t virt, vmem_pool_t *p, const int64_t *phys, int64_t n,
                   vmem_err_t *err);
    int (*unmap_run)(vmem_resv_t *r, int64_t virt, int64_t n, vmem_err_t *err);
} vmem_ops_t;

struct vmem_backend {
    const vmem_ops_t *ops;
    atomic_int refs;
    int kind;
    int device;
    uint64_t granularity;
    int64_t max_map_count;
    int64_t map_budget;                /* min(map_budget_os, map_budget_cap) */
    int64_t map_budget_os;             /* from vm.max_map_count and the process's other mappings */
    int64_t map_budget_cap;            /* vmem_backend_set_map_budget; INT64_MAX when unset */
    int64_t last_refresh_ns;           /* CLOCK_MONOTONIC of the last refresh_budget */
    pthread_mutex_t budget_lock;       /* guards map_budget* and last_refresh_ns; a leaf: nothing is locked under it */
    atomic_llong *mappings_used;       /* shared by every backend of this kind in the process */
    int hugetlb_available;
    int thp_advise;
    pthread_mutex_t lock;              /* guards pools[] */
    vmem_pool_t *pools[VMEM_MAX_POOLS];
    void *priv;                        /* backend-specific (cuda: context, properties) */
};

struct vmem_resv {
    vmem_backend_t *b;
    atomic_int refs;
    pthread_mutex_t lock;
    int closed;
    uint64_t addr;
    uint64_t num_bytes;
    uint64_t page_bytes;
    int64_t num_pages;
    uint64_t *table;                   /* [num_pages] entries, see VMEM_ENTRY_SHIFT */
    int64_t num_breaks;                /* boundaries i|i+1 that separate two mappings */
    int64_t mapped_pages;
    int64_t map_calls, unmap_calls, map_ops, unmap_ops;
    int64_t pages_mapped_total, pages_unmapped_total;
    int64_t fault_nth;
    int fault_status;
};

struct vmem_pool {
    vmem_backend_t *b;
    atomic_int refs;                   /* owner + one per mapping pair + queued jobs */
    pthread_mutex_t lock;
    int closed;
    int32_t id;
    uint64_t page_bytes;
    int64_t num_pages;
    int64_t max_pages;                 /* 0: unbounded */
    int64_t cap_pages;                 /* allocated length of mapcount / backed */
    uint32_t *mapcount;                /* [cap_pages] how many virtual pages map each physical page */
    uint8_t *backed;                   /* [cap_pages] page holds memory */
    int64_t backed_pages;
    int64_t mapped_pages;              /* pages with mapcount > 0 */
    int64_t mappings;                  /* sum of mapcount */
    int64_t fault_nth;
    int fault_status;
    int fd;                            /* host: the memfd */
    int hugetlb;
    void *priv;                        /* cuda: handle array */
    vmem_lease_t *lease;               /* elastic pools: the budget lease pages are charged to, else NULL */
    uint8_t *charged;                  /* elastic: [cap_pages] page is charged to the lease */
    int64_t charged_pages;
};

extern const vmem_ops_t vmem_host_ops;
extern const vmem_ops_t vmem_cuda_ops;

/* core.c helpers used by backends and the worker */
void _vmem_err_set(vmem_err_t *err, int status, int detail, int64_t os_error, int64_t index);
void _vmem_resv_retain(vmem_resv_t *r);
void _vmem_resv_drop(vmem_resv_t *r);
void _vmem_pool_retain(vmem_pool_t *p);
void _vmem_pool_drop(vmem_pool_t *p);
int64_t _vmem_read_sysctl(const char *path);
int _vmem_fail(vmem_err_t *err, int status, int detail, int64_t index);
void _vmem_backend_drop(vmem_backend_t *b);
int _vmem_budget_take(vmem_backend_t *b, int64_t delta, vmem_err_t *err);
void _vmem_budget_give(vmem_backend_t *b, int64_t delta);
vmem_pool_t *_vmem_pool_of(vmem_backend_t *b, uint64_t entry);
int64_t _vmem_phys_of(uint64_t entry);
void _vmem_unpin_entries(vmem_backend_t *b, const uint64_t *entries, int64_t n);
int _vmem_check_page_bytes(vmem_backend_t *b, uint64_t page_bytes, vmem_err_t *err);
/* budget.c / pool.c: elastic pools (Note [Shared KV budget]) */
void _vmem_lease_retain(vmem_lease_t *ls);
void _vmem_lease_drop(vmem_lease_t *ls);
int _vmem_pool_charge(vmem_pool_t *p, const int64_t *phys, int64_t n, vmem_err_t *err);
void _vmem_pool_uncharge(vmem_pool_t *p, const int64_t *phys, int64_t n);

#endif
