"""The benchmarks' synthetic vindex: written once, reused, and its status line kept off stdout,
which `larql bench ... --json` leaves to the JSON document alone."""

from __future__ import annotations

import json

from larql.benchmarks import synthetic_vindex


def test_synthetic_vindex_reports_on_stderr_and_is_reused(tmp_path, capsys) -> None:
    path = synthetic_vindex(tmp_path, layers=1, vocab=512)
    first = capsys.readouterr()
    assert first.out == "", first.out  # a line here broke `--json` on a first run
    assert "writing a synthetic" in first.err
    assert json.loads((path / "index.json").read_text())["num_layers"] == 1
    assert synthetic_vindex(tmp_path, layers=1, vocab=512) == path
    again = capsys.readouterr()
    assert "writing a synthetic" not in again.err + again.out
