"""Speculative sampling keeps the model's distribution exactly: a chi-square test of the joint
distribution of the first four sampled tokens against the exact one, over many seeds.

With temperature 1 and top-k 4 the first four tokens take at most 4^4 = 256 values, whose
exact probabilities follow from 1 + 4 + 16 + 64 forward passes. Each drafter is run for N
seeds with `speculate=2` (the first token comes from the prefill, the next three from one or
two verify passes, so accept, reject and bonus tokens all occur), and the counts are compared
with N * p by Pearson's statistic over cells merged until each expects >= 5 draws. Under the
null hypothesis it is chi-square with (cells - 1) degrees of freedom; the threshold is its
1 - 1e-3 quantile (Wilson-Hilferty). The seeds are fixed, so the test is deterministic; a
correct implementation fails it for one seed set in a thousand. A negative control (drafts
always accepted) shows the test has the power to see a wrong rule.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest

from larql import speculative as sp
from larql.generate import GenerationStats, generate
from larql.models.gemma4 import Gemma4Model
from larql.sampling import Sampler
from larql.vindex import open_vindex
from larql.vindex.extract import extract

PROMPT = [2, 40, 41, 42, 43, 44]     # longer than the sliding window (3): the ring wraps
TOKENS = 4
TOP_K = 4
Z_999 = 3.0902                     # standard normal 1 - 1e-3 quantile


def sampler(seed: int | None = None) -> Sampler:
    return Sampler(temperature=1.0, top_k=TOP_K, seed=seed)


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tmp_path_factory):
    _, ckpt = tiny_checkpoint("small", 0, sliding_window=3, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"])
    out = tmp_path_factory.mktemp("spec-sampling") / "m.vindex"
    return Gemma4Model(open_vindex(extract(ckpt, out, quant="f32", progress=False)))


def exact_joint(model) -> dict[tuple[int, ...], float]:
    """P(first TOKENS tokens) of plain sampling, enumerated (the sampler's filtered distribution
    after each prefix, from one-token decode steps)."""
    out: dict[tuple[int, ...], float] = {}

    def walk(cache, logits, prefix, prob):
        p = sampler().distribution(logits)
        for t in np.nonzero(p)[0]:
            q = prob * p[t]
            seq = (*prefix, int(t))
            if len(seq) == TOKENS:
                out[seq] = q
                continue
            c = copy.deepcopy(cache)
            walk(c, model.forward([int(t)], c), seq, q)

    cache = model.new_cache()
    walk(cache, model.forward(PROMPT, cache), (), 1.0)
    assert abs(sum(out.values()) - 1) < 1e-9
    return out


def chi_square(counts: Counter, probs: dict, n: int) -> tuple[float, float]:
    """(Pearson statistic, its 1 - 1e-3 null quantile) over cells merged to expect >= 5."""
    cells = sorted(probs, key=probs.get)
    bins, acc_p, acc_o = [], 0.0, 0
    for c in cells:       # merge the least likely cells together until each bin expects >= 5
        acc_p += probs[c]
        acc_o += counts.get(c, 0)
        if acc_p * n >= 5:
            bins.append((acc_p, acc_o))
            acc_p, acc_o = 0.0, 0
    if acc_p:
        p0, o0 = bins.pop() if bins else (0.0, 0)
        bins.append((p0 + acc_p, o0 + acc_o))
    outside = n - sum(counts.get(c, 0) for c in cells)      # a sequence plain sampling never makes
    assert outside == 0, f"{outside} draws outside the support"
    stat = sum((o - n * p) ** 2 / (n * p) for p, o in bins)
    df = len(bins) - 1
    threshold = df * (1 - 2 / (9 * df) + Z_999 * math.sqrt(2 / (9 * df))) ** 3
    return stat, threshold


class ArgmaxDrafter(sp.BatchDrafter):
    """Point-mass drafts: the model's own most likely tokens (exact dispatch, its own cache),
    accepted with probability p(argmax), often enough for long accepted chains."""

    name = "argmax"

    def __init__(self, model) -> None:
        super().__init__(model)
        self.model.dispatch = "exact"

    def propose(self, history, n, sampler):
        return super().propose(history, n, Sampler())     # greedy: probs None


def sampled_batch_drafter(model):
    return sp.BatchDrafter(model, sample_drafts=True)


def draw(model, drafter_factory, seeds) -> tuple[Counter, dict]:
    counts: Counter = Counter()
    totals = Counter()
    for seed in seeds:
        stats = GenerationStats()
        toks = tuple(s.token for s in generate(model, PROMPT, TOKENS, sampler(seed), stats=stats,
                                               speculate=2, drafter=drafter_factory(model)))
        counts[toks] += 1
        totals.update({k: stats.speculation.get(k, 0) for k in ("drafted", "accepted", "decode_passes")})
    return counts, dict(totals)


@pytest.mark.parametrize("drafter,n", [(ArgmaxDrafter, 2000), (sampled_batch_drafter, 2000)],
                         ids=["point-mass", "batch-q"])
def test_speculative_sampling_matches_the_model_distribution(model, drafter, n):
    probs = exact_joint(model)
    counts, totals = draw(model, drafter, range(n))
    stat, threshold = chi_square(counts, probs, n)
    # both rules of the test were exercised: drafts accepted and drafts rejected
    assert 0 < totals["accepted"] < totals["drafted"], totals
    print(f"chi-square {stat:.1f} < {threshold:.1f}; {totals}")
    assert stat < threshold, (stat, threshold, totals)


def test_the_chi_square_test_catches_a_wrong_acceptance_rule(model, monkeypatch):
    """Accepting every in-support draft (no accept/reject) skews towards the drafter's picks."""
    probs = exact_joint(model)

    def accept_all(rows, draft, q, s):
        out = []
        for i, d in enumerate(draft):
            if s.distribution(rows[i])[d] == 0:
                out.append(s(rows[i]))
                return out
            out.append(int(d))
        out.append(s(rows[len(draft)]))
        return out

    monkeypatch.setattr(sp, "accept_draft", accept_all)
    n = 300
    counts, _ = draw(model, ArgmaxDrafter, range(10_000, 10_000 + n))
    stat, threshold = chi_square(counts, probs, n)
    print(f"wrong rule: chi-square {stat:.1f} vs threshold {threshold:.1f}")
    assert stat > 3 * threshold


@pytest.mark.parametrize("drafter", [ArgmaxDrafter, sp.BatchDrafter, lambda m: sp.PromptLookup()],
                         ids=["argmax", "batch", "lookup"])
def test_point_mass_drafts_sample_the_same_tokens_as_off_for_a_seed(model, drafter):
    """One sampler draw per yielded token, in order, on bit-identical logits: the sampled text
    is the one `--speculate off` samples, for every seed and draft length."""
    accepted = 0
    for seed in range(40):
        want = [s.token for s in generate(model, PROMPT, 12, sampler(seed))]
        for n in (1, 3, 8):
            stats = GenerationStats()
            got = [s.token for s in generate(model, PROMPT, 12, sampler(seed), stats=stats, speculate=n,
                                             drafter=drafter(model))]
            assert got == want, (seed, n)
            accepted += stats.speculation["accepted"]
    assert accepted > 0
