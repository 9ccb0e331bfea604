"""Build and run the C tests in csrc/tests/.

test_isa.c: one SIMD kernel table against the scalar one. test_lib.c: the whole library through
its public API (dispatch, matmul and MoE drivers, thread pool), best ISA against scalar.
Shared by test_neon.py (aarch64 cross build under qemu-user) and test_isa_native.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _library_flags() -> list[str]:
    """The flags build_ext.py compiles the extension with, so cross builds match it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("larql_build_ext", ROOT / "build_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.COMPILE_ARGS)


LIBRARY_FLAGS = _library_flags()
HARNESS = CSRC / "tests" / "test_isa.c"
LIB_TEST = CSRC / "tests" / "test_lib.c"
SKIP_EXIT = 77  # the harness's "this CPU cannot run the table"
# As build_ext.py compiles the library, so the tests run the code that ships.
LIB_FLAGS = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall"]
APT_HINT = "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"


@dataclass
class HarnessRun:
    passed: int
    failed: int
    table: str
    output: str


def require_tools(*tools: str) -> None:
    """Missing tools fail the test in CI (which installs them) and skip it elsewhere."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not found; install with: {APT_HINT}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


# The C files each table needs besides kernels_scalar.c (the NEON file holds both of its tables;
# the wider x86 tables borrow the AVX2 float kernels; cpu_x86.c says which x86 tables can run).
TABLE_SOURCES = {
    "avx2": ["kernels_avx2.c", "cpu_x86.c"],
    "avx512": ["kernels_avx512.c", "kernels_avx2.c", "cpu_x86.c"],
    "avxvnni": ["kernels_avxvnni.c", "kernels_avx2.c", "cpu_x86.c"],
    "amx": ["kernels_amx.c", "kernels_avx512.c", "kernels_avx2.c", "cpu_x86.c"],
    "neon": ["kernels_neon.c"],
    "neon_sdot": ["kernels_neon.c"],
}


def build(cc: str, isa: str, out: Path, flags: list[str]) -> Path:
    """Compile the harness with kernels_scalar.c and the files of table `isa` into `out`."""
    sources = [HARNESS, CSRC / "kernels_scalar.c", *(CSRC / f for f in TABLE_SOURCES[isa])]
    for src in sources:
        if not src.exists():
            pytest.fail(f"{src.relative_to(ROOT)} is missing")
    cmd = [cc, *LIB_FLAGS, "-Wextra", *flags, f"-DISA={isa}", *map(str, sources), f"-I{CSRC}", "-lm"]
    cmd += ["-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"build failed: {' '.join(cmd)}\n{res.stderr}"
    return out


def build_lib_test(cc: str, out: Path, flags: list[str]) -> Path:
    """Compile test_lib.c with every csrc/*.c (the library as build_ext builds it, minus cffi)."""
    sources = [LIB_TEST, *sorted(CSRC.glob("*.c"))]
    cmd = [cc, *LIB_FLAGS, "-pthread", *flags, *map(str, sources), f"-I{CSRC}", "-lm", "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"build failed: {' '.join(cmd)}\n{res.stderr}"
    return out


def run_lib_test(cmd: list[str], expected_isa: str | None, timeout: float = 120) -> str:
    """Run a built test_lib; returns its output. Fails on any mismatch it reports."""
    args = [*cmd, expected_isa] if expected_isa else cmd
    env = {k: v for k, v in os.environ.items() if k not in ("LARQL_ISA", "LARQL_NUM_THREADS")}
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    output = res.stdout + res.stderr
    summary = re.search(r"^(\d+) passed, (\d+) failed$", res.stdout, re.M)
    assert summary, f"no summary line (exit {res.returncode}):\n{output}"
    assert res.returncode == 0 and summary[2] == "0", f"{' '.join(args)}:\n{output}"
    assert int(summary[1]) >= 30, f"too few checks ran:\n{output}"
    return output


def run(cmd: list[str], seed: int, trials: int, timeout: float = 120) -> HarnessRun:
    """Run a built harness; returns its parsed summary. Fails on any mismatch it reports."""
    res = subprocess.run([*cmd, str(seed), str(trials)], capture_output=True, text=True, timeout=timeout)
    output = res.stdout + res.stderr
    if res.returncode == SKIP_EXIT:
        pytest.skip(output.strip())
    summary = re.search(r"^(\d+) passed, (\d+) failed$", res.stdout, re.M)
    assert summary, f"no summary line (exit {res.returncode}):\n{output}"
    table = re.search(r"^test_isa: (\w+) vs scalar", res.stdout, re.M)
    result = HarnessRun(int(summary[1]), int(summary[2]), table[1] if table else "?", output)
    assert res.returncode == 0 and result.failed == 0, f"{' '.join(cmd)} {seed} {trials}:\n{output}"
    assert result.passed >= 300, f"too few checks ran:\n{output}"  # a harness that checks nothing fails
    return result
