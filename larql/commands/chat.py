"""`larql chat VINDEX`: talk to the model in the terminal; `larql api-server VINDEX`: serve it
over an OpenAI-compatible HTTP API. The work is in larql/chat.py and larql/http_api.py."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from . import (
    add_sampling_options,
    add_shard_arguments,
    check_shard_arguments,
    remote_options,
    renormalize_warning,
)

# The HTTP API's own key (api-server --api-key-file). Not $LARQL_API_KEY: that is the expert
# servers' key (`larql serve` and every shard client read it), and one variable must not be both.
HTTP_API_KEY_ENV = "LARQL_HTTP_API_KEY"

CHAT_HELP = """\
commands:
  /reset          forget the conversation (the system prompt stays)
  /stats [json]   speed of the last turn and the session, expert server latencies
  /system [TEXT]  show the system prompt, or set it (and start over)
  /help           this text
  /exit           leave (or Ctrl-D)
Ctrl-C stops the answer being written; a line ending in \\ continues on the next line;
start a message with // to send one that begins with /."""


def _model_options(p: argparse.ArgumentParser, max_tokens_help: str) -> None:
    p.add_argument("vindex", help="path to a vindex directory")
    add_shard_arguments(p)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="kernel threads (default: all cores)")
    p.add_argument("--max-tokens", "-n", type=int, default=512, metavar="N", help=max_tokens_help)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="chat with a vindex in the terminal (multi-turn, streaming)",
        description="Interactive chat using the vindex's chat template. Earlier turns stay in the\n"
                    "KV cache, so each turn only runs its own new tokens. Reads one message per\n"
                    "line when stdin is not a terminal.",
        epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_options(p, "tokens per answer at most (default 512)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    add_sampling_options(p, "random seed (replays a sampled chat)")
    p.set_defaults(func=chat_main)

    q = sub.add_parser(
        "api-server", help="serve a vindex over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions "
                    "(stream: true for server-sent events). Needs the api extra: "
                    "pip install 'larql[api]'.",
    )
    _model_options(q, "max_tokens of a request that gives none (default 512)")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    q.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="require 'Authorization: Bearer KEY' of HTTP clients, with the key in FILE "
                        f"(default: ${HTTP_API_KEY_ENV}, else no key). Not the expert servers' key "
                        "(--shard-api-key-file, default $LARQL_API_KEY); the two must differ")
    q.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the vindex's model name)")
    q.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="requests waiting or running before new ones get 503 (default 32)")
    q.set_defaults(func=api_server_main)


def _check_model_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, not {args.max_tokens}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, not {args.threads}")
    check_shard_arguments(args)


def _load(args: argparse.Namespace, remote: dict | None = None):
    """The model; `remote`: remote_options(args) when already read (None: read them here)."""
    from .. import api, kernels

    if args.threads:
        kernels.set_num_threads(args.threads)
    if args.moe_shards and remote is None:
        remote = remote_options(args)
    model = api.load(args.vindex, args.moe_shards, dispatch=args.moe_dispatch, timeout=args.timeout,
                     **(remote or {}))
    renormalize_warning(args.command, args)
    return model


# ------------------------------------------------------------------------------------------
# chat


def _read_message(interactive: bool) -> str | None:
    """One message (lines ending in a backslash continue it); None at end of input."""
    lines: list[str] = []
    while True:
        if interactive:
            try:
                line = input("> " if not lines else "… ")
            except EOFError:
                return "\n".join(lines) if lines else None
        else:
            line = sys.stdin.readline()
            if not line:
                return "\n".join(lines) if lines else None
            line = line.rstrip("\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def format_stats(stats: dict) -> str:
    out = [f"turns {stats['turns']}, context {stats['context_tokens']} tokens "
           f"({stats['cached_tokens']} in the KV cache)"]
    if t := stats.get("last_turn"):
        reread = " (re-read the whole chat)" if t["reread"] else ""
        out.append(f"last turn: fed {t['fed_tokens']} new tokens in {t['prefill_ms']:.1f} ms "
                   f"({t['prefill_tok_s']:.1f} tok/s){reread}; generated {t['generated_tokens']} "
                   f"at {t['decode_tok_s']:.2f} tok/s ({t['finish_reason']})")
        if t["round_trips"]:
            out.append(f"  expert round trips: {t['round_trips']} "
                       f"({t['prefill_round_trips']} in the prefill)")
    if tot := stats.get("total"):
        out.append(f"session: {tot['generated_tokens']} tokens generated in {tot['seconds']:.2f} s "
                   f"({tot['tok_s']:.2f} tok/s overall), {tot['fed_tokens']} fed, "
                   f"{tot['round_trips']} expert round trips")
    if err := stats.get("servers_error"):
        out.append(f"  expert servers: {err}")
    for s in stats.get("servers", []):
        out.append(f"  shard {s['shard']} at {s['address']}: {s.get('requests', 0)} requests, latency "
                   f"p50 {s.get('p50_us', 0) / 1e3:.2f} ms, p99 {s.get('p99_us', 0) / 1e3:.2f} ms "
                   f"(compute p50 {s.get('compute_p50_us', 0) / 1e3:.2f} ms)")
    return "\n".join(out)


def _answer(session, text: str, out) -> None:
    """Stream one answer. The first Ctrl-C stops it at the next token (kept in the history);
    a second one aborts the step in progress and drops the turn."""
    from ..client import ShardError
    from ..protocol import RemoteError

    stop = threading.Event()

    def on_sigint(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    turns = len(session.turns)
    answer = session.send(text, stop=stop)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for piece in answer:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        if session.turns[-1].finish_reason == "interrupted":
            print("[stopped; the answer so far stays in the chat]", file=sys.stderr)
    except KeyboardInterrupt:
        answer.close()    # interrupted between steps, the turn is kept; inside one, it is dropped
        if len(session.turns) > turns:
            print("\n[stopped; the answer so far stays in the chat]", file=sys.stderr)
        else:
            print("\n[aborted mid-step: this turn is dropped; the next one re-reads the chat]",
                  file=sys.stderr)
    except (ShardError, RemoteError) as e:
        print(f"\n[expert servers failed, turn dropped: {e}]", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, previous)


def _command(session, line: str) -> bool:
    """Run a /command; False means leave."""
    name, _, rest = line.strip().partition(" ")
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/reset":
        session.reset()
        print("[new chat]", file=sys.stderr)
    elif name == "/stats":
        stats = session.stats()
        print(json.dumps(stats) if rest.strip() == "json" else format_stats(stats), flush=True)
    elif name == "/system":
        if rest.strip():
            session.system = rest.strip()
            session.reset()
            print("[system prompt set; new chat]", file=sys.stderr)
        else:
            print(session.system or "[no system prompt]", flush=True)
    elif name in ("/help", "/?"):
        print(CHAT_HELP, flush=True)
    else:
        print(f"[unknown command {name}; /help lists them]", file=sys.stderr)
    return True


def chat_main(args: argparse.Namespace) -> int:
    _check_model_args(args)
    from ..chat import ChatSession

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    model = _load(args)
    try:
        session = ChatSession(model, system=args.system, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)
        where = f"experts on {args.moe_shards}" if args.moe_shards else "experts in process"
        print(f"larql chat: {model.vindex.index.get('model') or model.vindex.path.name} ({where}). "
              f"/help for commands, Ctrl-D to leave.", file=sys.stderr)
        while True:
            try:
                line = _read_message(interactive)
            except KeyboardInterrupt:
                if not interactive:
                    raise
                print("\n[Ctrl-D leaves]", file=sys.stderr)
                continue
            if line is None:
                break
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not _command(session, line):
                    break
                continue
            _answer(session, line[1:] if line.startswith("//") else line, sys.stdout)
    except BrokenPipeError:   # the reader went away: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        model.close()
    return 0


# ------------------------------------------------------------------------------------------
# api-server


def read_api_key(path: str | None) -> str | None:
    """The HTTP API's key: --api-key-file (first line), else $LARQL_HTTP_API_KEY, else None."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file: cannot read {path}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise ValueError(f"--api-key-file {path} is empty")
        return key
    return os.environ.get(HTTP_API_KEY_ENV, "").strip() or None


def _check_keys(args: argparse.Namespace, http_key: str | None, remote: dict | None) -> None:
    """The HTTP key and the expert servers' key are two secrets: refuse one key for both (every
    HTTP client would hold the expert servers' key), and refuse to serve beyond loopback without
    an HTTP key when only $LARQL_API_KEY is set (which used to be the HTTP key too: serving
    without a key would then be a silent surprise)."""
    shard_key = (remote or {}).get("api_key") or None
    if http_key and shard_key and http_key.encode("utf-8") == shard_key:
        raise ValueError("the HTTP API key (--api-key-file / $" + HTTP_API_KEY_ENV + ") is the expert "
                         "servers' key (--shard-api-key-file / $LARQL_API_KEY): every HTTP client would "
                         "hold it; use two different keys")
    if (not http_key and os.environ.get("LARQL_API_KEY", "").strip()
            and not _is_loopback(args.host)):
        raise ValueError(f"refusing to serve on {args.host} without an HTTP API key: $LARQL_API_KEY is "
                         f"the expert servers' key, not the HTTP API's; set --api-key-file or "
                         f"${HTTP_API_KEY_ENV} (or, to serve without one, unset $LARQL_API_KEY and give "
                         f"the expert servers' key with --shard-api-key-file)")


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_port_free(host: str, port: int) -> None:
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server will
        try:
            s.bind(addr)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def api_server_main(args: argparse.Namespace) -> int:
    _check_model_args(args)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0-65535, not {args.port}")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, not {args.max_queue}")
    try:
        from .. import http_api
    except ImportError as e:
        print(f"larql api-server: {e}", file=sys.stderr)
        return 1
    import asyncio

    key = read_api_key(args.api_key_file)
    remote = remote_options(args) if args.moe_shards else None
    _check_keys(args, key, remote)
    _check_port_free(args.host, args.port)   # before loading the model: minutes on a real one
    model = _load(args, remote)
    name = args.model_name or model.vindex.index.get("model") or model.vindex.path.name
    app = http_api.create_app(model, model_name=name, api_key=key, max_queue=args.max_queue,
                              default_max_tokens=args.max_tokens)

    async def serve() -> None:
        runner = await http_api.start(app, args.host, args.port)
        host, port = runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        print(f"larql api-server: serving {name!r} on http://{host}:{port}/v1 "
              f"({'bearer key required' if key else 'no key'}); Ctrl-C stops", file=sys.stderr, flush=True)
        if not key and not _is_loopback(host.strip("[]")):
            print("larql api-server: warning: no API key and not on loopback: anyone who can reach "
                  f"this port can use the model (--api-key-file or ${HTTP_API_KEY_ENV})",
                  file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        model.close()
    print("larql api-server: stopped", file=sys.stderr)
    return 0
