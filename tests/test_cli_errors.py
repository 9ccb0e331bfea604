"""The CLI's answers to common mistakes: one clear line and a non-zero status, early, never a
traceback or a false success. Every command runs as a real child process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from larql.demo import build_demo_vindex, demo_config
from larql.processes import ServerProcess, child_env, free_port, larql_command
from larql.vindex.slicing import slice_vindex


def larql(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(larql_command(*map(str, args)), capture_output=True, text=True,
                          timeout=timeout, env=child_env(**env))


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def vindex(tmp_path_factory) -> Path:
    return build_demo_vindex(tmp_path_factory.mktemp("cli") / "d.vindex", config=demo_config(num_layers=2))


def closed_port() -> int:
    """A loopback port nobody listens on (the Hub "offline")."""
    return free_port()


def test_pull_into_an_existing_dir_with_the_hub_unreachable_fails(vindex, tmp_path):
    out_dir = tmp_path / "copy.vindex"
    shutil.copytree(vindex, out_dir)
    before = sorted(p.name for p in out_dir.rglob("*"))
    out = larql("pull", "me/model", "-o", out_dir, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
                HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1")
    assert_one_line_error(out, "pull me/model", "127.0.0.1", "failed")
    assert "pulled" not in out.stdout
    assert sorted(p.name for p in out_dir.rglob("*")) == before


def test_publish_with_the_hub_unreachable_is_one_line(vindex, tmp_path):
    out = larql("publish", vindex, "--repo", "me/model", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
                HF_TOKEN="hf_test", HF_HUB_DISABLE_XET="1")
    assert_one_line_error(out, "publish me/model", "failed", "HF_ENDPOINT")


def test_run_into_a_closed_pipe_stops_quietly(vindex):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head`) is gone before the first token
    try:
        proc = subprocess.run(larql_command("run", str(vindex), "hello", "--max-tokens", "8"),
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=child_env())
    finally:
        os.close(write_end)
    assert proc.returncode == 128 + 13, proc.stderr  # as `yes | head` reports it
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--moe-shards", ""], "--moe-shards is empty"),
    (["--moe-shards", "  "], "--moe-shards is empty"),
    (["--logprobs", "3"], "--logprobs needs --json"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--timeout", "-1"], "--timeout must be > 0"),
])
def test_run_refuses_silently_meaningless_flags(vindex, args, needle):
    assert_one_line_error(larql("run", vindex, "hi", *args), needle)


@pytest.mark.parametrize("args, needle", [
    (["--workers", "-1"], "--workers -1"),
    (["--threads", "-2"], "--threads -2"),
])
def test_serve_refuses_negative_counts(vindex, args, needle):
    assert_one_line_error(larql("serve", vindex, "--host", "127.0.0.1", "--port", free_port(), *args),
                          needle)


@pytest.mark.parametrize("env, needle", [
    ({"LARQL_ISA": "avx9000"}, "LARQL_ISA='avx9000'"),
    ({"LARQL_NUM_THREADS": "0"}, "LARQL_NUM_THREADS='0'"),
    ({"LARQL_NUM_THREADS": "four"}, "LARQL_NUM_THREADS='four'"),
])
def test_bad_kernel_environment_is_refused(vindex, env, needle):
    assert_one_line_error(larql("run", vindex, "hi", "--max-tokens", "1", **env), needle)


def test_good_kernel_environment_is_used(vindex):
    out = subprocess.run([sys.executable, "-c", "from larql import kernels; "
                          "print(kernels.isa(), kernels.num_threads())"], capture_output=True,
                         text=True, timeout=60, env=child_env(LARQL_ISA="scalar", LARQL_NUM_THREADS="1"))
    assert out.stdout.split() == ["scalar", "1"], out.stderr


def test_serve_on_a_client_slice_says_what_to_serve(vindex, tmp_path):
    client = slice_vindex(vindex, tmp_path / "client.vindex", preset="client", progress=False)
    out = larql("serve", client, "--host", "127.0.0.1", "--port", free_port())
    assert_one_line_error(out, "preset 'client'", "no expert layer files", "--preset experts")


@pytest.mark.parametrize("missing", ["norms.bin", "weight_manifest.json"])
def test_serve_without_norms_fails_at_startup(vindex, tmp_path, missing):
    broken = tmp_path / "broken.vindex"
    shutil.copytree(vindex, broken)
    (broken / missing).unlink()
    out = larql("serve", broken, "--host", "127.0.0.1", "--port", free_port(), "--warmup", timeout=60)
    assert out.returncode == 1, out.stderr
    assert "serving" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "cannot be served" in out.stderr or missing in out.stderr, out.stderr
    assert missing in out.stderr, out.stderr


def test_port_in_use_is_found_before_warm_up(vindex):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = larql("serve", vindex, "--host", "127.0.0.1", "--port", port, "--warmup")
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr
    assert "warm-up" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_server_log_file_has_whole_lines_and_a_readable_exit(vindex, tmp_path):
    srv = ServerProcess(vindex, "0-7", free_port(), tmp_path / "server.log", warmup=True)
    try:
        srv.wait_ready(60)
    finally:
        assert srv.stop() == 0
    text = srv.log_path.read_text()
    assert "\r" not in text, text  # no progress bar frames in a file
    lines = text.splitlines()
    assert all(" larql-server " in line for line in lines), text  # each log line its own line
    assert any("warm-up: faulting in" in line for line in lines), text
    exit_line = lines[-1]
    assert "exit after" in exit_line and " requests (0 errors)" in exit_line, exit_line
    assert "{" not in text, text  # no raw dicts


@pytest.mark.parametrize("entry, prog", [("server_main", "larql-server"), ("run_main", "larql-run")])
def test_console_scripts_name_themselves(entry, prog):
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['{prog}', '--help']; "
                          f"from larql.cli import {entry}; sys.exit({entry}())"],
                         capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {prog} "), out.stdout[:200]


@pytest.mark.parametrize("command, words", [("pull", "Download a vindex"), ("publish", "Upload a vindex")])
def test_hub_commands_describe_themselves(command, words):
    out = larql(command, "--help")
    assert out.returncode == 0 and words in out.stdout and "HF_TOKEN" in out.stdout


def test_slice_progress_bar_ends_at_100_percent_with_experts(vindex, tmp_path):
    out = larql("slice", vindex, "-o", tmp_path / "s.vindex", "--preset", "experts", "--experts", "0-3")
    assert out.returncode == 0, out.stderr
    final = out.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in final, out.stderr
