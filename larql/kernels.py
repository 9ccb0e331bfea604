"""The only Python module that touches cffi: numpy arrays and buffers in, numpy arrays out.

CONTRACT (filled in by the kernel work; signatures are fixed, other modules code against them).
All functions raise KernelError (a ValueError) with a message naming the bad argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

F32, F16, BF16, Q4_K, Q6_K, Q8_K = 0, 1, 2, 4, 5, 100
FORMAT_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", Q4_K: "Q4_K", Q6_K: "Q6_K", Q8_K: "Q8_K"}


class KernelError(ValueError):
    """A kernel call was given a bad format, shape or expert id."""


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


def row_bytes(fmt: int, cols: int) -> int: ...
def block_size(fmt: int) -> int: ...  # 256 for K-quants, 1 for float formats
def padded_cols(fmt: int, cols: int) -> int: ...  # cols rounded up to block_size(fmt)
def quantize(x: np.ndarray, fmt: int) -> np.ndarray: ...  # f32 [rows, cols] -> uint8 [rows*row_bytes]; pads cols with zeros
def dequantize(data, fmt: int, rows: int, cols: int) -> np.ndarray: ...  # -> f32 [rows, cols]
def quantize_q8k(x: np.ndarray) -> np.ndarray: ...  # f32 [T, n] -> uint8 [T, n/256*292] (n padded to 256)
def as_qmatrix(x: np.ndarray, fmt: int) -> QMatrix: ...  # quantise an f32 matrix into a QMatrix
def matmul(w: QMatrix, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...
    # x: f32 [k] -> [rows], or [T, k] -> [T, rows]; k <= w.cols
def matmul_q8k(w: QMatrix, xq: np.ndarray, T: int) -> np.ndarray: ...


class ExpertTable:
    """The experts of one layer as the C kernel sees them: pointers into mmapped (or numpy) bytes.

    experts[e] is None (not held by this process) or (buffer, gate_up_offset, gate_up_fmt,
    down_offset, down_fmt); the buffer is anything exposing the buffer protocol and is kept alive.
    """

    def __init__(self, hidden: int, inter: int, experts: Sequence[tuple | None]) -> None: ...


def moe_ffn(table: ExpertTable, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
            out: np.ndarray | None = None) -> np.ndarray: ...
    # x: f32 [T, hidden] (normed), ids int32 [T, K] (-1 = skip), weights f32 [T, K] -> f32 [T, hidden]


def set_num_threads(n: int) -> None: ...
def num_threads() -> int: ...
def isa() -> str: ...
def available_isas() -> list[str]: ...
def force_isa(name: str | None) -> None: ...  # None restores the best; KernelError if unavailable
