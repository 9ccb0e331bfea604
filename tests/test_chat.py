"""`larql chat` and ChatSession: multi-turn on one KV cache, checked against fresh prefills.

The reference for every turn is `generate` on a new cache over the whole conversation written
out by hand in Gemma 4's turn format (the demo vindex has no chat template, so the built-in
Gemma 4 renderer is what the chat uses): a turn's answer must equal it token for token, and the
tokens a turn feeds must be only the ones after the previous answer.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from standin import client_env, make_certs, secure_server, two_shards

import larql.api as lq
from larql.chat import ChatSession, next_turn_text
from larql.demo import build_demo_vindex, demo_config
from larql.generate import generate
from larql.sampling import Sampler

ROOT = Path(__file__).resolve().parent.parent
USER = "<|turn>user\n{}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
END_OF_ANSWER = "<turn|>\n"
N = 10


@pytest.fixture(scope="module")
def vindex_path(tmp_path_factory) -> Path:
    cfg = demo_config(num_layers=4, hidden=128, num_experts=8, top_k=2, moe_intermediate=128)
    return build_demo_vindex(tmp_path_factory.mktemp("chat") / "v", quant="f32", config=cfg)


@pytest.fixture(scope="module")
def model(vindex_path):
    with lq.load(vindex_path) as m:
        yield m


def reference(model, prompt_ids: list[int], n: int = N, sampler: Sampler | None = None) -> list[int]:
    """Tokens generated from `prompt_ids` on a fresh cache."""
    return [s.token for s in generate(model.model, prompt_ids, n, sampler or Sampler(),
                                      stop_ids=model.tokenizer.stop_ids)]


def streamed_text(tok, ids: list[int]) -> str:
    dec = tok.streamer()
    return "".join(dec.add(i) for i in ids) + dec.flush()


def conversation(model, users: list[str], n: int = N, system: str | None = None):
    """By hand: for each user message, (the full prompt, the answer's tokens, the answer's
    tokens that will have run through the model when the next turn starts)."""
    tok = model.tokenizer
    text = f"<|turn>system\n{system}<turn|>\n" if system else ""
    ids = tok.encode(text + USER.format(users[0]))
    out = []
    for i, user in enumerate(users):
        if i:
            ids = ids + tok.encode(END_OF_ANSWER + USER.format(user), add_bos=False)
        answer = reference(model, ids, n)
        out.append((ids, answer))
        ids = ids + answer
    return out


def test_two_turns_equal_a_fresh_prefill_and_feed_only_the_new_turn(model):
    chat = ChatSession(model, max_tokens=N)
    (p1, a1), (p2, a2), (p3, a3) = conversation(model, ["Hello there", "And again?", "third"])
    assert chat.ask("Hello there") == streamed_text(model.tokenizer, a1)
    assert chat.turns[0].tokens == a1 and chat.turns[0].fed_tokens == len(p1)
    assert chat.ask("And again?") == streamed_text(model.tokenizer, a2)
    turn = chat.turns[1]
    assert turn.tokens == a2
    # Only the new turn (plus answer 1's last token, which generation yields before running it
    # when it ends on max_tokens) went through the model.
    unfed = 1 if chat.turns[0].finish_reason == "length" else 0
    assert turn.fed_tokens == len(p2) - len(p1) - len(a1) + unfed < len(p2) // 2
    assert turn.stats.prompt_tokens == turn.fed_tokens and not turn.reread
    chat.ask("third")
    assert chat.turns[2].tokens == a3
    assert chat.transcript == p3 + a3
    assert len(chat.cache) == len(chat.transcript) - (chat.turns[2].finish_reason == "length")


def test_system_prompt_and_reset(model):
    chat = ChatSession(model, system="Be brief.", max_tokens=N)
    (p1, a1), (p2, a2) = conversation(model, ["Hi", "More"], system="Be brief.")
    chat.ask("Hi")
    chat.ask("More")
    assert chat.turns[1].tokens == a2
    chat.reset()
    assert chat.transcript == [] and len(chat.cache) == 0 and chat.messages[0]["role"] == "system"
    chat.ask("Hi")
    assert chat.turns == [chat.turns[0]] and chat.turns[0].tokens == a1
    assert chat.turns[0].fed_tokens == len(p1)


def test_seeded_sampling_replays_after_reset(model):
    chat = ChatSession(model, temperature=1.0, top_k=40, seed=11, max_tokens=N)
    first = [chat.ask("Hi"), chat.ask("Again")]
    chat.reset()
    assert [chat.ask("Hi"), chat.ask("Again")] == first
    # One RNG runs through the chat: turn 2 draws where turn 1 stopped, as a fresh seeded
    # sampler over the same two prompts does.
    sampler = Sampler(1.0, 40, 1.0, 11)
    (p1, _), = conversation(model, ["Hi"])
    a1 = reference(model, p1, N, sampler)
    assert chat.turns[0].tokens == a1


def test_stopping_early_keeps_the_partial_answer_in_the_history(model):
    chat = ChatSession(model, max_tokens=N)
    stop = threading.Event()
    got = []
    for piece in chat.send("Hello there", stop=stop):
        got.append(piece)
        if len(chat.turns) == 0 and len(got) == 1:
            stop.set()       # what Ctrl-C does in `larql chat`
    turn = chat.turns[0]
    assert turn.finish_reason == "interrupted" and 1 <= len(turn.tokens) < N
    partial = turn.tokens
    # The next turn continues from the partial answer exactly.
    tok = model.tokenizer
    p1 = tok.encode(USER.format("Hello there"))
    p2 = p1 + partial + tok.encode(END_OF_ANSWER + USER.format("next"), add_bos=False)
    chat.ask("next")
    assert chat.turns[1].tokens == reference(model, p2)
    assert chat.turns[1].fed_tokens == len(p2) - len(p1) - len(partial) + 1

    # A consumer that stops reading is the same: the turn is kept, the cache stays whole.
    chat.reset()
    for _ in chat.send("Hello there"):
        break
    assert chat.turns[0].finish_reason == "interrupted"
    chat.ask("next")
    kept = chat.turns[0].tokens
    p2 = p1 + kept + tok.encode(END_OF_ANSWER + USER.format("next"), add_bos=False)
    assert chat.turns[1].tokens == reference(model, p2)


class FailingExperts:
    """In-process experts that fail once, at a chosen call, in the middle of a forward pass
    (as a shard dying or a second Ctrl-C would)."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.calls, self.fail_at = inner, 0, fail_at

    def forward(self, *a):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("shard went away")
        return self.inner.forward(*a)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_failure_inside_a_forward_pass_drops_the_turn_and_rereads_the_chat(model, vindex_path):
    inner = model.model.experts
    flaky = lq.Model(model.vindex, experts=FailingExperts(inner, 10**9))
    chat = ChatSession(flaky, max_tokens=N)
    chat.ask("Hello there")
    before = (list(chat.transcript), [dict(m) for m in chat.messages])
    flaky.model.experts.fail_at = flaky.model.experts.calls + 2   # layer 2 of the next prefill
    with pytest.raises(ConnectionError):
        chat.ask("And again?")
    assert (chat.transcript, chat.messages) == before and len(chat.turns) == 1
    assert len(chat.cache) == 0          # the half-written cache is gone
    chat.ask("And again?")
    (_, _), (p2, a2) = conversation(model, ["Hello there", "And again?"])
    assert chat.turns[1].tokens == a2
    assert chat.turns[1].reread and chat.turns[1].fed_tokens == len(p2)


def test_next_turn_text_on_the_builtin_gemma4_format(model):
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert next_turn_text(model.tokenizer, history, "c") == END_OF_ANSWER + USER.format("c")
    with pytest.raises(ValueError):
        next_turn_text(model.tokenizer, history[:1], "c")


# ------------------------------------------------------------------------------------------
# The command, as a user runs it


def larql(*args, stdin: str | None = None, timeout: float = 120,
          env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "larql", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=timeout)


def test_chat_through_a_pipe(model, vindex_path):
    out = larql("chat", vindex_path, "-n", N, stdin="Hello there\nAnd again?\n/stats json\n")
    assert out.returncode == 0, out.stderr
    (p1, a1), (p2, a2) = conversation(model, ["Hello there", "And again?"])
    tok = model.tokenizer
    body, stats_line = out.stdout[:-1].rsplit("\n", 1)
    assert body + "\n" == streamed_text(tok, a1) + "\n" + streamed_text(tok, a2) + "\n"
    stats = json.loads(stats_line)
    assert stats["turns"] == 2 and stats["context_tokens"] == len(p2) + len(a2)
    last = stats["last_turn"]
    assert last["generated_tokens"] == len(a2)
    assert last["fed_tokens"] == len(p2) - len(p1) - len(a1) + (len(a1) == N)
    assert "servers" not in stats


def test_chat_commands_and_bad_arguments(vindex_path):
    out = larql("chat", vindex_path, "-n", 4, stdin="/help\n/nope\n/system Be nice.\n/system\n"
                "//slash\n/reset\n/stats\n/exit\nnot read\n")
    assert out.returncode == 0, out.stderr
    assert "/reset" in out.stdout and "Be nice." in out.stdout
    assert "unknown command /nope" in out.stderr and "new chat" in out.stderr
    assert "turns 0, context 0 tokens" in out.stdout     # /reset after the //slash turn
    assert out.stdout.count("\n") > 10
    bad = larql("chat", vindex_path, "-n", 0, stdin="")
    assert bad.returncode == 1 and "--max-tokens must be >= 1" in bad.stderr
    bad = larql("chat", vindex_path, "--moe-shards", "", stdin="")
    assert bad.returncode == 1 and "--moe-shards is empty" in bad.stderr
    bad = larql("chat", vindex_path, "--temperature", "-1", stdin="")
    assert bad.returncode == 1 and "temperature" in bad.stderr


def test_chat_with_remote_experts_reports_shard_latencies(model, vindex_path, tmp_path):
    with two_shards(vindex_path, tmp_path) as (_, spec):
        out = larql("chat", vindex_path, "-n", N, "--moe-shards", spec,
                    stdin="Hello there\nAnd again?\n/stats json\n/stats\n")
    assert out.returncode == 0, out.stderr
    (_, a1), (_, a2) = conversation(model, ["Hello there", "And again?"])
    tok = model.tokenizer
    assert out.stdout.startswith(streamed_text(tok, a1) + "\n" + streamed_text(tok, a2) + "\n")
    stats = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith('{"turns"')))
    assert {s["shard"] for s in stats["servers"]} == {"0-3", "4-7"}
    assert all(s["requests"] > 0 and s["p50_us"] > 0 for s in stats["servers"])
    # Exact dispatch: per layer of each forward pass, one request to each shard owning one of
    # the routed experts. A turn runs `generated_tokens` passes (the last token is not run).
    last = stats["last_turn"]
    passes = last["generated_tokens"]
    assert 4 * passes <= last["round_trips"] <= 2 * 4 * passes
    assert 4 <= last["prefill_round_trips"] <= 2 * 4
    assert "shard 0-3 at 127.0.0.1:" in out.stdout and "p50" in out.stdout


SHARD_KEY = "shard-key-" + "s" * 24
OTHER_KEY = "other-key-" + "o" * 24


def test_chat_through_an_authenticated_tls_shard_and_its_refusals(model, vindex_path, tmp_path):
    """The deployment of docs/DEPLOY.md: an expert server that requires a key and speaks TLS
    with a private CA. The flags are those of `larql run`; the answer is the in-process one."""
    certs = make_certs(tmp_path / "certs")
    srv = secure_server(vindex_path, "0-7", tmp_path, SHARD_KEY, certs)
    (tmp_path / "key").write_text(SHARD_KEY + "\n")
    (tmp_path / "other").write_text(OTHER_KEY)
    spec = f"0-7=tls://127.0.0.1:{srv.port}"
    secure = ("--moe-shards", spec, "--shard-api-key-file", tmp_path / "key", "--tls-ca", certs["ca"])
    stdin = "Hello there\nAnd again?\n/stats json\n"
    env = client_env(ROOT)
    try:
        srv.wait_ready()
        out = larql("chat", vindex_path, "-n", N, *secure, stdin=stdin, env=env)
        # the defaults: $LARQL_API_KEY and $LARQL_TLS_CA, as for `larql run`
        by_env = larql("chat", vindex_path, "-n", N, "--moe-shards", spec, stdin=stdin,
                       env=client_env(ROOT, LARQL_API_KEY=SHARD_KEY, LARQL_TLS_CA=str(certs["ca"])))
        failures = {
            "no key": larql("chat", vindex_path, "--moe-shards", spec, "--tls-ca", certs["ca"],
                            stdin="Hi\n", env=env),
            "wrong key": larql("chat", vindex_path, "--moe-shards", spec, "--tls-ca", certs["ca"],
                               "--shard-api-key-file", tmp_path / "other", stdin="Hi\n", env=env),
            "no CA": larql("chat", vindex_path, "--moe-shards", spec, "--shard-api-key-file",
                           tmp_path / "key", stdin="Hi\n", env=env),
            "missing key file": larql("chat", vindex_path, *secure[:2], "--shard-api-key-file",
                                      tmp_path / "nope", "--tls-ca", certs["ca"], stdin="Hi\n", env=env),
            "missing CA file": larql("chat", vindex_path, *secure[:4], "--tls-ca", tmp_path / "no-ca.pem",
                                     stdin="Hi\n", env=env),
        }
    finally:
        srv.stop()
    assert out.returncode == 0, out.stderr
    (_, a1), (_, a2) = conversation(model, ["Hello there", "And again?"])
    tok = model.tokenizer
    want = streamed_text(tok, a1) + "\n" + streamed_text(tok, a2) + "\n"
    assert out.stdout.startswith(want)
    stats = json.loads(out.stdout[len(want):])
    assert [s["shard"] for s in stats["servers"]] == ["0-7"] and stats["servers"][0]["requests"] > 0
    assert stats["servers"][0]["auth_failures"] == 0 and stats["degraded_layers"] == 0
    assert by_env.returncode == 0 and by_env.stdout.startswith(want), by_env.stderr
    for what, needle in [("no key", f"shard 0-7 at 127.0.0.1:{srv.port} requires an API key (set "
                                    "LARQL_API_KEY or --shard-api-key-file)"),
                         ("wrong key", "failed to prove it holds the API key"),
                         ("no CA", f"TLS certificate of 127.0.0.1:{srv.port} not trusted"),
                         ("missing key file", f"--shard-api-key-file: cannot read the API key file "
                                              f"{tmp_path / 'nope'}: No such file"),
                         ("missing CA file", f"--tls-ca: TLS: CA file {tmp_path / 'no-ca.pem'}: "
                                             "no such file")]:
        res = failures[what]
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, (what, res.stderr)     # one line ...
        assert lines[0].startswith("larql chat: error: ") and needle in lines[0], (what, res.stderr)
        assert res.stdout == "", what                                          # ... before any chat


def test_chat_renormalizes_around_a_lost_shard_when_asked(model, vindex_path, tmp_path):
    """--on-shard-failure reaches the chat's client: with renormalize, a shard that dies
    between turns costs its experts (counted in /stats) instead of the turn."""
    proc = None
    with two_shards(vindex_path, tmp_path) as (servers, spec):
        try:
            proc = subprocess.Popen([sys.executable, "-m", "larql", "chat", str(vindex_path), "-n", str(N),
                                     "--moe-shards", spec, "--on-shard-failure", "renormalize",
                                     "--timeout", "5"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=client_env(ROOT))
            (_, a1), (_, a2) = conversation(model, ["Hello there", "And again?"])
            first = (streamed_text(model.tokenizer, a1) + "\n").encode()
            proc.stdin.write(b"Hello there\n")
            proc.stdin.flush()
            assert proc.stdout.read(len(first)) == first        # turn 1, both shards up
            servers[1].stop()
            out, err = proc.communicate(b"And again?\n/stats json\n", timeout=120)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "larql chat: --on-shard-failure renormalize: a lost shard's experts are dropped" in err
    assert "turn dropped" not in err
    stats = json.loads(out.decode().splitlines()[-1])
    assert stats["turns"] == 2 and stats["last_turn"]["generated_tokens"] > 0
    assert stats["degraded_layers"] > 0


class TerminalReader:
    """Reads a pseudo-terminal's output; `expect(needle)` returns everything up to and
    including the needle and keeps what came after it for the next call."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, b""

    def expect(self, needle: bytes, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {needle!r} within {timeout:g}s; got {self.buf[-2000:]!r}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the chat exited before {needle!r}; got {self.buf[-2000:]!r}")
                self.buf += chunk
        end = self.buf.index(needle) + len(needle)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out


# Runs in a new session on the pseudo-terminal: takes it as the controlling terminal (so ^C
# becomes SIGINT for the chat) and becomes the chat. A fresh interpreter does this rather than
# pty.fork(), which would fork this multi-threaded test process and run Python in the child.
ON_TERMINAL = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
               "os.execv(sys.argv[1], sys.argv[1:])")


def test_chat_on_a_terminal_ctrl_c_stops_the_answer_and_ctrl_d_leaves(vindex_path):
    """A real pseudo-terminal: the line discipline turns ^C into SIGINT, ^D into end of input."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    fd, tty = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", ON_TERMINAL, sys.executable, "-m", "larql", "chat",
                             str(vindex_path), "-n", "1000000"], stdin=tty, stdout=tty, stderr=tty, env=env,
                            start_new_session=True)
    os.close(tty)
    term = TerminalReader(fd)
    try:
        term.expect(b"> ")
        os.write(fd, b"Hello there\r")
        term.expect(b"Hello there\r\n")
        time.sleep(0.5)             # the answer is streaming (a million tokens take minutes)
        os.write(fd, b"\x03")
        term.expect(b"[stopped")
        term.expect(b"> ")
        os.write(fd, b"/stats json\r")
        out = term.expect(b"> ").decode(errors="replace")
        stats = json.loads(next(ln for ln in out.splitlines() if ln.startswith('{"turns"')))
        assert stats["turns"] == 1 and stats["last_turn"]["finish_reason"] == "interrupted"
        assert 0 < stats["last_turn"]["generated_tokens"] < 1000000
        os.write(fd, b"\x04")
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if select.select([fd], [], [], 0.2)[0]:
                    os.read(fd, 65536)
            except OSError:
                pass
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(fd)
