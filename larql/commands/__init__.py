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
