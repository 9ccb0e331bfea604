"""A TCP forwarder that delays every byte by a fixed one-way latency (see
larql/benchmarks/delay_proxy.py, which `larql bench wan` also uses).

    python3 bench/delay_proxy.py --listen 10.77.0.1:9001 --target 10.77.0.2:9001 --delay-ms 22.5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from larql.benchmarks.delay_proxy import main  # noqa: E402

if __name__ == "__main__":
    main()
