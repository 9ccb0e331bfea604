"""The `larql` subcommands, one module per command group.

Each module has `add_parser(subparsers)` (its flags and help) and `main(args) -> int`, and turns
the parsed flags into plain keyword calls of the library (larql.vindex, larql.server,
larql.demo, ...), which never sees argparse. Heavy imports stay inside `main` so that
`larql --help` stays fast. larql/cli.py lists them in COMMANDS.
"""


def add_sampling_options(p, seed_help: str = "random seed for reproducible sampling") -> None:
    """--temperature/--top-k/--top-p/--seed: the sampler's flags, the same for run, chat, ..."""
    p.add_argument("--temperature", "-t", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help=seed_help)


def add_shard_arguments(p, *, old_key_flag: bool = False) -> None:
    """--moe-shards and how to use them: the same flags for every command that runs the model
    (run, chat, api-server); check them with check_shard_arguments."""
    p.add_argument("--moe-shards", default=None, metavar="SPEC",
                   help='remote experts, e.g. "0-63=HOST:PORT,64-127=tls://HOST:PORT" (default: in '
                        "process, from the vindex's layer files)")
    p.add_argument("--moe-dispatch", choices=["exact", "batch"], default="exact",
                   help="exact: experts layer by layer (default); batch: one round trip per token, "
                        "approximate")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SEC",
                   help="per-request timeout for --moe-shards (default 30)")
    add_remote_arguments(p, old_key_flag=old_key_flag)


def check_shard_arguments(args) -> None:
    """ValueError naming the flag for add_shard_arguments' values that cannot work."""
    if args.moe_shards is not None and not args.moe_shards.strip():
        raise ValueError('--moe-shards is empty: give "A-B=HOST:PORT,..." or leave it out to run '
                         "the experts in process")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, not {args.timeout:g}")


def add_remote_arguments(p, *, old_key_flag: bool = False) -> None:
    """How to reach --moe-shards expert servers securely and what to do when one is lost: the
    same flags for every command that connects to them (run, chat, api-server).

    The key is --shard-api-key-file everywhere: on a command that is a server itself
    (api-server), --api-key-file is the key its own clients must present, as on `larql serve`.
    `old_key_flag` keeps `larql run`'s first spelling, --api-key-file, working."""
    import argparse

    class KeyFile(argparse.Action):      # remembers the spelling used, for errors
        def __call__(self, parser, namespace, values, option_string=None):
            setattr(namespace, self.dest, values)
            namespace.shard_api_key_flag = option_string

    key_flags = ["--shard-api-key-file", "--api-key-file"] if old_key_flag else ["--shard-api-key-file"]
    p.add_argument(*key_flags, dest="shard_api_key_file", action=KeyFile, default=None, metavar="FILE",
                   help="file holding the API key the expert servers require (default: "
                        "$LARQL_API_KEY, which `larql serve` reads too; none = unauthenticated "
                        "servers)")
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="CA certificate(s) to verify tls:// and https:// shards against (default: "
                        "$LARQL_TLS_CA, else the system trust store)")
    p.add_argument("--encoding", choices=["auto", "f32", "q8k", "f16"], default="auto",
                   help="how the residual goes to the expert servers: auto (default) = q8k for a Q4_K "
                        "vindex (the experts' own Q8_K input blocks: 3.5x fewer bytes, same result "
                        "bit for bit), f32 otherwise; f16 halves f32 but rounds")
    p.add_argument("--on-shard-failure", choices=["fail", "renormalize"], default="fail",
                   help="fail: stop when a shard has no replica left (default); renormalize: drop that "
                        "shard's experts for the token and rescale the remaining router weights, with a "
                        "warning and a count, degraded_layers (run --json, chat's /stats json, "
                        "api-server's /health): changes the output")


def remote_options(args) -> dict:
    """connect_shards / larql.api.load keywords from add_remote_arguments' flags, with the key
    read and the CA file loaded now: a bad file is one error naming its flag, before any model
    is loaded or server contacted. Call it only when --moe-shards is given."""
    from ..client import resolve_api_key
    from ..errors import LarqlError
    from ..transport import AuthError, client_tls_context

    try:
        key = resolve_api_key(None, args.shard_api_key_file)    # the file, else $LARQL_API_KEY
    except AuthError as e:
        if args.shard_api_key_file:
            flag = getattr(args, "shard_api_key_flag", None) or "--shard-api-key-file"
            raise AuthError(f"{flag}: {e}") from None
        raise
    if args.tls_ca:
        try:
            client_tls_context(args.tls_ca)
        except LarqlError as e:
            raise LarqlError(f"--tls-ca: {e}") from None
    return {"api_key": key or "", "tls_ca": args.tls_ca,       # "": no key (not $LARQL_API_KEY again)
            "on_shard_failure": args.on_shard_failure, "encoding": args.encoding}


def renormalize_warning(command: str, args) -> None:
    """The one-line warning of --on-shard-failure renormalize (it changes the output)."""
    import sys

    if getattr(args, "moe_shards", None) and args.on_shard_failure == "renormalize":
        print(f"larql {command}: --on-shard-failure renormalize: a lost shard's experts are dropped "
              "(output changes; counted as degraded_layers)", file=sys.stderr)
