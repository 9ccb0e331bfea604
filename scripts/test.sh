#!/usr/bin/env bash
# Install larql with its test dependencies, run the test suite, then lint.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0   # a CPU build; a bare `torch` would pull CUDA
python3 -m pip install -q -e '.[test]'
python3 -m pytest -q "$@"
python3 -m ruff check --quiet larql tests bench examples build_ext.py
