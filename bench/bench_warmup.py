#!/usr/bin/env python3
"""Warm-up benchmark as a script: same as `larql bench warmup` (see larql/benchmarks/warmup.py).

    python3 bench/bench_warmup.py [--layers 6] [--experts 0-63] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larql.benchmarks import warmup  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=warmup.__doc__.splitlines()[0])
    warmup.add_arguments(p)
    return warmup.main(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
