"""cffi builder for the native layer (API mode, out of line): ``vmem._native._vmem_cffi``.

The header vmem.h is both the C contract and the cdef (preprocessor lines stripped, the
``#define`` status codes declared as ``#define NAME ...`` for cffi). setup.py wires ``ffibuilder``
through ``cffi_modules``; the extension is stamped with vmem/_version.py's version.
"""
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["core.c", "map.c", "pool.c", "host.c", "cuda.c", "worker.c"]


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
ffibuilder.cdef(_cdef((HERE / "vmem.h").read_text()))
ffibuilder.set_source(
    "vmem._native._vmem_cffi",
    '#include "vmem.h"\n',
    sources=[str((HERE / s).relative_to(HERE.parent.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent.parent))],
    define_macros=[("VMEM_VERSION", '"%s"' % _version())],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["dl", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
