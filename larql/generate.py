"""Generation: prefill the prompt in one batched pass, then decode one token at a time.

Embeddable API (the CLI and the HTTP API both use it):

    model = models.load(open_vindex(path))             # experts in process by default
    tok = TextTokenizer.from_vindex(model.vindex)
    stats = GenerationStats()
    for step in generate(model, tok.encode("The capital of France is"), 20,
                         Sampler(), stop_ids=tok.stop_ids, stats=stats):
        ...step.token, step.logprob, step.top_logprobs...

A stop token ends generation and is not yielded (`stats.finish_reason` says why it ended).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .sampling import Sampler, log_softmax, top_logprobs


@dataclass
class StepResult:
    token: int
    logprob: float | None = None                               # of the chosen token (with logprobs > 0)
    top_logprobs: list[tuple[int, float]] | None = None         # top-K (id, logprob), most likely first


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0          # time of the decode forward passes (after the first token)
    finish_reason: str = ""        # "stop" (a stop id), "length" (max_tokens) or "" while running
    extra: dict = field(default_factory=dict)

    @property
    def prefill_ms(self) -> float:
        return self.prefill_s * 1e3

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # Each decode forward produces the logits of one new token.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_ms": round(self.prefill_ms, 3),
            "prefill_tok_s": round(self.prefill_tok_s, 3),
            "decode_ms": round(self.decode_s * 1e3, 3),
            "decode_tok_s": round(self.decode_tok_s, 3),
            "finish_reason": self.finish_reason,
            **self.extra,
        }

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tok, prefill {self.prefill_ms:.1f} ms "
                f"({self.prefill_tok_s:.1f} tok/s); generated {self.generated_tokens} tok, "
                f"decode {self.decode_tok_s:.2f} tok/s ({self.finish_reason or 'running'})")


def generate(model, prompt_ids: Iterable[int], max_tokens: int, sampler: Sampler | None = None,
             stop_ids: Iterable[int] = (), logprobs: int = 0, cache=None,
             stats: GenerationStats | None = None) -> Iterator[StepResult]:
    """Yield up to `max_tokens` new tokens after `prompt_ids`.

    cache: a KVCache to continue from (model.new_cache() if None); the prompt is appended at
    its current length. The last yielded token has not been run through the model yet, so a
    caller continuing a conversation on the same cache passes it at the head of the next
    prompt (a stop token ends generation without being fed either).
    logprobs: also report the top-K log-probabilities of each step (of the
    model's distribution, before temperature and filtering).
    """
    prompt = np.asarray(list(prompt_ids), dtype=np.int64)
    if prompt.size == 0:
        raise ValueError("the prompt has no tokens")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, not {max_tokens}")
    sampler = sampler or Sampler()
    stop = frozenset(int(i) for i in stop_ids)
    stats = stats if stats is not None else GenerationStats()
    cache = cache if cache is not None else model.new_cache()
    stats.prompt_tokens = int(prompt.size)
    if max_tokens == 0:
        stats.finish_reason = "length"
        return

    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    stats.prefill_s = time.perf_counter() - t0

    while True:
        token = sampler(logits)
        if token in stop:
            stats.finish_reason = "stop"
            return
        step = StepResult(token)
        if logprobs:
            lp = log_softmax(logits)
            step.logprob = float(lp[token])
            step.top_logprobs = top_logprobs(lp, logprobs)
        stats.generated_tokens += 1
        yield step
        if stats.generated_tokens >= max_tokens:
            stats.finish_reason = "length"
            return
        t0 = time.perf_counter()
        logits = model.forward([token], cache)
        stats.decode_s += time.perf_counter() - t0
