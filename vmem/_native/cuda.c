/* Note [CUDA backend]
 *
 * Rationale. On a GPU the KV cache's virtual tensors live in device address space reserved with the
 * driver's virtual memory management API; physical memory is mapped under them on demand. Loading
 * libcuda.so.1 with dlopen at run time keeps the package buildable and importable on machines without
 * CUDA (the cuda backend then reports VMEM_ERR_UNSUPPORTED and "auto" falls back to the host).
 *
 * Approach.
 *   - reservation = cuMemAddressReserve;              release = cuCtxSynchronize (when pages are mapped),
 *                   cuMemUnmap of mapped runs, cuMemAddressFree;
 *   - pool        = one cuMemCreate handle per physical page, created up front (pooled: creating costs
 *                   ~130x a map), released on trim / close;
 *   - map         = cuMemMap per page, then ONE cuMemSetAccess per virtually contiguous run;
 *   - unmap       = one cuMemUnmap per virtually contiguous run;
 *   - granularity = cuMemGetAllocationGranularity(MINIMUM) (2 MiB on current GPUs; any multiple works).
 * The device's primary context is made current at the top of every entry point, so any thread may call
 * (the async worker included); cuCtxSetCurrent is a thread-local store in the driver.
 *
 * Implementation. The CUDA types and prototypes are declared here (CUmemAllocationProp is 32 bytes:
 * type, requestedHandleTypes, location{type,id}, win32HandleMetaData, allocFlags{compressionType,
 * gpuDirectRDMACapable, usage, reserved[4]}; CUmemAccessDesc is location + flags, 12 bytes), checked
 * against cuda.h. Function pointers are resolved once (pthread_once). A run is virtually contiguous
 * pages whatever their physical pages, because each page is its own handle.
 *
 * Limitations. Unmapping memory a running kernel may read is the caller's business: wait on an event
 * first, or keep pages mapped and recycle them (deferred reclamation). Release is the exception: it runs
 * when the last tensor view dies, with no caller to wait, so it synchronises the context itself. resident_bytes counts the handles
 * this pool holds, not what the driver reports device-wide. No mapping budget (the driver has none we
 * can read); num_mappings counts mapped runs. Only tested on a GPU through tests/gpu and
 * bench/gpu_check.sh.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "internal.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct CUctx_st *CUcontext;

typedef struct {
    int type;                          /* CUmemLocationType: 1 = DEVICE */
    int id;
} CUmemLocation;

typedef struct {
    int type;                          /* CUmemAllocationType: 1 = PINNED */
    int requestedHandleTypes;          /* CUmemAllocationHandleType: 0 = NONE */
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int flags;                         /* CUmemAccess_flags: 3 = PROT_READWRITE */
} CUmemAccessDesc;

_Static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp layout");
_Static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc layout");

#define CUDA_SUCCESS 0
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_NO_DEVICE 100
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_NOT_SUPPORTED 801
#define CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED 102
#define CU_MEM_LOCATION_TYPE_DEVICE 1
#define CU_MEM_ALLOCATION_TYPE_PINNED 1
#define CU_MEM_ACCESS_FLAGS_PROT_READWRITE 3
#define CU_MEM_ALLOC_GRANULARITY_MINIMUM 0

static struct {
    void *lib;
    CUresult (*cuInit)(unsigned int);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxSynchronize)(void);
    CUresult (*cuMemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
    CUresult (*cuMemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                            unsigned long long);
    CUresult (*cuMemRelease)(CUmemGenericAllocationHandle);
    CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
    CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*cuMemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, int);
    CUresult (*cuGetErrorString)(CUresult, const char **);
    int loaded;                        /* 1 ok, -1 failed */
} cu;

static pthread_once_t cu_once = PTHREAD_ONCE_INIT;

/* pre: cu.lib open; b (may be NULL) is the preferred versioned name. */
static void *sym(const char *a, const char *b)
{
    void *f = b ? dlsym(cu.lib, b) : NULL;
    return f ? f : dlsym(cu.lib, a);
}

/* pre: see the definition below. */
static CUresult unmap_range(CUdeviceptr base, int64_t n, uint64_t page_bytes);

/* pre: called once, through pthread_once. */
static void cu_load(void)
{
    cu.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cu.lib) {
        cu.loaded = -1;
        return;
    }
    cu.cuInit = sym("cuInit", NULL);
    cu.cuDeviceGet = sym("cuDeviceGet", NULL);
    cu.cuDeviceGetCount = sym("cuDeviceGetCount", NULL);
    cu.cuDeviceGetAttribute = sym("cuDeviceGetAttribute", NULL);
    cu.cuDevicePrimaryCtxRetain = sym("cuDevicePrimaryCtxRetain", NULL);
    cu.cuDevicePrimaryCtxRelease = sym("cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2");
    cu.cuCtxSetCurrent = sym("cuCtxSetCurrent", NULL);
    cu.cuCtxSynchronize = sym("cuCtxSynchronize", NULL);
    cu.cuMemAddressReserve = sym("cuMemAddressReserve", NULL);
    cu.cuMemAddressFree = sym("cuMemAddressFree", NULL);
    cu.cuMemCreate = sym("cuMemCreate", NULL);
    cu.cuMemRelease = sym("cuMemRelease", NULL);
    cu.cuMemMap = sym("cuMemMap", NULL);
    cu.cuMemUnmap = sym("cuMemUnmap", NULL);
    cu.cuMemSetAccess = sym("cuMemSetAccess", NULL);
    cu.cuMemGetAllocationGranularity = sym("cuMemGetAllocationGranularity", NULL);
    cu.cuGetErrorString = sym("cuGetErrorString", NULL);
    cu.loaded = cu.cuInit && cu.cuDeviceGet && cu.cuDeviceGetCount && cu.cuDeviceGetAttribute &&
                cu.cuDevicePrimaryCtxRetain && cu.cuDevicePrimaryCtxRelease && cu.cuCtxSetCurrent &&
                cu.cuCtxSynchronize &&
                cu.cuMemAddressReserve && cu.cuMemAddressFree && cu.cuMemCreate && cu.cuMemRelease &&
                cu.cuMemMap && cu.cuMemUnmap && cu.cuMemSetAccess && cu.cuMemGetAllocationGranularity
                    ? 1 : -1;
}

typedef struct {
    CUdevice dev;
    CUcontext ctx;
    CUmemAllocationProp prop;
    CUmemAccessDesc access;
} cuda_priv_t;

/* pre: none. CUresult -> VMEM status. */
static int cu_status(CUresult r)
{
    if (r == CUDA_SUCCESS) return VMEM_OK;
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return VMEM_ERR_OOM;
    if (r == CUDA_ERROR_NO_DEVICE || r == CUDA_ERROR_INVALID_DEVICE || r == CUDA_ERROR_NOT_SUPPORTED ||
        r == CUDA_ERROR_NOT_INITIALIZED)
        return VMEM_ERR_UNSUPPORTED;
    return VMEM_ERR_DRIVER;
}

/* pre: r != CUDA_SUCCESS. */
static int cu_fail(vmem_err_t *err, CUresult r)
{
    int st = cu_status(r);
    _vmem_err_set(err, st, VMEM_DETAIL_NONE, r, -1);
    return st;
}

/* Make the primary context current on the calling thread. pre: b opened. */
static CUresult cu_enter(vmem_backend_t *b)
{
    return cu.cuCtxSetCurrent(((cuda_priv_t *)b->priv)->ctx);
}

/* pre: b allocated by core.c. */
static int cuda_open(vmem_backend_t *b, int device, vmem_err_t *err)
{
    cuda_priv_t *pv;
    CUresult r;
    int count = 0, vmm = 0;
    size_t gran = 0;
    pthread_once(&cu_once, cu_load);
    if (cu.loaded != 1) {
        _vmem_err_set(err, VMEM_ERR_UNSUPPORTED, VMEM_DETAIL_NONE, 0, -1);
        return VMEM_ERR_UNSUPPORTED;
    }
    if ((r = cu.cuInit(0)) != CUDA_SUCCESS) return cu_fail(err, r);
    if ((r = cu.cuDeviceGetCount(&count)) != CUDA_SUCCESS) return cu_fail(err, r);
    if (device < 0 || device >= count) {
        _vmem_err_set(err, VMEM_ERR_UNSUPPORTED, VMEM_DETAIL_NONE, CUDA_ERROR_INVALID_DEVICE, -1);
        return VMEM_ERR_UNSUPPORTED;
    }
    pv = calloc(1, sizeof(*pv));
    if (!pv) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    if ((r = cu.cuDeviceGet(&pv->dev, device)) != CUDA_SUCCESS) goto fail;
    if ((r = cu.cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, pv->dev)))
        goto fail;
    if (!vmm) {
        r = CUDA_ERROR_NOT_SUPPORTED;
        goto fail;
    }
    if ((r = cu.cuDevicePrimaryCtxRetain(&pv->ctx, pv->dev)) != CUDA_SUCCESS) goto fail;
    pv->prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    pv->prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    pv->prop.location.id = pv->dev;
    pv->access.location = pv->prop.location;
    pv->access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if ((r = cu.cuCtxSetCurrent(pv->ctx)) != CUDA_SUCCESS ||
        (r = cu.cuMemGetAllocationGranularity(&gran, &pv->prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM))) {
        cu.cuDevicePrimaryCtxRelease(pv->dev);
        goto fail;
    }
    b->priv = pv;
    b->granularity = gran;
    b->max_map_count = -1;
    b->map_budget = INT64_MAX / 4;
    b->mappings_used = NULL;
    return VMEM_OK;
fail:
    free(pv);
    return cu_fail(err, r);
}

static void cuda_close(vmem_backend_t *b)
{
    cuda_priv_t *pv = b->priv;
    if (!pv) return;
    cu.cuDevicePrimaryCtxRelease(pv->dev);
    free(pv);
    b->priv = NULL;
}

/* pre: num_bytes a positive multiple of page_bytes (a multiple of the granularity). */
static int cuda_reserve(vmem_backend_t *b, uint64_t num_bytes, uint64_t page_bytes, uint64_t *addr,
                        vmem_err_t *err)
{
    CUdeviceptr p = 0;
    CUresult r;
    if ((r = cu_enter(b)) != CUDA_SUCCESS) return cu_fail(err, r);
    r = cu.cuMemAddressReserve(&p, (size_t)num_bytes, 0, 0, 0);
    if (r != CUDA_SUCCESS) {
        int st = cu_fail(err, r);
        if (st == VMEM_ERR_DRIVER && r == 1 /* INVALID_VALUE: no such hole */) {
            _vmem_err_set(err, VMEM_ERR_OOM, VMEM_DETAIL_TOO_LARGE, r, -1);
            return VMEM_ERR_OOM;
        }
        return st;
    }
    *addr = p;
    return VMEM_OK;
}

/* pre: r->lock held. Unmap every mapped run (the driver refuses to free a range that has mappings),
 * after the context's work is done: release runs when the last tensor view goes, which says nothing
 * about kernels still queued on a stream that read it. */
static void cuda_release(vmem_resv_t *r)
{
    int64_t i = 0, j;
    cu_enter(r->b);
    if (r->mapped_pages) cu.cuCtxSynchronize();
    while (i < r->num_pages) {
        if (!r->table[i]) {
            i++;
            continue;
        }
        for (j = i; j < r->num_pages && r->table[j]; j++) {}
        unmap_range(r->addr + (uint64_t)i * r->page_bytes, j - i, r->page_bytes);
        i = j;
    }
    cu.cuMemAddressFree(r->addr, (size_t)r->num_bytes);
}

/* pre: p a cuda pool, p->lock held or p private. */
static CUmemGenericAllocationHandle *handles(vmem_pool_t *p) { return p->priv; }

/* Create handles for pages [from, to). pre: p->lock held or p private; arrays hold `to` pages. */
static int create_handles(vmem_pool_t *p, int64_t from, int64_t to, vmem_err_t *err)
{
    cuda_priv_t *pv = p->b->priv;
    CUmemGenericAllocationHandle *h;
    int64_t i;
    CUresult r;
    h = realloc(p->priv, (size_t)(p->cap_pages > to ? p->cap_pages : to) * sizeof(*h));
    if (!h) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    p->priv = h;
    if ((r = cu_enter(p->b)) != CUDA_SUCCESS) return cu_fail(err, r);
    for (i = from; i < to; i++) {
        r = cu.cuMemCreate(&h[i], (size_t)p->page_bytes, &pv->prop, 0);
        if (r != CUDA_SUCCESS) {
            int64_t k;
            for (k = i - 1; k >= from; k--) cu.cuMemRelease(h[k]);
            cu_fail(err, r);
            if (err) err->needed = to - from, err->available = i - from;
            return cu_status(r);
        }
        p->backed[i] = 1;
    }
    p->backed_pages += to - from;
    return VMEM_OK;
}

/* Create handles for the listed pages that have none (each once), batched under one context entry; on
 * failure release what this call created. pre: p->lock held; arrays and handle array hold every phys. */
static int create_handle_list(vmem_pool_t *p, const int64_t *phys, int64_t n, vmem_err_t *err)
{
    cuda_priv_t *pv = p->b->priv;
    int64_t *made, i, k = 0;
    CUresult r = CUDA_SUCCESS;
    if (!(made = malloc((size_t)(n ? n : 1) * sizeof(int64_t)))) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    for (i = 0; i < n && r == CUDA_SUCCESS; i++) {
        if (p->backed[phys[i]]) continue;
        if ((r = cu.cuMemCreate(&handles(p)[phys[i]], (size_t)p->page_bytes, &pv->prop, 0)) == CUDA_SUCCESS) {
            p->backed[phys[i]] = 1;
            made[k++] = phys[i];
        }
    }
    if (r != CUDA_SUCCESS) {
        for (i = k - 1; i >= 0; i--) {
            cu.cuMemRelease(handles(p)[made[i]]);
            p->backed[made[i]] = 0;
        }
        free(made);
        cu_fail(err, r);
        if (err) err->needed = n, err->available = k;
        return cu_status(r);
    }
    p->backed_pages += k;
    free(made);
    return VMEM_OK;
}

/* Elastic pools (a budget lease) start with no handle: the map that first needs a page creates it. */
static int cuda_pool_open(vmem_pool_t *p, vmem_err_t *err)
{
    int rc = create_handles(p, 0, p->lease ? 0 : p->num_pages, err);
    if (rc != VMEM_OK) {
        free(p->priv);
        p->priv = NULL;
    }
    return rc;
}

/* pre: p->lock held. */
static int cuda_pool_grow(vmem_pool_t *p, int64_t new_num_pages, vmem_err_t *err)
{
    if (p->lease) return create_handles(p, new_num_pages, new_num_pages, err);  /* room for handles only */
    return create_handles(p, p->num_pages, new_num_pages, err);
}

/* pre: p->lock held; pages unmapped and backed. */
static int cuda_pool_trim(vmem_pool_t *p, int64_t phys, int64_t n, vmem_err_t *err)
{
    int64_t i;
    CUresult r;
    if ((r = cu_enter(p->b)) != CUDA_SUCCESS) return cu_fail(err, r);
    for (i = phys; i < phys + n; i++)
        if ((r = cu.cuMemRelease(handles(p)[i])) != CUDA_SUCCESS) {
            int64_t k;
            for (k = phys; k < i; k++) p->backed[k] = 0;  /* those are gone: say so (core keeps the rest) */
            p->backed_pages -= i - phys;
            return cu_fail(err, r);
        }
    return VMEM_OK;
}

/* pre: p->lock held. The driver keeps memory under live mappings until they are unmapped. */
static void cuda_pool_close(vmem_pool_t *p)
{
    int64_t i;
    if (!p->priv) return;
    cu_enter(p->b);
    for (i = 0; i < p->num_pages; i++)
        if (p->backed[i]) cu.cuMemRelease(handles(p)[i]);
    free(p->priv);
    p->priv = NULL;
}

static int64_t cuda_pool_resident(vmem_pool_t *p) { return p->backed_pages * (int64_t)p->page_bytes; }

/* pre: r->lock held; pages pinned. Maps each page, then one cuMemSetAccess for the run. */
static int cuda_map_run(vmem_resv_t *r, int64_t virt, vmem_pool_t *p, const int64_t *phys, int64_t n,
                        vmem_err_t *err)
{
    cuda_priv_t *pv = r->b->priv;
    CUmemGenericAllocationHandle *h = malloc((size_t)n * sizeof(*h));
    CUdeviceptr base = r->addr + (uint64_t)virt * r->page_bytes;
    int64_t i, done = 0;
    CUresult res = CUDA_SUCCESS;
    int rc = VMEM_OK;
    if (!h) return _vmem_fail(err, VMEM_ERR_OOM, VMEM_DETAIL_NONE, -1);
    /* p->lock until every page is mapped: handles may move under grow, trimmed pages get a new handle,
     * and vmem_pool_close on another thread must not cuMemRelease a handle before cuMemMap took it */
    pthread_mutex_lock(&p->lock);
    if (p->closed || !p->priv) rc = _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
    if (rc == VMEM_OK && (res = cu_enter(r->b)) != CUDA_SUCCESS) rc = cu_fail(err, res);
    /* pages without a handle (trimmed, or an elastic pool's first use) get one, all in one pass */
    if (rc == VMEM_OK) rc = create_handle_list(p, phys, n, err);
    for (i = 0; rc == VMEM_OK && i < n; i++) h[i] = handles(p)[phys[i]];
    for (; rc == VMEM_OK && done < n; done++) {
        res = cu.cuMemMap(base + (uint64_t)done * r->page_bytes, (size_t)r->page_bytes, 0, h[done], 0);
        if (res != CUDA_SUCCESS) rc = cu_fail(err, res);
    }
    pthread_mutex_unlock(&p->lock);
    if (rc != VMEM_OK) done--;  /* the failed page is not mapped */
    if (rc == VMEM_OK) {
        res = cu.cuMemSetAccess(base, (size_t)((uint64_t)n * r->page_bytes), &pv->access, 1);
        if (res != CUDA_SUCCESS) rc = cu_fail(err, res);
    }
    if (rc != VMEM_OK && done > 0) unmap_range(base, done, r->page_bytes);
    free(h);
    return rc;
}

/* pre: the context is current; [base, base + n pages) mapped, one handle per page. One cuMemUnmap over
 * the run (the driver accepts a range spanning several cuMemMap results); should a driver refuse that
 * (CUDA_ERROR_INVALID_VALUE), one call per page. */
static CUresult unmap_range(CUdeviceptr base, int64_t n, uint64_t page_bytes)
{
    CUresult res = cu.cuMemUnmap(base, (size_t)((uint64_t)n * page_bytes));
    int64_t i;
    if (res != 1 || n == 1) return res;
    for (i = 0; i < n; i++)
        if ((res = cu.cuMemUnmap(base + (uint64_t)i * page_bytes, (size_t)page_bytes)) != CUDA_SUCCESS) return res;
    return CUDA_SUCCESS;
}

/* pre: r->lock held; [virt, virt + n) mapped. */
static int cuda_unmap_run(vmem_resv_t *r, int64_t virt, int64_t n, vmem_err_t *err)
{
    CUresult res;
    if ((res = cu_enter(r->b)) != CUDA_SUCCESS) return cu_fail(err, res);
    res = unmap_range(r->addr + (uint64_t)virt * r->page_bytes, n, r->page_bytes);
    return res == CUDA_SUCCESS ? VMEM_OK : cu_fail(err, res);
}

const vmem_ops_t vmem_cuda_ops = {
    VMEM_KIND_CUDA, 0, cuda_open, NULL, cuda_close, cuda_reserve, cuda_release,
    cuda_pool_open, cuda_pool_grow, cuda_pool_trim, cuda_pool_close, cuda_pool_resident,
    cuda_map_run, cuda_unmap_run,
};

/* ---- raw floor for the GPU micro-benchmark: bare driver calls, timed per kind ---- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* pre: p a cuda pool with backed pages; [base, ...) a cuda reservation; pages unmapped.
 * ns[0] += time in cuMemMap, ns[1] += time in cuMemSetAccess (one per page). */
int vmem_raw_cuda_map(vmem_pool_t *p, uint64_t base, const int64_t *virt, const int64_t *phys, int64_t n,
                      uint64_t page_bytes, uint64_t *ns)
{
    cuda_priv_t *pv;
    int64_t i;
    uint64_t t0, t1, t2;
    if (!p || p->b->kind != VMEM_KIND_CUDA || !p->priv) return VMEM_ERR_INVALID;
    pv = p->b->priv;
    if (cu_enter(p->b) != CUDA_SUCCESS) return VMEM_ERR_DRIVER;
    for (i = 0; i < n; i++) {
        CUdeviceptr a = base + (uint64_t)virt[i] * page_bytes;
        t0 = now_ns();
        if (cu.cuMemMap(a, (size_t)page_bytes, 0, handles(p)[phys[i]], 0) != CUDA_SUCCESS) return VMEM_ERR_DRIVER;
        t1 = now_ns();
        if (cu.cuMemSetAccess(a, (size_t)page_bytes, &pv->access, 1) != CUDA_SUCCESS) return VMEM_ERR_DRIVER;
        t2 = now_ns();
        ns[0] += t1 - t0;
        ns[1] += t2 - t1;
    }
    return VMEM_OK;
}

/* pre: pages mapped by vmem_raw_cuda_map on a cuda backend b. */
int vmem_raw_cuda_unmap(vmem_backend_t *b, uint64_t base, const int64_t *virt, int64_t n, uint64_t page_bytes)
{
    int64_t i;
    if (!b || b->kind != VMEM_KIND_CUDA || cu_enter(b) != CUDA_SUCCESS) return VMEM_ERR_INVALID;
    for (i = 0; i < n; i++)
        if (cu.cuMemUnmap(base + (uint64_t)virt[i] * page_bytes, (size_t)page_bytes) != CUDA_SUCCESS)
            return VMEM_ERR_DRIVER;
    return VMEM_OK;
}
