"""pytest-benchmark suite for the kernels at Gemma 4 26B A4B shapes, weights streamed from DRAM.

    python3 -m pytest bench/bench_kernels.py --benchmark-columns=median,ops

Each benchmark cycles its weights through a bank of experts several times the last-level cache
the OS reports, so every call reads cold bytes as a server does. `extra_info` carries GB/s and
the ratio to the read bandwidth of the C streaming loop measured in the same session over a
buffer of the same size. Everything goes through larql.kernels (its benchmark hooks). For the ggml and numpy
ratios in one table, run `larql bench kernels` (larql/benchmarks/kernels.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larql import kernels as K  # noqa: E402
from larql.benchmarks.kernels import (  # noqa: E402
    HIDDEN,
    TOP_K,
    c_read_bandwidth,
    cold_bytes,
    experts_for,
    last_level_cache_bytes,
    make_bank,
)

COLD_BYTES = cold_bytes(last_level_cache_bytes())


@pytest.fixture(scope="module")
def bandwidths() -> dict[int, float]:
    """C read bandwidth by thread count (0 = all cores), measured once per session."""
    return {1: c_read_bandwidth(COLD_BYTES, 1), 0: c_read_bandwidth(COLD_BYTES, K.num_threads())}


@pytest.fixture(scope="module", params=[K.Q4_K, K.Q6_K], ids=["Q4_K", "Q6_K"])
def bank(request):
    return make_bank(experts_for(COLD_BYTES, request.param), request.param, request.param)


def _report(benchmark, nbytes: int, bandwidth: float) -> None:
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
    benchmark.extra_info["x read bandwidth"] = round(nbytes / median / bandwidth, 3)


@pytest.mark.parametrize("which", ["gate_up", "down"])
@pytest.mark.parametrize("threads", [1, 0], ids=["1thr", "allthr"])
def test_matvec(benchmark, bank, bandwidths, which, threads):
    mats = [bank.gate_up(e) if which == "gate_up" else bank.down(e) for e in range(bank.n)]
    m0 = mats[0]
    x = np.random.default_rng(0).standard_normal(m0.cols).astype(np.float32)
    xq = K.quantize_q8k(x)
    y = np.empty(m0.rows, np.float32)
    calls = [K.bench_matmul_q8k(m, xq, y) for m in mats]
    state = {"i": 0}

    def call():
        state["i"] += 7
        calls[state["i"] % len(calls)]()

    K.set_num_threads(threads)
    try:
        benchmark.pedantic(call, rounds=200, warmup_rounds=5)
    finally:
        K.set_num_threads(0)
    _report(benchmark, m0.data.size, bandwidths[threads])


@pytest.mark.parametrize("T", [1, 8])
def test_moe_ffn_top8(benchmark, bank, bandwidths, T):
    table = bank.table()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, HIDDEN)).astype(np.float32)
    w = rng.random((T, TOP_K)).astype(np.float32)
    out = np.empty((T, HIDDEN), np.float32)
    span = TOP_K if T == 1 else 3 * TOP_K
    calls = []
    for i in range(max(1, bank.n // span)):
        window = (np.arange(span) + i * span) % bank.n
        calls.append(np.stack([rng.choice(window, TOP_K, replace=False) for _ in range(T)]).astype(np.int32))
    prepared = [K.bench_moe_ffn(table, x, ids, w, out) for ids in calls]
    state = {"i": 0}

    def call():
        state["i"] += 1
        prepared[state["i"] % len(prepared)]()

    benchmark.pedantic(call, rounds=60, warmup_rounds=3)
    distinct = np.mean([len(np.unique(c)) for c in calls])
    _report(benchmark, int(distinct * bank.expert_bytes), bandwidths[0])


def test_quantize_q4k_throughput(benchmark):
    x = np.random.default_rng(2).standard_normal((256, 4096)).astype(np.float32)
    benchmark.pedantic(lambda: K.quantize(x, K.Q4_K), rounds=5, warmup_rounds=1)
    benchmark.extra_info["M weights/s"] = round(x.size / benchmark.stats.stats.median / 1e6, 1)
