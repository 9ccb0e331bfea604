"""A multi-turn chat kept in one KV cache: each turn runs only its own new tokens.

    import larql.api as lq
    from larql.chat import ChatSession

    with lq.load("model.vindex") as m:
        chat = ChatSession(m, system="Answer briefly.")
        for piece in chat.send("What is the capital of France?"):
            print(piece, end="", flush=True)
        for piece in chat.send("And of Italy?"):      # prefills only this turn's tokens
            print(piece, end="", flush=True)

The session keeps the conversation as one token transcript, of which the cache holds a prefix.
A new user turn appends the text the chat template puts between the model's last answer and the
next answer ("<turn|>\\n<|turn>user\\n...<|turn>model\\n..." for Gemma 4), and feeds the
transcript's tokens the cache does not hold yet: that text, plus the last answer's final token
(`generate` yields it before running it). So the cache always equals a fresh prefill of the
transcript, and a turn costs a prefill of its own tokens only. The transcript holds answers as
they were generated, where re-rendering the conversation would rewrite them (Gemma 4's template
drops a model turn's thoughts); a template whose earlier text changes as the conversation grows
makes the turn re-read the whole re-rendered conversation instead (`Turn.reread`).

Stopping an answer early (`stop` event, set by the CLI on Ctrl-C) ends it at the next token
boundary: the tokens generated so far stay in the transcript and the history, as if the answer
had hit max_tokens. An exception in the middle of a forward pass (a second Ctrl-C, a failed
shard) may leave a layer's cache half written, so the turn is rolled back: the history is as
before the turn, and the next turn re-reads the whole transcript into a new cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .generate import GenerationStats, generate
from .sampling import Sampler

# Stands in for the model's answer when rendering the template around it: the template may
# rewrite an answer (Gemma 4 drops its thoughts), but not a plain word.
_REPLY_SENTINEL = "LARQLREPLYSENTINEL"


def next_turn_text(tokenizer, history: list[dict], user_text: str) -> str | None:
    """The template's text between the end of the model's answer to `history` (whose last
    message is that answer) and the start of its answer to `user_text`; None when the template
    cannot be continued that way (rendering a longer conversation changes an earlier part)."""
    if not history or history[-1].get("role") != "assistant":
        raise ValueError("history must end with the assistant's answer")
    answered = [*history[:-1], {"role": "assistant", "content": _REPLY_SENTINEL}]
    before = tokenizer.render_chat(answered, add_generation_prompt=False)
    after = tokenizer.render_chat([*answered, {"role": "user", "content": user_text}],
                                  add_generation_prompt=True)
    at = before.rfind(_REPLY_SENTINEL)
    if at < 0 or not after.startswith(before):
        return None
    return before[at + len(_REPLY_SENTINEL):] + after[len(before):]


@dataclass
class Turn:
    """One exchange: what was fed, what came back, and how long it took."""

    user: str
    fed_tokens: int = 0            # tokens run through the model before the answer (this turn's only)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""        # "stop", "length" or "interrupted"
    stats: GenerationStats = field(default_factory=GenerationStats)
    round_trips: int = 0           # expert server requests during the turn
    prefill_round_trips: int = 0
    reread: bool = False           # the whole transcript was fed again (new cache)
    seconds: float = 0.0


class ChatSession:
    """A conversation with a `larql.api.Model`. Not thread-safe: one turn at a time."""

    def __init__(self, model, *, system: str | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, max_tokens: int = 512) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.system = system or None
        self.max_tokens = max_tokens
        self._sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        Sampler(**self._sampling)  # check the values now, not at the first turn
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the sampler's seed starts over."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.transcript: list[int] = []      # every token of the conversation, in order
        self.cache = self.model.model.new_cache()   # holds transcript[:cache.length]
        self.sampler = Sampler(**self._sampling)    # one RNG for the whole chat: a seed replays it
        self.turns: list[Turn] = []

    @property
    def cached_tokens(self) -> int:
        return len(self.cache)

    def _plan(self, user_text: str) -> tuple[list[int], bool]:
        """(the transcript up to the new answer, whether the cache must start over)."""
        convo = [*self.messages, {"role": "user", "content": user_text}]
        if not self.transcript:
            return self.tokenizer.encode_chat(convo), False
        text = next_turn_text(self.tokenizer, self.messages, user_text)
        if text is None:
            return self.tokenizer.encode_chat(convo), True
        return self.transcript + self.tokenizer.encode(text, add_bos=False), False

    def send(self, user_text: str, max_tokens: int | None = None,
             stop: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to `user_text` as text pieces; `self.turns[-1]` describes it."""
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
        prefix, start_over = self._plan(user_text)
        if start_over:
            self.cache = self.model.model.new_cache()
        feed = prefix[len(self.cache):]
        turn = Turn(user=user_text, fed_tokens=len(feed),
                    reread=start_over or (len(self.cache) == 0 and bool(self.transcript)))
        decoder = self.tokenizer.streamer()
        trips0 = self.model.expert_round_trips
        t0 = time.perf_counter()
        steps = generate(self.model.model, feed, max_tokens, self.sampler, stop_ids=self.tokenizer.stop_ids,
                         cache=self.cache, stats=turn.stats)
        try:
            for step in steps:
                if not turn.tokens:
                    turn.prefill_round_trips = self.model.expert_round_trips - trips0
                turn.tokens.append(step.token)
                piece = decoder.add(step.token)
                if piece:
                    yield piece
                if stop is not None and stop.is_set():
                    turn.finish_reason = "interrupted"
                    break
            tail = decoder.flush()
            if tail:
                yield tail
        except GeneratorExit:
            # The caller stopped reading: `steps` waits at a token boundary, the cache is whole.
            turn.finish_reason = "interrupted"
        except BaseException:
            # Possibly inside a forward pass: the cache may be half written. Keep the history as
            # it was before this turn; the next turn re-reads the transcript into a new cache.
            steps.close()
            self.cache = self.model.model.new_cache()
            raise
        steps.close()
        turn.finish_reason = turn.finish_reason or turn.stats.finish_reason
        turn.text = decoder.text
        turn.round_trips = self.model.expert_round_trips - trips0
        turn.seconds = time.perf_counter() - t0
        self.transcript = prefix + turn.tokens
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": turn.text}]
        self.turns.append(turn)

    def ask(self, user_text: str, max_tokens: int | None = None) -> str:
        """The whole answer at once."""
        return "".join(self.send(user_text, max_tokens))

    def stats(self) -> dict:
        """The last turn's figures, the session's totals and, with remote experts, each server's."""
        out: dict = {"turns": len(self.turns), "context_tokens": len(self.transcript),
                     "cached_tokens": len(self.cache)}
        if self.turns:
            t = self.turns[-1]
            out["last_turn"] = {**t.stats.as_dict(), "fed_tokens": t.fed_tokens,
                                "generated_tokens": len(t.tokens), "finish_reason": t.finish_reason,
                                "reread": t.reread, "round_trips": t.round_trips,
                                "prefill_round_trips": t.prefill_round_trips, "seconds": round(t.seconds, 3)}
            gen = sum(len(x.tokens) for x in self.turns)
            secs = sum(x.seconds for x in self.turns)
            out["total"] = {"fed_tokens": sum(x.fed_tokens for x in self.turns), "generated_tokens": gen,
                            "seconds": round(secs, 3), "tok_s": round(gen / secs, 3) if secs else 0.0,
                            "round_trips": sum(x.round_trips for x in self.turns)}
        try:
            servers = self.model.server_stats()
        except (ConnectionError, RuntimeError) as e:    # a shard that went away (ShardError, RemoteError)
            out["servers_error"] = str(e)
        else:
            if servers:
                out["servers"] = servers
        degraded = getattr(self.model.experts, "degraded_layers", None)   # remote experts only
        if degraded is not None:
            out["degraded_layers"] = degraded     # layers run without a lost shard (renormalize)
        return out
