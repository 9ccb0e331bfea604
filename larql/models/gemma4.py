"""Gemma 4 (text, Mixture-of-Experts variant): the forward pass the laptop runs.

Read top to bottom: weights, the pieces of one decoder layer, the model (the KV cache is
`cache.py`). The ground
truth is `transformers`' `Gemma4ForCausalLM` (see /work/shared/spec/GEMMA4.md):

    h = embed[ids] * embed_scale
    per layer:
        x  = input_layernorm(h)
        h += post_attention_layernorm(attention(x))        # QK-norm, V-norm, RoPE, scale 1.0
        m1 = post_feedforward_layernorm_1(dense_mlp(pre_feedforward_layernorm(h)))
        m2 = post_feedforward_layernorm_2(experts(h, route(h)))   # both FFNs read the same h
        h  = (h + post_feedforward_layernorm(m1 + m2)) * layer_scalar
    logits = softcap(norm(h) @ embed^T)

Every matrix product goes through `larql.kernels.matmul` (f32/f16/bf16/Q4_K/Q6_K weights).
The vector steps between them (norms, QK-norm + RoPE, gelu * up, the residual combine, the
router's top-k, a decode token's attention over the cache) are fused C helpers in
`larql.kernels`, one call per step: on a busy CPU each separate numpy pass costs far more than
its arithmetic. numpy keeps prefill attention and the remaining bookkeeping. Experts
sit behind `larql.experts.Experts` (in process or remote); the backend applies
`pre_feedforward_layernorm_2` and returns the raw weighted sum, and this module applies
`post_feedforward_layernorm_2` to it. A remote backend's requests go out before the dense MLP
runs, which then overlaps the servers' work and the wire (the two FFNs are independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..config import ModelConfig
from ..experts import Experts, Pending
from ..kernels import QMatrix
from .cache import KVCache, LayerCache

# Queries per attention block during prefill: bounds the score matrix to
# heads * QUERY_BLOCK * keys floats however long the prompt is.
QUERY_BLOCK = 256


def matmul(w: QMatrix, x: np.ndarray) -> np.ndarray:
    """y = x @ w.T through the C kernels (a module-level name so a profiler can wrap it)."""
    return kernels.matmul(w, x)


def as_matrix(a: np.ndarray) -> QMatrix:
    """View a 2-D f32/f16 numpy array as a QMatrix without copying."""
    a = np.ascontiguousarray(a)
    fmt = {np.dtype(np.float32): kernels.F32, np.dtype(np.float16): kernels.F16}.get(a.dtype)
    if fmt is None or a.ndim != 2:
        raise ValueError(f"cannot use a {a.dtype} array of shape {a.shape} as a weight matrix")
    rows, cols = a.shape
    return QMatrix(fmt, rows, cols, a.reshape(-1).view(np.uint8), cols)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def softcap(logits: np.ndarray, cap: float | None) -> np.ndarray:
    """tanh(logits / cap) * cap, in place: no new vocabulary-sized temporaries per token."""
    if not cap:
        return logits
    c = np.float32(cap)
    np.divide(logits, c, out=logits)
    np.tanh(logits, out=logits)
    return np.multiply(logits, c, out=logits)


# --------------------------------------------------------------------------------------------
# Weights


@dataclass
class LayerWeights:
    index: int
    full: bool                      # full attention (else sliding window)
    head_dim: int
    kv_heads: int
    k_eq_v: bool
    inv_freq: np.ndarray            # [head_dim/2] RoPE frequencies (zeros where not rotated)
    q: QMatrix
    k: QMatrix
    v: QMatrix | None               # None when V reuses the raw K projection
    o: QMatrix
    gate: QMatrix
    up: QMatrix
    down: QMatrix
    router: QMatrix                 # [E, H]
    router_scale: np.ndarray        # [H], folded with H^-0.5
    per_expert_scale: np.ndarray    # [E]
    input_norm: np.ndarray
    post_attn_norm: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray
    pre_ffn_norm: np.ndarray
    post_ffn_norm: np.ndarray
    post_ffn_norm_1: np.ndarray
    post_ffn_norm_2: np.ndarray
    layer_scalar: np.float32


def rope_inv_freq(cfg: ModelConfig, layer: int) -> np.ndarray:
    """Default RoPE on sliding layers; "proportional" partial RoPE on full layers.

    Proportional RoPE keeps the whole head (rotate-half pairs i with i + d/2) but only the first
    `partial_rotary_factor * d / 2` frequencies are non-zero, with exponents over the full d.
    """
    d = cfg.layer_head_dim(layer)
    if cfg.is_full(layer):
        theta = cfg.rope_theta_global
        rotated = int(cfg.partial_rotary_factor_global * d // 2)
    else:
        theta, rotated = cfg.rope_theta_local, d // 2
    inv = np.zeros(d // 2, dtype=np.float32)
    exps = np.arange(0, 2 * rotated, 2, dtype=np.float32) / np.float32(d)
    inv[:rotated] = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
    return inv


def load_layer(vindex, layer: int) -> LayerWeights:
    cfg: ModelConfig = vindex.config
    p = f"layers.{layer}."
    attn = vindex.attn(layer)
    mlp = vindex.dense_mlp(layer)
    router = np.ascontiguousarray(vindex.norm(p + "router.proj.weight"), dtype=np.float32)
    router = router.reshape(cfg.num_experts, cfg.hidden_size)
    scale = vindex.norm(p + "router.scale").astype(np.float32) * np.float32(cfg.hidden_size ** -0.5)
    has_scalar = vindex.has(p + "layer_scalar")
    layer_scalar = vindex.norm(p + "layer_scalar") if has_scalar else np.ones(1, np.float32)
    return LayerWeights(
        index=layer,
        full=cfg.is_full(layer),
        head_dim=cfg.layer_head_dim(layer),
        kv_heads=cfg.layer_kv_heads(layer),
        k_eq_v=cfg.layer_k_eq_v(layer),
        inv_freq=rope_inv_freq(cfg, layer),
        q=attn.q, k=attn.k, v=attn.v, o=attn.o,
        gate=mlp.gate, up=mlp.up, down=mlp.down,
        router=as_matrix(router),
        router_scale=scale,
        per_expert_scale=vindex.norm(p + "router.per_expert_scale").astype(np.float32),
        input_norm=vindex.norm(p + "input_layernorm.weight"),
        post_attn_norm=vindex.norm(p + "post_attention_layernorm.weight"),
        q_norm=vindex.norm(p + "self_attn.q_norm.weight"),
        k_norm=vindex.norm(p + "self_attn.k_norm.weight"),
        pre_ffn_norm=vindex.norm(p + "pre_feedforward_layernorm.weight"),
        post_ffn_norm=vindex.norm(p + "post_feedforward_layernorm.weight"),
        post_ffn_norm_1=vindex.norm(p + "post_feedforward_layernorm_1.weight"),
        post_ffn_norm_2=vindex.norm(p + "post_feedforward_layernorm_2.weight"),
        layer_scalar=np.float32(np.asarray(layer_scalar).reshape(-1)[0]),
    )


# --------------------------------------------------------------------------------------------
# The pieces of one layer


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # f32 like transformers: the angle is rounded to f32 before cos/sin.
    ang = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(ang), np.sin(ang)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
           window: int | None) -> np.ndarray:
    """Scaled-by-1.0 softmax attention with GQA and a position mask.

    q [T, heads, d]; k, v [kv_heads, S, d]; q_pos [T]; k_pos [S] (-1 = empty slot).
    A key is visible when 0 <= q_pos - k_pos (< window on sliding layers). Returns [T, heads*d].
    """
    T, heads, d = q.shape
    kvh = k.shape[0]
    g = heads // kvh
    out = np.empty((T, heads * d), dtype=np.float32)
    for s in range(0, T, QUERY_BLOCK):
        qb = q[s:s + QUERY_BLOCK]
        tb = qb.shape[0]
        kb, vb, kp = k, v, k_pos
        if window and k.shape[1] > tb + window:
            # A long prompt on a sliding layer: this block only sees the keys of its window,
            # so prefill stays linear in the prompt length.
            lo, hi = q_pos[s] - window + 1, q_pos[s + tb - 1]
            idx = np.nonzero((k_pos >= lo) & (k_pos <= hi))[0]
            kb, vb, kp = k[:, idx], v[:, idx], k_pos[idx]
        dist = q_pos[s:s + tb, None] - kp[None, :]
        visible = (dist >= 0) & (kp[None, :] >= 0)
        if window:
            visible &= dist < window
        # [T, heads, d] -> [kvh, g*T, d]: query head h reads kv head h // g.
        qg = qb.reshape(tb, kvh, g, d).transpose(1, 2, 0, 3).reshape(kvh, g * tb, d)
        scores = _bmm_t(qg, kb).reshape(kvh, g, tb, -1)
        scores = np.where(visible, scores, np.float32(-np.inf))
        probs = softmax(scores).reshape(kvh, g * tb, -1)
        a = _bmm(probs, vb).reshape(kvh, g, tb, d)
        out[s:s + tb] = a.transpose(2, 0, 1, 3).reshape(tb, heads * d)
    return out


# Decode multiplies a couple of query rows per KV head by the cache: skinny products where a
# multi-threaded BLAS spends more time waking threads than computing (and fights the kernels'
# own thread pool for the cores). einsum's single-threaded loop is faster there; prefill blocks
# are real matrix products and go to BLAS.
_SKINNY_ROWS = 16


def _bmm_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [B, m, d] @ b[B, n, d]^T -> [B, m, n]."""
    if a.shape[1] <= _SKINNY_ROWS:
        return np.einsum("bmd,bnd->bmn", a, b)
    return a @ b.transpose(0, 2, 1)


def _bmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [B, m, n] @ b [B, n, d] -> [B, m, d]."""
    if a.shape[1] <= _SKINNY_ROWS:
        return np.einsum("bmn,bnd->bmd", a, b)
    return a @ b


@dataclass
class RouteResult:
    ids: np.ndarray      # int32 [T, K]
    weights: np.ndarray  # f32 [T, K]


# --------------------------------------------------------------------------------------------
# The model


class Gemma4Model:
    """Gemma 4 MoE over a vindex. `forward(ids, cache)` runs T new tokens and returns logits.

    experts: an `Experts` backend; None runs them in process from the vindex (LocalExperts).
    dispatch: "exact" calls the experts layer by layer (what the model computes);
    "batch" is the reference's one-round-trip approximation (see `_forward_batch`).
    """

    def __init__(self, vindex, experts: Experts | None = None, dispatch: str = "exact") -> None:
        if dispatch not in ("exact", "batch"):
            raise ValueError(f"dispatch must be 'exact' or 'batch', not {dispatch!r}")
        self.vindex = vindex
        self.cfg: ModelConfig = vindex.config
        cfg = self.cfg
        if not cfg.num_experts:
            raise ValueError("this vindex has no experts (num_experts = 0); only Gemma 4 MoE is supported")
        if experts is None:
            from ..experts import LocalExperts

            experts = LocalExperts(vindex)
        self.experts = experts
        self.dispatch = dispatch
        self.embed = vindex.embeddings()
        head = vindex.lm_head()
        self.lm_head: QMatrix = head if head is not None else as_matrix(self.embed)
        self.embed_scale = np.float32(cfg.embed_scale)
        self.final_norm = vindex.norm("norm.weight")
        # Every norm is kernels.rms_norm: x / rms(x) * w (Gemma 4 stores w itself, no 1 + w), one C
        # call each; ~10 per layer per token, where numpy's several passes cost more than the math.
        self.eps = np.float32(cfg.rms_norm_eps)
        self.layers = [load_layer(vindex, i) for i in range(cfg.num_layers)]
        self._rope_cache: dict = {}

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg)

    # -- embeddings and head -------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= self.embed.shape[0]):
            bad = int(ids[(ids < 0) | (ids >= self.embed.shape[0])][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.embed.shape[0] - 1})")
        # transformers multiplies in the weight dtype; for f16 embeddings the scale is f16-rounded
        # as well, which ModelConfig.embed_scale already encodes.
        return self.embed[ids].astype(np.float32) * self.embed_scale

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Final norm, tied LM head, soft-cap. h [T, H] -> [T, vocab]."""
        x = kernels.rms_norm(h, self.final_norm, self.eps)
        return softcap(matmul(self.lm_head, x), self.cfg.final_logit_softcapping)

    # -- attention -------------------------------------------------------------------------
    def attention(self, lw: LayerWeights, x: np.ndarray, positions: np.ndarray,
                  cache: LayerCache, rowwise: bool = False) -> np.ndarray:
        cfg = self.cfg
        T = x.shape[0]
        d = lw.head_dim
        q = matmul(lw.q, x).reshape(T, cfg.num_heads, d)
        k_raw = matmul(lw.k, x).reshape(T, lw.kv_heads, d)
        v = k_raw if lw.k_eq_v else matmul(lw.v, x).reshape(T, lw.kv_heads, d)
        cos, sin = self._rope(positions, lw)
        q = kernels.norm_rope(q, lw.q_norm, self.eps, cos, sin)
        k = kernels.norm_rope(k_raw, lw.k_norm, self.eps, cos, sin)
        v = kernels.rms_norm(v, None, self.eps)  # V norm has no weight; with k_eq_v it sees the raw K

        window = None if lw.full else cfg.sliding_window
        if rowwise and T > 1:
            # Verify pass of speculative decoding: each row written and attended exactly as a
            # one-token decode step would (same C kernel, same cache state), so the logits of
            # row i are bit-identical to decoding the tokens one by one. Rows are few (the
            # drafts); the projections and the experts stay batched.
            a = np.empty((T, cfg.num_heads * d), dtype=np.float32)
            for i in range(T):
                cache.write(positions[i:i + 1], k[i:i + 1], v[i:i + 1])
                a[i] = kernels.attend_one(q[i], cache.k, cache.v, cache.pos, cache.used,
                                          positions[i], window)
        elif window and T > 1:
            # A prompt chunk can be longer than the ring: attend over (ring + chunk), then
            # keep the chunk's last `window` entries.
            ck, cv, cpos = cache.view()
            keys = np.concatenate([ck, k.transpose(1, 0, 2)], axis=1)
            vals = np.concatenate([cv, v.transpose(1, 0, 2)], axis=1)
            kpos = np.concatenate([np.where(cpos < positions[0], cpos, -1), positions])
            a = attend(q, keys, vals, positions, kpos, window)
            cache.write(positions, k, v)
        elif T == 1:
            # Decode: one query row over the cache, in C straight from the cache arrays.
            cache.write(positions, k, v)
            a = kernels.attend_one(q[0], cache.k, cache.v, cache.pos, cache.used, positions[0], window)
            a = a.reshape(1, -1)
        else:
            cache.write(positions, k, v)
            keys, vals, kpos = cache.view()
            a = attend(q, keys, vals, positions, kpos, window)
        return matmul(lw.o, a)

    def _rope(self, positions: np.ndarray, lw: LayerWeights) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin for these positions, computed once per forward call and layer type."""
        key = (lw.full, lw.head_dim)
        hit = self._rope_cache.get(key)
        if hit is None or hit[0] is not positions:
            hit = (positions, *rope_tables(positions, lw.inv_freq))
            self._rope_cache[key] = hit
        return hit[1], hit[2]

    # -- feed-forward ----------------------------------------------------------------------
    def dense_mlp(self, lw: LayerWeights, h: np.ndarray) -> np.ndarray:
        x = kernels.rms_norm(h, lw.pre_ffn_norm, self.eps)
        return matmul(lw.down, kernels.gelu_mul(matmul(lw.gate, x), matmul(lw.up, x)))

    def route(self, lw: LayerWeights, h: np.ndarray) -> RouteResult:
        """Router on the raw residual: softmax over all experts, top-k, renormalise, per-expert scale.

        Softmax-then-renormalise over the top k equals a softmax over the top k logits alone
        (the other experts' terms cancel), so only k exponentials are taken.
        """
        r = kernels.rms_norm(h, lw.router_scale, self.eps)  # x / rms * scale, as the weight
        logits = matmul(lw.router, r)
        ids, w = kernels.route_topk(logits, self.cfg.top_k, lw.per_expert_scale)
        return RouteResult(ids, w)

    def run_experts(self, lw: LayerWeights, h: np.ndarray, route: RouteResult) -> np.ndarray:
        return self.experts.forward(lw.index, h, route.ids, route.weights)

    def start_experts(self, lw: LayerWeights, h: np.ndarray, route: RouteResult) -> Pending:
        """The layer's expert call, begun: a backend with `start` (remote) sends now, so the
        dense MLP overlaps the servers' work and the wire; others run at `result()`."""
        start = getattr(self.experts, "start", None)
        if start is None:
            return Pending(lambda: self.run_experts(lw, h, route))
        return start(lw.index, h, route.ids, route.weights)

    def combine(self, lw: LayerWeights, h: np.ndarray, m1: np.ndarray, moe_sum: np.ndarray) -> np.ndarray:
        # (h + post_ffn_norm(post_ffn_norm_1(m1) + post_ffn_norm_2(moe_sum))) * layer_scalar
        return kernels.ffn_combine(h, m1, moe_sum, lw.post_ffn_norm_1, lw.post_ffn_norm_2,
                                   lw.post_ffn_norm, self.eps, lw.layer_scalar)

    def layer(self, lw: LayerWeights, h: np.ndarray, positions: np.ndarray, cache: LayerCache,
              moe_sum: np.ndarray | None = None,
              rowwise: bool = False) -> tuple[np.ndarray, np.ndarray, RouteResult]:
        """One decoder layer. With `moe_sum` given, use it instead of calling the experts.

        Returns (new h, the residual the FFNs read, its route)."""
        x = kernels.rms_norm(h, lw.input_norm, self.eps)
        att = self.attention(lw, x, positions, cache, rowwise)
        h = kernels.add_rms_norm(h, att, lw.post_attn_norm, self.eps)
        route = self.route(lw, h)
        pending = self.start_experts(lw, h, route) if moe_sum is None else None
        try:
            m1 = self.dense_mlp(lw, h)      # while remote experts compute (both read h)
        finally:
            if pending is not None:
                moe_sum = pending.result()
        return self.combine(lw, h, m1, moe_sum), h, route

    # -- whole model -------------------------------------------------------------------------
    def forward(self, ids, cache: KVCache, all_logits: bool = False, rowwise: bool = False) -> np.ndarray:
        """Run T new tokens (a prompt chunk, or one decode token) at the cache's next positions.

        Returns logits f32 [vocab] for the last token, or [T, vocab] with all_logits.
        rowwise (exact dispatch): attention row by row as decode does it, so that row i's
        logits equal, bit for bit, those of feeding the tokens one at a time, while each
        layer's experts still get all T tokens in one call (speculative decoding's verify).
        Every other step already computes each row independently of the others.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward needs at least one token")
        positions = np.arange(cache.length, cache.length + ids.size, dtype=np.int64)
        h = self.embed_tokens(ids)
        if self.dispatch == "batch":
            h = self._forward_batch(h, positions, cache)
        else:
            for lw in self.layers:
                h, _, _ = self.layer(lw, h, positions, cache.layers[lw.index], rowwise=rowwise)
        cache.length += ids.size
        logits = self.logits(h if all_logits else h[-1:])
        return logits if all_logits else logits[0]

    def _forward_batch(self, h0: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        """Batch dispatch: every layer's expert work in ONE `forward_multi` (one round trip).

        Pass 1 runs all layers with expert outputs zeroed, collecting each layer's FFN input and
        route. The experts then run on those inputs at once, and pass 2 reruns the layers using
        them (rewriting the KV entries pass 1 wrote at the same positions). Approximate: a
        layer's experts see a residual computed without the experts of the layers before it.
        """
        # One decode token overwrites only its own slot, which pass 2 rewrites; a chunk of
        # several could evict ring entries pass 2 still needs, so pass 1 writes to a copy.
        scratch = cache.layers if h0.shape[0] == 1 else [lc.copy() for lc in cache.layers]
        work = []
        h = h0
        for lw in self.layers:
            zero = np.zeros_like(h)
            h, ffn_in, route = self.layer(lw, h, positions, scratch[lw.index], moe_sum=zero)
            work.append((lw.index, ffn_in, route.ids, route.weights))
        moe = self.experts.forward_multi(work)
        if len(moe) != len(work):
            raise ValueError(f"experts backend returned {len(moe)} results for {len(work)} layers")
        h = h0
        for lw, moe_sum in zip(self.layers, moe, strict=True):
            h, _, _ = self.layer(lw, h, positions, cache.layers[lw.index], moe_sum=moe_sum)
        return h

    def close(self) -> None:
        self.experts.close()
