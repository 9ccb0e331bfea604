"""This machine's SIMD kernel table against the scalar reference, built natively.

AVX2 on x86-64 (skipped only when the CPU lacks AVX2/FMA: the harness exits 77), NEON on
aarch64. The same C harness as test_neon.py; native runs are fast, so several seeds. Then the
whole library through its public API (csrc/tests/test_lib.c), best ISA against scalar.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
from isa_harness import build, build_lib_test, run, run_lib_test

ISA = {"x86_64": "avx2", "amd64": "avx2", "aarch64": "neon", "arm64": "neon"}.get(platform.machine().lower())


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


def test_whole_library_matches_scalar(native_build: Path, tmp_path: Path) -> None:
    # native_build first: it skips on a CPU without the SIMD table, where "best" would be scalar
    output = run_lib_test([str(build_lib_test(_compiler(), tmp_path / "test_lib", []))], expected_isa=ISA)
    assert f"default {ISA}" in output, output
