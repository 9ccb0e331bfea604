"""Speculative decoding is exact: cache rollback, bit-identical verify rows, greedy output equal
to `--speculate off` (in process and through loopback expert servers), drafters, `auto`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from larql import speculative as sp
from larql.client import connect_shards
from larql.demo import demo_config
from larql.generate import GenerationStats, generate
from larql.models.cache import KVCache
from larql.models.gemma4 import Gemma4Model
from larql.server import ExpertServer
from larql.vindex import open_vindex
from larql.vindex.extract import extract

PROMPT = [2, 17, 99, 4, 250, 31, 77, 8, 120, 5, 64, 300, 11]   # longer than every window below
STEPS = 40


# --------------------------------------------------------------------------------------------
# The KV cache journal


def cache_arrays(cache: KVCache) -> list[tuple[np.ndarray, ...]]:
    """What attention reads: each layer's written slots (keys, values, positions) and `used`."""
    out = []
    for lc in cache.layers:
        k, v, pos = lc.view()
        out.append((k.copy(), v.copy(), pos.copy(), np.array(lc.used)))
    return out


def assert_same_cache(a: KVCache, b: KVCache) -> None:
    assert len(a) == len(b)
    for x, y in zip(cache_arrays(a), cache_arrays(b), strict=True):
        for u, w in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, w)


@pytest.mark.parametrize("window", [2, 3, 5])
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_rollback_equals_never_having_written_the_rejected_positions(window, chunk):
    """Write positions one by one (as the verify pass does) or in chunks (a prefill, batch
    dispatch), past several ring wraps: after rollback(n) the cache equals, array for array, one
    that only ever wrote positions < n, and both go on identically."""
    cfg = dataclasses.replace(demo_config(num_layers=4), sliding_window=window)
    shapes = [(lc.k.shape[0], lc.k.shape[2]) for lc in KVCache(cfg).layers]
    rng = np.random.default_rng(window * 10 + chunk)
    for _ in range(15):
        start = int(rng.integers(1, 4 * window + 3))
        extra = int(rng.integers(1, 3 * window + 2))    # verify chunks longer than a ring too
        keep = start + int(rng.integers(0, extra + 1))
        end = start + extra + window + 1
        kv = {p: [rng.standard_normal(s, dtype=np.float32) for s in shapes] for p in range(end)}

        def write(cache, positions, step=chunk, kv=kv):
            positions = list(positions)
            for i in range(0, len(positions), step):
                p = np.array(positions[i:i + step], dtype=np.int64)
                for li, lc in enumerate(cache.layers):
                    k = np.stack([kv[int(q)][li] for q in p])
                    lc.write(p, k, -k)
                cache.length = int(p[-1]) + 1

        spec, ref = KVCache(cfg), KVCache(cfg)
        write(spec, range(start))
        spec.checkpoint()
        write(spec, range(start, start + extra), step=min(chunk, window))
        spec.rollback(keep)
        spec.commit()
        write(ref, range(keep), step=1)
        assert_same_cache(spec, ref)
        write(spec, range(keep, end))
        write(ref, range(keep, end))
        assert_same_cache(spec, ref)


def test_rollback_into_a_chunk_longer_than_the_ring_is_refused():
    cfg = dataclasses.replace(demo_config(num_layers=2), sliding_window=2)
    cache = KVCache(cfg)
    kv = [np.ones((5, lc.k.shape[0], lc.k.shape[2]), dtype=np.float32) for lc in cache.layers]
    cache.checkpoint()
    for lc, x in zip(cache.layers, kv, strict=True):
        lc.write(np.arange(5), x, x)        # stores positions 3 and 4 only
    cache.length = 5
    with pytest.raises(ValueError, match="longer than the sliding window"):
        cache.rollback(2)
    cache.rollback(4)                       # positions 2 and 3 are still held: fine
    assert len(cache) == 4


def test_rollback_twice_within_one_checkpoint():
    cfg = dataclasses.replace(demo_config(num_layers=2), sliding_window=2)
    cache, ref = KVCache(cfg), KVCache(cfg)
    rng = np.random.default_rng(0)
    vals = [[rng.standard_normal((lc.k.shape[0], 1, lc.k.shape[2]), dtype=np.float32)
             for lc in cache.layers] for _ in range(9)]
    for c, upto in ((cache, 9), (ref, 4)):
        for p in range(upto):
            if c is cache and p == 3:
                c.checkpoint()
            for li, lc in enumerate(c.layers):
                lc.write(np.array([p]), vals[p][li].transpose(1, 0, 2), vals[p][li].transpose(1, 0, 2))
            c.length = p + 1
    cache.rollback(6)
    cache.rollback(4)
    assert_same_cache(cache, ref)


def test_rollback_needs_a_checkpoint_and_a_valid_length():
    cache = KVCache(demo_config(num_layers=2))
    with pytest.raises(RuntimeError, match="checkpoint"):
        cache.rollback(0)
    cache.checkpoint()
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(1)


# --------------------------------------------------------------------------------------------
# Models: tiny sliding windows, so verify chunks wrap the rings

MODEL_CASES = [("small", "f32", 3), ("small", "q4k", 3), ("no_keqv", "f32", 4), ("wide", "q4k", 5)]


@pytest.fixture(scope="module")
def vindexes(tiny_checkpoint, tmp_path_factory):
    made: dict = {}

    def get(name: str, quant: str, window: int):
        key = (name, quant, window)
        if key not in made:
            _, ckpt = tiny_checkpoint(name, 0, sliding_window=window)
            out = tmp_path_factory.mktemp(f"spec-{name}-{quant}-w{window}") / "m.vindex"
            made[key] = open_vindex(extract(ckpt, out, quant=quant, progress=False))
        return made[key]

    return get


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rowwise_verify_rows_equal_one_token_decode_bit_for_bit(vindexes, case):
    vindex = vindexes(*case)
    model = Gemma4Model(vindex)
    rng = np.random.default_rng(1)
    tail = rng.integers(3, vindex.config.vocab_size, 11).tolist()
    seq_cache = model.new_cache()
    model.forward(PROMPT, seq_cache)
    want = np.stack([model.forward([t], seq_cache) for t in tail])
    cache = model.new_cache()
    model.forward(PROMPT, cache)
    got = model.forward(tail, cache, all_logits=True, rowwise=True)
    np.testing.assert_array_equal(got, want)
    assert_same_cache(cache, seq_cache)
    # The ordinary batched path is only close: a different attention kernel. With f32 weights the
    # difference stays at rounding level. With K-quant weights each layer re-quantises its input
    # to Q8_K, so a 1e-7 difference can move one quant by a step and the logits by more: on a Zen 5
    # with the avx512 table (exact K-quant dots, AVX2 float attention) decode differed from the
    # scalar table's by 0.025 after such a flip in one expert input. Bound: 5% of the largest logit.
    other = model.new_cache()
    model.forward(PROMPT, other)
    batched = model.forward(tail, other, all_logits=True)
    if case[1] == "f32":
        np.testing.assert_allclose(batched, want, atol=1e-4)
    else:
        assert np.abs(batched - want).max() <= 0.05 * np.abs(want).max()


class OracleDrafter:
    """Drafts the reference continuation with a token corrupted now and then (seeded), so the
    verify passes see full, partial and zero acceptance; nothing when off the reference."""

    name = "oracle"
    round_trips_per_token = 0

    def __init__(self, reference: list[int], seed: int = 0, corrupt: float = 0.3, vocab: int = 512):
        self.reference, self.corrupt, self.vocab = reference, corrupt, vocab
        self.rng = np.random.default_rng(seed)

    def propose(self, history, n, sampler):
        h = list(history)
        if h != self.reference[:len(h)]:
            return sp.Draft([])
        out = list(self.reference[len(h):len(h) + n])
        for i in range(len(out)):
            if self.rng.random() < self.corrupt / max(1, len(out)):
                out[i] = (out[i] + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab
        return sp.Draft(out)

    def close(self):
        pass


def run_generation(model, steps=STEPS, stop=(), **kw):
    stats = GenerationStats()
    cache = model.new_cache()
    tokens = [s.token for s in generate(model, PROMPT, steps, stop_ids=stop, stats=stats, cache=cache, **kw)]
    return tokens, stats, cache


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_greedy_speculation_is_identical_to_off(vindexes, case):
    vindex = vindexes(*case)
    model = Gemma4Model(vindex)
    ref, ref_stats, ref_cache = run_generation(model)
    assert ref_stats.finish_reason == "length" and len(ref) == STEPS
    full = PROMPT + ref
    drafters = [("lookup", None), ("batch", None)] + [
        (f"oracle{s}", OracleDrafter(full, seed=s, corrupt=c, vocab=vindex.config.vocab_size))
        for s, c in ((0, 0.0), (1, 0.5), (2, 2.0))]
    accepted_any = False
    for n in (1, 3, 8):
        for name, drafter in drafters:
            tokens, stats, cache = run_generation(model, speculate=n, drafter=drafter or name)
            assert tokens == ref, (n, name)
            assert stats.finish_reason == "length" and stats.generated_tokens == STEPS
            assert_same_cache(cache, ref_cache)     # left exactly as plain decoding leaves it
            info = stats.speculation
            assert info["accepted"] <= info["drafted"] and info["decode_passes"] <= STEPS - 1
            accepted_any |= info["accepted"] > 0
            if name == "oracle0":       # perfect drafts: every pass yields n + 1 tokens
                assert info["accepted"] == info["drafted"] > 0
                assert info["decode_passes"] == -(-(STEPS - 1) // (n + 1))
    assert accepted_any


def test_stop_tokens_and_max_tokens_inside_an_accepted_draft(vindexes):
    vindex = vindexes("small", "f32", 3)
    model = Gemma4Model(vindex)
    ref, _, _ = run_generation(model)
    oracle = OracleDrafter(PROMPT + ref, corrupt=0.0)
    for stop_at in (1, 5, 17):
        stop = {ref[stop_at]} - set(ref[:stop_at])
        if not stop:
            continue
        want, want_stats, want_cache = run_generation(model, stop=stop)
        got, stats, cache = run_generation(model, stop=stop, speculate=8, drafter=oracle)
        assert got == want == ref[:stop_at] and stats.finish_reason == want_stats.finish_reason == "stop"
        assert_same_cache(cache, want_cache)
    for steps in (1, 2, 7):
        want, _, want_cache = run_generation(model, steps=steps)
        got, stats, cache = run_generation(model, steps=steps, speculate=8, drafter=oracle)
        assert got == want and stats.finish_reason == "length"
        assert_same_cache(cache, want_cache)


def test_speculation_needs_exact_dispatch_and_a_valid_setting(vindexes):
    vindex = vindexes("small", "f32", 3)
    with pytest.raises(ValueError, match="exact dispatch"):
        list(generate(Gemma4Model(vindex, dispatch="batch"), PROMPT, 4, speculate=4))
    for bad in ("sometimes", -1, sp.MAX_DRAFT + 1, 2.5):
        with pytest.raises(ValueError, match="speculate"):
            list(generate(Gemma4Model(vindex), PROMPT, 4, speculate=bad))
    with pytest.raises(ValueError, match="unknown drafter"):
        list(generate(Gemma4Model(vindex), PROMPT, 4, speculate=4, drafter="crystal-ball"))


def test_auto_is_off_for_in_process_experts(vindexes):
    model = Gemma4Model(vindexes("small", "f32", 3))
    ref, _, _ = run_generation(model)
    tokens, stats, _ = run_generation(model, speculate="auto")
    assert tokens == ref and stats.speculate == "off" and not stats.speculation


# --------------------------------------------------------------------------------------------
# Through expert servers on loopback


@pytest.fixture(scope="module")
def served(vindexes):
    vindex = vindexes("small", "q4k", 3)
    half = vindex.config.num_experts // 2
    ranges = [(0, half - 1), (half, vindex.config.num_experts - 1)]
    servers = [ExpertServer(open_vindex(vindex.path), experts=range(a, b + 1)).start_in_thread("127.0.0.1", 0)
               for a, b in ranges]
    spec = ",".join(f"{a}-{b}={s.address}" for (a, b), s in zip(ranges, servers, strict=True))
    yield vindex, spec
    for s in servers:
        s.stop()


def test_remote_speculation_is_identical_and_saves_round_trips(served):
    vindex, spec = served
    layers = vindex.config.num_layers
    remote = connect_shards(spec, vindex, timeout=30)
    try:
        model = Gemma4Model(vindex, experts=remote)
        ref, off_stats, _ = run_generation(model)
        local_ref, _, _ = run_generation(Gemma4Model(vindex))
        assert ref == local_ref
        per_pass = 2 * layers   # one request per shard per layer, however many rows
        assert off_stats.round_trips - off_stats.prefill_round_trips <= per_pass * (STEPS - 1)
        oracle = OracleDrafter(PROMPT + ref, seed=3, corrupt=0.5, vocab=vindex.config.vocab_size)
        for speculate, drafter in ((4, oracle), (8, "lookup"), ("auto", "lookup"), ("auto", oracle),
                                   (3, "batch")):
            tokens, stats, _ = run_generation(model, speculate=speculate, drafter=drafter)
            assert tokens == ref, (speculate, drafter)
            info = stats.speculation
            decode_trips = stats.round_trips - stats.prefill_round_trips
            # a verify pass of any length: at most one request per shard per layer; the batch
            # drafter adds one `multi` request per shard per drafted token
            draft_trips = 2 * info["drafted"] if drafter == "batch" else 0
            assert 0 < decode_trips <= per_pass * info["decode_passes"] + draft_trips
            if drafter is oracle and speculate == 4:
                assert info["accepted"] > 0
                assert stats.tokens_per_round_trip > 1.5 * off_stats.tokens_per_round_trip
        assert stats.speculate == "3"
    finally:
        remote.close()


# --------------------------------------------------------------------------------------------
# Drafters and the auto policy


def test_prompt_lookup_copies_the_latest_longest_match_and_runs_past_the_end():
    d = sp.PromptLookup(max_ngram=3)
    assert d.propose([1, 2, 3, 1, 2, 3, 1, 2], 7).tokens == [3, 1, 2, 3, 1, 2, 3]
    assert d.propose([5, 6, 7, 8], 3).tokens == []                        # nothing repeats
    # the longest n-gram wins over a more recent shorter one: "9 4" last followed "9 4" at 0
    assert d.propose([9, 4, 1, 4, 2, 9, 4], 2).tokens == [1, 4]
    # incremental index: growing text, then a different text
    h = [7, 8, 9]
    for t in (7, 8):
        h.append(t)
        d.propose(h, 1)
    assert d.propose(h, 4).tokens == [9, 7, 8, 9]
    assert d.propose([3, 3], 2).tokens == [3, 3]
    with pytest.raises(ValueError):
        sp.PromptLookup(max_ngram=1, min_ngram=2)


def test_auto_policy_drafts_long_when_drafts_pay_and_not_at_all_when_they_fail():
    good = sp.AutoPolicy()
    good.record(drafted=0, accepted=0, seconds=1.0)          # a 30-RTT pass: 1 s
    for _ in range(10):
        good.record(drafted=8, accepted=8, seconds=1.02)
    assert good.draft_length() == sp.AUTO_MAX_DRAFT
    assert good.draft_length(3) == 3
    bad = sp.AutoPolicy()
    bad.record(drafted=0, accepted=0, seconds=1.0)
    for _ in range(30):
        bad.record(drafted=4, accepted=0, seconds=1.2)       # 5% per extra row, nothing accepted
    assert bad.draft_length() == 0
    # not drafting, the estimate drifts back to the prior: it probes again after a while
    # ... and probes with one draft token now and then, in case the text changed
    probes = []
    for _ in range(60):
        k = bad.draft_length()
        probes.append(k)
        bad.record(drafted=k, accepted=0, seconds=1.0 + 0.05 * k)
    assert probes[:10] == [0] * 10 and 2 <= probes.count(1) <= 4 and max(probes) == 1
    assert sp.AutoPolicy().draft_length() == 0               # measures a plain pass first
    # a drafter that costs a round trip per token needs more acceptance than a free one
    costly = sp.AutoPolicy(draft_round_trips=1)
    costly.record(drafted=0, accepted=0, seconds=1.0)
    for _ in range(30):
        costly.record(drafted=2, accepted=0, seconds=1.0, draft_seconds=0.1)
    assert costly.draft_length() == 0


def test_parse_speculate():
    assert sp.parse_speculate("off") == sp.parse_speculate(None) == sp.parse_speculate(0) == 0
    assert sp.parse_speculate("auto") == "auto" and sp.parse_speculate("5") == 5 == sp.parse_speculate(5)
