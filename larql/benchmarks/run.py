"""`larql bench run`: where a decoded token's time goes on the client, and prefill tokens/s.

On a synthetic vindex with the real Gemma 4 26B A4B shapes (hidden 2816, 16 heads, sliding
8x256 / full 2x512 KV, dense MLP 2112, 128 experts of 704 top-8, vocab 262144, Q4_K) and a few
layers (default 6: five sliding and one full, the real pattern), experts in process:

  decode   per-token time split into attention, dense MLP, router, experts, LM head and the
           rest (embedding, norms, combine), each as a fraction of the token's time; and the
           Python/numpy glue: the time NOT inside a C kernel call (matmul, moe_ffn, or one of
           the fused vector-glue helpers, which are reported on their own line), which
           should stay under 10% of decode time. Also projected to all 30 layers (per-layer
           parts scaled by 30/L, LM head and embedding once).
  prefill  one batched pass over the prompt vs the same prompt fed one token at a time, in
           tokens/s (the ratio is what batching buys).
  agreement (--agreement N) top-1 agreement of batch dispatch with exact dispatch, teacher
           forced on exact mode's greedy tokens.

  floor    bytes read per token (attention, dense MLP, router, top-k experts, LM head: from the
           vindex's own tensors) / the C streaming read bandwidth on all threads (larql bench
           kernels' anchor), over a buffer several times the last-level cache read once after
           each decode token, median: the time no kernel can beat, printed beside the measured
           ms/token as a ratio, for the measured layers and the 30-layer projection. (Timed
           between the tokens so both see the same moments of a shared machine: a best-of-3
           read taken apart moved the ratio by as much as the decode itself did.)

Everything is a ratio against a quantity measured in the same run. --json prints the figures as
one JSON object on stdout (the table then goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict

import numpy as np

from . import add_lm_head_argument, add_synthetic_vindex_arguments, synthetic_vindex

# larql.kernels' fused vector-glue helpers: timed apart from the matmul/moe kernels.
VECTOR_KERNELS = ("rms_norm", "norm_rope", "gelu_mul", "add_rms_norm", "ffn_combine", "route_topk",
                  "attend_one")
COMPONENTS = ("attention", "dense_mlp", "route", "run_experts", "logits")
LABELS = {"attention": "attention", "dense_mlp": "dense MLP", "route": "router",
          "run_experts": "experts", "logits": "LM head (+final norm)",
          "other": "rest (embed, norms, combine)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_lm_head_argument(p)
    add_synthetic_vindex_arguments(p, 6, "vocabulary (default 262144, the real one)")
    p.add_argument("--tokens", type=int, default=16, help="decode tokens measured (default 16)")
    p.add_argument("--warmup", type=int, default=3, help="decode tokens before measuring (default 3)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for prefill (default 64)")
    p.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    p.add_argument("--context", type=int, default=0, metavar="N",
                   help="decode after N cached positions (random K/V written straight into the cache, "
                        "e.g. 1024 fills the sliding windows; default: just the prompt)")
    p.add_argument("--dispatch", choices=["exact", "batch"], default="exact")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object (the table goes to stderr)")
    p.add_argument("--agreement", type=int, default=0, metavar="N",
                   help="also report how often batch dispatch's greedy token matches exact mode's over "
                        "N teacher-forced decode steps (default 0: skip)")


class Profiler:
    """Wall time per model component, plus time inside C kernel calls, by wrapping them."""

    def __init__(self, model) -> None:
        from .. import kernels
        from ..models import gemma4

        self.times: dict[str, float] = defaultdict(float)
        self.kernel_in: dict[str, float] = defaultdict(float)   # C time inside each component
        self.kernel = 0.0
        self.calls = 0
        self._restore = []
        for name in COMPONENTS:
            self._wrap_method(model, name)
        self._wrap_module(gemma4, "matmul")        # every projection and the LM head
        self._wrap_module(kernels, "moe_ffn")      # the experts (LocalExperts calls it)
        self.vec = 0.0                             # fused C vector glue (norms, RoPE, top-k...)
        self.vec_calls = 0
        for name in VECTOR_KERNELS:
            self._wrap_module(kernels, name, vector=True)
        self.attend = 0.0                          # numpy attention over the KV cache
        fn = gemma4.attend

        def attend(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.attend += time.perf_counter() - t

        gemma4.attend = attend
        self._restore.append(lambda: setattr(gemma4, "attend", fn))

    def _wrap_method(self, obj, name: str) -> None:
        fn = getattr(obj, name)
        times = self.times

        def timed(*a, **kw):
            t, k = time.perf_counter(), self.kernel + self.vec
            try:
                return fn(*a, **kw)
            finally:
                times[name] += time.perf_counter() - t
                self.kernel_in[name] += self.kernel + self.vec - k

        setattr(obj, name, timed)
        self._restore.append(lambda: delattr(obj, name))

    def _wrap_module(self, mod, name: str, vector: bool = False) -> None:
        fn = getattr(mod, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if vector:
                    self.vec += time.perf_counter() - t
                    self.vec_calls += 1
                else:
                    self.kernel += time.perf_counter() - t
                    self.calls += 1

        setattr(mod, name, timed)
        self._restore.append(lambda: setattr(mod, name, fn))

    def reset(self) -> None:
        self.times.clear()
        self.kernel_in.clear()
        self.kernel = 0.0
        self.calls = 0
        self.attend = 0.0
        self.vec = 0.0
        self.vec_calls = 0

    def close(self) -> None:
        for undo in reversed(self._restore):
            undo()


def bytes_per_token(vindex, layers: list[int]) -> dict[str, int]:
    """Weight bytes one decoded token reads, by component, over `layers` (the LM head once)."""
    cfg = vindex.config
    out = {"attention": 0, "dense_mlp": 0, "router": 0, "experts": 0}
    for layer in layers:
        a = vindex.attn(layer)
        out["attention"] += sum(m.data.size for m in (a.q, a.k, a.v, a.o) if m is not None)
        d = vindex.dense_mlp(layer)
        out["dense_mlp"] += d.gate.data.size + d.up.data.size + d.down.data.size
        out["router"] += vindex.norm(f"layers.{layer}.router.proj.weight").nbytes
        ef = vindex.expert_file(layer)
        sizes = [e.gate_up_len + e.down_len for e in map(ef.entry, ef.present()) if e is not None]
        out["experts"] += round(cfg.top_k * sum(sizes) / max(1, len(sizes)))
    head = vindex.lm_head()
    out["lm_head"] = head.data.size if head is not None else vindex.embeddings().nbytes
    return out


class InterleavedRead:
    """The C read anchor, timed once after each decode token over a cold buffer (several times
    the last-level cache) on all threads."""

    def __init__(self, nbytes: int = 0) -> None:
        from .. import kernels
        from .kernels import cold_bytes, last_level_cache_bytes

        self.buf = kernels.aligned_buffer(nbytes or cold_bytes(last_level_cache_bytes()))
        self._read = kernels.bench_read(self.buf, parallel=kernels.num_threads() > 1)
        self._read()                  # warm: page tables, pool wake-up
        self.seconds: list[float] = []

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self._read()
        self.seconds.append(time.perf_counter() - t0)

    def bandwidth(self) -> tuple[float, float]:
        """Bytes/s: (median, best) of the reads."""
        return self.buf.size / float(np.median(self.seconds)), self.buf.size / min(self.seconds)


def bandwidth_floor(vindex, measured_s: float, projected_s: float, real_layers: int,
                    read: InterleavedRead) -> dict:
    """The bandwidth floor of this run and of the projection, and measured / floor for each."""
    from .. import kernels

    layers = list(range(vindex.config.num_layers))
    per = bytes_per_token(vindex, layers)
    head = per["lm_head"]
    layer_bytes = sum(per.values()) - head
    projected = round(layer_bytes * real_layers / len(layers)) + head
    bw, best = read.bandwidth()
    floor, floor_proj = (layer_bytes + head) / bw, projected / bw
    return {"bytes_per_token": per, "bytes_per_token_total": layer_bytes + head,
            "bytes_per_token_projected": projected, "c_read_bytes_per_s": bw,
            "c_read_best_bytes_per_s": best, "c_reads": len(read.seconds),
            "threads": kernels.num_threads(), "floor_s": floor, "measured_s": measured_s,
            "x_floor": measured_s / floor, "projected_floor_s": floor_proj,
            "projected_s": projected_s, "projected_x_floor": projected_s / floor_proj}


def main(args: argparse.Namespace) -> int:
    if not args.json:
        return _main(args)
    with contextlib.redirect_stdout(sys.stderr):
        report = _main(args, as_json=True)
    print(json.dumps(report, indent=1))
    return 0


def _main(args: argparse.Namespace, as_json: bool = False):
    from .. import kernels, models
    from ..vindex import open_vindex

    if args.threads:
        kernels.set_num_threads(args.threads)
    path = synthetic_vindex(args.dir, args.layers, args.vocab, "synth-run", args.lm_head)
    vindex = open_vindex(path)
    cfg = vindex.config
    model = models.load(vindex, dispatch=args.dispatch)
    rng = np.random.default_rng(0)
    prompt = [cfg.bos_token_id, *rng.integers(4, cfg.vocab_size, args.prompt_tokens - 1).tolist()]
    n_full = sum(cfg.is_full(i) for i in range(cfg.num_layers))
    print(f"larql bench run: {cfg.num_layers} layers ({n_full} full), hidden {cfg.hidden_size}, "
          f"{cfg.num_experts} experts top-{cfg.top_k}, vocab {cfg.vocab_size}, quant {vindex.quant}, "
          f"isa {kernels.isa()}, {kernels.num_threads()} threads, dispatch {args.dispatch}")

    # Every expert's pages mapped in first, as `larql serve --warmup` does: decode tokens pick
    # experts no earlier token touched, and each first touch of a MADV_RANDOM mapping is a 4 KiB
    # fault (measured: 6 layers spent 11.6 s in the kernel, run_experts 4.3 ms a layer against
    # 1.4 ms for the same bytes resident), which is the page cache's cost, not the kernels'.
    t = time.perf_counter()
    paged = sum(vindex.expert_file(layer).prefault() for layer in range(cfg.num_layers))
    print(f"expert pages mapped in: {paged / 2**20:.0f} MiB in {time.perf_counter() - t:.1f} s")

    # Prefill: one batched pass vs one token at a time (fresh caches). A warm-up pass over the
    # whole prompt first, so both timings find the same expert pages resident.
    model.forward(prompt, model.new_cache())
    t = time.perf_counter()
    cache = model.new_cache()
    logits = model.forward(prompt, cache)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    seq_cache = model.new_cache()
    for tok in prompt:
        model.forward([tok], seq_cache)
    sequential = time.perf_counter() - t
    n = len(prompt)
    print(f"\nprefill {n} tokens: batched {n / batched:.1f} tok/s, one at a time {n / sequential:.1f} tok/s "
          f"-> batching x{sequential / batched:.2f}")

    if args.context > len(prompt):
        fill_cache(cache, args.context)
        print(f"(decode measured after {args.context} cached positions of random K/V)")

    # Decode with the profiler attached, the anchor's read after each token.
    read = InterleavedRead()
    prof = Profiler(model)
    try:
        token = int(np.argmax(logits))
        for _ in range(args.warmup):
            token = int(np.argmax(model.forward([token], cache)))
        prof.reset()
        total = 0.0
        for _ in range(args.tokens):
            t = time.perf_counter()
            token = int(np.argmax(model.forward([token], cache)))
            total += time.perf_counter() - t
            read()
    finally:
        prof.close()
    per_tok = total / args.tokens
    parts = {k: prof.times.get(k, 0.0) / args.tokens for k in COMPONENTS}
    parts["other"] = max(per_tok - sum(parts.values()), 0.0)
    glue = max(total - prof.kernel - prof.vec, 0.0) / args.tokens
    vec = prof.vec / args.tokens
    print(f"\ndecode: {per_tok * 1e3:.2f} ms/token ({1 / per_tok:.2f} tok/s), "
          f"{prof.calls / args.tokens:.0f} kernel calls/token "
          f"(+{prof.vec_calls / args.tokens:.0f} fused vector-glue calls); fractions of decode time:")
    for k, v in parts.items():
        in_c = prof.kernel_in.get(k, 0.0) / args.tokens
        note = f"   ({in_c / v:.0%} in C kernels)" if k in COMPONENTS and v else ""
        print(f"  {LABELS[k]:<30} {v / per_tok:6.1%}   {v * 1e3:8.3f} ms{note}")
    att = prof.attend / args.tokens
    print(f"  {'Python/numpy glue (not in C)':<30} {glue / per_tok:6.1%}   {glue * 1e3:8.3f} ms   "
          f"(target < 10%: {'met' if glue / per_tok < 0.10 else 'NOT met'})")
    print(f"    of which attention over the KV cache (numpy) {att / per_tok:.1%}, "
          f"Python overhead and vector glue {(glue - att) / per_tok:.1%}")
    print(f"  {'fused vector glue (in C)':<30} {vec / per_tok:6.1%}   {vec * 1e3:8.3f} ms   "
          "(norms, RoPE, gelu*up, combine, top-k, decode attention)")

    # Projection to the real depth: everything but the LM head (and its glue) is per layer.
    L, real = cfg.num_layers, 30
    scale = real / L
    proj = {k: (v * scale if k != "logits" else v) for k, v in parts.items()}
    proj_total = sum(proj.values())
    head_glue = (prof.times.get("logits", 0.0) - prof.kernel_in.get("logits", 0.0)) / args.tokens
    proj_glue = (glue - head_glue) * scale + head_glue
    proj_att = att * scale
    print(f"\nprojected to {real} layers: {proj_total * 1e3:.1f} ms/token ({1 / proj_total:.2f} tok/s); "
          "fractions:")
    for k, v in proj.items():
        print(f"  {LABELS[k]:<30} {v / proj_total:6.1%}")
    print(f"  {'Python/numpy glue (not in C)':<30} {min(proj_glue / proj_total, 1):6.1%}")
    print(f"    of which attention over the KV cache (numpy) {proj_att / proj_total:.1%}, "
          f"Python overhead and vector glue {(proj_glue - proj_att) / proj_total:.1%}")
    floor = bandwidth_floor(vindex, per_tok, proj_total, real, read)
    del read
    print(f"\nbandwidth floor ({floor['bytes_per_token_total'] / 1e6:.1f} MB/token over {L} layers / C read "
          f"{floor['c_read_bytes_per_s'] / 1e9:.1f} GB/s on {floor['threads']} threads, median of "
          f"{floor['c_reads']} reads between the tokens, best {floor['c_read_best_bytes_per_s'] / 1e9:.1f}): "
          f"{floor['floor_s'] * 1e3:.2f} ms/token; measured {per_tok * 1e3:.2f} ms = "
          f"x{floor['x_floor']:.2f} the floor")
    print(f"  projected to {real} layers: {floor['bytes_per_token_projected'] / 1e9:.2f} GB/token, floor "
          f"{floor['projected_floor_s'] * 1e3:.1f} ms; projected {proj_total * 1e3:.1f} ms = "
          f"x{floor['projected_x_floor']:.2f} the floor (target <= 1.5)")
    total_bytes = floor["bytes_per_token_total"]
    share = ", ".join(f"{k} {v / total_bytes:.0%}" for k, v in floor["bytes_per_token"].items())
    print(f"  bytes by component ({L} layers): {share}")
    agree = agreement(model, prompt[:16], args.agreement) if args.agreement else None
    model.close()
    if not as_json:
        return 0
    return {"layers": L, "isa": kernels.isa(), "threads": kernels.num_threads(), "dispatch": args.dispatch,
            "prefill_tokens": n, "prefill_batched_tok_per_s": n / batched,
            "prefill_sequential_tok_per_s": n / sequential, "decode_s_per_token": per_tok,
            "decode_parts_s": parts, "glue_s": glue, "vector_glue_s": vec,
            "projected_layers": real, "projected_s_per_token": proj_total, "floor": floor,
            "agreement": agree}


def fill_cache(cache, n: int) -> None:
    """Pretend n positions were seen: random unit-rms K/V (attention cost does not depend on them)."""
    rng = np.random.default_rng(1)
    start = cache.length
    positions = np.arange(start, n, dtype=np.int64)
    for lc in cache.layers:
        kvh, _, d = lc.k.shape
        for i in range(0, positions.size, 256):
            p = positions[i:i + 256]
            kv = rng.standard_normal((p.size, kvh, d), dtype=np.float32)
            lc.write(p, kv, kv)
    cache.length = n


def agreement(model, prompt: list[int], steps: int) -> float:
    """Fraction of steps where batch dispatch's argmax equals exact dispatch's (teacher forced)."""
    from .. import models

    exact = models.load(model.vindex, experts=model.experts, dispatch="exact")
    batch = models.load(model.vindex, experts=model.experts, dispatch="batch")
    ce, cb = exact.new_cache(), batch.new_cache()
    le, lb = exact.forward(prompt, ce), batch.forward(prompt, cb)
    same = 0
    for _ in range(steps):
        tok = int(np.argmax(le))
        same += tok == int(np.argmax(lb))
        le, lb = exact.forward([tok], ce), batch.forward([tok], cb)
    print(f"\nbatch dispatch: greedy token equals exact mode's on {same}/{steps} teacher-forced steps "
          f"({same / steps:.0%})")
    return same / steps
