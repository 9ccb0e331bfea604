"""`larql bench wan --rtt MS`: decode tok/s behind a high-latency link, exact vs batch vs
speculative dispatch, side by side in one run.

Expert servers (`larql serve` child processes on loopback) each sit behind a delay proxy
(larql/benchmarks/delay_proxy.py: every byte held RTT/2 each way), so a round trip costs the
RTT; no root or network namespaces needed (bench/netem.py does the same with `tc netem`).
The model is a random Gemma 4 MoE with the real layer count (30) and top-8 of 128 experts but
small matrices, so the network sets the pace, as over the public internet.

Two texts, each decoded in every mode from the same prompt:
  repeated  greedy from a list-like prompt. A random model's greedy output falls into loops
            within a few tokens, which is the repeated structure prompt lookup exploits (on a
            real model: code, quoting, lists, summaries).
  varied    sampled at temperature 1 (all tokens, seed fixed): a random model's samples
            barely repeat, so drafts fail; `auto` must back off.
Modes: exact (layer by layer; the baseline), batch (one round trip per token, approximate:
its agreement with exact is printed), speculate N with prompt lookup, speculate auto with
prompt lookup, speculate auto with the batch drafter. For the greedy text the speculative
tokens must equal exact's (checked; a mismatch makes the bench exit 1). Printed per mode:
decode tok/s and its ratio to exact, expert round trips per generated token, drafts accepted.
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
    p.add_argument("--seed", type=int, default=0, help="model and sampling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


MODES = {   # name -> (dispatch, speculate, drafter)
    "exact": ("exact", "off", "lookup"),
    "batch": ("batch", "off", "lookup"),
    "lookup": ("exact", None, "lookup"),     # None: --speculate N
    "auto": ("exact", "auto", "lookup"),
    "auto-batch": ("exact", "auto", "batch"),
}
TEXTS = {"repeated": 0.0, "varied": 1.0}   # name -> temperature


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


def _decode(model, tok, prompt: str, tokens: int, temperature: float, seed: int, speculate, drafter):
    from ..generate import GenerationStats, generate
    from ..sampling import Sampler

    ids = tok.encode(prompt)
    stats = GenerationStats()
    out: list[int] = []
    t_first = t_end = 0.0
    for step in generate(model, ids, tokens, Sampler(temperature, seed=seed), stats=stats,
                         speculate=speculate, drafter=drafter):
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


def main(args: argparse.Namespace) -> int:
    from .. import models
    from ..client import connect_shards
    from ..demo import build_demo_vindex, demo_config, shard_ranges
    from ..processes import ServerProcess, free_port
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
    if args.tokens < 2 or args.rtt < 0 or args.speculate < 1:
        raise ValueError("--tokens must be >= 2, --rtt >= 0 and --speculate >= 1")
    say = (lambda *a, **k: None) if args.json else print

    tmp = Path(tempfile.mkdtemp(prefix="larql-wan-"))
    procs: list = []
    try:
        cfg = demo_config(num_layers=args.layers, hidden=256, num_experts=128, top_k=8, moe_intermediate=64)
        say(f"building a random {args.layers}-layer, 128-expert top-8 vindex ...", flush=True)
        path = build_demo_vindex(tmp / "wan.vindex", quant="q4k", config=cfg, seed=args.seed)
        vindex = open_vindex(path)
        parts = []
        for a, b in shard_ranges(cfg.num_experts, args.shards):
            port, pport = free_port(), free_port()
            server = ServerProcess(path, f"{a}-{b}", port, tmp / f"server-{a}-{b}.log")
            procs.append(server)
            proxy = subprocess.Popen(
                [sys.executable, "-m", "larql.benchmarks.delay_proxy", "--listen", f"127.0.0.1:{pport}",
                 "--target", f"127.0.0.1:{port}", "--delay-ms", str(args.rtt / 2)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=_child_env())
            procs.append(proxy)
            parts.append((f"{a}-{b}=127.0.0.1:{pport}", server, proxy, pport))
        for _, server, proxy, pport in parts:
            server.wait_ready()
            _wait_port(pport, proxy, "delay proxy")
        spec = ",".join(p[0] for p in parts)
        rx = connect_shards(spec, vindex, timeout=120)
        try:
            rtt = _measure_rtt(rx, cfg)
            say(f"{args.shards} expert servers behind {args.rtt:g} ms delay proxies; measured round trip "
                f"(one 1-token expert request to every shard) {rtt * 1e3:.1f} ms")
            tok = TextTokenizer.from_vindex(vindex)
            results = {}
            ok = True
            for text in texts:
                temperature = TEXTS[text]
                prompt = REPEATED_PROMPT if text == "repeated" else "The weather report for tomorrow says"
                rows = {}
                ref_tokens = None
                for mode in modes:
                    dispatch, speculate, drafter = MODES[mode]
                    speculate = args.speculate if speculate is None else speculate
                    model = models.load(vindex, experts=rx, dispatch=dispatch)
                    tokens, row = _decode(model, tok, prompt, args.tokens, temperature, args.seed,
                                          speculate, drafter)
                    if mode == "exact":
                        ref_tokens = tokens
                    if ref_tokens is not None and mode != "exact":
                        row["same_tokens_as_exact"] = tokens == ref_tokens
                        if mode != "batch" and temperature == 0 and tokens != ref_tokens:
                            ok = False
                    rows[mode] = row
                    say(f"  {text:>8} {mode:>10}: {row['decode_tok_s']:7.2f} tok/s, "
                        f"{row['round_trips_per_token']:6.2f} round trips/token"
                        + (f", {row['accepted']}/{row['drafted']} drafts accepted" if row["drafted"] else ""),
                        flush=True)
                base = rows.get("exact", {}).get("decode_tok_s", 0.0)
                for row in rows.values():
                    row["vs_exact"] = row["decode_tok_s"] / base if base else 0.0
                results[text] = rows
        finally:
            rx.close()
        report = {"rtt_ms": args.rtt, "measured_rtt_ms": round(rtt * 1e3, 3), "layers": args.layers,
                  "shards": args.shards, "tokens": args.tokens, "speculate": args.speculate,
                  "texts": results, "greedy_speculative_tokens_identical": ok}
        if args.json:
            json.dump(report, sys.stdout)
            sys.stdout.write("\n")
        else:
            _print_table(report)
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            if isinstance(p, subprocess.Popen):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            else:
                p.stop()
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
    print("(varied text is sampled: its tokens differ between modes by design; batch dispatch is "
          "approximate; greedy speculative tokens identical to exact: "
          f"{'yes' if report['greedy_speculative_tokens_identical'] else 'NO'})")
