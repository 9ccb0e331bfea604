"""Quantised bytes do not depend on the machine: the library built for aarch64 (run under
qemu-user, NEON dispatch and forced scalar) writes exactly the Q4_K, Q6_K and Q8_K bytes that
larql.kernels writes here. A vindex extracted on a laptop and one extracted on a server agree.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from isa_harness import CSRC, LIBRARY_FLAGS, require_tools

from larql import kernels as K

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
FLAGS = LIBRARY_FLAGS
LIB_SOURCES = ["quant.c", "kernels_scalar.c", "kernels_neon.c", "dispatch.c", "threadpool.c"]

# Reads rows, cols and f32 values from argv[1]; writes each format's bytes to argv[2..4].
PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "kernels.h"
int main(int argc, char **argv) {
    if (argc != 5) return 2;
    FILE *f = fopen(argv[1], "rb");
    int64_t shape[2];
    if (!f || fread(shape, 8, 2, f) != 2) return 3;
    float *x = malloc((size_t)(shape[0] * shape[1]) * 4);
    if (fread(x, 4, (size_t)(shape[0] * shape[1]), f) != (size_t)(shape[0] * shape[1])) return 4;
    fclose(f);
    int fmts[3] = {LQ_Q4_K, LQ_Q6_K, LQ_Q8_K};
    for (int i = 0; i < 3; i++) {
        size_t n = (size_t)shape[0] * lq_row_bytes(fmts[i], shape[1]);
        void *q = malloc(n);
        if (lq_quantize(fmts[i], x, q, shape[0], shape[1]) != 0) return 5;
        FILE *o = fopen(argv[2 + i], "wb");
        if (!o || fwrite(q, 1, n, o) != n) return 6;
        fclose(o);
    }
    printf("%s\n", lq_isa());
    return 0;
}
"""


@pytest.fixture(scope="module")
def aarch64_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools(CROSS_CC, QEMU)
    out = tmp_path_factory.mktemp("crossarch")
    src = out / "quantize_file.c"
    src.write_text(PROGRAM)
    exe = out / "quantize_file"
    subprocess.run(
        [CROSS_CC, *FLAGS, "-static", f"-I{CSRC}", str(src), *(str(CSRC / s) for s in LIB_SOURCES),
         "-lm", "-o", str(exe)],
        check=True, capture_output=True, timeout=300,
    )
    return exe


@pytest.mark.parametrize("isa", ["neon", "scalar"])
def test_aarch64_quantises_to_the_same_bytes(aarch64_program: Path, tmp_path: Path, isa: str) -> None:
    rng = np.random.default_rng(31)
    x = rng.standard_normal((24, 2816)).astype(np.float32)
    x[3] *= 1e-3  # small super-scales (f16 subnormal range)
    x[4] *= 300.0
    x[5, :1000] = 0.0
    x[6] = np.abs(x[6])  # all positive: min clamps to zero
    inp = tmp_path / "x.bin"
    inp.write_bytes(np.array(x.shape, np.int64).tobytes() + x.tobytes())
    outs = [tmp_path / f"{name}.bin" for name in ("q4k", "q6k", "q8k")]
    env = dict(os.environ, LARQL_ISA=isa, LARQL_NUM_THREADS="2")
    res = subprocess.run([QEMU, str(aarch64_program), str(inp), *map(str, outs)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == isa
    for fmt, out in zip((K.Q4_K, K.Q6_K, K.Q8_K), outs, strict=True):
        assert out.read_bytes() == K.quantize(x, fmt).tobytes(), K.FORMAT_NAMES[fmt]
