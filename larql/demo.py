"""`larql demo`: the whole system on one machine in seconds, with nothing downloaded.

1. build a small random Gemma 4 MoE vindex (byte-level tokenizer, Q4_K experts);
2. start expert servers on loopback, each owning a contiguous slice of the experts
   (child processes running `larql serve`, or threads with --in-process);
3. generate through them with `--moe-shards`-style remote experts, then again with the experts
   in process, and check the tokens are identical;
4. print what happened, the tok/s of both, and stop the servers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .config import ModelConfig
from .errors import LarqlError
from .processes import ServerProcess, default_server_threads, free_port


def demo_config(num_layers: int = 4, hidden: int = 256, num_experts: int = 16, top_k: int = 4,
                vocab: int = 260, moe_intermediate: int = 352) -> ModelConfig:
    """A small but complete Gemma 4 MoE shape: sliding and full layers, k_eq_v, Q4_K-able rows."""
    return ModelConfig(
        model_type="gemma4_text", num_layers=num_layers, hidden_size=hidden, intermediate_size=384,
        vocab_size=vocab, num_heads=4, num_kv_heads=2, head_dim=64, global_head_dim=128,
        num_global_kv_heads=1, attention_k_eq_v=True, sliding_window=16,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                     for i in range(num_layers)],
        rope_theta_local=10_000.0, rope_theta_global=1_000_000.0, partial_rotary_factor_global=0.25,
        rms_norm_eps=1e-6, final_logit_softcapping=30.0, num_experts=num_experts, top_k=top_k,
        moe_intermediate_size=moe_intermediate, bos_token_id=2, eos_token_ids=[1], pad_token_id=0,
    )


def build_demo_vindex(out: str | os.PathLike, *, quant: str = "q4k", seed: int = 0,
                      config: ModelConfig | None = None, progress: bool = False,
                      overwrite: bool = True) -> Path:
    """Write a random Gemma 4 vindex with the byte-level tokenizer (no torch, no download)."""
    from .tokenizer import byte_level_tokenizer
    from .vindex import write_vindex
    from .vindex.random_model import random_tensors

    cfg = config or demo_config()
    tok = byte_level_tokenizer().to_str().encode()
    return write_vindex(out, cfg, random_tensors(cfg, seed), quant=quant, tokenizer_json=tok,
                        progress=progress, model_name=f"larql-demo-random-{quant}-seed{seed}",
                        overwrite=overwrite)


def shard_ranges(num_experts: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, as even as possible: 16 experts over 2 shards -> [(0, 7), (8, 15)]."""
    if not 1 <= shards <= num_experts:
        raise ValueError(f"--shards {shards} must be between 1 and the {num_experts} experts")
    bounds = [round(i * num_experts / shards) for i in range(shards + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(shards)]


def speculative_line(remote, prompt: str, max_tokens: int, n: int = 8) -> tuple[str, bool]:
    """Greedy through the servers without and with `--speculate n` (prompt lookup): the drafts,
    the acceptance and the round trips per token; the tokens must be identical."""
    off = remote.generate_ids(prompt, max_tokens=max_tokens)
    s_off = remote.last.stats
    spec = remote.generate_ids(prompt, max_tokens=max_tokens, speculate=n)
    s = remote.last.stats
    info = s.speculation
    verdict = "identical" if spec == off else "DIFFERENT"
    return (f"      speculative greedy (--speculate {n}, prompt lookup): {info['accepted']}/"
            f"{info['drafted']} drafts accepted, {s.tokens_per_round_trip:.3f} tokens per round trip "
            f"vs {s_off.tokens_per_round_trip:.3f} off; tokens {verdict} to --speculate off"), spec == off


def run_demo(*, prompt: str = "The capital of France is", max_tokens: int = 24, shards: int = 2,
             dispatch: str = "exact", temperature: float = 0.8, seed: int = 0, keep: str | None = None,
             force: bool = False, in_process: bool = False, server_threads: int = 0) -> int:
    """Build the random vindex, start `shards` expert servers on loopback, generate through
    them, print what happened and compare with in-process experts. 0 if the tokens agree.

    `keep`: write the vindex there and leave it (an existing path only with `force`). Server
    logs go to a temporary directory, removed at the end unless a server failed.
    `server_threads`: kernel threads per server (0: the cores divided among the servers)."""
    from . import api
    from .server import ExpertServer
    from .vindex import open_vindex

    t_start = time.perf_counter()
    if keep and Path(keep).exists() and not force:
        raise LarqlError(f"--keep {keep}: it exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix="larql-demo-"))
    path = Path(keep) if keep else tmp / "demo.vindex"
    threads = server_threads or default_server_threads(shards)
    servers: list = []
    failed = True
    try:
        t0 = time.perf_counter()
        build_demo_vindex(path, overwrite=force or not keep)
        vindex = open_vindex(path)
        cfg = vindex.config
        size = sum(vindex.file_sizes().values())
        print(f"[1/4] built a random Gemma 4 MoE vindex in {time.perf_counter() - t0:.1f}s: {path}\n"
              f"      {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts "
              f"(top-{cfg.top_k}, Q4_K), byte-level tokenizer, {size / 2**20:.1f} MiB")

        t0 = time.perf_counter()
        ranges = shard_ranges(cfg.num_experts, shards)
        spec_parts = []
        for a, b in ranges:
            if in_process:
                h = ExpertServer(open_vindex(path), experts=range(a, b + 1)).start_in_thread("127.0.0.1", 0)
                servers.append(h)
                port = h.port
            else:
                port = free_port()
                servers.append(ServerProcess(path, f"{a}-{b}", port, tmp / f"server-{a}-{b}.log",
                                             threads=threads))
            spec_parts.append(f"{a}-{b}=127.0.0.1:{port}")
        for s in servers:
            if isinstance(s, ServerProcess):
                s.wait_ready()
        spec = ",".join(spec_parts)
        kind = "threads" if in_process else "processes"
        each = "" if in_process else f", {threads} kernel thread{'s' * (threads > 1)} each"
        print(f"[2/4] started {len(servers)} expert servers ({kind}) in {time.perf_counter() - t0:.1f}s"
              f"{each}:\n"
              f"      --moe-shards \"{spec}\"")

        remote = api.load(path, shards=spec, dispatch=dispatch)
        try:
            t0 = time.perf_counter()
            pieces = []
            print(f"[3/4] generating {max_tokens} tokens through the servers "
                  f"({dispatch} dispatch):")
            print(f"      {prompt!r} -> ", end="", flush=True)
            sampling = dict(temperature=temperature, seed=seed)
            for piece in remote.stream(prompt, max_tokens=max_tokens, **sampling):
                pieces.append(piece)
                print(piece.replace("\ufffd", "?").encode("ascii", "backslashreplace").decode(),
                      end="", flush=True)
            r = remote.last
            print(f"\n      token ids {r.tokens}\n"
                  "      (a random model: its bytes are noise; ? marks invalid UTF-8)")
            trips = r.stats.round_trips
            prefill_trips = r.stats.prefill_round_trips
            stats = remote.server_stats()
            spec_line, spec_same = (speculative_line(remote, prompt, max_tokens) if dispatch == "exact"
                                    else ("", True))
        finally:
            remote.close()
        local = api.load(path)
        try:
            ref = local.generate_ids(prompt, max_tokens=max_tokens, **sampling)
            lr = local.last
        finally:
            local.close()
        same = ref == r.tokens
        n_layers = cfg.num_layers
        print(f"[4/4] remote: {len(r.tokens)} tokens, prefill {r.prefill_ms:.1f} ms, decode "
              f"{r.decode_tok_s:.1f} tok/s; {trips} expert round trips in all\n"
              f"      prefill of {len(r.prompt_ids)} prompt tokens: {prefill_trips} round trips "
              f"(at most one per shard per layer: {len(servers)} x {n_layers})")
        for s in stats:
            print(f"      server {s['shard']:>7} @ {s['address']}: {s['requests']} requests, "
                  f"{s['tokens']} token-layers, p50 {s['p50_us']:.0f} us, p99 {s['p99_us']:.0f} us, "
                  f"compute {s['compute_s'] * 1e3:.0f} ms")
        print(f"      in-process experts: decode {lr.decode_tok_s:.1f} tok/s; "
              f"remote/in-process = {r.decode_tok_s / max(lr.decode_tok_s, 1e-9):.2f} "
              f"(tiny experts: the loopback round trips dominate; `larql bench server` measures "
              f"real 26B-A4B sizes)")
        if dispatch == "exact":
            verdict = "identical" if same else "DIFFERENT"
            print(f"      the {len(ref)} tokens are {verdict} to a run with the experts in process")
        else:
            agree = sum(a == b for a, b in zip(ref, r.tokens, strict=False)) / max(1, len(ref))
            print(f"      batch dispatch is approximate: {agree:.0%} of tokens equal exact in-process greedy")
            same = True
        if spec_line:
            print(spec_line)
            same = same and spec_same
        print(f"done in {time.perf_counter() - t_start:.1f}s")
        failed = False
        return 0 if same else 1
    finally:
        for s in servers:
            s.stop()
        if failed and any(isinstance(s, ServerProcess) for s in servers):
            if not keep:
                shutil.rmtree(tmp / "demo.vindex", ignore_errors=True)
            print(f"server logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
