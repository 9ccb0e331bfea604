"""This machine's SIMD kernel table against the scalar reference, built natively.

AVX2 on x86-64 (skipped only when the CPU lacks AVX2/FMA: the harness exits 77), NEON on
aarch64. The same C harness as test_neon.py; native runs are fast, so several seeds.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
from isa_harness import build, run

ISA = {"x86_64": "avx2", "amd64": "avx2", "aarch64": "neon", "arm64": "neon"}.get(platform.machine().lower())


@pytest.fixture(scope="module")
def native_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if ISA is None:
        pytest.skip(f"no SIMD kernel table for {platform.machine()}")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc/gcc): needed to build larql at all")
    return build(cc, ISA, tmp_path_factory.mktemp("isa") / f"test_isa_{ISA}", [])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_native_isa_matches_scalar(native_build: Path, seed: int) -> None:
    run([str(native_build)], seed=seed, trials=6)
