/* Note [Host backend]
 *
 * Rationale. The KV cache wants what CUDA's virtual memory API gives on a GPU: a large contiguous
 * virtual range whose pages get physical memory on demand, can move without a copy, and can give
 * memory back. Linux offers the same with plain mmap, so every CPU machine can run (and test) the real
 * mechanism, not a mock.
 *
 * Approach.
 *   - physical pool  = a memfd (sparse shmem file); physical page k = file offset k * page_bytes;
 *   - reservation    = mmap(PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE): reads of unmapped
 *                      pages return zeros (the shared zero page), writes fault, no memory is charged;
 *   - map            = mmap(addr, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_FIXED|MAP_POPULATE, memfd, off);
 *   - unmap          = the reservation's own anonymous read-only mapping put back with MAP_FIXED,
 *                      so the range stays reserved and merges back into the reservation's VMA;
 *   - trim           = fallocate(FALLOC_FL_PUNCH_HOLE) gives the memory back to the OS.
 *
 * Implementation. core.c sorts a batch by virtual page and hands this file runs of pages that are
 * contiguous both virtually and in the file: one mmap per run, and the kernel merges adjacent runs with
 * contiguous offsets into one VMA. A process may hold vm.max_map_count VMAs (65,530 by default); at the
 * limit even an unmap in the middle of a run fails (it splits a VMA). So core.c counts the VMAs each
 * reservation holds (breaks between mappings in its virt->phys table) and refuses with
 * VMEM_ERR_MAP_LIMIT before the kernel would fail. The budget, read at open and read again before
 * refusing (the rest of the process may have dropped mappings meanwhile), is
 *     max_map_count - (VMAs the process holds now, less vmem's own) - headroom
 * with headroom = max(1024, max_map_count / 32) for what the rest of the process maps later
 * (override: VMEM_MAP_HEADROOM). The count of vmem's mappings is process-wide (g_host_mappings).
 * Huge pages are used when present, never required: a pool whose page_bytes is a multiple of 2 MiB
 * takes an MFD_HUGETLB memfd when the hugetlb pool has enough free pages (VMEM_HUGETLB=0 disables),
 * and shmem THP in "advise" mode gets MADV_HUGEPAGE on each mapped run.
 *
 * Limitations. MAP_POPULATE cannot report that the machine is out of memory: mmap succeeds and a later
 * touch may raise SIGBUS, so a pool should not be larger than the memory it may use (max_pages). The
 * VMA count is an upper bound (the kernel may merge with neighbours we do not count). mmap's ENOMEM is
 * reported as VMEM_ERR_MAP_LIMIT (with os_error ENOMEM): past our budget check it means the rest of the
 * process took the VMAs. Linux only.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "internal.h"

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif

#define HUGE_2M ((uint64_t)2 << 20)

static atomic_llong g_host_mappings;

static const int RESV_PROT = PROT_READ;
static const int RESV_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
static const int MAP_PROT = PROT_READ | PROT_WRITE;
static const int MAP_FLAGS = MAP_SHARED | MAP_FIXED | MAP_POPULATE;

/* pre: none. */
int64_t vmem_count_process_mappings(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    int64_t lines = 0;
    int c;
    if (!f) return -1;
    while ((c = getc(f)) != EOF)
        if (c == '\n') lines++;
    fclose(f);
    return lines;
}

/* pre: none; 0 when the default huge page size is not 2 MiB or none are free. */
static int64_t hugetlb_free_pages_2m(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long long v = 0, size_kb = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "HugePages_Free: %lld", &v) == 1) continue;
        sscanf(line, "Hugepagesize: %lld kB", &size_kb);
    }
    fclose(f);
    return size_kb == 2048 ? v : 0;
}

/* pre: none. Is shmem THP in "advise" mode (MADV_HUGEPAGE helps)? */
static int thp_shmem_advise(void)
{
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r");
    char buf[256] = {0};
    if (!f) return 0;
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    return strstr(buf, "[advise]") != NULL;
}

/* pre: b->mappings_used set. budget = max_map_count - (process VMAs - vmem's) - headroom, read now
 * (sysctl and /proc/self/maps: about a millisecond; called at open and before refusing a map). */
static void host_refresh_budget(vmem_backend_t *b)
{
    int64_t max_map = _vmem_read_sysctl("/proc/sys/vm/max_map_count");
    int64_t ours = atomic_load(&g_host_mappings);
    int64_t in_use = vmem_count_process_mappings();
    int64_t headroom;
    const char *env = getenv("VMEM_MAP_HEADROOM");
    if (max_map <= 0) max_map = 65530;
    if (in_use < 0) in_use = ours;
    headroom = max_map / 32 > 1024 ? max_map / 32 : 1024;
    if (env && *env) headroom = atoll(env);
    b->max_map_count = max_map;
    b->map_budget_os = max_map - (in_use - ours) - headroom;
    if (b->map_budget_os < 0) b->map_budget_os = 0;
}

/* pre: b allocated by core.c. */
static int host_open(vmem_backend_t *b, int device, vmem_err_t *err)
{
    (void)device;
    (void)err;
    b->granularity = (uint64_t)sysconf(_SC_PAGESIZE);
    b->mappings_used = &g_host_mappings;
    host_refresh_budget(b);
    b->map_budget = b->map_budget_os;
    b->hugetlb_available = hugetlb_free_pages_2m() > 0;
    b->thp_advise = thp_shmem_advise();
    return VMEM_OK;
}

static void host_close(vmem_backend_t *b) { (void)b; }

/* Largest power of two dividing page_bytes, at most 2 MiB: huge pages need 2 MiB alignment. */
static uint64_t resv_align(uint64_t page_bytes)
{
    uint64_t a = page_bytes & (~page_bytes + 1);
    return a > HUGE_2M ? HUGE_2M : a;
}

/* pre: num_bytes a positive multiple of page_bytes. */
static int host_reserve(vmem_backend_t *b, uint64_t num_bytes, uint64_t page_bytes, uint64_t *addr,
                        vmem_err_t *err)
{
    uint64_t align = resv_align(page_bytes), base, start;
    void *p;
    (void)b;
    if (align < b->granularity) align = b->granularity;
    p = mmap(NULL, num_bytes + align, RESV_PROT, RESV_FLAGS, -1, 0);
    if (p == MAP_FAILED) {
        _vmem_err_set(err, VMEM_ERR_OOM, VMEM_DETAIL_TOO_LARGE, errno, -1);
        return VMEM_ERR_OOM;
    }
    base = (uint64_t)(uintptr_t)p;
    start = (base + align - 1) / align * align;
    if (start > base) munmap(p, start - base);
    if (base + align > start) munmap((void *)(uintptr_t)(start + num_bytes), base + align - start);
    *addr = start;
    return VMEM_OK;
}

/* pre: r->lock held. munmap drops every mapping in the range at once. */
static void host_release(vmem_resv_t *r)
{
    munmap((void *)(uintptr_t)r->addr, r->num_bytes);
}

static int os_fail(vmem_err_t *err, int status, int e)
{
    _vmem_err_set(err, status, VMEM_DETAIL_NONE, e, -1);
    return status;
}

/* pre: p->page_bytes, num_pages, max_pages set; p private to the caller. */
static int host_pool_open(vmem_pool_t *p, vmem_err_t *err)
{
    const char *env = getenv("VMEM_HUGETLB");
    uint64_t bytes = (uint64_t)p->num_pages * p->page_bytes;
    int want_huge = p->page_bytes % HUGE_2M == 0 && p->b->hugetlb_available && p->num_pages > 0 && !p->lease &&
                    !(env && env[0] == '0');
    if (want_huge && (uint64_t)hugetlb_free_pages_2m() * HUGE_2M >= bytes) {
        int fd = memfd_create("vmem-pool-huge", MFD_CLOEXEC | MFD_HUGETLB);
        if (fd >= 0 && ftruncate(fd, (off_t)bytes) == 0 && fallocate(fd, 0, 0, (off_t)bytes) == 0) {
            int64_t i;
            p->fd = fd;
            p->hugetlb = 1;
            for (i = 0; i < p->num_pages; i++) p->backed[i] = 1;
            p->backed_pages = p->num_pages;
            return VMEM_OK;
        }
        if (fd >= 0) close(fd);
    }
    p->fd = memfd_create("vmem-pool", MFD_CLOEXEC);
    if (p->fd < 0) return os_fail(err, errno == ENOMEM ? VMEM_ERR_OOM : VMEM_ERR_DRIVER, errno);
    if (ftruncate(p->fd, (off_t)bytes) != 0) {
        int e = errno;
        close(p->fd);
        p->fd = -1;
        return os_fail(err, e == EFBIG || e == ENOSPC ? VMEM_ERR_OOM : VMEM_ERR_DRIVER, e);
    }
    return VMEM_OK;
}

/* pre: p->lock held; new_num_pages > num_pages; arrays hold new_num_pages. */
static int host_pool_grow(vmem_pool_t *p, int64_t new_num_pages, vmem_err_t *err)
{
    off_t bytes = (off_t)((uint64_t)new_num_pages * p->page_bytes);
    if (ftruncate(p->fd, bytes) != 0) return os_fail(err, VMEM_ERR_DRIVER, errno);
    if (p->hugetlb) {
        off_t old = (off_t)((uint64_t)p->num_pages * p->page_bytes);
        int64_t i;
        if (fallocate(p->fd, 0, old, bytes - old) != 0) {
            int e = errno;
            if (ftruncate(p->fd, old) != 0) { /* the old size stays valid either way */ }
            return os_fail(err, VMEM_ERR_OOM, e);
        }
        for (i = p->num_pages; i < new_num_pages; i++) p->backed[i] = 1;
        p->backed_pages += new_num_pages - p->num_pages;
    }
    return VMEM_OK;
}

/* pre: p->lock held; pages [phys, phys + n) unmapped. */
static int host_pool_trim(vmem_pool_t *p, int64_t phys, int64_t n, vmem_err_t *err)
{
    if (fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)((uint64_t)phys * p->page_bytes),
                  (off_t)((uint64_t)n * p->page_bytes)) != 0)
        return os_fail(err, VMEM_ERR_DRIVER, errno);
    return VMEM_OK;
}

/* pre: p->lock held. */
static void host_pool_close(vmem_pool_t *p)
{
    if (p->fd >= 0) close(p->fd);   /* mappings keep the file alive until unmapped */
    p->fd = -1;
}

static int64_t host_pool_resident(vmem_pool_t *p)
{
    struct stat st;
    if (p->fd < 0 || fstat(p->fd, &st) != 0) return -1;
    return (int64_t)st.st_blocks * 512;
}

/* pre: r->lock held, p->lock not; phys[0..n) contiguous; pages pinned in p. p->lock is held across the
 * mmap: vmem_pool_close on another thread (an async job runs while its pool closes) must not close the
 * memfd between our read of p->fd and the mmap (EBADF, or a file that reused the number). */
static int host_map_run(vmem_resv_t *r, int64_t virt, vmem_pool_t *p, const int64_t *phys, int64_t n,
                        vmem_err_t *err)
{
    void *addr = (void *)(uintptr_t)(r->addr + (uint64_t)virt * r->page_bytes);
    size_t len = (size_t)((uint64_t)n * r->page_bytes);
    pthread_mutex_lock(&p->lock);
    if (p->closed || p->fd < 0) {
        pthread_mutex_unlock(&p->lock);
        return _vmem_fail(err, VMEM_ERR_CLOSED, VMEM_DETAIL_NONE, -1);
    }
    if (mmap(addr, len, MAP_PROT, MAP_FLAGS, p->fd, (off_t)((uint64_t)phys[0] * p->page_bytes)) == MAP_FAILED) {
        int e = errno;
        pthread_mutex_unlock(&p->lock);
        /* a failed MAP_FIXED may have removed the old mapping: put the reservation back */
        mmap(addr, len, RESV_PROT, RESV_FLAGS | MAP_FIXED, -1, 0);
        return os_fail(err, e == ENOMEM ? VMEM_ERR_MAP_LIMIT : VMEM_ERR_DRIVER, e);
    }
    pthread_mutex_unlock(&p->lock);
    if (r->b->thp_advise && r->page_bytes % HUGE_2M == 0 && !p->hugetlb) madvise(addr, len, MADV_HUGEPAGE);
    return VMEM_OK;
}

/* pre: r->lock held; [virt, virt + n) mapped. */
static int host_unmap_run(vmem_resv_t *r, int64_t virt, int64_t n, vmem_err_t *err)
{
    void *addr = (void *)(uintptr_t)(r->addr + (uint64_t)virt * r->page_bytes);
    if (mmap(addr, (size_t)((uint64_t)n * r->page_bytes), RESV_PROT, RESV_FLAGS | MAP_FIXED, -1, 0) == MAP_FAILED) {
        int e = errno;
        return os_fail(err, e == ENOMEM ? VMEM_ERR_MAP_LIMIT : VMEM_ERR_DRIVER, e);
    }
    return VMEM_OK;
}

/* pre: called in a forked child on a range a host reservation of the parent held; async-signal-safe. */
int vmem_host_forget_range(uint64_t addr, uint64_t num_bytes)
{
    if (!addr || !num_bytes) return VMEM_ERR_INVALID;
    if (mmap((void *)(uintptr_t)addr, (size_t)num_bytes, PROT_NONE, RESV_FLAGS | MAP_FIXED, -1, 0) == MAP_FAILED)
        return VMEM_ERR_DRIVER;
    return VMEM_OK;
}

const vmem_ops_t vmem_host_ops = {
    VMEM_KIND_HOST, 1, host_open, host_refresh_budget, host_close, host_reserve, host_release,
    host_pool_open, host_pool_grow, host_pool_trim, host_pool_close, host_pool_resident,
    host_map_run, host_unmap_run,
};

/* ---- raw floor for the benchmark: the same syscalls, no bookkeeping ---- */

/* pre: p a host pool; [base, ...) a host reservation of page_bytes pages; pages unmapped. */
int vmem_raw_host_map(vmem_pool_t *p, uint64_t base, const int64_t *virt, const int64_t *phys, int64_t n,
                      uint64_t page_bytes)
{
    int64_t i;
    for (i = 0; i < n; i++)
        if (mmap((void *)(uintptr_t)(base + (uint64_t)virt[i] * page_bytes), page_bytes, MAP_PROT, MAP_FLAGS,
                 p->fd, (off_t)((uint64_t)phys[i] * page_bytes)) == MAP_FAILED)
            return VMEM_ERR_DRIVER;
    return VMEM_OK;
}

/* pre: pages mapped by vmem_raw_host_map. */
int vmem_raw_host_unmap(uint64_t base, const int64_t *virt, int64_t n, uint64_t page_bytes)
{
    int64_t i;
    for (i = 0; i < n; i++)
        if (mmap((void *)(uintptr_t)(base + (uint64_t)virt[i] * page_bytes), page_bytes, RESV_PROT,
                 RESV_FLAGS | MAP_FIXED, -1, 0) == MAP_FAILED)
            return VMEM_ERR_DRIVER;
    return VMEM_OK;
}
