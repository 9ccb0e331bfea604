"""`larql serve --scheduling`: batch (the default) puts every server thread on SCHED_BATCH, so
a request never preempts a co-located client; normal leaves ordinary time-sharing."""

from __future__ import annotations

import os
import sys

import pytest

from larql.demo import build_demo_vindex, demo_config
from larql.processes import ServerProcess, free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory):
    cfg = demo_config(num_layers=1, hidden=64, num_experts=4, top_k=2)
    return build_demo_vindex(tmp_path_factory.mktemp("sched") / "v", quant="f32", config=cfg)


@pytest.mark.parametrize("mode, policy", [((), os.SCHED_BATCH), (("--scheduling", "normal"), os.SCHED_OTHER)])
def test_every_server_thread_gets_the_policy(vindex_path, tmp_path, mode, policy):
    srv = ServerProcess(vindex_path, "0-3", free_port(), tmp_path / "log", threads=2, extra=mode)
    try:
        srv.wait_ready(60)
        pid = srv.proc.pid
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) >= 2                   # the event loop and the kernel pool at least
        assert {os.sched_getscheduler(t) for t in tids} == {policy}
    finally:
        srv.stop()
