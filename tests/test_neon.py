"""NEON kernels against the scalar reference: cross-compiled for aarch64, run under qemu-user.

Two builds: baseline armv8-a, where the int8 dot products exist in both forms (smull and sdot)
and the CPU's HWCAP picks one, and armv8.2-a+dotprod, where only sdot is compiled. qemu's
`cortex-a57` has no dotprod and its `max` has it, so all three combinations really run.
Also proves the whole C library compiles for aarch64 and runs there: dispatch picks NEON, and
matmul / MoE through the public API agree with the scalar table (csrc/tests/test_lib.c).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from isa_harness import (
    CSRC,
    LIBRARY_FLAGS,
    ROOT,
    build,
    build_lib_test,
    require_tools,
    run,
    run_lib_test,
)

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"


@pytest.fixture(scope="module")
def neon_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_tools(CROSS_CC, QEMU)
    out = tmp_path_factory.mktemp("neon")
    return {
        march: build(
            CROSS_CC, "neon", out / f"test_isa_{march.replace('+', '_')}", ["-static", f"-march={march}"]
        )
        for march in ("armv8-a", "armv8.2-a+dotprod")
    }


@pytest.mark.parametrize(
    ("march", "cpu", "path", "seed"),
    [
        ("armv8-a", "cortex-a57", "smull", 11),  # no dotprod on this CPU: the fallback runs
        ("armv8-a", "max", "sdot", 12),  # same binary, dotprod CPU: chosen at run time
        ("armv8.2-a+dotprod", "max", "sdot", 13),  # compiled-in sdot
    ],
)
def test_neon_matches_scalar(
    neon_builds: dict[str, Path], march: str, cpu: str, path: str, seed: int
) -> None:
    result = run([QEMU, "-cpu", cpu, str(neon_builds[march])], seed=seed, trials=3)
    assert result.int8_path == path, result.output


def test_whole_library_cross_compiles(tmp_path: Path) -> None:
    require_tools(CROSS_CC)
    sources = sorted(CSRC.glob("*.c"))
    assert any(p.name == "kernels_neon.c" for p in sources)
    errors = []
    for src in sources:
        obj = tmp_path / (src.stem + ".o")
        res = subprocess.run(
            [CROSS_CC, *LIBRARY_FLAGS, f"-I{CSRC}", "-c", str(src), "-o", str(obj)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if res.returncode != 0:
            errors.append(f"{src.name}:\n{res.stderr}")
    assert not errors, "aarch64 build failed:\n" + "\n".join(errors)
    # The NEON table must really be there (the file is empty off aarch64).
    nm = subprocess.run(
        ["aarch64-linux-gnu-nm", str(tmp_path / "kernels_neon.o")], capture_output=True, text=True
    )
    if nm.returncode == 0:
        assert "lq_kernels_neon" in nm.stdout


def test_whole_library_runs_on_aarch64(tmp_path: Path) -> None:
    require_tools(CROSS_CC, QEMU)
    exe = build_lib_test(CROSS_CC, tmp_path / "test_lib_aarch64", ["-static"])
    # one CPU is enough here: both int8 paths are covered kernel by kernel above
    output = run_lib_test([QEMU, "-cpu", "max", str(exe)], expected_isa="neon")
    assert "default neon" in output, output
