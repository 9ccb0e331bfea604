"""Exact speculative decoding: draft a few tokens cheaply, verify them in one batched pass.

Over a high-latency link a decode step costs one round trip per layer (30 x RTT for Gemma 4
26B A4B), however many tokens the step carries: the model is causal, so checking k drafted
tokens is one (k+1)-token pass, the same layer-by-layer round trips as one token (each layer
sends all rows to each shard in one request, as prefill does). A step keeps the longest
drafted prefix the model itself produces, plus the model's own next token, and rolls the KV
cache back past the rest (`KVCache.checkpoint/rollback`).

Exactness:
- The verify pass runs with `rowwise=True`: its row i logits are bit-identical to decoding the
  tokens one at a time, so greedy output equals `--speculate off` token for token.
- Sampling uses the standard accept/reject rule (Leviathan et al. 2023; Chen et al. 2023):
  accept draft d with probability min(1, p(d) / q(d)), on rejection sample from
  normalise(max(p - q, 0)); the tokens are then distributed exactly as the model's own
  (p = the sampler's filtered distribution). A deterministic drafter's q is a point mass: d
  must be accepted with probability p(d) and a rejection must sample p without d. Drawing
  x ~ p and accepting iff x == d does exactly that (x given x != d is that residual), and it
  takes one sampler draw per yielded token, in order, as plain decoding does: with the same
  seed the sampled tokens are identical to `--speculate off`, whatever N, `auto` or timing
  decide. Both built-in drafters are deterministic; a drafter that samples its drafts
  (`BatchDrafter(sample_drafts=True)`, a future model drafter) takes the general rule and
  keeps the distribution, not the seed's tokens.

Drafters (one small interface, `Drafter`): `PromptLookup` (n-gram match against the prompt and
the generated text: free, strong on loops, lists, code and quoting) and `BatchDrafter` (the
model in batch dispatch: one round trip per drafted token). A model drafter (Gemma 4's
multi-token-prediction assistants) would be a third class with the same `propose`.

`AutoPolicy` picks the draft length from the measured acceptance rate and pass times: a pass
of 1 + k rows costs about t1 + k * b (t1 = round trips + compute of one token, b = the extra
compute per row), plus k * c for a drafter that costs a round trip per token, and yields
(1 - a^(k+1)) / (1 - a) tokens at acceptance rate a; k maximises tokens per second, 0 when
drafts do not pay (then the step is a plain decode step and costs nothing extra).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .sampling import Sampler

# Longest draft `auto` tries, and `--speculate N`'s upper bound (a verify pass of 1 + N rows).
AUTO_MAX_DRAFT = 8
MAX_DRAFT = 64


@dataclass
class Draft:
    """Proposed next tokens; probs[i] is the distribution token i was drawn from (None: the
    drafter is deterministic, i.e. point masses)."""

    tokens: list[int]
    probs: list[np.ndarray] | None = None


class Drafter(Protocol):
    name: str
    # Round trips each drafted token costs (0 for free drafters): `auto` charges them.
    round_trips_per_token: int

    def propose(self, history: Sequence[int], n: int, sampler: Sampler) -> Draft:
        """Up to n tokens likely to follow `history` (prompt + every token generated so far)."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Drafters


class PromptLookup:
    """Draft by copying what followed the most recent earlier occurrence of the text's last
    n tokens (the longest n in [min_ngram, max_ngram] that occurs), LZ77-style: the copy may
    run into the tokens it is producing, so a loop of period p drafts n tokens, not p."""

    name = "lookup"
    round_trips_per_token = 0

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._seen: list[int] = []
        # n -> {n-gram: index right after its most recent occurrence that has a continuation}
        self._index: dict[int, dict[tuple[int, ...], int]] = {}

    def _update(self, history: Sequence[int]) -> None:
        h = list(history)
        if h[:len(self._seen)] != self._seen:   # a different text: start over
            self._seen, self._index = [], {}
        start = len(self._seen)
        self._seen = h
        for n in range(self.min_ngram, self.max_ngram + 1):
            table = self._index.setdefault(n, {})
            # n-grams ending at e (exclusive) with a continuation h[e], e < len(h)
            for e in range(max(n, start), len(h)):
                table[tuple(h[e - n:e])] = e

    def propose(self, history: Sequence[int], n: int, sampler: Sampler | None = None) -> Draft:
        if n <= 0 or not history:
            return Draft([])
        self._update(history)
        h = self._seen
        for size in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            at = self._index.get(size, {}).get(tuple(h[-size:]))
            if at is None:
                continue
            out: list[int] = []
            for i in range(n):
                j = at + i
                out.append(h[j] if j < len(h) else out[j - len(h)])
            return Draft(out)
        return Draft([])

    def close(self) -> None:
        pass


class BatchDrafter:
    """Drafts with the model itself in batch dispatch (all layers' experts in one round trip
    per token, approximate) on its own KV cache, kept in step with the accepted text.

    Drafts are the batch model's most likely tokens (point masses, so sampled output stays
    identical to plain decoding for a seed); sample_drafts=True draws them from its
    distribution q instead (more acceptance when q is close to p; only the distribution kept)."""

    name = "batch"
    round_trips_per_token = 1

    def __init__(self, model, sample_drafts: bool = False) -> None:
        self.sample_drafts = sample_drafts
        # A shallow copy shares the weights and the experts backend; only the dispatch differs.
        self.model = copy.copy(model)
        self.model.dispatch = "batch"
        self.model._rope_cache = {}
        self.cache = model.new_cache()
        self.fed: list[int] = []       # tokens in self.cache, in order

    def propose(self, history: Sequence[int], n: int, sampler: Sampler) -> Draft:
        if n <= 0:
            return Draft([])
        history = list(history)
        # Keep the longest prefix of what the cache holds that is still the text (the last
        # token is fed again: its logits give the first draft); undo the rest.
        common = 0
        limit = min(len(self.fed), len(history) - 1)
        while common < limit and self.fed[common] == history[common]:
            common += 1
        ckpt = self.cache.checkpoint_length
        if ckpt is not None and common >= ckpt:
            self.cache.rollback(common)     # the previous call's drafts that were rejected
            self.cache.commit()
        elif common < len(self.fed):        # a different text: start over
            self.cache, common = self.model.new_cache(), 0
        logits = self.model.forward(history[common:], self.cache)
        self.fed = history
        self.cache.checkpoint()             # the drafts below are undone at the next call
        tokens, probs = [], []
        for i in range(n):
            if sampler.greedy or not self.sample_drafts:
                t = int(np.argmax(logits))
            else:   # drawn from the drafter's own distribution q, which accept_draft uses
                q = sampler.distribution(logits)
                t = int(sampler.rng.choice(q.size, p=q))
                probs.append(q)
            tokens.append(t)
            if i + 1 < n:
                logits = self.model.forward([t], self.cache)
                self.fed.append(t)
        return Draft(tokens, probs if probs else None)

    def close(self) -> None:
        pass          # the experts belong to the target model


DRAFTERS: dict[str, Callable] = {
    "lookup": lambda model: PromptLookup(),
    "batch": BatchDrafter,
}


def make_drafter(name: str, model) -> Drafter:
    try:
        return DRAFTERS[name](model)
    except KeyError:
        raise ValueError(f"unknown drafter {name!r} (one of {', '.join(DRAFTERS)})") from None


# --------------------------------------------------------------------------------------------
# How many tokens to draft


def parse_speculate(value: str | int | None) -> int | str:
    """'off'/0/None -> 0, 'auto' -> 'auto', 'N' -> N (1..MAX_DRAFT); anything else a ValueError."""
    if value is None:
        return 0
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("off", "0", "none", "no"):
            return 0
        if v == "auto":
            return "auto"
        try:
            value = int(v)
        except ValueError:
            raise ValueError(f"speculate must be off, auto or a number of draft tokens, "
                             f"not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DRAFT:
        raise ValueError(f"speculate must be off, auto or 1..{MAX_DRAFT} draft tokens, not {value!r}")
    return value


class FixedPolicy:
    """Always draft up to n tokens."""

    measures = False

    def __init__(self, n: int) -> None:
        self.n = n

    def draft_length(self, available: int | None = None) -> int:
        return self.n if available is None else min(self.n, available)

    def record(self, **kw) -> None:
        pass

    def shadow(self, accepted: bool) -> None:
        pass

    def describe(self) -> dict:
        return {}


class AutoPolicy:
    """Draft length from measured acceptance and pass times (see the module docstring).

    Estimates decay (each observation weighs the past by `decay`), so a change of text is
    followed within a few passes. While drafts do not pay, a free drafter (lookup) keeps being
    measured on the tokens the plain steps produce (`shadow`); a costly one (batch) is probed
    with one draft token every `probe_every` passes."""

    measures = True

    def __init__(self, max_draft: int = AUTO_MAX_DRAFT, draft_round_trips: int = 0,
                 decay: float = 0.9, prior_accept: float = 0.5, prior_weight: float = 1.0,
                 probe_every: int = 16) -> None:
        self.max_draft = max_draft
        self.probe_every = probe_every
        self.since_observed = 0
        self.draft_round_trips = draft_round_trips
        self.decay = decay
        self.prior_accept, self.prior_weight = prior_accept, prior_weight
        self.accepted = 0.0   # decayed counts of drafted positions tested
        self.tested = 0.0
        self.t1: float | None = None      # seconds of a one-token pass (round trips + compute)
        self.per_row: float | None = None  # extra seconds per additional verified row
        self.per_draft: float = 0.0       # seconds per drafted token (drafters with round trips)

    @property
    def acceptance(self) -> float:
        return ((self.accepted + self.prior_accept * self.prior_weight)
                / (self.tested + self.prior_weight))

    @staticmethod
    def _ewma(old: float | None, new: float, w: float = 0.3) -> float:
        return new if old is None else (1 - w) * old + w * new

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def cost(self, k: int) -> float:
        t1 = self.t1 or 1.0
        per_row = self.per_row if self.per_row is not None else 0.02 * t1
        return t1 + k * (per_row + self.per_draft)

    def draft_length(self, available: int | None = None) -> int:
        if self.t1 is None:       # measure a plain step first
            return 0
        cap = self.max_draft if available is None else min(self.max_draft, available)
        best, best_rate = 0, 1.0 / self.cost(0)
        for k in range(1, cap + 1):
            rate = self.expected_tokens(k) / self.cost(k)
            if rate > best_rate * 1.001:
                best, best_rate = k, rate
        if best == 0 and cap and self.since_observed >= self.probe_every:
            return 1
        return best

    def _observe(self, accepted: float, tested: float) -> None:
        self.accepted = self.accepted * self.decay + accepted
        self.tested = self.tested * self.decay + tested
        self.since_observed = 0

    def record(self, drafted: int, accepted: int, seconds: float, draft_seconds: float = 0.0) -> None:
        if drafted:
            self._observe(accepted, accepted + (1 if accepted < drafted else 0))
        else:
            self.since_observed += 1
        if drafted == 0:
            self.t1 = self._ewma(self.t1, seconds)
        elif self.t1 is not None:
            self.per_row = self._ewma(self.per_row, max(0.0, (seconds - self.t1) / drafted))
        if drafted and draft_seconds:
            self.per_draft = self._ewma(self.per_draft or None, draft_seconds / drafted)

    def shadow(self, accepted: bool) -> None:
        """A free draft that was not verified, compared with the token the step produced: for
        a point-mass draft, P(equal) is exactly the probability it would have been accepted."""
        self._observe(float(accepted), 1.0)

    def describe(self) -> dict:
        return {"auto_acceptance": round(self.acceptance, 4),
                "auto_pass_ms": round((self.t1 or 0.0) * 1e3, 3),
                "auto_row_ms": round((self.per_row or 0.0) * 1e3, 3)}


# --------------------------------------------------------------------------------------------
# Accept / reject


def accept_draft(rows: np.ndarray, draft: Sequence[int], probs: Sequence[np.ndarray] | None,
                 sampler: Sampler) -> list[int]:
    """The tokens a verify pass yields: the accepted draft prefix, then one token of the model's.

    rows[i] are the model's logits after the i-th fed token (row 0: after the last accepted
    token), len(rows) == len(draft) + 1. Point-mass drafts (probs None; greedy or sampling):
    draw the model's token as plain decoding would and keep going while it equals the draft.
    Drafts drawn from q: the accept/reject rule above. Either way each yielded token is
    distributed as sampler(rows[i]) would draw it.
    """
    out: list[int] = []
    for i, d in enumerate(draft):
        if probs is None or sampler.greedy:
            t = sampler(rows[i])
            out.append(t)
            if t != d:
                return out
            continue
        p = sampler.distribution(rows[i])
        q_d = float(probs[i][d])
        if q_d > 0 and sampler.rng.random() * q_d < p[d]:   # u < p(d) / q(d)
            out.append(int(d))
            continue
        residual = np.maximum(p - probs[i], 0.0)
        total = residual.sum()
        residual = residual / total if total > 0 else p
        out.append(int(sampler.rng.choice(residual.size, p=residual)))
        return out
    out.append(sampler(rows[len(draft)]))
    return out


# --------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class SpeculationCounters:
    drafted: int = 0         # draft tokens verified
    accepted: int = 0        # of them kept
    passes: int = 0          # verify (or plain decode) passes of the model after the prefill
    draft_calls: int = 0     # drafter invocations that produced tokens
    draft_s: float = 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
                "decode_passes": self.passes, "draft_calls": self.draft_calls,
                "draft_ms": round(self.draft_s * 1e3, 3)}


def speculative_steps(model, cache, first_logits: np.ndarray, history: list[int], max_tokens: int,
                      sampler: Sampler, stop: frozenset[int], drafter: Drafter, policy,
                      counters: SpeculationCounters, on_pass: Callable[[float], None]
                      ) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Yield (token, its logits row, "") per generated token, then (-1, None, reason) once.

    On entry the cache holds all of `history` (the prefilled prompt; `first_logits` is its
    last row). Each pass feeds the last yielded token with the drafts. On return the cache
    holds exactly what plain decoding leaves: every yielded token but the last after
    max_tokens, all of them after a stop.
    `on_pass(seconds)` is told each step's time (drafting and the verify pass); `history`
    grows with the tokens.
    """
    logits = first_logits
    token = sampler(logits)
    generated = 0
    if token in stop:
        yield -1, None, "stop"
        return
    history.append(token)
    generated += 1
    yield token, logits, ""
    while generated < max_tokens:
        room = max_tokens - generated - 1          # a pass yields up to k + 1 tokens
        k = min(policy.draft_length(None), room)
        draft = Draft([])
        t_draft = 0.0
        if k > 0:
            t0 = time.perf_counter()
            draft = drafter.propose(history, k, sampler)
            t_draft = time.perf_counter() - t0
            if draft.tokens:
                counters.draft_calls += 1
                counters.draft_s += t_draft
            k = min(policy.draft_length(len(draft.tokens)), room)
        elif policy.measures and drafter.round_trips_per_token == 0 and room > 0:
            draft = drafter.propose(history, 1, sampler)   # free: only to keep measuring acceptance
        tokens = draft.tokens[:k]
        probs = draft.probs[:k] if draft.probs is not None and k else None
        start = cache.length
        cache.checkpoint()
        t0 = time.perf_counter()
        rows = model.forward([history[-1], *tokens], cache, all_logits=True, rowwise=True)
        seconds = time.perf_counter() - t0
        on_pass(seconds + t_draft)
        out = accept_draft(rows, tokens, probs, sampler)
        m = len(out) - 1
        counters.passes += 1
        counters.drafted += len(tokens)
        counters.accepted += m
        policy.record(drafted=len(tokens), accepted=m, seconds=seconds,
                      draft_seconds=t_draft if tokens else 0.0)
        if not tokens and draft.tokens:
            policy.shadow(draft.tokens[0] == out[0])
        for j, t in enumerate(out):
            if t in stop:
                cache.rollback(start + j + 1)
                cache.commit()
                yield -1, None, "stop"
                return
            history.append(t)
            generated += 1
            yield t, rows[j], ""
            if generated >= max_tokens:
                cache.rollback(start + j + 1)
                cache.commit()
                yield -1, None, "length"
                return
        cache.rollback(start + len(out))
        cache.commit()
    yield -1, None, "length"
