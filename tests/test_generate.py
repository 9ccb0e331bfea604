"""Sampling and the generation loop (stop ids, logprobs, stats, cache continuation)."""

from __future__ import annotations

import numpy as np
import pytest

from larql.generate import GenerationStats, generate
from larql.models.gemma4 import Gemma4Model
from larql.sampling import Sampler, log_softmax, top_logprobs
from larql.vindex import open_vindex
from larql.vindex.extract import extract

LOGITS = np.array([0.5, 3.0, 2.9, -1.0, 1.0, 2.0], dtype=np.float32)


def test_greedy_is_argmax():
    assert Sampler()(LOGITS) == 1


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    a = Sampler(1.0, seed=5)
    b = Sampler(1.0, seed=5)
    seq_a = [a(LOGITS) for _ in range(50)]
    assert seq_a == [b(LOGITS) for _ in range(50)]
    c = Sampler(1.0, seed=6)
    assert seq_a != [c(LOGITS) for _ in range(50)]


def test_sampling_frequencies_follow_softmax():
    s = Sampler(1.0, seed=0)
    counts = np.bincount([s(LOGITS) for _ in range(20000)], minlength=LOGITS.size) / 20000
    p = np.exp(LOGITS - LOGITS.max())
    p /= p.sum()
    # 20000 draws: the standard error of each frequency is below 0.0036; allow 4 of them.
    assert np.abs(counts - p).max() < 0.015


def test_top_k_and_top_p_filters():
    p = Sampler(1.0, top_k=2).distribution(LOGITS)
    assert set(np.nonzero(p)[0]) == {1, 2} and abs(p.sum() - 1) < 1e-12
    # top_p: the smallest most-likely set reaching the mass. Ids 1, 2 hold ~0.63 of it here.
    p_full = Sampler(1.0).distribution(LOGITS)
    first_two = p_full[1] + p_full[2]
    assert set(np.nonzero(Sampler(1.0, top_p=first_two - 1e-6).distribution(LOGITS))[0]) == {1, 2}
    assert set(np.nonzero(Sampler(1.0, top_p=first_two + 1e-6).distribution(LOGITS))[0]) == {1, 2, 5}
    # A tiny top_p or top_k=1 is greedy whatever the seed.
    assert {Sampler(2.0, top_p=1e-9, seed=s)(LOGITS) for s in range(20)} == {1}
    assert {Sampler(2.0, top_k=1, seed=s)(LOGITS) for s in range(20)} == {1}
    # Low temperature sharpens, high flattens.
    assert Sampler(0.1).distribution(LOGITS)[1] > p_full[1] > Sampler(10.0).distribution(LOGITS)[1]


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(temperature=float("nan"))])
def test_bad_sampler_settings(kw):
    with pytest.raises(ValueError):
        Sampler(**kw)


def test_logprobs_helpers():
    lp = log_softmax(LOGITS)
    assert abs(np.exp(lp).sum() - 1) < 1e-12
    top = top_logprobs(lp, 3)
    assert [i for i, _ in top] == [1, 2, 5]
    assert top[0][1] == pytest.approx(lp[1])


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tmp_path_factory):
    _, ckpt = tiny_checkpoint("small", 0)
    out = tmp_path_factory.mktemp("gen") / "m.vindex"
    vindex = open_vindex(extract(ckpt, out, quant="f32", progress=False))
    return Gemma4Model(vindex)


def test_generation_stops_on_stop_ids_and_counts(model):
    prompt = [2, 40, 41, 42]
    free = [s.token for s in generate(model, prompt, 12)]
    assert len(free) == 12
    stop = free[5]
    first = free.index(stop)
    stats = GenerationStats()
    got = [s.token for s in generate(model, prompt, 12, stop_ids=[stop], stats=stats)]
    assert got == free[:first] and stats.finish_reason == "stop"
    assert stats.generated_tokens == first and stats.prompt_tokens == 4
    stats = GenerationStats()
    assert len(list(generate(model, prompt, 3, stats=stats))) == 3 and stats.finish_reason == "length"
    assert stats.prefill_s > 0 and stats.decode_s > 0 and "prompt 4 tok" in stats.summary()
    assert list(generate(model, prompt, 0)) == []


def test_logprobs_are_the_models_distribution(model):
    prompt = [2, 50, 51]
    steps = list(generate(model, prompt, 4, logprobs=5))
    cache = model.new_cache()
    logits = model.forward(prompt, cache)
    for step in steps:
        lp = log_softmax(logits)
        assert step.token == int(np.argmax(logits))
        assert step.logprob == pytest.approx(lp[step.token])
        assert step.top_logprobs[0] == (step.token, pytest.approx(lp[step.token]))
        assert len(step.top_logprobs) == 5
        logits = model.forward([step.token], cache)


def test_continuing_a_cache_equals_one_long_prompt(model):
    """A second turn appended to the first turn's cache sees the whole conversation."""
    turn1, turn2 = [2, 60, 61, 62, 63, 64, 65], [70, 71, 72, 73, 74, 75, 76, 77, 78]
    cache = model.new_cache()
    out1 = [s.token for s in generate(model, turn1, 5, cache=cache)]
    # The cache holds the prompt plus the generated tokens that were fed back (all but the last).
    assert len(cache) == len(turn1) + len(out1) - 1
    history = turn1 + out1[:-1]
    out2 = [s.token for s in generate(model, turn2, 6, cache=cache)]
    assert out2 == [s.token for s in generate(model, history + turn2, 6)]


def test_bad_generate_inputs(model):
    with pytest.raises(ValueError, match="no tokens"):
        list(generate(model, [], 3))
    with pytest.raises(ValueError, match="max_tokens"):
        list(generate(model, [2], -1))
