"""`larql api-server` as clients use it: the real `openai` package against a server process on
loopback, checked against `larql run --json` for the same prompt and options."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

openai = pytest.importorskip("openai", reason="the test extra installs openai")
pytest.importorskip("aiohttp", reason="the api extra (in the test extra) installs aiohttp")

from standin import client_env, make_certs, secure_server, two_shards  # noqa: E402

from larql.demo import build_demo_vindex, demo_config  # noqa: E402
from larql.http_api import StopMatcher  # noqa: E402
from larql.processes import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-larql-test-key"
NAME = "tiny-gemma4"
N = 12


def _env(**extra: str) -> dict:
    return client_env(ROOT, **extra)     # no LARQL_*_KEY / LARQL_TLS_CA unless a test sets them


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory) -> Path:
    cfg = demo_config(num_layers=4, hidden=128, num_experts=8, top_k=2, moe_intermediate=128)
    return build_demo_vindex(tmp_path_factory.mktemp("api") / "v", quant="f32", config=cfg)


class APIServer:
    """`larql api-server` in a child process on a free loopback port."""

    def __init__(self, vindex: Path, log: Path, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "larql", "api-server", str(vindex), "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env or _env())

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api-server exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"api-server did not answer within {timeout:g}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(vindex_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-server")
    (tmp / "key").write_text(KEY + "\n")
    srv = APIServer(vindex_path, tmp / "server.log", "--api-key-file", str(tmp / "key"), "--model-name", NAME,
                    "--max-tokens", str(N))
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log()      # SIGTERM is a clean shutdown
        assert "larql api-server: stopped" in srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def larql_run(vindex: Path, prompt: str, *args) -> dict:
    cmd = [sys.executable, "-m", "larql", "run", str(vindex), prompt, "--json", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_greedy_completion_equals_larql_run(client, vindex_path):
    want = larql_run(vindex_path, "The capital of France is", "-n", N)
    r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=N)
    assert r.choices[0].text == want["text"]
    assert r.choices[0].finish_reason == ("length" if len(want["tokens"]) == N else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want["prompt_tokens"], len(want["tokens"]))
    assert r.usage.total_tokens == want["prompt_tokens"] + len(want["tokens"])
    chunks = list(client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=N,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert len(chunks) > 3         # streamed piece by piece, not in one lump
    # Token ids as the prompt (what `larql run` encoded) give the same answer.
    r2 = client.completions.create(model=NAME, prompt=want["prompt_ids"], max_tokens=N)
    assert r2.choices[0].text == want["text"]


def test_greedy_chat_equals_larql_run_chat(client, vindex_path):
    want = larql_run(vindex_path, "Hello there", "--chat", "-n", N)
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N)
    msg = r.choices[0].message
    assert (msg.role, msg.content) == ("assistant", want["text"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want["prompt_tokens"], len(want["tokens"]))
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=N, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["tokens"])
    # Content given as text parts renders the same prompt; the server's default max_tokens is N.
    r2 = client.chat.completions.create(model=NAME, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    assert r2.choices[0].message.content == want["text"]


def test_seeded_sampling_is_reproducible_and_equals_larql_run(client, vindex_path):
    want = larql_run(vindex_path, "Once upon", "-n", N, "--temperature", "0.9", "--seed", "5")
    kw = dict(model=NAME, prompt="Once upon", max_tokens=N, temperature=0.9, seed=5)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text == want["text"]
    other = client.completions.create(**{**kw, "seed": 6})
    greedy = client.completions.create(**{**kw, "temperature": 0})
    assert other.choices[0].text != a.choices[0].text or greedy.choices[0].text != a.choices[0].text
    top = client.completions.create(**kw, top_p=0.5)
    assert top.choices[0].text == larql_run(vindex_path, "Once upon", "-n", N, "--temperature", "0.9",
                                            "--seed", "5", "--top-p", "0.5")["text"]


def test_stop_strings_end_the_answer_and_are_stripped(client):
    full = client.completions.create(model=NAME, prompt="Hello", max_tokens=N).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]
    cut = full[:full.find(stop)]
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=N, stop=[stop, "never-seen"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert 1 <= r.usage.completion_tokens < N
    chunks = list(client.completions.create(model=NAME, prompt="Hello", max_tokens=N, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
    text = chat.choices[0].message.content
    stop = text[1:3]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], stop=stop)
    assert r.choices[0].message.content == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages"),
    (dict(n=2), "n"),
    (dict(temperature=5), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0), "top_p"),
    (dict(stop=[1]), "stop"),
    (dict(seed=-1), "seed"),
    (dict(frequency_penalty=1.0), "frequency_penalty"),
    (dict(logprobs=True), "logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
])
def test_bad_chat_requests_are_400_with_an_openai_error(client, kwargs, param):
    kwargs = {"messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, **kwargs)
    body = err.value.body
    assert err.value.status_code == 400
    assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"]


def test_other_errors(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=2, echo=True)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # Not through the client: a body that is not JSON, a missing field, a path or method that
    # does not exist. Each answers an OpenAI-shaped JSON error.
    cases = [("GET", "/v1/models", None, 401),     # no key sent (the client always sends one)
             ("POST", "/v1/chat/completions", b"{not json", 400),
             ("POST", "/v1/chat/completions", b'{"model": "tiny-gemma4"}', 400),
             ("POST", "/v1/completions", b"[1, 2]", 400),
             ("GET", "/v1/nothing-here", None, 404),
             ("DELETE", "/v1/models", None, 405)]
    for method, path, body, status in cases:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if status != 401:
            headers["Authorization"] = f"Bearer {KEY}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        conn.close()
        assert resp.status == status, (path, err)
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert health(server)["status"] == "ok"


def test_concurrent_requests_queue_and_each_gets_its_own_answer(client):
    prompts = ["alpha", "beta", "gamma", "delta"]
    alone = {p: client.completions.create(model=NAME, prompt=p, max_tokens=N).choices[0].text
             for p in prompts}
    got: dict = {}

    def ask(p: str) -> None:
        got[p] = client.completions.create(model=NAME, prompt=p, max_tokens=N).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == alone


def _wait_idle(server, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(server)["queued"] == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(client, server, stream):
    """A million tokens would take minutes: the server must notice the client left."""
    body = json.dumps({"model": NAME, "prompt": "Hello", "max_tokens": 1_000_000, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    if stream:
        assert b"200 OK" in sock.recv(65536)      # the stream has started
    else:
        deadline = time.monotonic() + 20
        while health(server)["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert health(server)["queued"] == 1
    sock.close()
    assert _wait_idle(server), "the generation went on after its client left"
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=3)
    assert r.usage.completion_tokens == 3


def _start_endless_stream(port: int, key: str = KEY) -> socket.socket:
    body = json.dumps({"prompt": "Hello", "max_tokens": 1_000_000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert b"200 OK" in sock.recv(65536)
    return sock


def test_without_a_key_and_with_the_env_key_and_a_full_queue(vindex_path, tmp_path):
    srv = APIServer(vindex_path, tmp_path / "open.log", "-n", "3", "--max-queue", "1")
    try:
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="anything", max_retries=0)
        r = client.completions.create(model="larql-demo-random-f32-seed0", prompt="Hi")   # the vindex's name
        assert r.usage.completion_tokens == 3
        assert "(no key)" in srv.log()
        busy = _start_endless_stream(srv.port)
        with pytest.raises(openai.InternalServerError) as err:     # one running = the queue is full
            client.completions.create(model="larql-demo-random-f32-seed0", prompt="Hi")
        assert err.value.status_code == 503 and err.value.body["code"] == "queue_full"
        busy.close()
        assert _wait_idle(srv)
        assert client.completions.create(model="larql-demo-random-f32-seed0", prompt="Hi").choices
    finally:
        assert srv.stop() == 0
    # The HTTP key's variable is LARQL_HTTP_API_KEY; LARQL_API_KEY is the expert servers' key
    # and does not lock the HTTP API (on loopback; beyond it, see test_shard_key_...).
    srv = APIServer(vindex_path, tmp_path / "env.log",
                    env=_env(LARQL_HTTP_API_KEY="from-env", LARQL_API_KEY="the-expert-servers-key"))
    try:
        srv.wait_ready()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in ok.models.list().data] == ["larql-demo-random-f32-seed0"]
        for wrong in ("nope", "the-expert-servers-key"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.url + "/v1", api_key=wrong, max_retries=0).models.list()
    finally:
        assert srv.stop() == 0
    srv = APIServer(vindex_path, tmp_path / "shard-env.log", "-n", "2",
                    env=_env(LARQL_API_KEY="the-expert-servers-key"))
    try:
        srv.wait_ready()
        anyone = openai.OpenAI(base_url=srv.url + "/v1", api_key="anything", max_retries=0)
        assert anyone.completions.create(model="larql-demo-random-f32-seed0", prompt="Hi").choices
        assert "(no key)" in srv.log()
    finally:
        assert srv.stop() == 0


def test_remote_experts_and_a_shard_that_dies(vindex_path, tmp_path):
    with two_shards(vindex_path, tmp_path) as (shards, spec):
        srv = APIServer(vindex_path, tmp_path / "api.log", "--moe-shards", spec, "-n", str(N))
        try:
            srv.wait_ready()
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            name = client.models.list().data[0].id
            want = larql_run(vindex_path, "Hello", "-n", N)       # experts in process
            assert client.completions.create(model=name, prompt="Hello").choices[0].text == want["text"]
            shards[1].stop()
            with pytest.raises(openai.InternalServerError) as err:
                client.completions.create(model=name, prompt="Hello")
            assert err.value.status_code == 503 and err.value.body["code"] == "experts_unavailable"
            assert "4-7" in err.value.body["message"]
            with pytest.raises(openai.APIError, match="4-7"):     # reported inside the event stream
                list(client.completions.create(model=name, prompt="Hello", stream=True))
            assert health(srv)["status"] == "ok"
        finally:
            rc = srv.stop()          # judged after every child has stopped
    assert rc == 0


HTTP_KEY = "sk-http-" + "h" * 24       # what HTTP clients send
SHARD_KEY = "shard-" + "s" * 24        # what the expert servers require


def api_server(vindex: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`larql api-server` that is expected to stop before serving (a refusal)."""
    return subprocess.run([sys.executable, "-m", "larql", "api-server", str(vindex), "--port",
                           str(free_port()), *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), timeout=60)


def test_an_http_key_and_a_different_shard_key_each_go_only_where_they_belong(vindex_path, tmp_path):
    """The HTTP API behind its key, the experts on an authenticated TLS server behind another:
    the answer is the in-process one; neither key opens the other door."""
    certs = make_certs(tmp_path / "certs")
    (tmp_path / "http.key").write_text(HTTP_KEY + "\n")
    (tmp_path / "shard.key").write_text(SHARD_KEY + "\n")
    shard = trap = srv = None
    try:
        shard = secure_server(vindex_path, "0-7", tmp_path, SHARD_KEY, certs)
        # An expert server that would accept the HTTP key: if api-server ever sent that key to
        # its shards, connecting to this one would succeed.
        trap = secure_server(vindex_path, "0-7", tmp_path, HTTP_KEY, certs)
        shard.wait_ready()
        trap.wait_ready()
        spec = f"0-7=tls://127.0.0.1:{shard.port}"
        srv = APIServer(vindex_path, tmp_path / "api.log", "--moe-shards", spec, "-n", str(N),
                        "--api-key-file", str(tmp_path / "http.key"),
                        "--shard-api-key-file", str(tmp_path / "shard.key"), "--tls-ca", str(certs["ca"]))
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=HTTP_KEY, max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        want = larql_run(vindex_path, "Hello", "-n", N)       # experts in process
        assert client.completions.create(model=name, prompt="Hello").choices[0].text == want["text"]
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}])
        assert chat.choices[0].message.content == larql_run(vindex_path, "Hi", "--chat", "-n", N)["text"]
        assert "bearer key required" in srv.log()
        with pytest.raises(openai.AuthenticationError):      # the shard key is not an HTTP key
            openai.OpenAI(base_url=srv.url + "/v1", api_key=SHARD_KEY, max_retries=0).models.list()
        assert health(srv)["degraded_layers"] == 0

        trap_spec = f"0-7=tls://127.0.0.1:{trap.port}"
        for how, args, env in [
                ("flag", ("--api-key-file", tmp_path / "http.key"), _env()),
                ("variable", (), _env(LARQL_HTTP_API_KEY=HTTP_KEY))]:
            out = api_server(vindex_path, "--moe-shards", trap_spec, "--tls-ca", certs["ca"], *args, env=env)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 1 and len(lines) == 1, (how, out.stderr)
            assert (f"larql api-server: error: shard 0-7 at 127.0.0.1:{trap.port} requires an API key "
                    "(set LARQL_API_KEY or --shard-api-key-file)") == lines[0], how
        # One key for both: refused before anything is loaded or contacted.
        out = api_server(vindex_path, "--moe-shards", spec, "--tls-ca", certs["ca"], "--api-key-file",
                         tmp_path / "http.key", env=_env(LARQL_API_KEY=HTTP_KEY))
        assert out.returncode == 1 and "is the expert servers' key" in out.stderr, out.stderr
        assert "use two different keys" in out.stderr
        # A bad shard-side file names its flag and the file, as `larql run` does.
        out = api_server(vindex_path, "--moe-shards", spec, "--shard-api-key-file", tmp_path / "nope")
        assert out.returncode == 1 and (f"--shard-api-key-file: cannot read the API key file "
                                        f"{tmp_path / 'nope'}") in out.stderr, out.stderr
        out = api_server(vindex_path, "--moe-shards", spec, "--shard-api-key-file", tmp_path / "shard.key",
                         "--tls-ca", tmp_path / "no-ca.pem")
        assert out.returncode == 1 and f"--tls-ca: TLS: CA file {tmp_path / 'no-ca.pem'}" in out.stderr
        assert srv.stop() == 0, srv.log()     # SIGTERM is a clean shutdown
    finally:
        for p in (srv, shard, trap):          # every child, even after a failed assertion
            if p is not None:
                p.stop()


def test_shard_key_in_the_environment_does_not_stand_in_for_an_http_key(vindex_path):
    """LARQL_API_KEY used to set the HTTP key too: beyond loopback, a server with only that set
    would now be open to anyone, so it refuses and says which variable is which."""
    out = api_server(vindex_path, "--host", "0.0.0.0", env=_env(LARQL_API_KEY=SHARD_KEY))
    assert out.returncode == 1, out.stderr
    assert ("refusing to serve on 0.0.0.0 without an HTTP API key: $LARQL_API_KEY is the expert "
            "servers' key, not the HTTP API's; set --api-key-file or $LARQL_HTTP_API_KEY") in out.stderr


def test_renormalize_keeps_answering_without_a_lost_shard_and_counts_it(vindex_path, tmp_path):
    with two_shards(vindex_path, tmp_path) as (shards, spec):
        srv = APIServer(vindex_path, tmp_path / "api.log", "--moe-shards", spec, "-n", str(N),
                        "--on-shard-failure", "renormalize", "--timeout", "5")
        try:
            srv.wait_ready()
            assert "--on-shard-failure renormalize: a lost shard's experts are dropped" in srv.log()
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            name = client.models.list().data[0].id
            assert client.completions.create(model=name, prompt="Hello").usage.completion_tokens == N
            assert health(srv)["degraded_layers"] == 0
            shards[1].stop()
            assert client.completions.create(model=name, prompt="Hello").usage.completion_tokens == N
            assert health(srv)["degraded_layers"] > 0        # not a 503 as with the default, fail
        finally:
            rc = srv.stop()
    assert rc == 0, srv.log()


def test_without_aiohttp_the_command_says_how_to_install_it(vindex_path, tmp_path):
    blocker = tmp_path / "block"
    (blocker / "aiohttp").mkdir(parents=True)
    (blocker / "aiohttp" / "__init__.py").write_text("raise ImportError('aiohttp is not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    out = subprocess.run([sys.executable, "-m", "larql", "api-server", str(vindex_path)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["larql api-server: the HTTP API needs aiohttp: "
                                               "pip install 'larql[api]'"]


def test_bad_server_arguments(vindex_path, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "larql", "api-server", str(vindex_path), *args],
                              capture_output=True, text=True, env=_env(), timeout=60)

    (tmp_path / "empty").write_text("\n")
    for args, needle in [(("--api-key-file", str(tmp_path / "empty")), "is empty"),
                         (("--api-key-file", str(tmp_path / "missing")),
                          f"--api-key-file: cannot read {tmp_path / 'missing'}: No such file"),
                         (("--port", "70000"), "--port must be"),
                         (("--max-queue", "0"), "--max-queue must be")]:
        out = run(*args)
        assert out.returncode == 1 and needle in out.stderr, (args, out.stderr)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = run("--port", str(busy.getsockname()[1]))
    assert out.returncode == 1 and "address already in use" in out.stderr.lower(), out.stderr


# ------------------------------------------------------------------------------------------
# Stop strings on any split of the text


@given(text=st.text(alphabet="abc", max_size=30), stops=st.lists(st.text(alphabet="abc", min_size=1,
                                                                          max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_matcher_cuts_at_the_first_stop_string_however_the_text_arrives(text, stops, cuts):
    pieces, last = [], 0
    for c in sorted(set(cuts)):
        pieces.append(text[last:c])
        last = max(last, c)
    pieces.append(text[last:])
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        emitted, stopped = m.feed(p)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    # Where generation would see a stop string first: the shortest prefix ending in one.
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
    assert "".join(out) == (text[:min(hits)[1]] if hits else text)
    assert stopped == bool(hits)
