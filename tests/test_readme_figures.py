"""The README's demo figures are the recorded run's: `make demo` writes bench/results/demo_cpu.json (its losses,
accuracy, machine and versions, see bench/demo_result.py), and the README must quote exactly its lines."""

from __future__ import annotations

import json

from launcher.train import accuracy_line, summary_line
from tests.helpers import ROOT

RECORD = ROOT / "bench" / "results" / "demo_cpu.json"


def quoted_demo_lines(text: str) -> list[str]:
    return [
        s.strip() for s in text.splitlines() if s.strip().startswith(("final: loss ", "accuracy: before="))
    ]


def test_the_readme_quotes_the_recorded_demo_run():
    record = json.loads(RECORD.read_text())
    # The record's lines are what the run printed for its own figures.
    assert record["lines"] == [summary_line(record), accuracy_line(record)]
    assert record["machine"]["device"] and record["versions"]["torch"] and record["steps"] > 0
    quoted = quoted_demo_lines((ROOT / "README.md").read_text())
    assert sorted(quoted) == sorted(record["lines"]), (quoted, record["lines"])
