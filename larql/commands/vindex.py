"""`larql extract | slice | pull | publish | info | verify`: the vindex commands.

Each turns its flags into a keyword call of a larql.vindex operation. Heavy imports stay inside."""

from __future__ import annotations

import argparse
import json
import sys


def _extract(args) -> int:
    from ..vindex.extract import extract

    out = extract(
        args.src,
        args.output,
        quant=args.quant,
        progress=not args.quiet,
        lyrw_version=args.lyrw_version,
        threads=args.threads,
        overwrite=args.force,
        lm_head=args.lm_head,
    )
    print(f"wrote {out}")
    return 0


def _slice(args) -> int:
    from ..vindex.slicing import slice_vindex

    out = slice_vindex(
        args.src,
        args.output,
        preset=args.preset,
        experts=args.experts,
        layers=args.layers,
        progress=not args.quiet,
        overwrite=args.force,
    )
    print(f"wrote {out}")
    return 0


def _pull(args) -> int:
    from ..vindex.hub import pull

    out = pull(args.repo, args.output, preset=args.preset, layers=args.layers, revision=args.revision,
               experts=args.experts)
    shard = f", experts {args.experts}" if args.experts else ""
    print(f"pulled {args.repo} ({args.preset}{shard}) into {out}")
    return 0


def _publish(args) -> int:
    from ..vindex.hub import publish

    repos = publish(args.dir, args.repo, slices=args.slices, private=args.private)
    for r in repos:
        print(f"published {r}")
    return 0


def _info(args) -> int:
    from ..vindex.report import format_info, info

    d = info(args.vindex)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    for p in d["problems"]:  # a truncated or malformed file: the exit status says so
        print(f"larql info: FAIL {p}", file=sys.stderr)
    return 1 if d["problems"] else 0


def _verify(args) -> int:
    from ..vindex.report import verify

    problems = verify(args.vindex, progress=not args.quiet)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.vindex}: OK (all checksums match, structure valid)")
    return 0


def _preset_argument(p, presets: list[str], what: str) -> None:
    p.add_argument("--preset", default="all", choices=presets, metavar="NAME",
                   help=f"{what}: {', '.join(presets)} (default all)")


def add_parser(sub) -> None:
    from ..vindex.slicing import ALIASES, PRESETS

    presets = [*PRESETS, *ALIASES]

    p = sub.add_parser(
        "extract",
        help="convert a checkpoint (HF dir or .gguf) into a vindex",
        description="Convert a Gemma 4 MoE checkpoint into a vindex, streaming tensor by tensor.",
    )
    p.add_argument("src", help="Hugging Face model directory (config.json + *.safetensors) or a .gguf file")
    p.add_argument(
        "-o", "--output", required=True, help="output directory, e.g. out/gemma4-26b-a4b-q4k.vindex"
    )
    p.add_argument(
        "--quant",
        choices=["q4k", "f16", "f32"],
        default="q4k",
        help="q4k: Q4_K/Q6_K like the reference (default); f16/f32: unquantised",
    )
    p.add_argument(
        "--lyrw-version",
        type=int,
        choices=[1, 2],
        default=2,
        help="expert file layout: 2 = page-aligned experts (default), 1 = the reference's packing",
    )
    p.add_argument(
        "--lm-head",
        choices=["tied", "q4k", "q6k"],
        default=None,
        help="LM head: q4k = Q4_K copy of the embeddings in lm_head_q4.bin (default for --quant q4k, "
        "as the reference; ~3.6x fewer bytes read per token than the f16 tie), q6k = Q6_K in "
        "lm_head_q6k.bin, tied = logits from the embeddings (default for f16/f32: exact)",
    )
    p.add_argument("--threads", type=int, default=None, help="quantisation threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)

    p = sub.add_parser(
        "slice",
        help="copy the parts of a vindex one machine needs",
        description="Copy a preset's files; --experts/--layers physically keep only those.",
    )
    p.add_argument("src", help="source vindex")
    p.add_argument("-o", "--output", required=True, help="destination vindex directory")
    _preset_argument(p, presets, "one of")
    p.add_argument("--experts", default=None, help="keep only these experts, e.g. 0-63")
    p.add_argument("--layers", default=None, help="keep only these layers' expert files, e.g. 0-14")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)

    p = sub.add_parser(
        "pull",
        help="download a vindex (or a preset's files) from the Hugging Face Hub",
        description="Download a vindex repository, or only the files a preset needs (e.g. "
                    "--preset experts --layers 0-14 for one expert server), into OUTPUT, then open "
                    "it to check what arrived. Private repositories need HF_TOKEN; HF_ENDPOINT "
                    "selects another Hub.",
    )
    p.add_argument("repo", help="OWNER/NAME on the Hub (HF_ENDPOINT selects another endpoint)")
    p.add_argument("-o", "--output", required=True, help="local directory")
    _preset_argument(p, presets, "download only this preset's files")
    p.add_argument("--layers", default=None, help="download only these layers' expert files, e.g. 0-14")
    p.add_argument("--experts", default=None, metavar="A-B",
                   help="download only these experts' bytes of each layer file (HTTP ranges), e.g. 64-127: "
                        "a shard vindex holding just them")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.set_defaults(func=main)

    p = sub.add_parser(
        "publish",
        help="upload a vindex to the Hugging Face Hub",
        description="Upload a vindex directory to OWNER/NAME (created if absent) and, with --slices, "
                    "each named preset's slice to OWNER/NAME-PRESET. Needs a write token in HF_TOKEN "
                    "(or the token huggingface_hub's login saved); HF_ENDPOINT selects another Hub.",
    )
    p.add_argument("dir", help="vindex directory")
    p.add_argument("--repo", required=True, help="OWNER/NAME (created if absent)")
    p.add_argument(
        "--slices",
        default="none",
        help="also publish these presets as <repo>-<preset>, comma separated (default none)",
    )
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(func=main)

    p = sub.add_parser("info", help="what a vindex holds: dims, experts, layers, bytes, formats")
    p.add_argument("vindex")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main)

    p = sub.add_parser("verify", help="check every file's sha256 against index.json and the structure")
    p.add_argument("vindex")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


_HANDLERS = {"extract": _extract, "slice": _slice, "pull": _pull, "publish": _publish,
             "info": _info, "verify": _verify}


def main(args: argparse.Namespace) -> int:
    return _HANDLERS[args.command](args)
