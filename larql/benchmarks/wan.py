"""`larql bench wan --rtt MS`: decode tok/s behind a high-latency link, exact vs batch vs
speculative dispatch, side by side in one run.

Expert servers (`larql serve` child processes on loopback) each sit behind a delay proxy
(larql/benchmarks/delay_proxy.py: every byte held RTT/2 each way), so a round trip costs the
RTT; no root or network namespaces needed (bench/netem.py does the same with `tc netem`).
The model is a random Gemma 4 MoE with the real layer count (30) and top-8 of 128 experts but
small matrices, so the network sets the pace, as over the public internet.

Two texts, both greedy (so every speculative mode must give exact's tokens, checked; a
mismatch makes the bench exit 1), each from its own random 30-layer model:
  repeated  a model whose residual branches are damped (post-attention and post-FFN norm
            weights x --damp, default 0.05): each layer only perturbs the embedding, the model
            is close to a bigram map, and greedy decoding of a map on a finite vocabulary
            falls into runs and cycles: the repetitive regime prompt lookup exploits (on a real
            model: code, quoting, lists, summaries). At 0.05 the text is one repeated token
            (the best case); 0.1 gives runs that change (a partial case).
  varied    the plain random model: deep random networks are chaotic, its greedy text barely
            repeats, drafts fail, and `auto` must back off.
Modes: exact (layer by layer; the baseline), batch (one round trip per token, approximate:
its agreement with exact is printed), speculate N with prompt lookup, speculate auto with
prompt lookup, speculate auto with the batch drafter. Printed per mode: decode tok/s and its
ratio to exact, expert round trips per generated token, drafts accepted.

Measured here (2 cores shared with other work, 45 ms RTT, 30 layers, 2 shards, 32 tokens,
N = 8): repeated (damp 0.05) exact 0.61 tok/s, lookup 8.05x, auto 6.58x, auto-batch 2.94x,
all with exact's tokens; damp 0.1 (runs that change) lookup 1.61x, auto 1.59x; varied lookup
1.04x (1/48 drafts accepted), auto 1.08x, auto-batch 1.00x; batch dispatch 12-15x but
approximate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPEATED_PROMPT = "fn(a, b), fn(b, c), fn(c, d), fn(d, e), fn(e, f), fn("


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtt", type=float, default=45.0, metavar="MS",
                   help="round-trip time added to every expert request (default 45)")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per mode (default 24)")
    p.add_argument("--layers", type=int, default=30, help="model layers (default 30, as Gemma 4 26B A4B)")
    p.add_argument("--shards", type=int, default=2, help="expert servers (default 2)")
    p.add_argument("--speculate", type=int, default=8, metavar="N",
                   help="draft length of the fixed speculative mode (default 8)")
    p.add_argument("--modes", default="exact,batch,lookup,auto,auto-batch",
                   help="comma-separated subset of exact,batch,lookup,auto,auto-batch")
    p.add_argument("--texts", default="repeated,varied", help="comma-separated subset of repeated,varied")
    p.add_argument("--seed", type=int, default=0, help="random model seed (default 0)")
    p.add_argument("--damp", type=float, default=0.05,
                   help="residual-branch scale of the repeated text's model (default 0.05)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


MODES = {   # name -> (dispatch, speculate, drafter)
    "exact": ("exact", "off", "lookup"),
    "batch": ("batch", "off", "lookup"),
    "lookup": ("exact", None, "lookup"),     # None: --speculate N
    "auto": ("exact", "auto", "lookup"),
    "auto-batch": ("exact", "auto", "batch"),
}
TEXTS = {"repeated": REPEATED_PROMPT, "varied": "The weather report for tomorrow says"}


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} on port {port} did not start within {timeout:g}s")


def _decode(model, tok, prompt: str, tokens: int, speculate, drafter):
    from ..generate import GenerationStats, generate

    ids = tok.encode(prompt)
    stats = GenerationStats()
    out: list[int] = []
    t_first = t_end = 0.0
    for step in generate(model, ids, tokens, stats=stats, speculate=speculate, drafter=drafter):
        out.append(step.token)
        t_end = time.perf_counter()
        if len(out) == 1:
            t_first = t_end
    decode_tokens = len(out) - 1          # the first token comes from the prefill
    seconds = t_end - t_first
    trips = stats.round_trips - stats.prefill_round_trips
    return out, {
        "tokens": len(out),
        "decode_tok_s": decode_tokens / seconds if seconds > 0 else 0.0,
        "round_trips_per_token": trips / decode_tokens if decode_tokens else 0.0,
        "prefill_round_trips": stats.prefill_round_trips,
        "drafted": stats.speculation.get("drafted", 0),
        "accepted": stats.speculation.get("accepted", 0),
        "decode_passes": stats.speculation.get("decode_passes", decode_tokens),
    }


def build_model_vindex(out: Path, layers: int, seed: int, damp: float | None) -> Path:
    """The bench's random 30-layer, 128-expert top-8 model; damp scales its residual branches."""
    from ..demo import demo_config
    from ..tokenizer import byte_level_tokenizer
    from ..vindex import write_vindex
    from ..vindex.random_model import random_tensors

    cfg = demo_config(num_layers=layers, hidden=256, num_experts=128, top_k=8, moe_intermediate=64)
    src = random_tensors(cfg, seed)
    if damp is not None:
        for name, x in src.tensors.items():
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                x *= np.float32(damp)
    return write_vindex(out, cfg, src, quant="q4k", tokenizer_json=byte_level_tokenizer().to_str().encode(),
                        progress=False, model_name=f"larql-wan-random-seed{seed}-damp{damp}", overwrite=True)


class ProxiedShards:
    """`larql serve` children on loopback, each behind a delay proxy child; `.spec` names the
    proxies as a --moe-shards map."""

    def __init__(self, path: Path, shards: int, rtt_ms: float, logdir: Path) -> None:
        from ..demo import shard_ranges
        from ..processes import ServerProcess, free_port
        from ..vindex import open_vindex

        self.procs: list = []
        parts = []
        try:
            for a, b in shard_ranges(open_vindex(path).config.num_experts, shards):
                port, pport = free_port(), free_port()
                server = ServerProcess(path, f"{a}-{b}", port, logdir / f"server-{path.name}-{a}-{b}.log")
                self.procs.append(server)
                proxy = subprocess.Popen(
                    [sys.executable, "-m", "larql.benchmarks.delay_proxy", "--listen", f"127.0.0.1:{pport}",
                     "--target", f"127.0.0.1:{port}", "--delay-ms", str(rtt_ms / 2)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_child_env())
                self.procs.append(proxy)
                parts.append((f"{a}-{b}=127.0.0.1:{pport}", server, proxy, pport))
            for _, server, proxy, pport in parts:
                server.wait_ready()
                _wait_port(pport, proxy, "delay proxy")
        except BaseException:
            self.stop()
            raise
        self.spec = ",".join(p[0] for p in parts)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if isinstance(p, subprocess.Popen):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            else:
                p.stop()
        self.procs = []


def main(args: argparse.Namespace) -> int:
    from .. import models
    from ..client import connect_shards
    from ..tokenizer import TextTokenizer
    from ..vindex import open_vindex

    modes = [m for m in args.modes.split(",") if m]
    texts = [t for t in args.texts.split(",") if t]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r} (one of {', '.join(MODES)})")
    for t in texts:
        if t not in TEXTS:
            raise ValueError(f"--texts: unknown text {t!r} (one of {', '.join(TEXTS)})")
    if args.tokens < 2 or args.rtt < 0 or args.speculate < 1 or args.damp <= 0:
        raise ValueError("--tokens must be >= 2, --rtt >= 0, --speculate >= 1 and --damp > 0")
    say = (lambda *a, **k: None) if args.json else print

    tmp = Path(tempfile.mkdtemp(prefix="larql-wan-"))
    results, rtts, ok = {}, {}, True
    try:
        for text in texts:
            damp = args.damp if text == "repeated" else None
            say(f"[{text}] building a random {args.layers}-layer, 128-expert top-8 vindex"
                + (f" (residual branches x {damp:g})" if damp else "") + " ...", flush=True)
            path = build_model_vindex(tmp / f"{text}.vindex", args.layers, args.seed, damp)
            vindex = open_vindex(path)
            tok = TextTokenizer.from_vindex(vindex)
            shards = ProxiedShards(path, args.shards, args.rtt, tmp)
            try:
                rx = connect_shards(shards.spec, vindex, timeout=120)
                try:
                    rtts[text] = _measure_rtt(rx, vindex.config)
                    say(f"[{text}] {args.shards} expert servers behind {args.rtt:g} ms delay proxies; "
                        f"measured round trip (a 1-token request to every shard) {rtts[text] * 1e3:.1f} ms")
                    rows, ref_tokens = {}, None
                    for mode in modes:
                        dispatch, speculate, drafter = MODES[mode]
                        speculate = args.speculate if speculate is None else speculate
                        model = models.load(vindex, experts=rx, dispatch=dispatch)
                        tokens, row = _decode(model, tok, TEXTS[text], args.tokens, speculate, drafter)
                        if mode == "exact":
                            ref_tokens = tokens
                        elif ref_tokens is not None:
                            row["same_tokens_as_exact"] = tokens == ref_tokens
                            if mode != "batch" and tokens != ref_tokens:
                                ok = False
                        rows[mode] = row
                        say(f"  {text:>8} {mode:>10}: {row['decode_tok_s']:7.2f} tok/s, "
                            f"{row['round_trips_per_token']:6.2f} round trips/token"
                            + (f", {row['accepted']}/{row['drafted']} drafts accepted" if row["drafted"]
                               else ""), flush=True)
                finally:
                    rx.close()
            finally:
                shards.stop()
            base = rows.get("exact", {}).get("decode_tok_s", 0.0)
            for row in rows.values():
                row["vs_exact"] = row["decode_tok_s"] / base if base else 0.0
            results[text] = rows
        rtt = float(np.median(list(rtts.values()))) if rtts else 0.0
        report = {"rtt_ms": args.rtt, "measured_rtt_ms": round(rtt * 1e3, 3), "layers": args.layers,
                  "shards": args.shards, "tokens": args.tokens, "speculate": args.speculate,
                  "damp": args.damp, "texts": results, "greedy_speculative_tokens_identical": ok}
        if args.json:
            json.dump(report, sys.stdout)
            sys.stdout.write("\n")
        else:
            _print_table(report)
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _child_env() -> dict:
    """The environment `larql serve` children get: this larql first on the path."""
    import os

    root = str(Path(__file__).resolve().parent.parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _measure_rtt(rx, cfg) -> float:
    """Median time of a 1-token expert request to every shard (all at once), after a warm-up."""
    h = np.ones((1, cfg.hidden_size), dtype=np.float32)
    ids = np.arange(cfg.top_k, dtype=np.int32)[None, :] * (cfg.num_experts // cfg.top_k)
    w = np.full((1, cfg.top_k), 1.0 / cfg.top_k, dtype=np.float32)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        rx.forward(0, h, ids, w)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def _print_table(report: dict) -> None:
    print(f"\nlarql bench wan: {report['layers']} layers, {report['shards']} shards, "
          f"RTT {report['rtt_ms']:g} ms "
          f"(measured {report['measured_rtt_ms']:.1f} ms), {report['tokens']} tokens per mode, "
          f"speculate N = {report['speculate']}")
    print(f"{'text':>9} {'mode':>10} {'tok/s':>8} {'vs exact':>9} {'RT/token':>9} {'accepted':>10} "
          f"{'= exact':>8}")
    for text, rows in report["texts"].items():
        for mode, r in rows.items():
            acc = f"{r['accepted']}/{r['drafted']}" if r["drafted"] else "-"
            same = r.get("same_tokens_as_exact")
            same = "-" if same is None else ("yes" if same else "no")
            print(f"{text:>9} {mode:>10} {r['decode_tok_s']:8.2f} {r['vs_exact']:8.2f}x "
                  f"{r['round_trips_per_token']:9.2f} {acc:>10} {same:>8}")
    print(f"(repeated: residual branches x {report['damp']:g}, a near-bigram model whose greedy text "
          "loops; varied: the plain random model, chaotic; batch dispatch is approximate; speculative "
          f"tokens identical to exact: {'yes' if report['greedy_speculative_tokens_identical'] else 'NO'})")
