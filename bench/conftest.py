"""`pytest bench/ --benchmark-only`: the pytest-benchmark suites are the bench_*.py files that
hold test functions (pyproject's python_files); the others are scripts and collect nothing.

larql is imported here first, from wherever this interpreter finds it (installed, or PYTHONPATH
in a built checkout), so a suite that puts the repository root on sys.path cannot shadow an
installed larql with the uncompiled source tree."""

import larql  # noqa: F401
