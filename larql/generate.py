"""Generation: prefill the prompt in one batched pass, then decode one token at a time.

Embeddable API (the CLI and the HTTP API both use it):

    model = models.load(open_vindex(path))             # experts in process by default
    tok = TextTokenizer.from_vindex(model.vindex)
    stats = GenerationStats()
    for step in generate(model, tok.encode("The capital of France is"), 20,
                         Sampler(), stop_ids=tok.stop_ids, stats=stats):
        ...step.token, step.logprob, step.top_logprobs...

A stop token ends generation and is not yielded (`stats.finish_reason` says why it ended).

Speculative decoding (`speculate=N` or "auto", see larql/speculative.py) drafts tokens and
verifies them in one pass; greedy output is identical to `speculate="off"`, sampled output has
exactly the same distribution, and the cache is left as plain decoding leaves it.
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
    prefill_round_trips: int = 0   # expert requests (all shards) of the prompt's pass; 0 in process
    round_trips: int = 0           # expert requests of the whole generation, prefill and drafts included
    speculate: str = "off"         # "off", "N" or "auto" as run (auto in process runs off)
    drafter: str = ""
    speculation: dict = field(default_factory=dict)   # SpeculationCounters.as_dict() + auto's estimates
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

    @property
    def tokens_per_round_trip(self) -> float:
        """Generated tokens per expert round trip after the prefill (0 in process)."""
        decode_trips = self.round_trips - self.prefill_round_trips
        return self.generated_tokens / decode_trips if decode_trips > 0 else 0.0

    def as_dict(self) -> dict:
        out = {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_ms": round(self.prefill_ms, 3),
            "prefill_tok_s": round(self.prefill_tok_s, 3),
            "decode_ms": round(self.decode_s * 1e3, 3),
            "decode_tok_s": round(self.decode_tok_s, 3),
            "finish_reason": self.finish_reason,
            "prefill_round_trips": self.prefill_round_trips,
            "round_trips": self.round_trips,
            "tokens_per_round_trip": round(self.tokens_per_round_trip, 4),
            "speculate": self.speculate,
        }
        if self.speculate != "off" or self.speculation:
            out["drafter"] = self.drafter
            out.update(self.speculation)
        return {**out, **self.extra}

    def summary(self) -> str:
        text = (f"prompt {self.prompt_tokens} tok, prefill {self.prefill_ms:.1f} ms "
                f"({self.prefill_tok_s:.1f} tok/s); generated {self.generated_tokens} tok, "
                f"decode {self.decode_tok_s:.2f} tok/s ({self.finish_reason or 'running'})")
        if self.round_trips:
            text += f"; {self.tokens_per_round_trip:.3f} tok per expert round trip"
        if self.speculation:
            s = self.speculation
            text += (f"; speculate {self.speculate} ({self.drafter}): {s['accepted']}/{s['drafted']} "
                     f"drafts accepted, {s['decode_passes']} passes")
        return text


def _step(token: int, logits: np.ndarray, logprobs: int) -> StepResult:
    step = StepResult(token)
    if logprobs:
        lp = log_softmax(logits)
        step.logprob = float(lp[token])
        step.top_logprobs = top_logprobs(lp, logprobs)
    return step


def _round_trips(model) -> int:
    return int(getattr(model.experts, "round_trips", 0))


def generate(model, prompt_ids: Iterable[int], max_tokens: int, sampler: Sampler | None = None,
             stop_ids: Iterable[int] = (), logprobs: int = 0, cache=None,
             stats: GenerationStats | None = None, speculate: int | str = "off",
             drafter="lookup") -> Iterator[StepResult]:
    """Yield up to `max_tokens` new tokens after `prompt_ids`.

    cache: a KVCache to continue from (model.new_cache() if None); the prompt is appended at
    its current length. The last yielded token has not been run through the model yet, so a
    caller continuing a conversation on the same cache passes it at the head of the next
    prompt (a stop token ends generation without being fed either).
    logprobs: also report the top-K log-probabilities of each step (of the
    model's distribution, before temperature and filtering).
    speculate: "off" (or 0), N draft tokens per verify pass, or "auto" (adapts N; runs off
    when the experts are in process, where drafts only save batched compute).
    drafter: "lookup", "batch" or a `speculative.Drafter`.
    """
    from . import speculative

    n_spec = speculative.parse_speculate(speculate)
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
    remote = hasattr(model.experts, "round_trips")
    if n_spec == "auto" and not remote:
        n_spec = 0
    if n_spec and getattr(model, "dispatch", "exact") != "exact":
        raise ValueError("speculative decoding verifies with exact dispatch; use --moe-dispatch exact "
                         "(batch dispatch is available as the drafter: --draft batch)")
    stats.speculate = "off" if not n_spec else str(n_spec)
    if max_tokens == 0:
        stats.finish_reason = "length"
        return

    trips0 = _round_trips(model)
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    stats.prefill_s = time.perf_counter() - t0
    stats.prefill_round_trips = stats.round_trips = _round_trips(model) - trips0

    if n_spec:
        yield from _speculative(model, cache, logits, prompt, max_tokens, sampler, stop, logprobs,
                                stats, n_spec, drafter, trips0)
        return
    while True:
        token = sampler(logits)
        if token in stop:
            stats.finish_reason = "stop"
            return
        stats.generated_tokens += 1
        yield _step(token, logits, logprobs)
        if stats.generated_tokens >= max_tokens:
            stats.finish_reason = "length"
            return
        t0 = time.perf_counter()
        logits = model.forward([token], cache)
        stats.decode_s += time.perf_counter() - t0
        stats.round_trips = _round_trips(model) - trips0


def _speculative(model, cache, logits, prompt, max_tokens, sampler, stop, logprobs, stats,
                 n_spec, drafter, trips0) -> Iterator[StepResult]:
    from . import speculative as sp

    own_drafter = isinstance(drafter, str)
    d = sp.make_drafter(drafter, model) if own_drafter else drafter
    policy = (sp.AutoPolicy(draft_round_trips=d.round_trips_per_token) if n_spec == "auto"
              else sp.FixedPolicy(n_spec))
    counters = sp.SpeculationCounters()
    stats.drafter = d.name

    def on_pass(seconds: float) -> None:
        stats.decode_s += seconds

    def sync() -> None:
        stats.round_trips = _round_trips(model) - trips0
        stats.speculation = {**counters.as_dict(), **policy.describe()}

    try:
        for token, row, reason in sp.speculative_steps(model, cache, logits, [int(t) for t in prompt],
                                                       max_tokens, sampler, stop, d, policy, counters,
                                                       on_pass):
            sync()
            if reason:
                stats.finish_reason = reason
                return
            stats.generated_tokens += 1
            yield _step(token, row, logprobs)
    finally:
        sync()
        if own_drafter:
            d.close()
