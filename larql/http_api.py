"""An OpenAI-compatible HTTP API over a `larql.api.Model` (aiohttp: `pip install 'larql[api]'`).

    GET  /v1/models               the one model served
    POST /v1/chat/completions     messages -> the vindex's chat template -> an answer
    POST /v1/completions          a prompt (text, or token ids) -> its continuation
    GET  /health                  {"status": "ok", "queued": N} (no key needed; with remote
                                  experts also degraded_layers, see --on-shard-failure)

Both completions accept `max_tokens` (chat: also `max_completion_tokens`), `temperature`,
`top_p`, `top_k` (an extension), `seed`, `stop` (a string or a list: generation ends at the
first one, which is not returned) and `stream` (server-sent events, ending with `data: [DONE]`;
`stream_options.include_usage` adds a last chunk with the usage). Errors are OpenAI-shaped:
`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

One model instance serves every request: requests wait in FIFO order (up to `max_queue`,
then 503), each generation runs on one worker thread so the event loop keeps answering, and a
client that disconnects stops its own generation at the next token.

    app = create_app(model, model_name="gemma4", api_key="...")
    web.run_app(app, host="127.0.0.1", port=8000)      # or `larql api-server VINDEX`
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

try:
    from aiohttp import web
except ImportError as e:   # an optional extra; the CLI turns this into a one-line hint
    raise ImportError("the HTTP API needs aiohttp: pip install 'larql[api]'") from e

from . import __version__
from .client import ShardError
from .protocol import RemoteError

log = logging.getLogger("larql.api-server")

DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 16
ROLES = ("system", "developer", "user", "assistant")


# ------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """A request the API refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------------------
# Validating requests (pure: a dict in, a GenerationRequest or an APIError out)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{key}' must be a number, not {type(v).__name__}", key, "invalid_type")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        side = "(" if lo_open else "["
        raise _bad(f"'{key}' must be in {side}{lo:g}, {hi:g}], not {v!r}", key, "invalid_value")
    return float(v)


def _integer(body: dict, key: str, default, lo: int | None = None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{key}' must be an integer, not {type(v).__name__}", key, "invalid_type")
    if lo is not None and v < lo:
        raise _bad(f"'{key}' must be >= {lo}, not {v}", key, "invalid_value")
    return v


def _stop_strings(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' holds {len(items)} strings, at most {MAX_STOP_STRINGS}", "stop", "invalid_value")
    return [s for s in items if s]


def _unsupported(body: dict, keys: dict) -> None:
    """Refuse options this server does not implement when they would change the answer."""
    for key, neutral in keys.items():
        v = body.get(key)
        if v is not None and v != neutral and not (neutral is None and v in (False, [], {})):
            raise _bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")


def _common(body: dict, model_name: str, default_max_tokens: int, max_keys: tuple[str, ...]) -> dict:
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model", "invalid_type")
        if model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
    n = _integer(body, "n", 1)
    if n != 1:
        raise _bad(f"'n' must be 1 (one choice per request), not {n}", "n", "unsupported_parameter")
    max_tokens = None
    for key in max_keys:
        max_tokens = _integer(body, key, max_tokens, lo=1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
    _unsupported(body, {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
                        "logprobs": None, "top_logprobs": None, "best_of": 1})
    return dict(
        max_tokens=max_tokens or default_max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, lo=0),
        seed=_integer(body, "seed", None, lo=0),
        stop=_stop_strings(body),
        stream=stream, include_usage=stream and include_usage,
    )


def _message_text(i: int, msg) -> dict:
    if not isinstance(msg, dict):
        raise _bad(f"messages[{i}] must be an object", "messages", "invalid_type")
    role = msg.get("role")
    if role not in ROLES:
        raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}", "messages",
                   "invalid_value")
    content = msg.get("content")
    if isinstance(content, list):   # content parts: only text ones
        parts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages",
                           "unsupported_content")
            parts.append(text)
        content = "".join(parts)
    if not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages",
                   "invalid_type")
    return {"role": role, "content": content}


def parse_chat_request(body, tokenizer, model_name: str,
                       default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerationRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_type")
    msgs = [_message_text(i, m) for i, m in enumerate(messages)]
    _unsupported(body, {"tools": None, "tool_choice": None, "functions": None})
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("only response_format {'type': 'text'} is supported", "response_format",
                   "unsupported_parameter")
    opts = _common(body, model_name, default_max_tokens, ("max_tokens", "max_completion_tokens"))
    from .tokenizer import TokenizerError

    try:
        ids = tokenizer.encode_chat(msgs)
    except TokenizerError as e:
        raise _bad(f"the chat template cannot render these messages: {e}", "messages") from None
    return GenerationRequest(prompt_ids=ids, **opts)


def parse_completion_request(body, tokenizer, model_name: str,
                             default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerationRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]      # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        vocab = tokenizer.vocab_size
        if bad := [t for t in prompt if not 0 <= t < vocab]:
            raise _bad(f"'prompt' holds token ids outside [0, {vocab}): {bad[:5]}", "prompt", "invalid_value")
        ids = list(prompt)
    else:
        raise _bad("'prompt' must be a string or a non-empty list of token ids (one prompt per request)",
                   "prompt", "invalid_type")
    _unsupported(body, {"echo": False, "suffix": None})
    opts = _common(body, model_name, default_max_tokens, ("max_tokens",))
    return GenerationRequest(prompt_ids=ids, **opts)


# ------------------------------------------------------------------------------------------
# Stop strings


class StopMatcher:
    """Cuts streamed text at the first stop string to be complete. `feed(piece)` returns (text that is final,
    whether a stop string was found); text that could be the start of a stop string is held
    back until the next piece decides it; `flush()` releases it at the end."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text, False
        # The stop string that is complete first (the earliest end; the longest at one end).
        hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)[1]], True
        keep = 0
        for s in self.stops:   # the longest tail of text that begins some stop string
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


# ------------------------------------------------------------------------------------------
# Running generations one at a time


@dataclass
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Engine:
    """Owns the model: one generation at a time on one worker thread, FIFO queue in front."""

    def __init__(self, model, max_queue: int = 32) -> None:
        self.model = model
        self.max_queue = max_queue
        self.queued = 0                    # requests waiting or running
        self._lock: asyncio.Lock | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="larql-generate")

    def _generate(self, req: GenerationRequest, emit, cancel: threading.Event) -> Outcome:
        """Runs on the worker thread; `emit(text)` hands final text to the event loop."""
        tok = self.model.tokenizer
        decoder = tok.streamer()
        matcher = StopMatcher(req.stop)
        count = 0
        finish = ""
        steps = self.model.stream_ids(req.prompt_ids, req.max_tokens, temperature=req.temperature,
                                      top_k=req.top_k, top_p=req.top_p, seed=req.seed)
        try:
            for tid in steps:
                count += 1
                text, hit = matcher.feed(decoder.add(tid))
                if text:
                    emit(text)
                if hit:
                    finish = "stop"
                    break
                if cancel.is_set():
                    finish = "cancelled"
                    break
        finally:
            steps.close()
        if not finish:
            text, hit = matcher.feed(decoder.flush())
            text += "" if hit else matcher.flush()
            if text:
                emit(text)
            finish = "stop" if hit else self.model.last.stats.finish_reason or "length"
        return Outcome(finish, len(req.prompt_ids), count)

    def check_capacity(self) -> None:
        if self.queued >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.queued} requests queued); retry later",
                           type="server_error", code="queue_full")

    async def run(self, req: GenerationRequest, on_text) -> Outcome:
        """Generate for `req`, awaiting `on_text(piece)` for each piece of final text. If the
        caller is cancelled (its client went away) the generation stops at the next token."""
        self.check_capacity()
        if self._lock is None:
            self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self.queued += 1
        try:
            async with self._lock:
                fut = loop.run_in_executor(
                    self._pool, self._generate, req,
                    lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text), cancel)
                fut.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
                try:
                    while (piece := await pieces.get()) is not None:
                        await on_text(piece)
                    return fut.result()
                finally:
                    cancel.set()
                    if not fut.done():   # hold the model until the worker has let go of it
                        await asyncio.wait([fut])
        finally:
            self.queued -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------
# HTTP


def _json(data: dict, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False))


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _error_for(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ShardError, RemoteError)):
        return APIError(503, f"expert servers failed: {exc}", type="server_error", code="experts_unavailable")
    log.exception("generation failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                    code="internal_error")


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return _json(e.body(), e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = APIError(e.status, f"{e.reason}: {request.method} {request.path}",
                       code="not_found" if e.status == 404 else None)
        return _json(err.body(), e.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        err = _error_for(e)
        return _json(err.body(), err.status)


class API:
    """The routes, bound to one Engine."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key or None
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    def check_key(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "no API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def _body(self, request: web.Request):
        self.check_key(request)
        try:
            return await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}") from None

    # -- routes ------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        out = {"status": "ok", "queued": self.engine.queued}
        degraded = getattr(self.engine.model.experts, "degraded_layers", None)   # remote experts only
        if degraded is not None:
            out["degraded_layers"] = degraded     # layers run without a lost shard (renormalize)
        return _json(out)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "larql"}

    async def models(self, request: web.Request) -> web.Response:
        self.check_key(request)
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self.check_key(request)
        name = request.match_info["name"]
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return _json(self._model_card())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        req = parse_chat_request(body, self.engine.model.tokenizer, self.model_name, self.default_max_tokens)
        return await self._complete(request, req, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        req = parse_completion_request(body, self.engine.model.tokenizer, self.model_name,
                                       self.default_max_tokens)
        return await self._complete(request, req, chat=False)

    # -- answering ---------------------------------------------------------------------------
    async def _complete(self, request: web.Request, req: GenerationRequest, chat: bool) -> web.StreamResponse:
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": f"larql-{__version__}"}
        if req.stream:
            return await self._stream(request, req, chat, head)
        parts: list[str] = []

        async def collect(piece: str) -> None:
            parts.append(piece)

        out = await self.engine.run(req, collect)
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": out.finish_reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish_reason})
        return _json({**head, "choices": [choice], "usage": out.usage()})

    async def _stream(self, request: web.Request, req: GenerationRequest, chat: bool,
                      head: dict) -> web.StreamResponse:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if req.include_usage else {}

        def chunk(content: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": content} if content is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **extra}

        # Queue-full is still a plain HTTP error: check before the 200 goes out.
        self.engine.check_capacity()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        if chat:
            await resp.write(_sse(chunk(None, role=True)))

        async def send(piece: str) -> None:
            await resp.write(_sse(chunk(piece)))

        try:
            out = await self.engine.run(req, send)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:   # the status line is gone: report in the stream, as OpenAI does
            await resp.write(_sse(_error_for(e).body()))
            await resp.write(_sse("[DONE]"))
            return resp
        await resp.write(_sse(chunk(None, out.finish_reason)))
        if req.include_usage:
            await resp.write(_sse({**head, "choices": [], "usage": out.usage()}))
        await resp.write(_sse("[DONE]"))
        await resp.write_eof()
        return resp


def create_app(model, *, model_name: str, api_key: str | None = None, max_queue: int = 32,
               default_max_tokens: int = DEFAULT_MAX_TOKENS) -> web.Application:
    """The aiohttp application serving `model` (a larql.api.Model; closing it is the caller's)."""
    engine = Engine(model, max_queue=max_queue)
    api = API(engine, model_name, api_key, default_max_tokens)
    app = web.Application(middlewares=[_errors], client_max_size=4 * 1024 * 1024)
    app.add_routes([
        web.get("/health", api.health),
        web.get("/v1/models", api.models),
        web.get("/v1/models/{name:.+}", api.model),    # ids may hold a slash (org/model)
        web.post("/v1/chat/completions", api.chat_completions),
        web.post("/v1/completions", api.completions),
    ])

    async def shutdown(_app) -> None:
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app.on_cleanup.append(shutdown)
    app["larql.engine"] = engine
    return app


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app` on the running loop; `await runner.cleanup()` stops it. Handlers are
    cancelled when their client disconnects, which stops that client's generation."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
