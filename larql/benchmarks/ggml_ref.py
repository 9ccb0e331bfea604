"""ggml's CPU dot kernels as the `x ggml` baseline of `larql bench kernels`.

The one place that loads a foreign library with ctypes: llama-cpp-python's shared libraries
(found without importing llama_cpp and its dependencies). larql's own kernels are reached only
through larql.kernels; this module hands the benchmark function addresses and ggml's own Q8_K
activations, and larql.kernels.bench_vec_dot drives them row by row from C.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from larql import kernels as K

Q8K_BLOCK_BYTES = 292  # ggml's block_q8_K: the same layout as ours (d, 256 int8, 16 bsums)


class Ggml:
    """ggml_vec_dot_q4_K_q8_K / _q6_K_q8_K and quantize_row_q8_K from llama-cpp-python's libggml."""

    def __init__(self, libs: list[ctypes.CDLL]) -> None:
        def find(name: str):
            for lb in libs:
                try:
                    return getattr(lb, name)
                except AttributeError:
                    continue
            raise AttributeError(name)

        try:
            find("ggml_cpu_init")()
        except AttributeError:
            pass
        self._quantize_row_q8_K = find("quantize_row_q8_K")
        self._quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self._quantize_row_q8_K.restype = None
        self.dot_address = {
            K.Q4_K: ctypes.cast(find("ggml_vec_dot_q4_K_q8_K"), ctypes.c_void_p).value,
            K.Q6_K: ctypes.cast(find("ggml_vec_dot_q6_K_q8_K"), ctypes.c_void_p).value,
        }

    def quantize_q8k(self, x: np.ndarray) -> np.ndarray:
        """f32 [n] (n a multiple of 256) -> ggml's Q8_K bytes."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros(x.size // K.QK_K * Q8K_BLOCK_BYTES, dtype=np.uint8)
        self._quantize_row_q8_K(x.ctypes.data, out.ctypes.data, x.size)
        return out


def load_ggml(libdir: str | Path | None = None) -> Ggml | None:
    """ggml's CPU library from `libdir`, else from llama_cpp/lib/. None if neither has it."""
    if libdir is None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            return None
        libdir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    paths = sorted(Path(libdir).glob("libggml*.so*"), key=lambda p: (p.name != "libggml-base.so", p.name))
    libs = []
    for p in paths:
        try:
            libs.append(ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL))
        except OSError:
            continue
    try:
        return Ggml(libs)
    except AttributeError:
        return None
