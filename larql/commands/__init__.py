"""The `larql` subcommands, one module per command group.

Each module has `add_parser(subparsers)` (its flags and help) and `main(args) -> int`, and turns
the parsed flags into plain keyword calls of the library (larql.vindex, larql.server,
larql.demo, ...), which never sees argparse. Heavy imports stay inside `main` so that
`larql --help` stays fast. larql/cli.py lists them in COMMANDS.
"""
