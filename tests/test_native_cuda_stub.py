"""cuda.c's logic on a machine without a GPU, against a stand-in libcuda.so.1.

Not a substitute for tests/gpu (which run against the real driver): the stand-in implements the dozen
driver calls cuda.c uses on top of mmap/memfd, and is strict where the real driver is — a call without
a current context fails (CUDA_ERROR_INVALID_CONTEXT), mapping over a mapping, unmapping a hole or
freeing a range that still has mappings fail, cuMemCreate honours a memory cap (OUT_OF_MEMORY) —
so the dlopen path, the struct layouts as cuda.c fills them, per-thread context handling (the async
worker too), run coalescing for cuMemSetAccess, rollback and pooled handles all execute here. The
stand-in runs in a subprocess with LD_LIBRARY_PATH pointing at it, because dlopen reads that at start.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

STUB_C = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <pthread.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long H;
typedef struct { int type, id; } Loc;
typedef struct { int type, req; Loc location; void *w; unsigned char c, g; unsigned short u;
                 unsigned char r[4]; } Prop;
typedef struct { Loc location; int flags; } Access;

#define GRAN (64u << 10)
#define MAXH 4096
static __thread int ctx_current;
static int fds[MAXH + 1];            /* handle -> memfd (0: free) */
static size_t sizes[MAXH + 1];
static long long cap_bytes = -1, used_bytes;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
long long stub_setaccess_calls, stub_map_calls, stub_mapped_pages, stub_sync_calls, stub_unmaps_before_sync;

#define NEED_CTX if (!ctx_current) return 201

CUresult cuInit(unsigned f) { const char *c = getenv("STUB_CAP_BYTES"); if (c) cap_bytes = atoll(c); return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int o) { if (o != 0) return 101; *d = 0; return 0; }
CUresult cuDeviceGetAttribute(int *v, int a, int d) { *v = a == 102; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { *c = (void *)0x1; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int d) { return 0; }
CUresult cuCtxSetCurrent(void *c) { ctx_current = c != 0; return 0; }
CUresult cuCtxSynchronize(void) { NEED_CTX; __atomic_add_fetch(&stub_sync_calls, 1, __ATOMIC_RELAXED); return 0; }
CUresult cuGetErrorString(CUresult r, const char **s) { *s = "stub"; return 0; }
CUresult cuMemGetAllocationGranularity(size_t *g, const Prop *p, int o) {
    NEED_CTX; if (p->type != 1 || p->location.type != 1 || p->w) return 1; *g = GRAN; return 0; }
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t n, size_t a, CUdeviceptr addr, unsigned long long f) {
    NEED_CTX; if (n % GRAN) return 1;
    void *m = mmap(0, n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return 2; *p = (CUdeviceptr)m; return 0; }
static int range_has_mapping(CUdeviceptr p, size_t n) {   /* mincore-free check via /proc is slow; */
    unsigned char v; size_t off;                            /* probe: a mapped page is readable */
    for (off = 0; off < n; off += GRAN) {
        int fd[2]; if (pipe(fd)) return 1;
        ssize_t w = write(fd[1], (void *)(p + off), 1);
        close(fd[0]); close(fd[1]);
        (void)v; if (w == 1) return 1;
    }
    return 0; }
CUresult cuMemAddressFree(CUdeviceptr p, size_t n) {
    NEED_CTX; if (range_has_mapping(p, n)) return 1; munmap((void *)p, n); return 0; }
CUresult cuMemCreate(H *h, size_t n, const Prop *p, unsigned long long f) {
    NEED_CTX; if (n % GRAN || p->type != 1 || p->location.type != 1) return 1;
    pthread_mutex_lock(&mu);
    if (cap_bytes >= 0 && used_bytes + (long long)n > cap_bytes) { pthread_mutex_unlock(&mu); return 2; }
    int i; for (i = 1; i <= MAXH && fds[i]; i++) {}
    if (i > MAXH) { pthread_mutex_unlock(&mu); return 2; }
    int fd = memfd_create("stub", 0); ftruncate(fd, n); fds[i] = fd; sizes[i] = n; used_bytes += n;
    pthread_mutex_unlock(&mu); *h = i; return 0; }
CUresult cuMemRelease(H h) {
    NEED_CTX; pthread_mutex_lock(&mu);
    if (h < 1 || h > MAXH || !fds[h]) { pthread_mutex_unlock(&mu); return 1; }
    close(fds[h]); fds[h] = 0; used_bytes -= sizes[h]; pthread_mutex_unlock(&mu); return 0; }
CUresult cuMemMap(CUdeviceptr p, size_t n, size_t off, H h, unsigned long long f) {
    NEED_CTX; if (h < 1 || h > MAXH || !fds[h] || n != sizes[h] || off) return 1;
    if (range_has_mapping(p, n)) return 1;
    if (mmap((void *)p, n, PROT_NONE, MAP_SHARED | MAP_FIXED, fds[h], 0) == MAP_FAILED) return 2;
    __atomic_add_fetch(&stub_map_calls, 1, __ATOMIC_RELAXED); return 0; }
CUresult cuMemSetAccess(CUdeviceptr p, size_t n, const Access *d, size_t c) {
    NEED_CTX; if (c != 1 || d->location.type != 1 || d->flags != 3) return 1;
    if (mprotect((void *)p, n, PROT_READ | PROT_WRITE)) return 1;
    __atomic_add_fetch(&stub_setaccess_calls, 1, __ATOMIC_RELAXED); return 0; }
CUresult cuMemUnmap(CUdeviceptr p, size_t n) {
    NEED_CTX; size_t off;
    if (getenv("STUB_UNMAP_ONE_MAPPING") && n != GRAN) return 1;   /* a driver that wants one per map */
    for (off = 0; off < n; off += GRAN) {       /* every page must be mapped */
        int fd[2]; if (pipe(fd)) return 1;
        ssize_t w = write(fd[1], (void *)(p + off), 1); close(fd[0]); close(fd[1]);
        if (w != 1) return 1;
    }
    mmap((void *)p, n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (!stub_sync_calls) __atomic_add_fetch(&stub_unmaps_before_sync, 1, __ATOMIC_RELAXED);
    return 0; }
"""

CHILD = textwrap.dedent("""
    import ctypes, gc, threading
    import numpy as np, torch
    from vmem.backends import get_backend
    from vmem.errors import VmemDriverError, VmemOutOfMemory, VmemInvalidArgument
    stub = ctypes.CDLL("libcuda.so.1")
    calls = lambda name: ctypes.c_longlong.in_dll(stub, name).value

    b = get_backend("cuda")
    assert get_backend("auto") is b
    pb = b.granularity_bytes
    assert pb == 64 << 10, pb
    r = b.reserve(64 * pb, pb)
    p = b.create_pool(pb, 16)
    assert p.resident_bytes() == 16 * pb

    # one cuMemSetAccess per virtually contiguous run, whatever the physical pages
    s0 = calls("stub_setaccess_calls")
    r.map([0, 1, 2, 3, 10, 11], p, [7, 2, 9, 0, 1, 3])
    assert calls("stub_setaccess_calls") - s0 == 2
    assert r.num_mappings == 2 and r.stats()["map_ops"] == 2
    buf = (ctypes.c_char * (4 * pb)).from_address(r.address)
    ctypes.memset(r.address, 7, 4 * pb)
    assert buf.raw[4 * pb - 1] == 7

    # the same physical page seen through another virtual page
    r.map([20], p, [9])
    assert ctypes.string_at(r.address + 20 * pb, 1) == bytes([7])

    # rollback: the 3rd driver op fails, nothing stays mapped
    r.inject_fault(2)
    try:
        r.map([30, 32, 34], p, [4, 5, 6])
        raise SystemExit("no error")
    except VmemDriverError:
        pass
    assert (r.mapping(30, 5) == -1).all() and p.info()["mappings"] == 7

    # unmap in runs; double unmap is refused by vmem before the driver sees it
    r.unmap([0, 1, 2, 3])
    try:
        r.unmap([0])
        raise SystemExit("no error")
    except VmemInvalidArgument:
        pass

    # the async worker thread makes the context current itself (the stub fails calls without one)
    m = b.async_mapper()
    t = m.submit(r, np.arange(40, 48), p, np.arange(8) + 8)
    m.wait(t)
    ctypes.memset(r.address + 40 * pb, 1, 8 * pb)
    m.wait(m.submit_unmap(r, np.arange(40, 48)))
    m.close()

    # trim releases handles; a trimmed page gets a new one when mapped
    p.trim([12, 13])
    assert p.resident_bytes() == 14 * pb
    r.map([50], p, [12])
    assert p.resident_bytes() == 15 * pb

    # release unmaps what is mapped before freeing the range (the stub refuses otherwise), once the
    # context's queued work is done (a kernel may still read the pages a dead view pointed at)
    assert calls("stub_sync_calls") == 0
    unmaps = calls("stub_unmaps_before_sync")
    r.close()
    assert calls("stub_sync_calls") == 1 and calls("stub_unmaps_before_sync") == unmaps
    p.close()

    # out of memory at pool creation is a MemoryError, and nothing is leaked
    try:
        b.create_pool(pb, 10_000)
        raise SystemExit("no error")
    except VmemOutOfMemory as e:
        assert isinstance(e, MemoryError)
    q = b.create_pool(pb, 8)
    q.close()

    # torch views over the reservation use __cuda_array_interface__ only on real CUDA; here the
    # stand-in memory is host memory, so only the CPU-free parts are checked above
    print("STUB-OK")
""")


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("stubcuda")
    src = d / "stub.c"
    src.write_text(STUB_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libcuda.so.1"), str(src), "-lpthread"],
                   check=True)
    return d


@pytest.mark.parametrize("unmap_one_mapping", [False, True])
def test_cuda_backend_against_stand_in_driver(stub_dir, unmap_one_mapping):
    env = dict(os.environ, LD_LIBRARY_PATH=str(stub_dir), STUB_CAP_BYTES=str(64 * (64 << 10)))
    if unmap_one_mapping:
        env["STUB_UNMAP_ONE_MAPPING"] = "1"
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "STUB-OK" in p.stdout, p.stderr[-3000:]
