"""`larql run VINDEX PROMPT`: generate text, experts in process or on expert servers.

Text streams to stdout as it is generated and a one-line summary goes to stderr; `--json`
prints one JSON object instead (prompt_tokens, prompt_ids, tokens, text, stats and, with
`--logprobs K`, the top-K (id, logprob) pairs of every step).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import (
    add_sampling_options,
    add_shard_arguments,
    check_shard_arguments,
    remote_options,
    renormalize_warning,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="generate text from a vindex (experts in process, or --moe-shards)",
        description="Generate text with a Gemma 4 MoE vindex. Without --moe-shards the experts run in "
                    "this process from the vindex's layer files.",
    )
    p.add_argument("vindex", help="path to a vindex directory (e.g. output/gemma4-26b-a4b-q4k.vindex)")
    p.add_argument("prompt", help="prompt text ('-' reads it from stdin)")
    p.add_argument("--max-tokens", "-n", type=int, default=64, metavar="N",
                   help="tokens to generate at most (default 64)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the vindex's chat template as one user turn")
    add_sampling_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--logprobs", type=int, default=0, metavar="K",
                   help="with --json: the top-K (id, logprob) pairs of every generated step")
    add_shard_arguments(p, old_key_flag=True)
    p.add_argument("--speculate", default="off", metavar="N|auto|off",
                   help="speculative decoding: draft up to N tokens and verify them in one pass "
                        "through the experts (output identical to off when greedy, same distribution "
                        "when sampling); auto adapts N to the acceptance rate and round-trip time and "
                        "is off for in-process experts (default off)")
    p.add_argument("--draft", choices=["lookup", "batch"], default="lookup",
                   help="drafter for --speculate: lookup = n-gram match against the prompt and the "
                        "text so far (free); batch = batch dispatch, one round trip per draft token")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="kernel threads (default: all cores)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.set_defaults(func=main)


def _check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, not {args.max_tokens}")
    if args.logprobs < 0:
        raise ValueError(f"--logprobs must be >= 0, not {args.logprobs}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, not {args.threads}")
    if args.logprobs and not args.json:
        raise ValueError("--logprobs needs --json (log-probabilities are part of the JSON output)")
    check_shard_arguments(args)
    from ..speculative import parse_speculate

    try:
        parse_speculate(args.speculate)
    except ValueError as e:
        raise ValueError(f"--speculate: {e}") from None


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    from .. import kernels, models
    from ..generate import GenerationStats, generate
    from ..sampling import Sampler
    from ..tokenizer import TextTokenizer
    from ..vindex import open_vindex

    if args.threads:
        kernels.set_num_threads(args.threads)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    vindex = open_vindex(args.vindex)
    tok = TextTokenizer.from_vindex(vindex)
    ids = tok.encode_chat(prompt) if args.chat else tok.encode(prompt)
    experts = None
    if args.moe_shards:
        from ..client import connect_shards  # only needed (and imported) for remote experts

        experts = connect_shards(args.moe_shards, vindex, timeout=args.timeout, **remote_options(args))
        renormalize_warning("run", args)
    model = models.load(vindex, experts=experts, dispatch=args.moe_dispatch)
    stats = GenerationStats()
    stream = tok.streamer()
    tokens: list[int] = []
    logprobs: list[dict] = []
    try:
        for step in generate(model, ids, args.max_tokens, sampler, stop_ids=tok.stop_ids,
                             logprobs=args.logprobs, stats=stats, speculate=args.speculate,
                             drafter=args.draft):
            tokens.append(step.token)
            if args.json:
                if args.logprobs:
                    logprobs.append({"token": step.token, "logprob": step.logprob,
                                     "top": [[i, lp] for i, lp in step.top_logprobs or []]})
                continue
            piece = stream.add(step.token)
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        model.close()
    if experts is not None:   # layers computed without a lost shard (renormalize; else always 0)
        stats.extra["degraded_layers"] = experts.degraded_layers
    if args.json:
        out = {"prompt_tokens": len(ids), "prompt_ids": ids, "tokens": tokens,
               "text": tok.decode(tokens), "stats": stats.as_dict()}
        if args.logprobs:
            out["logprobs"] = logprobs
        json.dump(out, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        print(stats.summary(), file=sys.stderr)
    return 0
