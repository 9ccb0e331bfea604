"""Extraction throughput and peak RSS at the real Gemma 4 26B A4B tensor shapes.

Same as `larql bench extract` (see larql/benchmarks/extract.py); run from the repository root:
    python3 bench/bench_extract.py --layers 1
"""

from __future__ import annotations

import argparse
import sys

from larql.benchmarks.extract import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="larql extract benchmark")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
