"""The fused vector-glue kernels (csrc/vecops.c) against numpy written from the formulas.

Each helper replaces several numpy passes in the model, so each must compute the same f32
values: norms and RoPE to a few ulps, top-k exactly (same ids, same order), attention to 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from larql import kernels

EPS = 1e-6


def np_rms_norm(x, w=None):
    x = x.astype(np.float32)
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True).astype(np.float32)
    y = x / np.sqrt(ms + np.float32(EPS))
    return y * w if w is not None else y


def np_gelu_tanh(x):
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def np_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("shape", [(5,), (3, 2816), (2, 4, 257)])
def test_rms_norm_matches_formula(rng, shape):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    np.testing.assert_allclose(kernels.rms_norm(x, w, EPS), np_rms_norm(x, w), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(kernels.rms_norm(x, None, EPS), np_rms_norm(x), rtol=2e-6, atol=1e-6)
    # a zero row is eps-guarded, not NaN
    assert np.all(kernels.rms_norm(np.zeros(shape, np.float32), w, EPS) == 0)


def test_norm_rope_matches_norm_then_rope(rng):
    T, heads, d = 3, 4, 64
    x = rng.standard_normal((T, heads, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    ang = np.arange(T, dtype=np.float32)[:, None] * rng.random(d // 2).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    before = x.copy()
    got = kernels.norm_rope(x, w, EPS, cos, sin)
    np.testing.assert_array_equal(x, before)  # input untouched
    np.testing.assert_allclose(got, np_rope(np_rms_norm(x, w), cos, sin), rtol=1e-5, atol=2e-6)
    with pytest.raises(kernels.KernelError, match="cos/sin"):
        kernels.norm_rope(x, w, EPS, cos[:, :-1], sin)


def test_gelu_mul(rng):
    g = (rng.standard_normal(1000) * 4).astype(np.float32)
    u = rng.standard_normal(1000).astype(np.float32)
    # atol: for very negative g, 1 + tanh cancels, so one ulp of difference between libm's tanhf
    # and numpy's tanh near -1 (~6e-8) shows up as an absolute error of that size times |g u|.
    np.testing.assert_allclose(kernels.gelu_mul(g, u), np_gelu_tanh(g) * u, rtol=1e-6, atol=1e-6)
    with pytest.raises(kernels.KernelError, match="differ"):
        kernels.gelu_mul(g, u[:10])


def test_add_rms_norm_and_combine(rng):
    h, a, b = (rng.standard_normal((2, 300)).astype(np.float32) for _ in range(3))
    w1, w2, w = (rng.standard_normal(300).astype(np.float32) for _ in range(3))
    got = kernels.add_rms_norm(h, a, w, EPS)
    np.testing.assert_allclose(got, h + np_rms_norm(a, w), rtol=1e-5, atol=1e-6)
    want = (h + np_rms_norm(np_rms_norm(a, w1) + np_rms_norm(b, w2), w)) * np.float32(0.5)
    np.testing.assert_allclose(kernels.ffn_combine(h, a, b, w1, w2, w, EPS, 0.5), want, rtol=1e-5, atol=1e-6)


def test_route_topk_ids_order_and_weights(rng):
    logits = rng.standard_normal((4, 128)).astype(np.float32)
    logits[1, [3, 90]] = 9.0  # a tie: the lower id comes first
    scale = rng.random(128).astype(np.float32) + 0.5
    ids, w = kernels.route_topk(logits, 8, scale)
    want = np.argsort(-logits, axis=-1, kind="stable")[:, :8]
    np.testing.assert_array_equal(ids, want)
    top = np.take_along_axis(logits, want, axis=-1)
    e = np.exp(top - top.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(w, e / e.sum(axis=-1, keepdims=True) * scale[want], rtol=1e-6)
    assert ids.dtype == np.int32 and w.dtype == np.float32
    with pytest.raises(kernels.KernelError, match="outside"):
        kernels.route_topk(logits, 129, scale)


@pytest.mark.parametrize("window", [None, 3])
def test_attend_one_masks_by_position(rng, window):
    heads, kvh, d, slots = 8, 2, 32, 6
    q = rng.standard_normal((heads, d)).astype(np.float32)
    k = rng.standard_normal((kvh, slots, d)).astype(np.float32)
    v = rng.standard_normal((kvh, slots, d)).astype(np.float32)
    pos = np.array([8, 9, 4, 5, 10, -1], dtype=np.int64)  # a ring: slot 5 never written
    q_pos = 9
    got = kernels.attend_one(q, k, v, pos, 5, q_pos, window)
    want = np.empty((heads, d), np.float32)
    for h in range(heads):
        dist = q_pos - pos[:5]
        vis = (pos[:5] >= 0) & (dist >= 0) & ((dist < window) if window else True)
        s = k[h // (heads // kvh), :5][vis] @ q[h]
        p = np.exp(s - s.max())
        want[h] = (p / p.sum()) @ v[h // (heads // kvh), :5][vis]
    np.testing.assert_allclose(got.reshape(heads, d), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(kernels.KernelError, match="at least n"):
        kernels.attend_one(q, k, v, pos, 7, q_pos, window)


@pytest.mark.parametrize("heads,kvh,d", [(16, 2, 40), (16, 8, 256), (6, 3, 16), (4, 4, 7)])
def test_attend_one_grouped_heads_and_unwritten_slots(rng, heads, kvh, d):
    """Query heads grouped per KV head (2-8 of them, as on Gemma 4's layers), head sizes with a
    tail past the 16-value register blocks, more slots than one value pass: the numpy result.
    Unwritten slots hold NaN and slots outside the window hold huge values: neither may leak."""
    slots, n, q_pos, window = 23, 21, 40, 12
    q = rng.standard_normal((heads, d)).astype(np.float32)
    k = rng.standard_normal((kvh, slots, d)).astype(np.float32)
    v = rng.standard_normal((kvh, slots, d)).astype(np.float32)
    pos = np.arange(20, 20 + slots, dtype=np.int64)
    v[:, pos <= q_pos - window] = 1e30          # visible only without the window
    pos[[3, 9, 17]] = -1
    k[:, [3, 9, 17]] = np.nan
    v[:, [3, 9, 17]] = np.nan
    got = kernels.attend_one(q, k, v, pos, n, q_pos, window).reshape(heads, d)
    dist = q_pos - pos[:n]
    vis = (pos[:n] >= 0) & (dist >= 0) & (dist < window)
    for h in range(heads):
        kv = h // (heads // kvh)
        sc = k[kv, :n][vis].astype(np.float64) @ q[h]
        p = np.exp(sc - sc.max())
        want = (p / p.sum()) @ v[kv, :n][vis].astype(np.float64)
        np.testing.assert_allclose(got[h], want, rtol=2e-5, atol=2e-5)
