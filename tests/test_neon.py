"""NEON kernels against the scalar reference: cross-compiled for aarch64, run under qemu-user.

The int8 dot products come as two tables: "neon" (smull, any ARMv8.0 CPU) and "neon_sdot"
(ARMv8.2 dotprod). Builds for baseline armv8-a hold both, and the sdot table is usable only where
the CPU's HWCAP has dotprod; armv8.2-a+dotprod builds compile sdot in. qemu's `cortex-a57` has no
dotprod and its `max` has it, so each table is forced and run on each CPU it can run on, and the
sdot table must refuse to run (exit 77) on the CPU without dotprod.
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
    SKIP_EXIT,
    build,
    build_lib_test,
    require_tools,
    run,
    run_lib_test,
)

CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"


@pytest.fixture(scope="module")
def neon_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    require_tools(CROSS_CC, QEMU)
    out = tmp_path_factory.mktemp("neon")
    return {
        (march, table): build(
            CROSS_CC, table, out / f"test_isa_{table}_{march.replace('+', '_')}",
            ["-static", f"-march={march}"],
        )
        for march in ("armv8-a", "armv8.2-a+dotprod")
        for table in ("neon", "neon_sdot")
    }


@pytest.mark.parametrize(
    ("march", "cpu", "table", "seed"),
    [
        ("armv8-a", "cortex-a57", "neon", 11),  # no dotprod on this CPU: smull
        ("armv8-a", "max", "neon", 14),  # smull forced on a dotprod CPU
        ("armv8-a", "max", "neon_sdot", 12),  # same binary, dotprod CPU: sdot found at run time
        ("armv8.2-a+dotprod", "max", "neon_sdot", 13),  # compiled-in sdot
        ("armv8.2-a+dotprod", "max", "neon", 15),  # the smull table still exists there
    ],
)
def test_neon_matches_scalar(
    neon_builds: dict[tuple[str, str], Path], march: str, cpu: str, table: str, seed: int
) -> None:
    result = run([QEMU, "-cpu", cpu, str(neon_builds[march, table])], seed=seed, trials=3)
    assert result.table == table, result.output


def test_sdot_table_refuses_a_cpu_without_dotprod(neon_builds: dict[tuple[str, str], Path]) -> None:
    res = subprocess.run([QEMU, "-cpu", "cortex-a57", str(neon_builds["armv8-a", "neon_sdot"]), "1", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == SKIP_EXIT and "dotprod" in res.stdout, res.stdout + res.stderr


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
    # with dotprod both tables are listed and each is forced through the public API; without it
    # only the smull table is
    output = run_lib_test([QEMU, "-cpu", "max", str(exe)], expected_isa="neon_sdot")
    assert "default neon_sdot" in output and "-- neon\n" in output and "-- neon_sdot" in output, output
    output = run_lib_test([QEMU, "-cpu", "cortex-a57", str(exe)], expected_isa="neon")
    assert "default neon" in output and "neon_sdot" not in output, output
