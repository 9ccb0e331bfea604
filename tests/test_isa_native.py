"""This machine's SIMD kernel table against the scalar reference, built natively.

On x86-64 every table: AVX2, AVX-VNNI, AVX-512 VNNI and AMX, each skipped (the harness exits 77,
and the reason is shown) only where this CPU or its OS cannot run it; NEON on aarch64 (both of
its tables are covered under qemu by test_neon.py). The same C harness as test_neon.py; native
runs are fast, so several seeds. Then the whole library through its public API
(csrc/tests/test_lib.c): every table dispatch lists, each forced, against scalar.
"""

from __future__ import annotations

import platform
import re
import shutil
from pathlib import Path

import pytest
from isa_harness import build, build_lib_test, run, run_lib_test

ISA = {"x86_64": "avx2", "amd64": "avx2", "aarch64": "neon", "arm64": "neon"}.get(platform.machine().lower())
# the tables past the baseline SIMD one that this architecture may have
WIDER = {"avx2": ["avxvnni", "avx512", "amx"]}.get(ISA or "", [])


# /proc/cpuinfo flags each wider table needs (cpu_x86.c asks cpuid itself: two independent reads)
NEEDS = {
    "avxvnni": {"avx_vnni"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"},
}
# wider tables that dispatch ranks below a narrower one (dispatch.c says why: measured slower)
RANKED_BELOW = {"avxvnni": "avx2", "amx": "avx512"}


def _cpu_flags() -> set[str] | None:
    try:
        return set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1].split())
    except (OSError, TypeError):
        return None  # not Linux


def _best_table_here() -> str | None:
    """The table dispatch must pick by default: the widest the CPU advertises (avx512 on Zen 4/5
    and on Xeons with AMX), passing over the tables in RANKED_BELOW."""
    if ISA != "avx2":
        return ISA
    flags = _cpu_flags()
    if flags is None:
        return None  # test_lib still checks the default is the widest it lists
    return next((t for t in reversed(WIDER) if t not in RANKED_BELOW and NEEDS[t] <= flags), ISA)


def _compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc/gcc): needed to build larql at all")
    return cc


@pytest.fixture(scope="module")
def native_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if ISA is None:
        pytest.skip(f"no SIMD kernel table for {platform.machine()}")
    return build(_compiler(), ISA, tmp_path_factory.mktemp("isa") / f"test_isa_{ISA}", [])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_native_isa_matches_scalar(native_build: Path, seed: int) -> None:
    run([str(native_build)], seed=seed, trials=6)


NO_WIDER = [pytest.param(None, marks=pytest.mark.skip(reason=f"no wider table for {platform.machine()}"))]


@pytest.mark.parametrize("table", WIDER or NO_WIDER)
@pytest.mark.parametrize("seed", [5, 6])
def test_wider_isa_matches_scalar(table: str, seed: int, tmp_path: Path) -> None:
    """Built (so it compiles everywhere) and run where the CPU and OS allow; exit 77 = skip, with
    the harness's reason, e.g. "SKIP: avx512 table: this CPU (or OS) lacks the instructions"."""
    exe = build(_compiler(), table, tmp_path / f"test_isa_{table}", [])
    run([str(exe)], seed=seed, trials=6)


def test_whole_library_matches_scalar(native_build: Path, tmp_path: Path) -> None:
    # native_build first: it skips on a CPU without the SIMD table, where "best" would be scalar
    best = _best_table_here()
    output = run_lib_test([str(build_lib_test(_compiler(), tmp_path / "test_lib", []))], expected_isa=best)
    assert best is None or f"default {best}" in output, output


@pytest.mark.skipif(ISA != "avx2", reason="the emulated-VNNI build is x86-64 only")
@pytest.mark.parametrize("seed", [7, 8])
def test_avxvnni_table_with_emulated_vpdpbusd(seed: int, tmp_path: Path) -> None:
    """The AVX-VNNI table with vpdpbusd replaced by an exact AVX2 stand-in: runs on any AVX2 CPU,
    so its lane layout, scales, min/offset terms and float fold are tested against scalar (bit
    for bit on the exact trials) even where the real instruction is missing."""
    exe = build(_compiler(), "avxvnni", tmp_path / "test_isa_avxvnni_emulated", ["-DLQ_TEST_EMULATE_VNNI"])
    result = run([str(exe)], seed=seed, trials=6)
    assert result.table == "avxvnni", result.output


@pytest.mark.skipif(ISA != "avx2", reason="the emulated-AMX build is x86-64 only")
@pytest.mark.parametrize("seed", [9, 10])
def test_amx_table_with_emulated_tiles(seed: int, tmp_path: Path) -> None:
    """The AMX table with its tile instructions (ldtilecfg, tileloadd, tdpbusd, tilestored) done
    by C functions with the ISA's semantics: runs on any AVX2 CPU, so the repacked weight and
    activation layouts, the 16-row / 16-token tails, the block chunks and the fold are checked
    against scalar bit for bit, including the rows kernels' T >= 4 tile path."""
    exe = build(_compiler(), "amx", tmp_path / "test_isa_amx_emulated", ["-DLQ_TEST_EMULATE_AMX"])
    result = run([str(exe)], seed=seed, trials=6)
    assert result.table == "amx", result.output
    assert "rows kernels: the table's own" in result.output, result.output


@pytest.mark.skipif(ISA != "avx2", reason="the emulated-AMX build is x86-64 only")
def test_whole_library_with_emulated_amx(tmp_path: Path) -> None:
    """The library built with the AMX tiles emulated lists the amx table (the best one on a CPU
    without AVX-512, below avx512 on one with it), and its
    matmul driver (T = 5 and 70: one and several 16-token tiles, 37 rows: a partial 16-row tile)
    and expert FFN agree with scalar through the public API (csrc/tests/test_lib.c)."""
    exe = build_lib_test(_compiler(), tmp_path / "test_lib_amx", ["-DLQ_TEST_EMULATE_AMX"])
    flags = _cpu_flags()
    above = RANKED_BELOW["amx"]
    expected = above if flags is not None and NEEDS[above] <= flags else "amx"
    output = run_lib_test([str(exe)], expected_isa=expected)
    assert "-- amx" in output, output
