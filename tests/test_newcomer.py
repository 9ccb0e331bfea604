"""What a newcomer meets first: the README's commands from the checkout root after
`pip install .`, the examples and benchmark scripts, the CLI's answers to common mistakes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from larql import processes
from larql.demo import build_demo_vindex, demo_config
from larql.processes import ServerProcess, child_env, free_port, larql_command

REPO = Path(__file__).resolve().parent.parent
SHADOWED = "the checkout's uncompiled larql/ source tree was imported"


@pytest.fixture
def checkout_cwd(tmp_path, monkeypatch) -> Path:
    """A copy of the checkout as it is after `pip install .`: larql/ without the compiled
    extension, examples/ and bench/ beside it; the working directory.

    Its larql/__init__.py raises, so any import of this tree instead of the installed larql is
    caught (the missing extension alone may not show: an editable install elsewhere can resolve
    `larql._kernels` through its own import finder)."""
    import larql

    src = Path(larql.__file__).parent
    shutil.copytree(src, tmp_path / "larql", ignore=shutil.ignore_patterns("_kernels*", "__pycache__"))
    with open(tmp_path / "larql" / "__init__.py", "a") as f:
        f.write(f"\nraise ImportError({SHADOWED!r})\n")
    for folder in ("examples", "bench"):
        shutil.copytree(src.parent / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_servers_start_from_a_checkout_without_the_extension(checkout_cwd):
    vindex = build_demo_vindex(checkout_cwd / "d.vindex", config=demo_config(num_layers=2))
    # What a bare `python -m larql` does here: the source tree shadows the installed package.
    bare = subprocess.run([sys.executable, "-m", "larql", "serve", str(vindex), "--host", "127.0.0.1",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60,
                          env=child_env())
    assert bare.returncode != 0 and SHADOWED in bare.stderr, bare.stderr[-2000:]
    # The demo's, benchmarks' and tests' way (`-P` on 3.11+).
    srv = ServerProcess(vindex, "0-7", free_port(), checkout_cwd / "s.log")
    try:
        srv.wait_ready(60)
    finally:
        srv.stop()
    # The `-c` bootstrap used on 3.10, which has no -P.
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", processes._BOOTSTRAP, "serve", str(vindex),
                             "--host", "127.0.0.1", "--port", str(port)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_demo_from_a_checkout_without_the_extension(checkout_cwd):
    # `larql demo` as the installed console script starts it: sys.path without the cwd.
    out = subprocess.run(larql_command("demo", "--max-tokens", "4", "--temperature", "0"),
                         capture_output=True, text=True, timeout=180, env=child_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the 4 tokens are identical" in out.stdout


def test_examples_and_bench_scripts_use_the_installed_larql(checkout_cwd):
    env = child_env()  # the real larql on PYTHONPATH stands for the installed one
    for script in ("bench/bench_run.py", "bench/bench_server.py", "bench/bench_extract.py"):
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == 0 and "usage:" in out.stdout, script + out.stderr[-2000:]
    out = subprocess.run([sys.executable, "examples/stream_tokens.py", "--max-tokens", "2"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "async: prompt" in out.stdout, out.stderr[-2000:]


def test_pytest_bench_collects_the_benchmark_suite():
    """The README's `pytest bench/ --benchmark-only` (collected only here: the suite runs minutes)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "--collect-only",
                          "-q", "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=child_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "bench/bench_kernels.py::test_moe_ffn_top8" in out.stdout
