"""cffi builder for the native layer (API mode, out of line): ``vmem._native._vmem_cffi``.

The headers (vmem.h, vmem_attn.h) are both the C contract and the cdef (preprocessor lines stripped,
``#define`` constants declared as ``#define NAME ...`` for cffi). setup.py wires ``ffibuilder``
through ``cffi_modules``; the extension is stamped with vmem/_version.py's version.
"""
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["core.c", "map.c", "pool.c", "host.c", "cuda.c", "worker.c", "budget.c", "attn_cpu.c", "attn_cpu_x86.c"]
# vmem.h: the primitive contract; vmem_attn.h: the fused CPU decode attention kernel (Note [CPU decode
# attention] in attn_cpu.c). Both are the cdef as well as the C declarations.
HEADERS = ["vmem.h", "vmem_attn.h"]


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
ffibuilder.cdef("\n".join(_cdef((HERE / h).read_text()) for h in HEADERS))
ffibuilder.set_source(
    "vmem._native._vmem_cffi",
    "".join('#include "%s"\n' % h for h in HEADERS),
    sources=[str((HERE / s).relative_to(HERE.parent.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent.parent))],
    define_macros=[("VMEM_VERSION", '"%s"' % _version())],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["dl", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
