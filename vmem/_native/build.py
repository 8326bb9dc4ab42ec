"""cffi builder for the native layer (API mode, out of line): ``vmem._native._vmem_cffi``.

The header vmem.h is both the C contract and the cdef (preprocessor lines stripped, the
``#define`` status codes declared as ``#define NAME ...`` for cffi). setup.py wires ``ffibuilder``
through ``cffi_modules``; the extension is stamped with vmem/_version.py's version.
"""
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["core.c", "map.c", "pool.c", "host.c", "cuda.c", "worker.c", "attn_cpu.c"]

# The fused CPU decode attention kernel (Note [CPU decode attention] in attn_cpu.c, which declares the same).
ATTN_DECLS = """
#define VMEM_ATTN_F32 0
#define VMEM_ATTN_F16 1
#define VMEM_ATTN_BF16 2
#define VMEM_ATTN_PORTABLE 1
#define VMEM_ATTN_NO_BF16_DOT 2
#define VMEM_ATTN_PATH_PORTABLE 0
#define VMEM_ATTN_PATH_AVX512 1
#define VMEM_ATTN_PATH_AVX512_BF16 2
typedef struct {
    const void *q;
    const void *k_cache;
    const void *v_cache;
    void *out;
    const int64_t *seqlens;
    const int64_t *rows;
    int64_t q_stride_b, q_stride_h;
    int64_t k_stride_b, k_stride_s, k_stride_h;
    int64_t v_stride_b, v_stride_s, v_stride_h;
    int64_t out_stride_b, out_stride_h;
    int32_t dtype;
    int32_t batch, num_heads, num_kv_heads, head_dim;
    int32_t num_threads;
    int32_t flags;
    float scale;
} vmem_attn_decode_t;
int vmem_attn_decode(const vmem_attn_decode_t *args);
int vmem_attn_decode_path(int32_t head_dim, int32_t flags);
"""


def _version() -> str:
    text = (HERE.parent / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _cdef(header: str) -> str:
    out = []
    for line in header.splitlines():
        m = re.match(r"#define\s+(\w+)\s+\S", line)
        if m and m.group(1) != "VMEM_H":
            out.append("#define %s ..." % m.group(1))
        elif not line.startswith("#"):
            out.append(line)
    return "\n".join(out)


ffibuilder = FFI()
ffibuilder.cdef(_cdef((HERE / "vmem.h").read_text()) + ATTN_DECLS)
ffibuilder.set_source(
    "vmem._native._vmem_cffi",
    '#include "vmem.h"\n' + ATTN_DECLS,
    sources=[str((HERE / s).relative_to(HERE.parent.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent.parent))],
    define_macros=[("VMEM_VERSION", '"%s"' % _version())],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["dl", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
