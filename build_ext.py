"""cffi (API mode) build of larql._kernels from csrc/.

csrc/larql.h (the public API) is handed to cffi, and csrc/larql_bench.h (benchmark-only
entry points, kept out of the public header) in a second cdef section, and csrc/larql_wire.h
(the decode step's wire messages in C, used by larql/protocol_c.py) in a third. Each ISA file enables
its own instruction set with a `#pragma GCC target`, so the whole library is compiled for the
baseline and the fastest kernels are chosen at run time (csrc/dispatch.c).
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _cdef_from_header(text: str) -> str:
    """larql.h minus preprocessor lines: cffi parses plain declarations."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


# -ffp-contract=off: the dequantisers must round exactly like ggml (no fused multiply-add
# unless a kernel asks for one with an intrinsic). Tests that cross-compile csrc/ reuse these.
COMPILE_ARGS = ["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall"]

ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header((CSRC / "larql.h").read_text()))
ffibuilder.cdef(_cdef_from_header((CSRC / "larql_bench.h").read_text()))
ffibuilder.cdef(_cdef_from_header((CSRC / "larql_wire.h").read_text()))
ffibuilder.set_source(
    "larql._kernels",
    '#include "larql.h"\n#include "larql_bench.h"\n#include "larql_wire.h"\n',
    sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=["-pthread", "-lm"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
