"""Client decode split (attention, dense MLP, router, experts, LM head, glue) and prefill tok/s
on a synthetic vindex with the real Gemma 4 26B A4B shapes.

Same as `larql bench run` (see larql/benchmarks/run.py); run from the repository root:
    python3 bench/bench_run.py --layers 6 --tokens 16
"""

from __future__ import annotations

import argparse
import sys

from larql.benchmarks.run import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="larql run (client decode) benchmark")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
