"""`larql bench kernels`: kernel throughput at Gemma 4 26B A4B shapes, as ratios measured in one run.

Prints the machine's read bandwidth (numpy sum over ~2 GiB, best of 3, one thread and all threads),
then for each kernel its time, GB/s of weight bytes streamed, and the ratios
  x bw     kernel GB/s / measured read bandwidth (same thread count): how close to the memory limit,
  x sum    numpy-sum time / ours for as many cold bytes (one thread or split over the threads,
           whichever is faster), timed call by call between the kernel's calls: the same ratio,
           robust to a shared machine's changing load,
  x numpy  numpy time / ours, numpy = larql's dequantiser then a numpy matmul on the f32 weights,
  x ggml   ggml time / ours for ggml_vec_dot_q4_K_q8_K / _q6_K_ on the same bytes (when llama-cpp-python
           is installed; see docs/KERNELS.md), driven row by row from C so Python costs nothing.
Weights are cycled through more memory than the last-level cache holds (64 experts = 210 MiB by
default), so every call streams its weights from DRAM as a server's would.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from larql import kernels as K
from larql._kernels import ffi, lib

HIDDEN, INTER, TOP_K = 2816, 704, 8
GGML_TYPE_Q4_K, GGML_TYPE_Q6_K = 12, 14


# ---- bandwidth ----------------------------------------------------------------------------

def read_bandwidth(gib: float = 2.0, threads: int = 1, repeat: int = 3) -> float:
    """Bytes/s of numpy summing `gib` GiB of f32 (best of `repeat`), split over `threads` threads."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        if threads == 1:
            a.sum()
        else:  # numpy releases the GIL inside the reduction
            ts = [threading.Thread(target=p.sum) for p in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


# ---- cold expert bank ---------------------------------------------------------------------

@dataclass
class ExpertBank:
    """n experts of Gemma 4 26B A4B shape laid out like an LYRW file: gate_up then down, per expert."""

    buf: np.ndarray
    n: int
    gate_up_bytes: int
    down_bytes: int
    fmt: int
    down_fmt: int
    gate_up_f32: np.ndarray  # the f32 weights the first expert was quantised from
    down_f32: np.ndarray

    @property
    def expert_bytes(self) -> int:
        return self.gate_up_bytes + self.down_bytes

    def gate_up(self, e: int) -> K.QMatrix:
        off = e * self.expert_bytes
        return K.QMatrix(self.fmt, 2 * INTER, HIDDEN, self.buf[off:off + self.gate_up_bytes])

    def down(self, e: int) -> K.QMatrix:
        off = e * self.expert_bytes + self.gate_up_bytes
        cols = K.padded_cols(self.down_fmt, INTER)
        return K.QMatrix(self.down_fmt, HIDDEN, cols, self.buf[off:off + self.down_bytes], INTER)

    def table(self) -> K.ExpertTable:
        return K.ExpertTable(HIDDEN, INTER, [
            (self.buf, e * self.expert_bytes, self.fmt, e * self.expert_bytes + self.gate_up_bytes,
             self.down_fmt)
            for e in range(self.n)
        ])


def make_bank(n_experts: int = 64, fmt: int = K.Q4_K, down_fmt: int = K.Q4_K, seed: int = 0) -> ExpertBank:
    """Quantise one random expert and copy its bytes n times (distinct addresses are what matter)."""
    rng = np.random.default_rng(seed)
    gu = (rng.standard_normal((2 * INTER, HIDDEN)) * 0.02).astype(np.float32)
    dn = (rng.standard_normal((HIDDEN, INTER)) * 0.02).astype(np.float32)
    qg, qd = K.quantize(gu, fmt), K.quantize(dn, down_fmt)
    one = np.concatenate([qg, qd])
    buf = np.tile(one, n_experts)
    return ExpertBank(buf, n_experts, qg.size, qd.size, fmt, down_fmt, gu, dn)


# ---- ggml, optional ---------------------------------------------------------------------------

class Ggml:
    """ggml's CPU dot kernels from llama-cpp-python's shared libraries, if installed."""

    def __init__(self, libs: list[ctypes.CDLL]) -> None:
        def find(name: str):
            for lb in libs:
                try:
                    return getattr(lb, name)
                except AttributeError:
                    continue
            raise AttributeError(name)

        init = None
        try:
            init = find("ggml_cpu_init")
        except AttributeError:
            pass
        if init is not None:
            init()
        self.quantize_row_q8_K = find("quantize_row_q8_K")
        self.quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self.quantize_row_q8_K.restype = None
        self.dot = {
            K.Q4_K: ctypes.cast(find("ggml_vec_dot_q4_K_q8_K"), ctypes.c_void_p).value,
            K.Q6_K: ctypes.cast(find("ggml_vec_dot_q6_K_q8_K"), ctypes.c_void_p).value,
        }

    def quantize_q8k(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros(x.size // 256 * 292, dtype=np.uint8)
        self.quantize_row_q8_K(x.ctypes.data, out.ctypes.data, x.size)
        return out


def load_ggml(libdir: str | Path | None = None) -> Ggml | None:
    """ggml's CPU library from `libdir`, else from llama_cpp/lib/ (found without importing
    llama_cpp and its dependencies). None if neither has it."""
    if libdir is None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            return None
        libdir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    libdir = Path(libdir)
    paths = sorted(libdir.glob("libggml*.so*"), key=lambda p: (p.name != "libggml-base.so", p.name))
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


# ---- timing -------------------------------------------------------------------------------

def median_time(fn: Callable[[int], object], repeat: int, warmup: int = 3) -> float:
    """Median seconds of fn(i) over `repeat` calls (i counts up so callers can cycle their inputs)."""
    return median_times([fn], repeat, warmup)[0]


def median_times(fns: list[Callable[[int], object]], repeat: int, warmup: int = 3) -> list[float]:
    """Median seconds of each fn(i), the functions called in turn so that a shared machine's load
    drifting over time affects each alike. The order rotates every round, so each function is
    equally often the one that follows a pause (and wakes the thread pool's sleeping workers)."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    times: list[list[int]] = [[] for _ in fns]
    for i in range(warmup, warmup + repeat):
        for k in range(len(fns)):
            j = (k + i) % len(fns)
            t0 = time.perf_counter_ns()
            fns[j](i)
            times[j].append(time.perf_counter_ns() - t0)
    return [statistics.median(ts) * 1e-9 for ts in times]


@dataclass
class Result:
    name: str
    seconds: float
    nbytes: int
    bandwidth: float
    numpy_seconds: float | None = None
    ggml_seconds: float | None = None
    sum_seconds: float | None = None

    def row(self) -> str:
        gbs = self.nbytes / self.seconds / 1e9
        cells = [f"{self.name:<44}", f"{self.seconds * 1e6:9.1f} us", f"{gbs:7.2f}",
                 f"{gbs * 1e9 / self.bandwidth:7.2f}"]
        cells.append(f"{self.sum_seconds / self.seconds:7.2f}" if self.sum_seconds else f"{'-':>7}")
        cells.append(f"{self.numpy_seconds / self.seconds:8.2f}" if self.numpy_seconds else f"{'-':>8}")
        cells.append(f"{self.ggml_seconds / self.seconds:7.2f}" if self.ggml_seconds else f"{'-':>7}")
        return "  ".join(cells)


HEADER = (f"{'kernel':<44}  {'time':>12}  {'GB/s':>7}  {'x bw':>7}  {'x sum':>7}  {'x numpy':>8}  "
          f"{'x ggml':>7}")


def _quiet_sum(a: np.ndarray) -> float:
    with np.errstate(all="ignore"):  # the bytes are quantised weights, not meaningful floats
        return float(a.sum())


class ColdSum:
    """numpy summing as many cold bytes of the bank as a kernel call reads: timed call by call
    between the kernel's calls, it is a read-bandwidth baseline that sees the same moment-to-moment
    load as the kernel on a shared machine (the `x sum` column). With threads > 1 both one thread
    and a split over the threads are timed and the faster counts."""

    def __init__(self, bank: ExpertBank, threads: int) -> None:
        self.f32 = bank.buf[: bank.buf.size // 4 * 4].view(np.float32)
        self.bank = bank
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def _region(self, start_expert: int, nbytes: int) -> np.ndarray:
        n = nbytes // 4
        start = (start_expert % self.bank.n) * self.bank.expert_bytes // 4
        return self.f32[0 if start + n > self.f32.size else start:][:n]

    def fns(self, start: Callable[[int], int], nbytes: Callable[[int], int]) -> list[Callable[[int], object]]:
        """The timed functions of call i: summing nbytes(i) bytes from expert start(i)."""
        def one(i: int) -> None:
            _quiet_sum(self._region(start(i), nbytes(i)))

        def split(i: int) -> None:  # numpy releases the GIL inside the reduction
            list(self.pool.map(_quiet_sum, np.array_split(self._region(start(i), nbytes(i)), self.threads)))

        return [one] if self.pool is None else [one, split]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# ---- the cases ------------------------------------------------------------------------------

def matvec_case(bank: ExpertBank, which: str, threads: int, bandwidth: float, repeat: int,
                ggml: Ggml | None, with_numpy: bool) -> Result:
    mats = [bank.gate_up(e) if which == "gate_up" else bank.down(e) for e in range(bank.n)]
    m0 = mats[0]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(m0.cols).astype(np.float32)
    xq = K.quantize_q8k(x)
    y = np.empty(m0.rows, np.float32)
    base = ffi.from_buffer(bank.buf)
    ptrs = [ffi.cast("uint8_t *", base) + (m.data.ctypes.data - bank.buf.ctypes.data) for m in mats]
    xq_p, y_p = ffi.cast("void *", xq.ctypes.data), ffi.cast("float *", y.ctypes.data)
    stride = 7  # hop between experts so consecutive calls never touch neighbouring bytes

    def ours(i: int) -> None:
        lib.lq_matmul_q8k(m0.fmt, ptrs[(i * stride) % bank.n], m0.rows, m0.cols, xq_p, 1, y_p)

    cold_sum = ColdSum(bank, threads)  # a quarter of the bank away from ours
    sums = cold_sum.fns(lambda i: i * stride + bank.n // 4, lambda i: m0.data.size)

    K.set_num_threads(threads)
    try:
        name = f"{K.FORMAT_NAMES[m0.fmt]} {m0.rows}x{m0.cols} matvec ({which}), {threads} thr"
        if ggml is None:
            t, *t_sums = median_times([ours, *sums], repeat)
            res = Result(name, t, m0.data.size, bandwidth, sum_seconds=min(t_sums))
        else:
            gq = ggml.quantize_q8k(x)
            gq_p = ffi.cast("void *", gq.ctypes.data)
            fn = ffi.cast("void *", ggml.dot[m0.fmt])
            rb = K.row_bytes(m0.fmt, m0.cols)

            def theirs(i: int) -> None:  # half the bank away from ours: cold as well
                w_p = ptrs[(i * stride + bank.n // 2) % bank.n]
                lib.lq_bench_vec_dot(fn, m0.cols, w_p, rb, m0.rows, gq_p, y_p, threads > 1)

            # ours against ggml, then ours against the numpy sums: two separate alternations, so
            # that the sums' Python threads do not disturb the kernel-to-kernel comparison
            t, t_ggml = median_times([ours, theirs], repeat)
            t2, *t_sums = median_times([ours, *sums], repeat)
            res = Result(name, t, m0.data.size, bandwidth, ggml_seconds=t_ggml,
                         sum_seconds=min(t_sums) * t / t2)
            # sanity: both kernels compute the same product
            lib.lq_matmul_q8k(m0.fmt, ptrs[0], m0.rows, m0.cols, xq_p, 1, y_p)
            ref = y.copy()
            theirs(0)
            if not np.allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max()):
                print(f"  warning: ggml and larql disagree on {res.name}")
        if with_numpy:
            def baseline(i: int) -> None:
                m = mats[(i * stride) % bank.n]
                w = K.dequantize(m.data, m.fmt, m.rows, m.cols)
                w @ x

            res.numpy_seconds = median_time(baseline, max(3, repeat // 5), warmup=1)
    finally:
        K.set_num_threads(0)
        cold_sum.close()
    return res


def moe_case(bank: ExpertBank, T: int, threads: int, bandwidth: float, repeat: int,
             with_numpy: bool) -> Result:
    table = bank.table()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, HIDDEN)).astype(np.float32)
    w = rng.random((T, TOP_K)).astype(np.float32)
    out = np.empty((T, HIDDEN), np.float32)
    # call i takes its experts from a window that slides over the whole bank, so an expert comes
    # round again only after the whole bank (210 MiB for 64 experts) has been streamed
    calls = []
    span = TOP_K if T == 1 else 3 * TOP_K  # a batch of tokens draws its experts from a wider window
    for i in range(bank.n):
        window = (np.arange(span) + i * span) % bank.n
        ids = np.stack([rng.choice(window, TOP_K, replace=False) for _ in range(T)]).astype(np.int32)
        calls.append((ids, len(np.unique(ids)) * bank.expert_bytes))
    ptrs = [(ffi.cast("int32_t *", ids.ctypes.data), n) for ids, n in calls]
    x_p, w_p, o_p = (ffi.cast("float *", a.ctypes.data) for a in (x, w, out))

    def ours(i: int) -> None:
        ids_p, _ = ptrs[i % len(ptrs)]
        rc = lib.lq_moe_ffn(table._c, table.n_experts, HIDDEN, INTER, x_p, T, TOP_K, ids_p, w_p, o_p)
        assert rc == 0

    cold_sum = ColdSum(bank, threads)  # the same number of bytes, half the bank away from ours
    sums = cold_sum.fns(lambda i: i * span + bank.n // 2, lambda i: calls[i % len(calls)][1])

    K.set_num_threads(threads)
    try:
        t, *t_sums = median_times([ours, *sums], repeat)
        nbytes = int(statistics.mean(n for _, n in calls))
        res = Result(f"top-{TOP_K} expert FFN, T={T}, {K.FORMAT_NAMES[bank.fmt]}, {threads} thr", t, nbytes,
                     bandwidth, sum_seconds=min(t_sums))
        if with_numpy:
            def baseline(i: int) -> None:
                ids, _ = calls[i % len(calls)]
                y = np.zeros((T, HIDDEN), np.float32)
                for e in np.unique(ids):
                    gu, dn = bank.gate_up(int(e)), bank.down(int(e))
                    g = K.dequantize(gu.data, gu.fmt, gu.rows, gu.cols)
                    d = K.dequantize(dn.data, dn.fmt, dn.rows, dn.cols)[:, :INTER]
                    tok, slot = np.nonzero(ids == e)
                    h = x[tok] @ g.T
                    a = h[:, :INTER]
                    a = 0.5 * a * (1 + np.tanh(0.7978845608 * (a + 0.044715 * a**3))) * h[:, INTER:]
                    y[tok] += w[tok, slot][:, None] * (a @ d.T)

            res.numpy_seconds = median_time(baseline, max(3, repeat // 10), warmup=1)
    finally:
        K.set_num_threads(0)
        cold_sum.close()
    return res


def quantize_rate(fmt: int, threads: int, rows: int = 1024, cols: int = 4096) -> float:
    """Weights per second quantised from f32 (best of 3)."""
    x = np.random.default_rng(3).standard_normal((rows, cols)).astype(np.float32)
    K.set_num_threads(threads)
    try:
        best = min(_timed(lambda: K.quantize(x, fmt)) for _ in range(3))
    finally:
        K.set_num_threads(0)
    return x.size / best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- CLI ------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="threads for the multi-threaded rows (0 = all cores)")
    p.add_argument("--experts", type=int, default=64,
                   help="distinct experts to cycle through (64 = 210 MiB of Q4_K, well past a 32 MiB L3)")
    p.add_argument("--bandwidth-gib", type=float, default=2.0,
                   help="array size for the read-bandwidth baseline")
    p.add_argument("--repeat", type=int, default=40, help="timed calls per kernel (the median is printed)")
    p.add_argument("--no-numpy", action="store_true", help="skip the (slow) numpy baseline")
    p.add_argument("--no-ggml", action="store_true", help="skip ggml even if llama-cpp-python is installed")
    p.add_argument("--ggml-lib", metavar="DIR",
                   help="directory holding libggml-cpu.so (default: llama-cpp-python's llama_cpp/lib)")


def main(args: argparse.Namespace) -> int:
    n_all = args.threads or K.num_threads()
    print(f"larql kernels: isa={K.isa()} (available: {' '.join(K.available_isas())}), threads={n_all}")
    bw1 = read_bandwidth(args.bandwidth_gib, 1)
    bw_all = read_bandwidth(args.bandwidth_gib, n_all) if n_all > 1 else bw1
    print(f"read bandwidth (numpy sum over {args.bandwidth_gib:g} GiB, best of 3): "
          f"{bw1 / 1e9:.1f} GB/s on 1 thread, {bw_all / 1e9:.1f} GB/s on {n_all}")
    ggml = None if args.no_ggml else load_ggml(args.ggml_lib)
    print("ggml: " + ("llama-cpp-python's libggml found" if ggml else
                      "not installed (pip install llama-cpp-python; see docs/KERNELS.md), ratio skipped"))
    numpy_on = not args.no_numpy
    print(f"building {args.experts} experts per format (cycled, so weights come from DRAM) ...", flush=True)
    q4 = make_bank(args.experts, K.Q4_K, K.Q4_K)
    print()
    print(HEADER)
    for threads, bw in ((1, bw1), (n_all, bw_all)):
        for which in ("gate_up", "down"):
            print(matvec_case(q4, which, threads, bw, args.repeat, ggml, numpy_on).row(), flush=True)
    for T in (1, 8):
        print(moe_case(q4, T, n_all, bw_all, args.repeat, numpy_on).row(), flush=True)
    del q4
    q6 = make_bank(args.experts, K.Q6_K, K.Q6_K, seed=1)
    print(matvec_case(q6, "down", n_all, bw_all, args.repeat, ggml, numpy_on).row(), flush=True)
    print(moe_case(q6, 1, n_all, bw_all, args.repeat, numpy_on).row(), flush=True)
    del q6
    print()
    for fmt in (K.Q4_K, K.Q6_K):
        rate = quantize_rate(fmt, n_all)
        print(f"quantise f32 -> {K.FORMAT_NAMES[fmt]} on {n_all} threads: {rate / 1e6:.1f} M weights/s")
    return 0
