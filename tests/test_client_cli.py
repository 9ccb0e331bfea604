"""`larql run --moe-shards` reports every expected failure in one line with a non-zero exit
(a server's error reply, a timeout, Ctrl-C), never a traceback unless --debug."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from standin import StandIn

from larql import protocol as P
from larql.demo import build_demo_vindex, demo_config
from larql.server import ExpertServer
from larql.vindex import open_vindex


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = build_demo_vindex(tmp_path_factory.mktemp("clicli") / "v",
                             config=demo_config(num_layers=3, num_experts=8, top_k=2))
    srv = ExpertServer(open_vindex(path)).start_in_thread("127.0.0.1", 0)
    try:
        yield path, srv
    finally:
        srv.stop()


def larql_run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "larql", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def refuse(req, rep):
    if req.get("op") == "experts":
        return P.error_reply(rep.get("id"), P.E_NOT_OWNED, "experts 0-7 of layer 1 are not served here")
    return rep


def stall(req, rep):
    if req.get("op") == "experts":
        time.sleep(3)
    return rep


@pytest.mark.parametrize("mangle, needle", [
    (refuse, "shard 0-7 at 127.0.0.1:PORT: experts 0-7 of layer 1 are not served here [not_owned]"),
    (stall, "shard 0-7: no answer"),
])
def test_server_errors_are_one_line(served, mangle, needle):
    path, srv = served
    proxy = StandIn((srv.host, srv.port), mangle=mangle)
    try:
        out = larql_run(path, "Hi", "-n", "3", "--moe-shards", f"0-7={proxy.address}", "--timeout", "1")
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert needle.replace("PORT", str(proxy.port)) in lines[0]
        assert lines[0].startswith("larql run: error: ")
        debug = larql_run(path, "Hi", "-n", "3", "--moe-shards", f"0-7={proxy.address}", "--timeout", "1",
                          "--debug")
        assert debug.returncode != 0 and "Traceback" in debug.stderr     # --debug shows it
    finally:
        proxy.stop()


def test_ctrl_c_during_a_remote_run_is_one_line(served):
    path, srv = served
    proc = subprocess.Popen([sys.executable, "-m", "larql", "run", str(path), "Hi", "-n", "100000",
                             "--moe-shards", f"0-7={srv.address}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while srv.server.stats.requests < 50 and time.monotonic() < deadline:   # generating
            time.sleep(0.05)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit after SIGINT: {signal_state(proc.pid)}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "larql run: interrupted"
    assert "Traceback" not in err and "Task exception" not in err


def test_ctrl_c_while_a_shard_is_silent_is_prompt(served):
    """Ctrl-C while the client waits inside C for a reply that never comes: it returns to
    Python at once (LQ_WIRE_INTERRUPTED), not after the 60 s timeout."""
    path, srv = served
    seen = [0]

    def go_silent(req, rep):
        if req.get("op") == "experts":
            seen[0] += 1
            if seen[0] > 30:
                return None
        return rep

    proxy = StandIn((srv.host, srv.port), mangle=go_silent)
    proc = subprocess.Popen([sys.executable, "-m", "larql", "run", str(path), "Hi", "-n", "100000",
                             "--moe-shards", f"0-7={proxy.address}", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while seen[0] <= 30 and time.monotonic() < deadline:   # until the first dropped one
            time.sleep(0.05)
        time.sleep(0.3)                       # waiting for the reply that will not come
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit after SIGINT: {signal_state(proc.pid)}") from None
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.stop()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "larql run: interrupted"


def signal_state(pid: int) -> str:
    """The signal lines of each thread of a process (why it did not react), for messages."""
    import os

    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        status = open(f"/proc/{pid}/task/{t}/status").read().splitlines()
        out.append(" ".join(ln for ln in status if ln.startswith(("Name", "SigPnd", "SigBlk", "SigIgn"))))
    return "; ".join(out)


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A disposition of SIG_IGN is inherited
    through exec, and in the full suite the test process had SIGINT ignored (seen in /proc: SigIgn
    0x1001006, SIGINT and SIGQUIT, as C's system() sets them while it runs), so Python in the
    child never installed its KeyboardInterrupt handler: what a user's shell never does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
