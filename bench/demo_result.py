#!/usr/bin/env python
"""Record what `make demo` measured: its accuracy and losses, with the machine and versions, in a committed file.

    python bench/demo_result.py runs/<the demo's run dir>    # `make demo` calls it after `sft launch`

Writes `bench/results/demo_<cpu|cuda>.json` from the run's `results.json`, with the two lines the run printed and
the README quotes (`tests/test_readme_figures.py` fails when the README and this record disagree).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.train import accuracy_line, summary_line  # noqa: E402


def machine() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "device": torch.cuda.get_device_name() if cuda else "CPU only",
        "ranks": torch.cuda.device_count() if cuda else 2,  # what `sft launch` starts here
    }


def record(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    keys = ("first_loss", "final_loss", "eval_loss_before", "eval_loss", "accuracy_before", "accuracy_after")
    return {
        "benchmark": "demo (make demo: the embedded default config, sft launch)",
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "transformers", "deepspeed")},
        },
        "commit": commit.strip() or None,
        "steps": results["steps"],
        "wall_s": round(results["wall_s"], 1),
        **{k: results[k] for k in keys},
        "lines": [summary_line(results), accuracy_line(results)],
    }


def main() -> None:
    import torch

    run_dir = Path(sys.argv[1])
    out = ROOT / "bench" / "results" / f"demo_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    rec = record(run_dir)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"recorded in {out.relative_to(ROOT)}: {'; '.join(rec['lines'])}")


if __name__ == "__main__":
    main()
