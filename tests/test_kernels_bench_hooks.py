"""larql.kernels' benchmark hooks: the prepared calls compute what the checked API computes, and
the C read loop refuses buffers it cannot read with aligned loads."""

from __future__ import annotations

import numpy as np
import pytest

from larql import kernels as K


def test_aligned_buffer_is_aligned_and_written() -> None:
    buf = K.aligned_buffer(1000)
    assert buf.size == 1024 and buf.ctypes.data % K.READ_ALIGN == 0
    assert (buf == 0x5A).all()  # every page written, so none maps the shared zero page


@pytest.mark.parametrize("parallel", [False, True])
def test_bench_read_runs_and_rejects_misaligned(parallel: bool) -> None:
    buf = K.aligned_buffer(3 << 20)
    K.bench_read(buf, parallel)()
    with pytest.raises(K.KernelError, match="aligned_buffer"):
        K.bench_read(buf[1:257], parallel)
    with pytest.raises(K.KernelError, match="aligned_buffer"):
        K.bench_read(buf[:300], parallel)


@pytest.mark.parametrize("fmt", [K.Q4_K, K.Q6_K])
def test_bench_matmul_q8k_matches_matmul(fmt: int) -> None:
    rng = np.random.default_rng(0)
    w = K.as_qmatrix(rng.standard_normal((40, 512)).astype(np.float32), fmt)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    y = np.zeros((3, 40), np.float32)
    K.bench_matmul_q8k(w, K.quantize_q8k(x), y)()
    assert np.array_equal(y, K.matmul(w, x))


def test_bench_moe_ffn_matches_moe_ffn() -> None:
    rng = np.random.default_rng(1)
    hidden, inter, n = 256, 128, 4
    experts = []
    for _ in range(n):
        gu = K.quantize(rng.standard_normal((2 * inter, hidden)).astype(np.float32), K.Q4_K)
        dn = K.quantize(rng.standard_normal((hidden, inter)).astype(np.float32), K.Q4_K)
        buf = np.concatenate([gu, dn])
        experts.append((buf, 0, K.Q4_K, gu.size, K.Q4_K))
    table = K.ExpertTable(hidden, inter, experts)
    x = rng.standard_normal((2, hidden)).astype(np.float32)
    ids = np.array([[0, 3], [2, 3]], np.int32)
    w = rng.random((2, 2)).astype(np.float32)
    out = np.zeros((2, hidden), np.float32)
    K.bench_moe_ffn(table, x, ids, w, out)()
    assert np.array_equal(out, K.moe_ffn(table, x, ids, w))
    with pytest.raises(K.KernelError, match="below 4"):
        K.bench_moe_ffn(table, x, np.array([[0, 4], [1, 2]], np.int32), w, out)


def test_bytes_per_token_counts_every_weight_file(tmp_path) -> None:
    """The bandwidth floor's byte count (larql bench run) against the vindex's own file sizes."""
    from larql.benchmarks.run import bytes_per_token
    from larql.vindex import open_vindex
    from larql.vindex.synthetic import write_synthetic_vindex

    vx = open_vindex(write_synthetic_vindex(tmp_path / "v", num_layers=2, vocab_size=512, num_experts=4,
                                            top_k=2))
    per = bytes_per_token(vx, [0, 1])
    sizes = vx.file_sizes()
    assert per["attention"] == sizes["attn_weights_q4k.bin"]
    assert per["dense_mlp"] == sizes["interleaved_q4k.bin"]
    assert per["lm_head"] == sizes["lm_head_q4.bin"]
    cfg = vx.config
    assert per["router"] == 2 * cfg.num_experts * cfg.hidden_size * 4
    ef = vx.expert_file(0)
    one = ef.entry(0).gate_up_len + ef.entry(0).down_len
    assert per["experts"] == 2 * cfg.top_k * one


def test_isa_comparison_times_every_table_and_restores_the_best() -> None:
    from larql.benchmarks import kernels as BK

    best = K.isa()
    bank = BK.make_bank(24)
    by_isa = BK.isa_comparison(bank, (1, 8), threads=1, repeat=2)
    tables = [t for t in K.available_isas() if t != "scalar"]
    assert list(by_isa) == tables
    for table in tables:
        assert set(by_isa[table]) == {1, 8}
        assert all(0 < s < 60 for s in by_isa[table].values())
    assert K.isa() == best                 # the forced tables are undone
    lines: list[str] = []
    BK.say_isa_comparison(lambda *a, **_: lines.append(" ".join(map(str, a))), by_isa, best)
    rows = [ln for ln in lines if ln.strip().split(" ")[0] in tables]
    assert len(rows) == len(tables)
    best_row = next(ln for ln in rows if ln.strip().startswith(best)).split()
    assert best_row[2] == best_row[4] == "1.00"   # the default table against itself


def test_bench_run_floor_uses_the_reads_between_the_tokens(tmp_path) -> None:
    """larql bench run's anchor: one C read per call, the floor from their median (the best is
    reported beside it), measured / floor as the ratio."""
    from larql.benchmarks.run import InterleavedRead, bandwidth_floor, bytes_per_token
    from larql.demo import build_demo_vindex
    from larql.vindex import open_vindex

    vindex = open_vindex(build_demo_vindex(tmp_path / "v"))
    read = InterleavedRead(8 << 20)
    for _ in range(5):
        read()
    f = bandwidth_floor(vindex, 0.5, 2.0, 30, read)
    median, best = read.bandwidth()
    assert f["c_reads"] == 5 and 0 < median <= best == f["c_read_best_bytes_per_s"]
    total = sum(bytes_per_token(vindex, list(range(vindex.config.num_layers))).values())
    assert f["floor_s"] == pytest.approx(total / median)
    assert f["x_floor"] == pytest.approx(0.5 / f["floor_s"])
    assert f["projected_x_floor"] == pytest.approx(2.0 / f["projected_floor_s"])


def test_thread_scaling_restores_the_thread_count_and_measures_a_ratio() -> None:
    """The T=8 scaling figure: a positive ratio of two real timings (on a 1-core machine ~1),
    with the pool back at its default size afterwards."""
    from larql.benchmarks import kernels as BK

    K.set_num_threads(0)
    before = K.num_threads()             # the default size
    ratio = BK.thread_scaling(BK.make_bank(24), 8, threads=2, repeat=4)
    assert 0.2 < ratio < 8
    assert K.num_threads() == before
