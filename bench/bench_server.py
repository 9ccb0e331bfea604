#!/usr/bin/env python3
"""Expert-server benchmarks as a script: same as `larql bench server` (see larql/benchmarks/server.py).

    python3 bench/bench_server.py [--what rtt|throughput|e2e|all] [--layers 2] [--vocab 262144] ...
    sudo python3 bench/netem.py      # exact vs batch dispatch behind a 45 ms round trip
"""

from __future__ import annotations

import argparse
import sys

from larql.benchmarks import server


def main() -> int:
    p = argparse.ArgumentParser(description=server.__doc__.splitlines()[0])
    server.add_arguments(p)
    return server.main(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
