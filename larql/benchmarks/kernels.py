"""`larql bench kernels`: kernel throughput at Gemma 4 26B A4B shapes, as ratios measured in one run.

The anchor is the machine's read bandwidth measured with a plain C streaming-load loop
(csrc/bench.c: the widest loads the CPU has, several independent accumulators) over a buffer
several times the last-level cache the OS reports, on one thread and on all threads. Then, for
each kernel, its time, GB/s of weight bytes streamed, and the ratios
  x bw     kernel GB/s / the C read bandwidth (same thread count): the share of the memory limit,
  x read   C-read time / ours for as many cold bytes of the same bank, timed call by call between
           the kernel's calls: the same ratio, robust to a shared machine's changing load,
  x npsum  kernel GB/s / a numpy float32 sum's read rate (secondary: numpy reads well below the
           limit on some machines, so this flatters the kernels),
  x numpy  numpy time / ours, numpy = larql's dequantiser then a numpy matmul on the f32 weights,
  x ggml   ggml time / ours for ggml_vec_dot_q4_K_q8_K / _q6_K_ on the same bytes (when
           llama-cpp-python is installed; see docs/KERNELS.md), driven row by row from C.
The weight bank (one quantised expert copied to distinct addresses) is sized past the
last-level cache the same way, so every call streams its weights from DRAM as a server's would.
Last, the T=8 expert FFN's speed-up from 1 thread to all, beside the C read's: a memory-bound
call speeds up as the read does, a compute-bound one as the cores do.
`--json` prints every figure as one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from larql import kernels as K

from .ggml_ref import Ggml, load_ggml

HIDDEN, INTER, TOP_K = 2816, 704, 8
CACHE_MULTIPLE = 4  # buffers and banks are at least this many times the last-level cache
MIN_COLD_BYTES = 256 << 20


# ---- the machine ----------------------------------------------------------------------------

def last_level_cache_bytes() -> int:
    """The largest data/unified cache of cpu0 as the OS reports it (sysfs, then sysconf), else 32 MiB."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        mult = units.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in units else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    if not best:
        for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
            try:
                best = max(best, os.sysconf(name))
            except (ValueError, OSError):
                pass
    return best or 32 << 20


def cold_bytes(llc: int) -> int:
    """Bytes a buffer needs to be cold: several times the last-level cache."""
    return max(CACHE_MULTIPLE * llc, MIN_COLD_BYTES)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def c_read_bandwidth(nbytes: int, threads: int, repeat: int = 3, buf: np.ndarray | None = None) -> float:
    """Bytes/s of the C streaming read loop over nbytes (best of `repeat`) on `threads` threads."""
    buf = K.aligned_buffer(nbytes) if buf is None else buf
    K.set_num_threads(threads)
    try:
        read = K.bench_read(buf, parallel=threads > 1)
        read()  # warm: page tables, pool wake-up
        best = min(_timed(read) for _ in range(repeat))
    finally:
        K.set_num_threads(0)
    return buf.size / best


def numpy_sum_bandwidth(buf: np.ndarray, threads: int, repeat: int = 3) -> float:
    """Bytes/s of numpy summing buf as float32 (best of `repeat`), split over `threads` threads."""
    a = buf[: buf.size // 4 * 4].view(np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        if threads == 1:
            _quiet_sum(a)
        else:  # numpy releases the GIL inside the reduction
            ts = [threading.Thread(target=_quiet_sum, args=(p,)) for p in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def _quiet_sum(a: np.ndarray) -> float:
    with np.errstate(all="ignore"):  # the bytes are not meaningful floats
        return float(a.sum())


@dataclass
class Bandwidth:
    """The anchors, bytes/s, by thread count."""

    buffer_bytes: int
    c_read: dict[int, float]
    numpy_sum: dict[int, float]


def measure_bandwidth(nbytes: int, thread_counts: list[int]) -> Bandwidth:
    buf = K.aligned_buffer(nbytes)
    c = {n: c_read_bandwidth(nbytes, n, buf=buf) for n in thread_counts}
    s = {n: numpy_sum_bandwidth(buf, n) for n in thread_counts}
    return Bandwidth(buf.size, c, s)


# ---- cold expert bank ---------------------------------------------------------------------

@dataclass
class ExpertBank:
    """n experts of Gemma 4 26B A4B shape laid out like an LYRW file: gate_up then down, per expert."""

    buf: np.ndarray  # from K.aligned_buffer: every expert starts 256-byte aligned
    n: int
    gate_up_bytes: int
    down_bytes: int
    fmt: int
    down_fmt: int

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

    def region(self, start_expert: int, nbytes: int) -> np.ndarray:
        """nbytes of the bank from expert start_expert (wrapping to the start if it would run off)."""
        start = (start_expert % self.n) * self.expert_bytes
        if start + nbytes > self.buf.size:
            start = 0
        return self.buf[start:start + nbytes]

    def table(self) -> K.ExpertTable:
        return K.ExpertTable(HIDDEN, INTER, [
            (self.buf, e * self.expert_bytes, self.fmt, e * self.expert_bytes + self.gate_up_bytes,
             self.down_fmt)
            for e in range(self.n)
        ])


def experts_for(nbytes: int, fmt: int) -> int:
    """How many experts of fmt make a bank of at least nbytes."""
    one = 2 * INTER * K.row_bytes(fmt, HIDDEN) + HIDDEN * K.row_bytes(fmt, K.padded_cols(fmt, INTER))
    return max(TOP_K * 3, -(-nbytes // one))


def make_bank(n_experts: int, fmt: int = K.Q4_K, down_fmt: int = K.Q4_K, seed: int = 0) -> ExpertBank:
    """Quantise one random expert and copy its bytes n times (distinct addresses are what matter)."""
    rng = np.random.default_rng(seed)
    gu = (rng.standard_normal((2 * INTER, HIDDEN)) * 0.02).astype(np.float32)
    dn = (rng.standard_normal((HIDDEN, INTER)) * 0.02).astype(np.float32)
    qg, qd = K.quantize(gu, fmt), K.quantize(dn, down_fmt)
    one = np.concatenate([qg, qd])
    buf = K.aligned_buffer(one.size * n_experts)
    buf.reshape(n_experts, one.size)[:] = one
    return ExpertBank(buf, n_experts, qg.size, qd.size, fmt, down_fmt)


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


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cold_reads(bank: ExpertBank, start: Callable[[int], int], nbytes: Callable[[int], int],
               parallel: bool) -> Callable[[int], None]:
    """Call i: the C read loop over nbytes(i) bytes of the bank from expert start(i)."""
    cache: dict[tuple[int, int], Callable[[], None]] = {}

    def call(i: int) -> None:
        key = (start(i) % bank.n, nbytes(i))
        if key not in cache:
            cache[key] = K.bench_read(bank.region(*key), parallel)
        cache[key]()

    return call


@dataclass
class Result:
    name: str
    fmt: str
    threads: int
    T: int
    seconds: float
    nbytes: int
    x_bw: float          # GB/s / C read bandwidth (same thread count)
    x_read: float        # interleaved cold C read of the same bytes: its time / ours
    x_npsum: float       # GB/s / numpy-sum rate (secondary)
    x_numpy: float | None = None
    x_ggml: float | None = None

    @property
    def gbs(self) -> float:
        return self.nbytes / self.seconds / 1e9

    def row(self) -> str:
        def cell(v: float | None, w: int) -> str:
            return f"{v:{w}.2f}" if v is not None else f"{'-':>{w}}"

        return "  ".join([f"{self.name:<44}", f"{self.seconds * 1e6:9.1f} us", f"{self.gbs:7.2f}",
                          cell(self.x_bw, 6), cell(self.x_read, 6), cell(self.x_npsum, 7),
                          cell(self.x_numpy, 8), cell(self.x_ggml, 7)])


HEADER = (f"{'kernel':<44}  {'time':>12}  {'GB/s':>7}  {'x bw':>6}  {'x read':>6}  {'x npsum':>7}  "
          f"{'x numpy':>8}  {'x ggml':>7}")


# ---- the cases ------------------------------------------------------------------------------

def matvec_case(bank: ExpertBank, which: str, threads: int, bw: Bandwidth, repeat: int,
                ggml: Ggml | None, with_numpy: bool) -> Result:
    mats = [bank.gate_up(e) if which == "gate_up" else bank.down(e) for e in range(bank.n)]
    m0 = mats[0]
    x = np.random.default_rng(1).standard_normal(m0.cols).astype(np.float32)
    xq = K.quantize_q8k(x)
    y = np.empty(m0.rows, np.float32)
    stride = 7  # hop between experts so consecutive calls never touch neighbouring bytes
    calls = [K.bench_matmul_q8k(m, xq, y) for m in mats]

    def ours(i: int) -> None:
        calls[(i * stride) % bank.n]()

    reads = cold_reads(bank, lambda i: i * stride + bank.n // 4, lambda i: m0.data.size, threads > 1)
    K.set_num_threads(threads)
    try:
        fns = [ours, reads]
        if ggml is not None:
            gq = ggml.quantize_q8k(x)
            theirs_calls = [K.bench_vec_dot(ggml.dot_address[m0.fmt], m, gq, y, threads > 1) for m in mats]

            def theirs(i: int) -> None:  # half the bank away from ours: cold as well
                theirs_calls[(i * stride + bank.n // 2) % bank.n]()

            fns.append(theirs)
        t, t_read, *t_ggml = median_times(fns, repeat)
        if ggml is not None:  # sanity: both kernels compute the same product
            calls[0]()
            ref = y.copy()
            theirs_calls[0]()
            if not np.allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max()):
                print(f"  warning: ggml and larql disagree on {which}")
        numpy_t = None
        if with_numpy:
            def baseline(i: int) -> None:
                m = mats[(i * stride) % bank.n]
                K.dequantize(m.data, m.fmt, m.rows, m.cols) @ x

            numpy_t = median_time(baseline, max(3, repeat // 5), warmup=1)
    finally:
        K.set_num_threads(0)
    n = m0.data.size
    return Result(f"{K.FORMAT_NAMES[m0.fmt]} {m0.rows}x{m0.cols} matvec ({which}), {threads} thr",
                  K.FORMAT_NAMES[m0.fmt], threads, 1, t, n, n / t / bw.c_read[threads], t_read / t,
                  n / t / bw.numpy_sum[threads], numpy_t / t if numpy_t else None,
                  t_ggml[0] / t if t_ggml else None)


@dataclass
class MoeCalls:
    """Prepared top-k expert FFN calls of T tokens over a bank: call i takes its experts from a
    window that slides over the whole bank, so an expert comes round again only after the whole
    bank has been streamed."""
    T: int
    span: int                    # experts each call draws from
    x: np.ndarray
    w: np.ndarray
    ids: list[np.ndarray]
    nbytes: list[int]            # distinct expert bytes each call reads
    calls: list[Callable[[], None]]


def moe_calls(bank: ExpertBank, T: int) -> MoeCalls:
    table = bank.table()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, HIDDEN)).astype(np.float32)
    w = rng.random((T, TOP_K)).astype(np.float32)
    out = np.empty((T, HIDDEN), np.float32)
    span = TOP_K if T == 1 else 3 * TOP_K  # a batch of tokens draws its experts from a wider window
    ids_list, nbytes_list = [], []
    for i in range(max(1, bank.n // span)):
        window = (np.arange(span) + i * span) % bank.n
        ids = np.stack([rng.choice(window, TOP_K, replace=False) for _ in range(T)]).astype(np.int32)
        ids_list.append(ids)
        nbytes_list.append(len(np.unique(ids)) * bank.expert_bytes)
    calls = [K.bench_moe_ffn(table, x, ids, w, out) for ids in ids_list]
    return MoeCalls(T, span, x, w, ids_list, nbytes_list, calls)


def _under(table: str, calls: list[Callable[[], None]]) -> Callable[[int], None]:
    def call(i: int) -> None:
        K.force_isa(table)
        calls[i % len(calls)]()
    return call


def isa_comparison(bank: ExpertBank, Ts: tuple[int, ...], threads: int,
                   repeat: int) -> dict[str, dict[int, float]]:
    """Seconds per expert FFN call under each kernel table this CPU can run (scalar left out:
    it is the reference, not a contender), the tables alternated call by call on the same cold
    calls, so they are compared in one run: {table: {T: seconds}}."""
    tables = [t for t in K.available_isas() if t != "scalar"]
    out: dict[str, dict[int, float]] = {t: {} for t in tables}
    K.set_num_threads(threads)
    try:
        for T in Ts:
            calls = moe_calls(bank, T).calls
            times = median_times([_under(t, calls) for t in tables], repeat)
            for table, t in zip(tables, times, strict=True):
                out[table][T] = t
    finally:
        K.force_isa(None)
        K.set_num_threads(0)
    return out


def moe_case(bank: ExpertBank, T: int, threads: int, bw: Bandwidth, repeat: int, with_numpy: bool) -> Result:
    mc = moe_calls(bank, T)
    x, w, ids_list, nbytes_list, calls, span = mc.x, mc.w, mc.ids, mc.nbytes, mc.calls, mc.span

    def ours(i: int) -> None:
        calls[i % len(calls)]()

    reads = cold_reads(bank, lambda i: (i % len(calls)) * span + bank.n // 2,
                       lambda i: nbytes_list[i % len(calls)], threads > 1)
    K.set_num_threads(threads)
    try:
        t, t_read = median_times([ours, reads], repeat)
        numpy_t = None
        if with_numpy:
            def baseline(i: int) -> None:
                ids = ids_list[i % len(calls)]
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

            numpy_t = median_time(baseline, max(3, repeat // 10), warmup=1)
    finally:
        K.set_num_threads(0)
    n = int(statistics.mean(nbytes_list))
    return Result(f"top-{TOP_K} expert FFN, T={T}, {K.FORMAT_NAMES[bank.fmt]}, {threads} thr",
                  K.FORMAT_NAMES[bank.fmt], threads, T, t, n, n / t / bw.c_read[threads], t_read / t,
                  n / t / bw.numpy_sum[threads], numpy_t / t if numpy_t else None)


def thread_scaling(bank: ExpertBank, T: int, threads: int, repeat: int) -> float:
    """How much faster T-token expert FFN calls run on `threads` threads than on 1 (cold calls,
    best of three rounds each). Beside the read bandwidth's own scaling it tells which bounds the
    call: memory-bound work speeds up as the read does, compute-bound work as the cores do."""
    calls = moe_calls(bank, T).calls
    best: dict[int, float] = {}
    try:
        for _ in range(3):
            for n in (1, threads):
                K.set_num_threads(n)
                t = median_time(lambda i: calls[i % len(calls)](), max(5, repeat // 4), warmup=1)
                best[n] = min(best.get(n, t), t)
    finally:
        K.set_num_threads(0)
    return best[1] / best[threads]


def quantize_rate(fmt: int, threads: int, rows: int = 1024, cols: int = 4096) -> float:
    """Weights per second quantised from f32 (best of 3)."""
    x = np.random.default_rng(3).standard_normal((rows, cols)).astype(np.float32)
    K.set_num_threads(threads)
    try:
        best = min(_timed(lambda: K.quantize(x, fmt)) for _ in range(3))
    finally:
        K.set_num_threads(0)
    return x.size / best


# ---- CLI ------------------------------------------------------------------------------------

def say_isa_comparison(say: Callable[..., None], by_isa: dict[str, dict[int, float]], best: str) -> None:
    """The top-8 expert FFN under each table, as ratios to the default (best) table."""
    say()
    say(f"top-{TOP_K} expert FFN, Q4_K, under each kernel table (calls alternated; x {best} = its time / "
        "this table's):")
    Ts = sorted(next(iter(by_isa.values())))
    say("  table     " + "".join(f"{f'T={T} ms':>10}{f'x {best}':>10}" for T in Ts))
    for table, d in by_isa.items():
        say(f"  {table:<10}" + "".join(f"{d[T] * 1e3:10.2f}{by_isa[best][T] / d[T]:10.2f}" for T in Ts))
    if len(by_isa) == 1:
        say(f"  (this CPU runs only the {best} table; AVX-512, AVX-VNNI and AMX machines list theirs here)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="threads for the multi-threaded rows (0 = all cores)")
    p.add_argument("--experts", type=int, default=0,
                   help=f"distinct experts to cycle through (0 = enough for {CACHE_MULTIPLE}x the "
                        "last-level cache)")
    p.add_argument("--bandwidth-mib", type=int, default=0,
                   help=f"buffer for the read-bandwidth anchor (0 = {CACHE_MULTIPLE}x the last-level cache, "
                        f"at least {MIN_COLD_BYTES >> 20} MiB)")
    p.add_argument("--repeat", type=int, default=40, help="timed calls per kernel (the median is printed)")
    p.add_argument("--no-numpy", action="store_true", help="skip the (slow) numpy baseline")
    p.add_argument("--no-ggml", action="store_true", help="skip ggml even if llama-cpp-python is installed")
    p.add_argument("--ggml-lib", metavar="DIR",
                   help="directory holding libggml-cpu.so (default: llama-cpp-python's llama_cpp/lib)")
    p.add_argument("--quick", action="store_true", help="Q4_K cases only (skip Q6_K and the quantisers)")
    p.add_argument("--json", action="store_true", help="print every figure as one JSON object")


def main(args: argparse.Namespace) -> int:
    say = (lambda *a, **k: None) if args.json else print
    n_all = args.threads or K.num_threads()
    llc = last_level_cache_bytes()
    nbytes = (args.bandwidth_mib << 20) or cold_bytes(llc)
    say(f"larql kernels: {cpu_model()}, isa={K.isa()} (available: {' '.join(K.available_isas())}), "
        f"threads={n_all}, last-level cache {llc >> 20} MiB")
    counts = sorted({1, n_all})
    bw = measure_bandwidth(nbytes, counts)
    say(f"read bandwidth, C streaming loop over {bw.buffer_bytes >> 20} MiB (best of 3): "
        + ", ".join(f"{bw.c_read[n] / 1e9:.1f} GB/s on {n} thr" for n in counts)
        + "   [numpy f32 sum: " + ", ".join(f"{bw.numpy_sum[n] / 1e9:.1f}" for n in counts) + " GB/s]")
    ggml = None if args.no_ggml else load_ggml(args.ggml_lib)
    say("ggml: " + ("llama-cpp-python's libggml found" if ggml else
                    "not installed (pip install llama-cpp-python; see docs/KERNELS.md), ratio skipped"))
    numpy_on = not args.no_numpy
    results: list[Result] = []

    def run(res: Result) -> None:
        results.append(res)
        say(res.row(), flush=True)

    bank_target = cold_bytes(llc)
    n_q4 = args.experts or experts_for(bank_target, K.Q4_K)
    say(f"building {n_q4} Q4_K experts ({n_q4 * 3.29:.0f} MiB, > {CACHE_MULTIPLE}x the cache, cycled, so "
        "weights come from DRAM) ...", flush=True)
    q4 = make_bank(n_q4, K.Q4_K, K.Q4_K)
    say()
    say(HEADER)
    for threads in counts:
        for which in ("gate_up", "down"):
            run(matvec_case(q4, which, threads, bw, args.repeat, ggml, numpy_on))
    for T in (1, 8):
        run(moe_case(q4, T, n_all, bw, args.repeat, numpy_on))
    by_isa = isa_comparison(q4, (1, 8), n_all, args.repeat)   # printed after the table above
    scaling = thread_scaling(q4, 8, n_all, args.repeat) if n_all > 1 else None
    banks = {"Q4_K": {"experts": q4.n, "bytes": q4.buf.size}}
    del q4
    rates = {}
    if not args.quick:
        q6 = make_bank(args.experts or experts_for(bank_target, K.Q6_K), K.Q6_K, K.Q6_K, seed=1)
        banks["Q6_K"] = {"experts": q6.n, "bytes": q6.buf.size}
        run(matvec_case(q6, "down", n_all, bw, args.repeat, ggml, numpy_on))
        run(moe_case(q6, 1, n_all, bw, args.repeat, numpy_on))
        del q6
    say_isa_comparison(say, by_isa, K.isa())
    read_scaling = bw.c_read[n_all] / bw.c_read[1]
    if scaling is not None:
        # where the speed-up lies between the read's (memory-bound) and the cores' (compute-bound)
        share = (scaling - read_scaling) / (n_all - read_scaling) if n_all > read_scaling else 0.0
        share = min(1.0, max(0.0, share))   # outside [0, 1]: the machine's load moved between the runs
        bound = ("memory" if share < 0.25 else "the kernels' arithmetic" if share > 0.75
                 else "memory and the kernels' arithmetic together")
        say(f"top-{TOP_K} expert FFN, T=8, Q4_K, {K.isa()}: {n_all} threads are {scaling:.2f}x faster "
            f"than 1 (the C read: {read_scaling:.2f}x, the cores: {n_all}x; {share:.0%} of the way "
            f"from the first to the second): {bound} bound it here")
    if not args.quick:
        say()
        for fmt in (K.Q4_K, K.Q6_K):
            rates[K.FORMAT_NAMES[fmt]] = quantize_rate(fmt, n_all)
            say(f"quantise f32 -> {K.FORMAT_NAMES[fmt]} on {n_all} threads: "
                f"{rates[K.FORMAT_NAMES[fmt]] / 1e6:.1f} M weights/s")
    if args.json:
        print(json.dumps({
            "cpu": cpu_model(), "isa": K.isa(), "available_isas": K.available_isas(), "threads": n_all,
            "last_level_cache_bytes": llc, "bandwidth_buffer_bytes": bw.buffer_bytes,
            "c_read_bytes_per_s": {str(k): v for k, v in bw.c_read.items()},
            "numpy_sum_bytes_per_s": {str(k): v for k, v in bw.numpy_sum.items()},
            "ggml": ggml is not None, "banks": banks,
            "results": [asdict(r) | {"gb_per_s": r.gbs} for r in results],
            "moe_ffn_s_by_isa": {t: {f"T={T}": v for T, v in d.items()} for t, d in by_isa.items()},
            "moe_ffn_T8_thread_scaling": scaling, "c_read_thread_scaling": read_scaling,
            "quantise_weights_per_s": rates,
        }, indent=1))
    return 0
