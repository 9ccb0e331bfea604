"""The only Python module that touches cffi: numpy arrays and buffers in, numpy arrays out.

Every call into C releases the GIL (cffi API mode), so a server's event loop keeps running while
a thread executor computes. The C thread pool serialises concurrent calls, so any thread may call
any function here. All functions raise KernelError (a ValueError) naming the bad argument.

Formats are the LYRW quant_format codes (see docs/KERNELS.md): F32, F16, BF16 and the
ggml-compatible K-quants Q4_K (144 B per 256 values) and Q6_K (210 B); Q8_K (292 B) is the
activation format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from larql._kernels import ffi, lib

from .errors import LarqlError

# Format ids and error codes come from csrc/larql.h (through cffi): the one definition.
F32, F16, BF16, Q4_K, Q6_K, Q8_K = lib.LQ_F32, lib.LQ_F16, lib.LQ_BF16, lib.LQ_Q4_K, lib.LQ_Q6_K, lib.LQ_Q8_K
# LYRW ids a file may carry that the kernels do not compute (row sizes known, except FP4's).
Q4_0, Q8_0, FP4, Q5_K = lib.LQ_Q4_0, lib.LQ_Q8_0, lib.LQ_FP4, lib.LQ_Q5_K
FORMAT_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", Q4_0: "Q4_0", Q4_K: "Q4_K", Q6_K: "Q6_K", Q8_0: "Q8_0",
                FP4: "FP4", Q5_K: "Q5_K", Q8_K: "Q8_K"}
QK_K = 256
WEIGHT_FORMATS = (F32, F16, BF16, Q4_K, Q6_K)  # what the row kernels compute with
KQUANTS = (Q4_K, Q6_K, Q8_K)
CODEC_FORMATS = (*WEIGHT_FORMATS, Q8_K)  # what quantize / dequantize convert


class KernelError(LarqlError, ValueError):
    """A kernel call was given a bad format, shape or expert id."""


_ERRORS = {
    lib.LQ_E_FORMAT: "unsupported format for this operation",
    lib.LQ_E_SHAPE: "bad shape",
    lib.LQ_E_EXPERT: "expert id out of range or not held",
    lib.LQ_E_NOMEM: "out of memory",
    lib.LQ_E_ISA: "ISA not available on this CPU",
}


def _check(rc: int, what: str) -> None:
    if rc != lib.LQ_OK:
        raise KernelError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")


def _fmt_name(fmt: int) -> str:
    return FORMAT_NAMES.get(fmt, f"unknown format {fmt}")


def _check_environment() -> None:
    """LARQL_ISA and LARQL_NUM_THREADS are read by the C side, which silently ignores a value it
    cannot use (a typo ran on the default): refuse them here, naming what is accepted."""
    import os

    want = os.environ.get("LARQL_ISA", "")
    isas = ffi.string(lib.lq_available_isas()).decode().split()
    if want and want not in isas:
        raise KernelError(f"LARQL_ISA={want!r}: this CPU runs {', '.join(isas)}")
    threads = os.environ.get("LARQL_NUM_THREADS", "")
    if threads and not (threads.strip().isdigit() and int(threads) >= 1):
        raise KernelError(f"LARQL_NUM_THREADS={threads!r}: expected a whole number of threads >= 1")


_check_environment()


@dataclass(frozen=True)
class QMatrix:
    """A row-major weight matrix in one format, viewing its bytes without copying.

    `cols` is the stored row length (a multiple of 256 for K-quants); `logical_cols` is the
    length before padding (x vectors may be that short; the tail counts as zero).
    `data` is a 1-D uint8 numpy array (usually a view into an mmap) of rows * row_bytes(fmt, cols).
    """

    fmt: int
    rows: int
    cols: int
    data: np.ndarray
    logical_cols: int = 0

    def __post_init__(self) -> None:
        if self.fmt not in WEIGHT_FORMATS:
            raise KernelError(f"QMatrix: format {_fmt_name(self.fmt)} is not a weight format")
        need = self.rows * row_bytes(self.fmt, self.cols)
        if self.rows < 0 or not isinstance(self.data, np.ndarray) or self.data.dtype != np.uint8:
            raise KernelError("QMatrix: data must be a 1-D uint8 numpy array and rows >= 0")
        if self.data.ndim != 1 or self.data.size != need or not self.data.flags.c_contiguous:
            raise KernelError(
                f"QMatrix: data holds {self.data.size} bytes (contiguous={self.data.flags.c_contiguous}), "
                f"{self.rows} x {self.cols} {_fmt_name(self.fmt)} needs {need}"
            )
        if not 0 <= self.logical_cols <= self.cols:
            raise KernelError(f"QMatrix: logical_cols {self.logical_cols} outside 0..{self.cols}")


def row_bytes(fmt: int, cols: int) -> int:
    """Bytes of one stored row of `cols` values (a whole number of fmt's blocks)."""
    n = lib.lq_row_bytes(int(fmt), int(cols))
    if n == 0:
        if block_size(fmt) == 0:
            raise KernelError(f"row_bytes: the layout of {_fmt_name(fmt)} is not known")
        raise KernelError(f"row_bytes: {cols} values is not a valid {_fmt_name(fmt)} row length")
    return int(n)


def block_size(fmt: int) -> int:
    """Values per block: 256 for K-quants, 32 for Q4_0/Q8_0, 1 for float formats."""
    if fmt not in FORMAT_NAMES:
        raise KernelError(f"block_size: unknown format {fmt}")
    return int(lib.lq_block_values(int(fmt)))


def padded_cols(fmt: int, cols: int) -> int:
    """cols rounded up to a whole number of blocks of fmt."""
    b = block_size(fmt)
    if b == 0:
        raise KernelError(f"padded_cols: the layout of {_fmt_name(fmt)} is not known")
    return (int(cols) + b - 1) // b * b


def _f32_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise KernelError(f"{name}: expected a 1-D or 2-D array, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


# A C pointer type -> the cffi array type whose from_buffer view passes for it.
_VIEW_TYPES = {"void *": "char[]", "float *": "float[]", "int32_t *": "int32_t[]", "int64_t *": "int64_t[]",
               "double *": "double[]"}


def _ptr(a: np.ndarray, ctype: str = "void *"):
    """A pointer to a contiguous array's data for a C argument of type ctype.

    ffi.from_buffer is ~2x cheaper than casting a.ctypes.data (a decode token makes ~150 of
    these), and refuses a non-contiguous array instead of passing its base address."""
    return ffi.from_buffer(_VIEW_TYPES[ctype], a)


def quantize(x: np.ndarray, fmt: int) -> np.ndarray:
    """f32 [rows, cols] -> uint8 [rows * row_bytes(fmt, padded cols)]; cols padded with zeros."""
    if fmt not in CODEC_FORMATS:
        raise KernelError(f"quantize: cannot quantise to {_fmt_name(fmt)} (format {fmt})")
    x = _f32_2d(x, "quantize")
    rows, cols = x.shape
    if cols == 0:
        raise KernelError("quantize: rows of length 0")
    pc = padded_cols(fmt, cols)
    if pc != cols:
        x = np.pad(x, ((0, 0), (0, pc - cols)))
    out = np.empty(rows * row_bytes(fmt, pc), dtype=np.uint8)
    if rows:
        _check(lib.lq_quantize(fmt, _ptr(x, "float *"), _ptr(out), rows, pc), "quantize")
    return out


def _as_bytes(data, name: str) -> np.ndarray:
    """Any buffer (numpy array, bytes, memoryview of an mmap) as a flat uint8 array, no copy."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise KernelError(f"{name}: array is not contiguous")
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def dequantize(data, fmt: int, rows: int, cols: int) -> np.ndarray:
    """rows x cols stored in fmt (cols = the stored row length) -> f32 [rows, cols]."""
    if fmt not in CODEC_FORMATS:
        raise KernelError(f"dequantize: cannot dequantise {_fmt_name(fmt)} (format {fmt})")
    buf = _as_bytes(data, "dequantize")
    need = rows * row_bytes(fmt, cols)
    if rows < 0 or buf.size != need:
        raise KernelError(
            f"dequantize: {buf.size} bytes given, {rows} x {cols} {_fmt_name(fmt)} needs {need}"
        )
    out = np.empty((rows, cols), dtype=np.float32)
    if rows:
        _check(lib.lq_dequantize(fmt, _ptr(buf), _ptr(out, "float *"), rows, cols), "dequantize")
    return out


def quantize_q8k(x: np.ndarray) -> np.ndarray:
    """f32 [T, n] -> uint8 [T, ceil(n/256)*292]: activations in Q8_K (n padded with zeros)."""
    x = _f32_2d(x, "quantize_q8k")
    return quantize(x, Q8_K).reshape(x.shape[0], -1)


def as_qmatrix(x: np.ndarray, fmt: int) -> QMatrix:
    """Quantise an f32 matrix [rows, cols] into a QMatrix (rows padded to whole blocks)."""
    x = _f32_2d(x, "as_qmatrix")
    if fmt not in WEIGHT_FORMATS:
        raise KernelError(f"as_qmatrix: {_fmt_name(fmt)} is not a weight format")
    rows, cols = x.shape
    return QMatrix(fmt, rows, padded_cols(fmt, cols), quantize(x, fmt), logical_cols=cols)


def matmul(w: QMatrix, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """W x: x f32 [k] -> [rows], or [T, k] -> [T, rows]; k <= w.cols (missing tail = 0)."""
    x = np.asarray(x)
    vec = x.ndim == 1
    x2 = _f32_2d(x, "matmul")
    T, k = x2.shape
    if T < 1 or k < 1 or k > w.cols:
        raise KernelError(f"matmul: x has shape {x.shape}, the matrix takes 1..{w.cols} columns and T >= 1")
    shape = (w.rows,) if vec else (T, w.rows)
    y = _out(out, shape, "matmul")
    if w.rows:
        _check(
            lib.lq_matmul(w.fmt, _ptr(w.data), w.rows, w.cols, _ptr(x2, "float *"), k, T, _ptr(y, "float *")),
            f"matmul ({_fmt_name(w.fmt)} {w.rows} x {w.cols})",
        )
    return y


def _out(out: np.ndarray | None, shape: tuple, name: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelError(f"{name}: out must be a writable contiguous f32 array of shape {shape}")
    return out


def matmul_q8k(w: QMatrix, xq: np.ndarray, T: int) -> np.ndarray:
    """W x for activations already in Q8_K (T rows of w.cols/256 blocks) -> f32 [T, rows]."""
    if w.fmt not in (Q4_K, Q6_K):
        raise KernelError(f"matmul_q8k: weights must be Q4_K or Q6_K, not {_fmt_name(w.fmt)}")
    buf = _as_bytes(xq, "matmul_q8k")
    need = T * row_bytes(Q8_K, w.cols)
    if T < 1 or buf.size != need:
        raise KernelError(f"matmul_q8k: {buf.size} activation bytes for T={T}, expected {need}")
    y = np.empty((T, w.rows), dtype=np.float32)
    if w.rows:
        _check(lib.lq_matmul_q8k(w.fmt, _ptr(w.data), w.rows, w.cols, _ptr(buf), T, _ptr(y, "float *")),
               "matmul_q8k")
    return y


class ExpertTable:
    """The experts of one layer as the C kernel sees them: pointers into mmapped (or numpy) bytes.

    experts[e] is None (not held by this process) or (buffer, gate_up_offset, gate_up_fmt,
    down_offset, down_fmt); the buffer is anything exposing the buffer protocol and is kept alive.
    """

    def __init__(self, hidden: int, inter: int, experts: Sequence[tuple | None]) -> None:
        if hidden < 1 or inter < 1:
            raise KernelError(f"ExpertTable: hidden={hidden} and inter={inter} must be positive")
        self.hidden, self.inter = int(hidden), int(inter)
        self.n_experts = len(experts)
        self._c = ffi.new("lq_expert[]", max(1, self.n_experts))
        self._keep: list = []  # cffi buffers: keep the memory mapped and alive
        self.held = np.zeros(self.n_experts, dtype=bool)
        # every held expert's gate_up is K-quant: moe_ffn_q8k can take Q8_K activations as they are
        self.q8k_input = True
        views: dict[int, object] = {}
        for e, spec in enumerate(experts):
            if spec is None:
                continue
            try:
                buffer, gu_off, gu_fmt, d_off, d_fmt = spec
            except (TypeError, ValueError):
                raise KernelError(
                    f"ExpertTable: expert {e} must be None or (buffer, gate_up_offset, gate_up_fmt, "
                    "down_offset, down_fmt)"
                ) from None
            if gu_fmt not in WEIGHT_FORMATS or d_fmt not in WEIGHT_FORMATS:
                raise KernelError(f"ExpertTable: expert {e} formats {gu_fmt}/{d_fmt} are not weight formats")
            gu_len = 2 * self.inter * row_bytes(gu_fmt, padded_cols(gu_fmt, self.hidden))
            d_len = self.hidden * row_bytes(d_fmt, padded_cols(d_fmt, self.inter))
            if id(buffer) not in views:
                cbuf = ffi.from_buffer(buffer)
                views[id(buffer)] = cbuf
                self._keep.append((buffer, cbuf))
            cbuf = views[id(buffer)]
            size = len(cbuf)
            for what, off, n in (("gate_up", gu_off, gu_len), ("down", d_off, d_len)):
                if off < 0 or off + n > size:
                    raise KernelError(
                        f"ExpertTable: expert {e} {what} bytes [{off}, {off + n}) lie outside its "
                        f"buffer of {size} bytes"
                    )
            base = ffi.cast("uint8_t *", cbuf)
            c = self._c[e]
            c.gate_up = base + int(gu_off)
            c.down = base + int(d_off)
            c.gate_up_fmt = int(gu_fmt)
            self.q8k_input = self.q8k_input and gu_fmt in (Q4_K, Q6_K)
            c.down_fmt = int(d_fmt)
            self.held[e] = True


def moe_ffn(table: ExpertTable, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            out: np.ndarray | None = None, out64: np.ndarray | None = None) -> np.ndarray:
    """sum_k weights[t,k] * down_e(gelu_tanh(gate_e x[t]) * up_e x[t]) with e = ids[t,k].

    x: f32 [T, hidden] (normed; a 1-D x is one token and gives a 1-D result), ids int [T, K]
    (-1 = skip the slot), weights f32 [T, K] -> f32 [T, hidden]. The sum is accumulated in
    double and rounded once; `out64` (f64, the result's shape) also receives the double sums,
    which shards of one layer add before rounding once (docs/PROTOCOL.md, `acc`).
    """
    x = np.asarray(x)
    vec = x.ndim == 1
    x2 = _f32_2d(x, "moe_ffn")
    T = x2.shape[0]
    if x2.shape[1] != table.hidden or T < 1:
        raise KernelError(f"moe_ffn: x has shape {x.shape}, expected [T, {table.hidden}] with T >= 1")
    return _moe_call(lib.lq_moe_ffn64, "moe_ffn", table, _ptr(x2, "float *"), T, vec, ids, weights, out,
                     out64)


def moe_ffn_q8k(table: ExpertTable, xq, T: int, ids: np.ndarray, weights: np.ndarray,
                out: np.ndarray | None = None, out64: np.ndarray | None = None) -> np.ndarray:
    """moe_ffn with x already normed and in Q8_K (T rows of row_bytes(Q8_K, hidden padded to
    256), as quantize_q8k makes them): the blocks are used as they are, so quantize_q8k(x) here
    gives moe_ffn(x) bit for bit. Every expert named needs a K-quant gate_up -> f32 [T, hidden]."""
    buf = _as_bytes(xq, "moe_ffn_q8k")
    need = T * row_bytes(Q8_K, (table.hidden + 255) // 256 * 256)
    if T < 1 or buf.size != need:
        raise KernelError(f"moe_ffn_q8k: {buf.size} activation bytes for T={T}, expected {need}")
    return _moe_call(lib.lq_moe_ffn64_q8k, "moe_ffn_q8k", table, _ptr(buf), T, False, ids, weights, out,
                     out64)


def _moe_call(fn, name: str, table: ExpertTable, x_c, T: int, vec: bool, ids, weights, out,
              out64) -> np.ndarray:
    """The checks shared by moe_ffn and moe_ffn_q8k, then the C call fn(..., x_c, ...)."""
    ids = np.asarray(ids)
    weights = np.asarray(weights)
    if vec and ids.ndim == 1:
        ids, weights = ids[None, :], weights[None, :]
    if ids.ndim != 2 or ids.shape[0] != T or weights.shape != ids.shape:
        raise KernelError(f"{name}: ids {ids.shape} and weights {weights.shape} must both be [T={T}, K]")
    if not np.issubdtype(ids.dtype, np.integer):
        raise KernelError(f"{name}: ids must be integers, got {ids.dtype}")
    if ids.dtype != np.int32 and ids.size and ids.max() >= table.n_experts:
        _raise_bad_ids(table, ids)  # before the cast to int32 could wrap a huge id into range
    ids32 = np.ascontiguousarray(ids, dtype=np.int32)
    w32 = np.ascontiguousarray(weights, dtype=np.float32)
    shape = (table.hidden,) if vec else (T, table.hidden)
    y = _out(out, shape, name)
    if out64 is None:
        y64 = ffi.NULL
    elif (out64.shape != shape or out64.dtype != np.float64 or not out64.flags.c_contiguous
          or not out64.flags.writeable):
        raise KernelError(f"{name}: out64 must be a writable contiguous f64 array of shape {shape}")
    else:
        y64 = _ptr(out64, "double *")
    rc = fn(table._c, table.n_experts, table.hidden, table.inter, x_c, T, ids32.shape[1],
            _ptr(ids32, "int32_t *"), _ptr(w32, "float *"), _ptr(y, "float *"), y64)
    if rc == lib.LQ_E_EXPERT:  # the C side checks every id; name the bad one only when it fails
        _raise_bad_ids(table, ids32)
    if rc == lib.LQ_E_FORMAT and fn is lib.lq_moe_ffn64_q8k:
        raise KernelError(f"{name}: Q8_K activations need K-quant gate_up weights; an expert named "
                          "has a float gate_up (use moe_ffn with f32 activations)")
    _check(rc, name)
    return y


def _raise_bad_ids(table: ExpertTable, ids: np.ndarray) -> None:
    used = ids[ids >= 0]
    bad = used[used >= table.n_experts]
    if bad.size:
        raise KernelError(f"moe_ffn: expert id {int(bad[0])} out of range (table has {table.n_experts})")
    absent = used[~table.held[used]]
    raise KernelError(f"moe_ffn: expert {int(absent[0]) if absent.size else '?'} is not held by this table")


def set_num_threads(n: int) -> None:
    """Resize the C thread pool (0 = all online cores)."""
    if n < 0:
        raise KernelError(f"set_num_threads: {n} threads")
    _check(lib.lq_set_num_threads(int(n)), "set_num_threads")


def num_threads() -> int:
    return int(lib.lq_get_num_threads())


def isa() -> str:
    return ffi.string(lib.lq_isa()).decode()


def available_isas() -> list[str]:
    return ffi.string(lib.lq_available_isas()).decode().split()


def force_isa(name: str | None) -> None:
    """Use the named kernel table ("scalar", "avx2", "neon"...); None restores the best."""
    if name is None:
        _check(lib.lq_force_isa(ffi.NULL), "force_isa")
        return
    if lib.lq_force_isa(name.encode()) != lib.LQ_OK:
        raise KernelError(f"force_isa: {name!r} is not available here (have: {' '.join(available_isas())})")


# --------------------------------------------------------------------------------------------
# Vector glue of a decoder layer (csrc/vecops.c): one C call per step instead of several numpy
# passes. All f32, on the calling thread; the formulas are the model's (larql/models/gemma4.py).


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _fbuf(a: np.ndarray):
    return _ptr(a, "float *")


def _weight(w: np.ndarray | None, n: int, name: str):
    if w is None:
        return ffi.NULL, None
    w = _f32(w)
    if w.shape != (n,):
        raise KernelError(f"{name}: weight has shape {w.shape}, expected ({n},)")
    return _fbuf(w), w


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float,
             out: np.ndarray | None = None) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (weight None: no weight)."""
    x = _f32(x)
    n = x.shape[-1] if x.ndim else 0
    if n < 1:
        raise KernelError(f"rms_norm: x has shape {x.shape}, needs a non-empty last axis")
    y = _out(out, x.shape, "rms_norm")
    wp, _keep = _weight(weight, n, "rms_norm")
    _check(lib.lq_rms_norm(_fbuf(x), wp, float(eps), x.size // n, n, _fbuf(y)), "rms_norm")
    return y


def rms_norm_q8k(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """quantize_q8k(rms_norm(x, weight, eps)) in one C call, the same bytes: f32 [T, n] ->
    uint8 [T, ceil(n/256)*292] (a client's q8k input)."""
    x = _f32_2d(x, "rms_norm_q8k")
    n = x.shape[1]
    if n < 1:
        raise KernelError(f"rms_norm_q8k: x has shape {x.shape}, needs a non-empty last axis")
    y = np.empty((x.shape[0], row_bytes(Q8_K, (n + 255) // 256 * 256)), dtype=np.uint8)
    wp, _keep = _weight(weight, n, "rms_norm_q8k")
    _check(lib.lq_rms_norm_q8k(_fbuf(x), wp, float(eps), x.shape[0], n, _ptr(y)), "rms_norm_q8k")
    return y


def norm_rope(x: np.ndarray, weight: np.ndarray | None, eps: float, cos: np.ndarray,
              sin: np.ndarray) -> np.ndarray:
    """RMSNorm each head of x [T, heads, d], then rotate-half RoPE (cos, sin [T, d/2]); a new array."""
    x = np.array(x, dtype=np.float32, order="C")  # a copy: the kernel works in place
    if x.ndim != 3 or x.shape[2] % 2:
        raise KernelError(f"norm_rope: x must be [T, heads, even d], got shape {x.shape}")
    T, heads, d = x.shape
    cos, sin = _f32(cos), _f32(sin)
    if cos.shape != (T, d // 2) or sin.shape != (T, d // 2):
        raise KernelError(f"norm_rope: cos/sin have shapes {cos.shape}/{sin.shape}, expected ({T}, {d // 2})")
    wp, _keep = _weight(weight, d, "norm_rope")
    if x.size:
        _check(lib.lq_norm_rope(_fbuf(x), wp, float(eps), T, heads, d, _fbuf(cos), _fbuf(sin)), "norm_rope")
    return x


def gelu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu_tanh(gate) * up, elementwise."""
    gate, up = _f32(gate), _f32(up)
    if gate.shape != up.shape:
        raise KernelError(f"gelu_mul: gate {gate.shape} and up {up.shape} differ")
    y = np.empty_like(gate)
    if y.size:
        _check(lib.lq_gelu_mul(_fbuf(gate), _fbuf(up), gate.size, _fbuf(y)), "gelu_mul")
    return y


def add_rms_norm(h: np.ndarray, a: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """h + rms_norm(a, weight) over the last axis; a new array."""
    h = np.array(h, dtype=np.float32, order="C")
    a = _f32(a)
    if h.shape != a.shape or h.ndim < 1 or h.shape[-1] < 1:
        raise KernelError(f"add_rms_norm: h {h.shape} and a {a.shape} must match (non-empty rows)")
    n = h.shape[-1]
    wp, _keep = _weight(weight, n, "add_rms_norm")
    _check(lib.lq_add_rms_norm(_fbuf(h), _fbuf(a), wp, float(eps), h.size // n, n), "add_rms_norm")
    return h


def ffn_combine(h: np.ndarray, m1: np.ndarray, m2: np.ndarray, w1: np.ndarray, w2: np.ndarray,
                w: np.ndarray, eps: float, scalar: float) -> np.ndarray:
    """(h + rms_norm(rms_norm(m1, w1) + rms_norm(m2, w2), w)) * scalar over the last axis."""
    h, m1, m2 = _f32(h), _f32(m1), _f32(m2)
    if not (h.shape == m1.shape == m2.shape) or h.ndim < 1 or h.shape[-1] < 1:
        raise KernelError(f"ffn_combine: h {h.shape}, m1 {m1.shape}, m2 {m2.shape} must match")
    n = h.shape[-1]
    (p1, k1), (p2, k2), (p, k) = (_weight(v, n, "ffn_combine") for v in (w1, w2, w))
    y = np.empty_like(h)
    _check(lib.lq_ffn_combine(_fbuf(h), _fbuf(m1), _fbuf(m2), p1, p2, p, float(eps), float(scalar),
                              h.size // n, n, _fbuf(y)), "ffn_combine")
    return y


def route_topk(logits: np.ndarray, k: int, per_expert_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of router logits [T, E] (descending), softmax over them, times per_expert_scale[id].

    Returns (ids int32 [T, k], weights f32 [T, k])."""
    logits = _f32_2d(logits, "route_topk")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise KernelError(f"route_topk: k = {k} outside 1..{E}")
    scale, _keep = _weight(per_expert_scale, E, "route_topk")
    ids = np.empty((T, k), dtype=np.int32)
    w = np.empty((T, k), dtype=np.float32)
    if T:
        _check(lib.lq_route_topk(_fbuf(logits), T, E, k, scale, _ptr(ids, "int32_t *"),
                                 _fbuf(w)), "route_topk")
    return ids, w


def attend_one(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, n: int, q_pos: int,
               window: int | None) -> np.ndarray:
    """One query position's attention (scale 1.0) over slots [0, n) of a KV cache.

    q [heads, d]; k, v [kv_heads, slots, d] contiguous f32; pos int64 [>= n] (-1 = empty slot).
    A slot is visible when 0 <= q_pos - pos (< window if given). Returns [heads * d]."""
    q = _f32(q)
    if q.ndim != 2 or k.ndim != 3 or k.shape != v.shape or k.shape[2] != q.shape[1]:
        raise KernelError(f"attend_one: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    for name, a in (("k", k), ("v", v)):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise KernelError(f"attend_one: {name} must be a contiguous f32 array")
    if pos.dtype != np.int64 or not pos.flags.c_contiguous or not 0 <= n <= min(len(pos), k.shape[1]):
        raise KernelError(f"attend_one: pos must be contiguous int64 with at least n = {n} entries")
    heads, d = q.shape
    kvh, slots, _ = k.shape
    out = np.empty(heads * d, dtype=np.float32)
    _check(lib.lq_attend_one(_fbuf(q), heads, d, _fbuf(k), _fbuf(v), kvh, slots,
                             _ptr(pos, "int64_t *"), n, int(q_pos), int(window or 0),
                             _fbuf(out)), "attend_one")
    return out


# --------------------------------------------------------------------------------------------
# Benchmark hooks (csrc/larql_bench.h, not the public API): calls with their cffi pointers made
# once, so a timing loop measures the kernel and not the argument checks, and the plain C read
# loop that is the bandwidth anchor. Only larql.benchmarks and bench/ use these.

READ_ALIGN = 64  # lq_bench_read wants 32-byte aligned buffers; a cache line is simplest


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A uint8 array of nbytes (rounded up to 256) starting on a cache line, every byte written.

    Written, not np.zeros: untouched calloc pages all map the kernel's one zero page, which a
    read loop would then stream from cache."""
    n = -(-int(nbytes) // 256) * 256
    raw = np.empty(n + READ_ALIGN, dtype=np.uint8)
    raw.fill(0x5A)
    off = (-raw.ctypes.data) % READ_ALIGN
    return raw[off:off + n]


def bench_read(buf: np.ndarray, parallel: bool) -> Callable[[], None]:
    """A call that reads all of buf (from aligned_buffer) with the C streaming loop, on the calling
    thread or spread over the pool in 1 MiB chunks."""
    if buf.dtype != np.uint8 or buf.ndim != 1 or buf.ctypes.data % 32 or buf.size % 256:
        raise KernelError("bench_read: buf must come from aligned_buffer()")
    p, n, par = _ptr(buf), buf.size, int(bool(parallel))
    sink = ffi.new("uint64_t *")

    def call() -> None:
        _check(lib.lq_bench_read(p, n, par, sink), "bench_read")

    return call


def bench_matmul_q8k(w: QMatrix, xq: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    """A prepared matmul_q8k(w, xq) into y (f32 [T, w.rows], T from y); the checks run once here."""
    if w.fmt not in (Q4_K, Q6_K) or y.dtype != np.float32 or not y.flags.c_contiguous:
        raise KernelError("bench_matmul_q8k: K-quant weights and a contiguous f32 y")
    T = y.size // max(1, w.rows)
    buf = _as_bytes(xq, "bench_matmul_q8k")
    if y.size != T * w.rows or buf.size != T * row_bytes(Q8_K, w.cols):
        raise KernelError(f"bench_matmul_q8k: {buf.size} activation bytes and {y.size} outputs do not fit")
    args = (w.fmt, _ptr(w.data), w.rows, w.cols, _ptr(buf), T, _ptr(y, "float *"))
    keep = (w, buf, y)

    def call() -> None:
        assert keep
        _check(lib.lq_matmul_q8k(*args), "bench_matmul_q8k")

    return call


def bench_vec_dot(fn_address: int, w: QMatrix, xq: np.ndarray, y: np.ndarray,
                  parallel: bool) -> Callable[[], None]:
    """A call running a foreign ggml-style vec_dot (its address) over every row of w against the
    activation bytes xq (in that library's own Q8_K), into y [w.rows]: timed from C, row by row."""
    if y.dtype != np.float32 or y.size != w.rows or not fn_address:
        raise KernelError("bench_vec_dot: y must be f32 [w.rows] and the function address non-zero")
    buf = _as_bytes(xq, "bench_vec_dot")
    args = (ffi.cast("void *", int(fn_address)), w.cols, _ptr(w.data), row_bytes(w.fmt, w.cols), w.rows,
            _ptr(buf), _ptr(y, "float *"), int(bool(parallel)))
    keep = (w, buf, y)

    def call() -> None:
        assert keep
        _check(lib.lq_bench_vec_dot(*args), "bench_vec_dot")

    return call


def bench_moe_ffn(table: ExpertTable, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                  out: np.ndarray) -> Callable[[], None]:
    """A prepared moe_ffn(table, x, ids, weights, out=out): ids int32 [T, K], x/out f32 [T, hidden]."""
    T = x.shape[0]
    expect = (("x", x, np.float32, (T, table.hidden)), ("out", out, np.float32, (T, table.hidden)),
              ("ids", ids, np.int32, ids.shape), ("weights", weights, np.float32, ids.shape))
    for name, a, dt, shape in expect:
        if a.dtype != dt or a.shape != shape or not a.flags.c_contiguous:
            raise KernelError(f"bench_moe_ffn: {name} must be contiguous {np.dtype(dt).name} {shape}")
    if ids.ndim != 2 or ids.shape[0] != T or (ids.size and ids.max() >= table.n_experts):
        raise KernelError(f"bench_moe_ffn: ids {ids.shape} must be [T={T}, K] below {table.n_experts}")
    args = (table._c, table.n_experts, table.hidden, table.inter, _ptr(x, "float *"), T, ids.shape[1],
            _ptr(ids, "int32_t *"), _ptr(weights, "float *"), _ptr(out, "float *"))
    keep = (table, x, ids, weights, out)

    def call() -> None:
        assert keep
        _check(lib.lq_moe_ffn(*args), "bench_moe_ffn")

    return call
