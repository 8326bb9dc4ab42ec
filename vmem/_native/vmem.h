/* vmem.h — the primitive contract of the native layer.
 *
 * One header, one source file per backend (host.c: memfd + mmap; cuda.c: the CUDA driver's virtual
 * memory API through dlopen), core.c for what both share (validation, the virt->phys table, run
 * coalescing, rollback, mapping budget, fault injection; map.c and pool.c split out of it) and
 * worker.c (the async map queue).
 *
 * Rules every function follows:
 *   - returns an int status (VMEM_OK or one VMEM_ERR_*); never exit/abort; no global error state:
 *     details of a failure go to the caller's vmem_err_t (may be NULL);
 *   - a batch that fails part way is rolled back inside the call (all or nothing);
 *   - safe to call from several threads: one mutex per reservation, one per pool
 *     (lock order: reservation, then pool); never needs the GIL.
 * Units: *_bytes are bytes, *_pages / virt / phys are page indices (int64), addresses are uint64.
 * This text is also fed to cffi's cdef (build.py strips the #-lines), so keep it plain C.
 */
#ifndef VMEM_H
#define VMEM_H
#include <stdint.h>

#define VMEM_OK                 0
#define VMEM_ERR_OOM            1   /* physical memory, address space or table memory exhausted */
#define VMEM_ERR_MAP_LIMIT      2   /* would exceed the mapping budget (vm.max_map_count) */
#define VMEM_ERR_INVALID        3   /* bad argument; err->detail says which */
#define VMEM_ERR_DRIVER         4   /* the OS or CUDA driver failed; err->os_error holds errno / CUresult */
#define VMEM_ERR_UNSUPPORTED    5   /* backend not available here (no libcuda, no device) */
#define VMEM_ERR_CLOSED         6   /* object already closed */
#define VMEM_ERR_BUSY           7   /* object in use (e.g. trim of a mapped page) */

/* err->detail for VMEM_ERR_INVALID / VMEM_ERR_BUSY */
#define VMEM_DETAIL_NONE            0
#define VMEM_DETAIL_UNALIGNED       1   /* size not a multiple of the granularity */
#define VMEM_DETAIL_VIRT_RANGE      2   /* virtual page outside the reservation */
#define VMEM_DETAIL_PHYS_RANGE      3   /* physical page outside the pool */
#define VMEM_DETAIL_ALREADY_MAPPED  4   /* virtual page is mapped already */
#define VMEM_DETAIL_NOT_MAPPED      5   /* unmap of a page that is not mapped */
#define VMEM_DETAIL_DUPLICATE       6   /* the same virtual page twice in one batch */
#define VMEM_DETAIL_PAGE_SIZE       7   /* pool and reservation page sizes differ */
#define VMEM_DETAIL_BACKEND         8   /* pool and reservation come from different backends */
#define VMEM_DETAIL_PAGE_IN_USE     9   /* physical page still mapped */
#define VMEM_DETAIL_TOO_LARGE      10   /* size beyond what the address space / pool may hold */
#define VMEM_DETAIL_POOL_FULL      11   /* grow beyond max_pages */
#define VMEM_DETAIL_INJECTED       12   /* failure injected by vmem_*_inject_fault */
#define VMEM_DETAIL_BUDGET         13   /* OOM: the shared budget (not the pool) has no room */
#define VMEM_DETAIL_BUDGET_SEGMENT 14   /* budget file missing, corrupt, foreign or of another version */
#define VMEM_DETAIL_BUDGET_HELD    15   /* new limit below what tenants hold (plus unmet minimums) */
#define VMEM_DETAIL_BUDGET_LOCK    16   /* the budget's lock was not acquired in time */
#define VMEM_DETAIL_BUDGET_TENANTS 17   /* every lease slot of the budget is taken */
#define VMEM_DETAIL_LEASE_PROCESS  18   /* lease used by a process other than its opener (after fork) */
#define VMEM_DETAIL_LEASE_LOST     19   /* lease record gone (closed, or recovered as stale) */
#define VMEM_DETAIL_TOO_MANY_POOLS 20   /* a backend holds VMEM_MAX_POOLS pools at most */

#define VMEM_MAX_POOLS 4096             /* pools open at once per backend (its pools[] table) */

#define VMEM_KIND_HOST 0
#define VMEM_KIND_CUDA 1

typedef struct vmem_backend vmem_backend_t;
typedef struct vmem_resv vmem_resv_t;
typedef struct vmem_pool vmem_pool_t;
typedef struct vmem_worker vmem_worker_t;
typedef struct vmem_budget vmem_budget_t;
typedef struct vmem_lease vmem_lease_t;

#define VMEM_BUDGET_MAX_TENANTS 64
#define VMEM_BUDGET_NAME_LEN 32

typedef struct {
    int32_t status;        /* the code the call returned */
    int32_t detail;        /* VMEM_DETAIL_* */
    int64_t os_error;      /* errno (host) or CUresult (cuda); 0 when none */
    int64_t index;         /* batch index of the offending element, -1 when none */
    int64_t needed;        /* MAP_LIMIT: mappings needed; OOM: bytes/pages asked for */
    int64_t available;     /* MAP_LIMIT: mappings left in the budget; OOM: what was free */
} vmem_err_t;

typedef struct {
    int32_t kind;                  /* VMEM_KIND_* */
    int32_t device;                /* CUDA ordinal, -1 for host */
    uint64_t granularity_bytes;    /* page_bytes must be a positive multiple */
    int64_t max_map_count;         /* vm.max_map_count read at open (host), -1 when n/a */
    int64_t map_budget;            /* mappings vmem may hold in this process */
    int64_t mappings_used;         /* mappings vmem holds now, all reservations of this kind */
    int32_t hugetlb_available;     /* host: free hugetlb pages exist */
} vmem_backend_info_t;

typedef struct {
    uint64_t address;
    uint64_t num_bytes;
    uint64_t page_bytes;
    int64_t num_pages;
    int64_t mapped_pages;
    int64_t num_mappings;          /* host: estimated VMAs; cuda: contiguous mapped runs */
    int64_t map_calls;             /* vmem_map calls that succeeded */
    int64_t unmap_calls;
    int64_t map_ops;               /* OS/driver calls issued for maps (mmap / cuMemMap) */
    int64_t unmap_ops;
    int64_t pages_mapped_total;
    int64_t pages_unmapped_total;
} vmem_resv_info_t;

typedef struct {
    uint64_t page_bytes;
    int64_t num_pages;             /* valid physical page ids: [0, num_pages) */
    int64_t max_pages;
    int64_t backed_pages;          /* pages holding memory (host: allocated in the memfd) */
    int64_t mapped_pages;          /* pages mapped at least once right now */
    int64_t mappings;              /* (virtual page, physical page) pairs that point into the pool */
    int64_t resident_bytes;        /* what the OS says (host: fstat st_blocks * 512); -1 when n/a */
    int32_t hugetlb;               /* host: the memfd is MFD_HUGETLB */
    int32_t closed;
    int32_t fd;                    /* host: the memfd (for independent checks); -1 otherwise */
    int64_t charged_pages;         /* elastic pools: pages charged to the budget lease; -1 otherwise */
} vmem_pool_info_t;

typedef struct {
    int64_t limit_bytes;
    int64_t held_bytes;            /* sum over live leases */
    int64_t waiting_bytes;         /* demand refused in the last 2 s, all leases */
    int64_t reclaimable_bytes;     /* what tenants say they could give back */
    int64_t reserved_bytes;        /* unmet guaranteed minimums */
    int64_t recovered_leases;      /* dead tenants' leases freed so far */
    int64_t recovered_bytes;
    int32_t num_tenants;
    int32_t max_tenants;
} vmem_budget_info_t;

typedef struct {
    int32_t slot;
    int32_t pid;
    int64_t held_bytes;
    int64_t min_bytes;
    int64_t max_bytes;             /* 0: none */
    int64_t waiting_bytes;
    int64_t reclaimable_bytes;
    int64_t peak_bytes;
    char name[32];
} vmem_tenant_info_t;

typedef struct {
    int32_t slot;
    int32_t num_others;
    int64_t limit_bytes;
    int64_t total_held_bytes;
    int64_t free_bytes;            /* what this lease may take now */
    int64_t held_bytes;
    int64_t min_bytes;
    int64_t max_bytes;
    int64_t peak_bytes;
    int64_t waiting_bytes;         /* this lease's refused demand (last 2 s) */
    int64_t others_waiting_bytes;
    int64_t others_reclaimable_bytes;
    int64_t recovered_leases;
} vmem_lease_info_t;

/* ---- version ---- */
const char *vmem_version(void);

/* ---- backend ----
 * pre: out != NULL. kind VMEM_KIND_HOST ignores device.
 * VMEM_ERR_UNSUPPORTED when the backend cannot run here (cuda: no libcuda.so.1 or no such device). */
int vmem_backend_open(int kind, int device, vmem_backend_t **out, vmem_err_t *err);
int vmem_backend_close(vmem_backend_t *b);
int vmem_backend_info(vmem_backend_t *b, vmem_backend_info_t *out);
/* Cap this backend's mapping budget (tests, or a process that needs VMAs of its own).
 * pre: 0 <= budget; the OS-derived budget still applies when it is lower. */
int vmem_backend_set_map_budget(vmem_backend_t *b, int64_t budget);

/* ---- reservation ----
 * pre: page_bytes > 0, multiple of granularity; num_bytes > 0 (rounded up to page_bytes).
 * Host: the range reads as zeros and faults on write until mapped. */
int vmem_reserve(vmem_backend_t *b, uint64_t num_bytes, uint64_t page_bytes,
                 vmem_resv_t **out, vmem_err_t *err);
/* Unmaps everything, frees the range and drops the caller's reference: r must not be used after.
 * (Queued worker jobs hold their own reference and find the reservation CLOSED.) */
int vmem_release(vmem_resv_t *r);
int vmem_resv_info(vmem_resv_t *r, vmem_resv_info_t *out);
/* out_phys[i] = physical page under virtual page first+i, or -1; out_pool (may be NULL) = pool id or -1. */
int vmem_resv_read_table(vmem_resv_t *r, int64_t first, int64_t n, int64_t *out_phys, int32_t *out_pool);
/* Fail the nth (1-based) OS/driver map or unmap op issued for this reservation with `status`;
 * nth = 0 disarms. */
int vmem_resv_inject_fault(vmem_resv_t *r, int64_t nth, int status);

/* ---- pool ----
 * pre: page_bytes as for vmem_reserve; num_pages >= 0; max_pages >= num_pages (0: no limit). */
int vmem_pool_create(vmem_backend_t *b, uint64_t page_bytes, int64_t num_pages, int64_t max_pages,
                     vmem_pool_t **out, vmem_err_t *err);
int vmem_pool_grow(vmem_pool_t *p, int64_t num_pages, vmem_err_t *err);
/* Return the memory of unmapped pages to the OS/driver; the ids stay valid and get memory again
 * when next mapped. pre: none of phys is mapped (else BUSY, nothing trimmed). */
int vmem_pool_trim(vmem_pool_t *p, const int64_t *phys, int64_t n, vmem_err_t *err);
/* Closes the pool and drops the caller's reference: p must not be used after. Its memory lives on
 * under existing mappings until they are unmapped. */
int vmem_pool_close(vmem_pool_t *p);
int vmem_pool_info(vmem_pool_t *p, vmem_pool_info_t *out);
int32_t vmem_pool_id(vmem_pool_t *p);
/* The same, counted over the map ops (one per run) that use this pool. */
int vmem_pool_inject_fault(vmem_pool_t *p, int64_t nth, int status);

/* ---- map / unmap ----
 * pre: every virt in [0, num_pages of r), distinct, unmapped (map) / mapped (unmap);
 *      every phys in [0, num_pages of p); r and p from the same backend, same page_bytes.
 * Contiguous virtual pages over contiguous physical pages go in one OS call (host) and count as one
 * mapping. All or nothing: on failure nothing changed. */
int vmem_map(vmem_resv_t *r, vmem_pool_t *p, const int64_t *virt, const int64_t *phys, int64_t n,
             vmem_err_t *err);
int vmem_unmap(vmem_resv_t *r, const int64_t *virt, int64_t n, vmem_err_t *err);

/* ---- async worker (worker.c) ----
 * One pthread with a FIFO. submit copies the arrays and returns a ticket at once; wait blocks until that
 * job ran and returns its status (err filled like vmem_map's). Each ticket is waited at most once.
 * pre: r, p open at submit; the job holds references, and finds CLOSED if they close before it runs.
 * n = 0 is a no-op job. */
int vmem_worker_create(vmem_worker_t **out);
int vmem_worker_submit_map(vmem_worker_t *w, vmem_resv_t *r, vmem_pool_t *p, const int64_t *virt,
                           const int64_t *phys, int64_t n, uint64_t *ticket);
int vmem_worker_submit_unmap(vmem_worker_t *w, vmem_resv_t *r, const int64_t *virt, int64_t n,
                             uint64_t *ticket);
int vmem_worker_wait(vmem_worker_t *w, uint64_t ticket, vmem_err_t *err);
/* Nonzero when the job is done (wait will not block); -1 for an unknown ticket. */
int vmem_worker_poll(vmem_worker_t *w, uint64_t ticket);
int64_t vmem_worker_pending(vmem_worker_t *w);
/* Runs what is queued, joins the thread and frees w (tickets not waited are dropped). */
int vmem_worker_close(vmem_worker_t *w);

/* ---- shared budget (budget.c, Note [Shared KV budget]) ----
 * A segment file shared by processes: a limit in bytes, leases (tenants) that hold bytes of it.
 * open: creates the file with limit_bytes when absent (limit_bytes 0: it must exist); a file that is
 * not a vmem budget of this version is VMEM_ERR_INVALID / VMEM_DETAIL_BUDGET_SEGMENT. Every call that
 * locks the segment may return VMEM_ERR_BUSY / VMEM_DETAIL_BUDGET_LOCK after VMEM_BUDGET_LOCK_MS. */
int vmem_budget_open(const char *path, int64_t limit_bytes, vmem_budget_t **out, vmem_err_t *err);
int vmem_budget_close(vmem_budget_t *bd);
/* pre: limit_bytes > 0. BUSY / VMEM_DETAIL_BUDGET_HELD (needed = held + unmet minimums) when lower. */
int vmem_budget_set_limit(vmem_budget_t *bd, int64_t limit_bytes, vmem_err_t *err);
int vmem_budget_info(vmem_budget_t *bd, vmem_budget_info_t *out, vmem_err_t *err);
int vmem_budget_tenants(vmem_budget_t *bd, vmem_tenant_info_t *out, int32_t max_out, int32_t *num_out,
                        vmem_err_t *err);
/* pre: 0 <= min_bytes; max_bytes == 0 (none) or >= min_bytes. OOM / VMEM_DETAIL_BUDGET when min_bytes is
 * not free now; BUSY / VMEM_DETAIL_BUDGET_TENANTS when every slot is taken. */
int vmem_lease_open(vmem_budget_t *bd, const char *name, int64_t min_bytes, int64_t max_bytes,
                    vmem_lease_t **out, vmem_err_t *err);
int vmem_lease_close(vmem_lease_t *ls);
/* All or nothing; OOM / VMEM_DETAIL_BUDGET (needed, available in bytes) records waiting demand. */
int vmem_lease_take(vmem_lease_t *ls, int64_t bytes, vmem_err_t *err);
int vmem_lease_give(vmem_lease_t *ls, int64_t bytes);
/* take, retried until timeout_ms (>= 0) has passed. */
int vmem_lease_wait(vmem_lease_t *ls, int64_t bytes, int64_t timeout_ms, vmem_err_t *err);
int vmem_lease_set_reclaimable(vmem_lease_t *ls, int64_t reclaimable_bytes);
/* waiting demand without a take (0: none); it expires 2 s after it was last set */
int vmem_lease_set_demand(vmem_lease_t *ls, int64_t bytes);
int vmem_lease_info(vmem_lease_t *ls, vmem_lease_info_t *out, vmem_err_t *err);
/* A pool whose pages are charged to `lease` as they gain memory (inside vmem_map, before the OS or
 * driver call; OOM / VMEM_DETAIL_BUDGET when the budget refuses) and given back when they lose it (trim,
 * last reference). It starts with no memory: host never takes hugetlb, cuda creates no handle up front
 * (handles are created, batched, by the map that first needs them, released by trim). */
int vmem_pool_create_elastic(vmem_backend_t *b, uint64_t page_bytes, int64_t num_pages, int64_t max_pages,
                             vmem_lease_t *lease, vmem_pool_t **out, vmem_err_t *err);
/* Testing only: hold / release the segment's lock (a holder that dies leaves it EOWNERDEAD). */
int vmem_budget_debug_lock(vmem_budget_t *bd);
int vmem_budget_debug_unlock(vmem_budget_t *bd);

/* ---- fork (vmem/backends/_fork.py) ----
 * In a forked child: replace the child's copy of a host range [addr, addr + num_bytes) by inaccessible
 * anonymous memory, so a write through an inherited view faults instead of landing in the parent's
 * memfd pages. Takes no lock and touches no vmem object (a thread of the parent may have held a lock
 * at fork time). */
int vmem_host_forget_range(uint64_t addr, uint64_t num_bytes);

/* ---- raw floor for bench/native_map.py: a bare loop of the host backend's syscalls ----
 * Maps page i of the range at base + virt[i]*page_bytes from fd offset phys[i]*page_bytes with exactly the
 * flags vmem_map uses, one mmap per page; unmap puts the reservation's anonymous memory back. */
int vmem_raw_host_map(vmem_pool_t *p, uint64_t base, const int64_t *virt, const int64_t *phys, int64_t n,
                      uint64_t page_bytes);
int vmem_raw_host_unmap(uint64_t base, const int64_t *virt, int64_t n, uint64_t page_bytes);
/* The same for the cuda backend: per page cuMemMap then cuMemSetAccess; ns[0] += ns spent in cuMemMap,
 * ns[1] += ns in cuMemSetAccess. Unmap: one cuMemUnmap per page. VMEM_ERR_INVALID on a host pool. */
int vmem_raw_cuda_map(vmem_pool_t *p, uint64_t base, const int64_t *virt, const int64_t *phys, int64_t n,
                      uint64_t page_bytes, uint64_t *ns);
int vmem_raw_cuda_unmap(vmem_backend_t *b, uint64_t base, const int64_t *virt, int64_t n, uint64_t page_bytes);
/* Number of lines in /proc/self/maps (VMAs of the process), -1 on error. */
int64_t vmem_count_process_mappings(void);

#endif
