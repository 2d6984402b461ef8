"""Peak memory of merging encoded parts into packed rows, per stage, on synthetic documents (no tokenizing).

    python bench/merge_memory.py [--docs 10000000] [--parts 20] [--workdir /tmp/sft-merge-memory] [--out F]

Writes `--parts` encoded parts of `--docs` documents in all (lognormal lengths like the data_scale mix, about 112
tokens each, capped at 4096; token files are sparse, so 10M documents take little disk), then runs the production
`launcher.data.pipeline.merge` on them (`data.max_length=4096`) while a thread samples this process's VmRSS,
RssAnon (heap) and RssFile (mapped file pages) every 20 ms. The merge's steps are labelled by wrapping them
(`_source_report`, `_gather_items`, `pack_plan`, `write_rows`). Prints JSON, then a table: peak per stage.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import launcher.data.pipeline as pipeline  # noqa: E402
from launcher.config import compose  # noqa: E402
from launcher.data.store import CANDIDATE_COLUMNS, EncodedPart  # noqa: E402


def status() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 2**20  # GiB
    return out


def make_parts(root: Path, docs: int, parts: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(parts):
        n = docs // parts + (1 if k < docs % parts else 0)
        d = root / f"part{k}"
        d.mkdir(parents=True)
        lengths = np.minimum(rng.lognormal(4.3, 0.9, n).astype(np.int64) + 2, 4096).astype(np.int32)
        cols = {
            "hashes": rng.integers(0, 2**63, n, dtype=np.uint64),  # all distinct in practice
            "status": np.zeros(n, np.uint8),
            "lengths": lengths,
            "trained": lengths // 2,
            "truncated": np.zeros(n, np.uint8),
            "lost": np.zeros(n, np.int32),
            "id_sums": np.zeros(n, np.int64),  # the tokens are zeros: their checksum is 0
        }
        for name, dtype in CANDIDATE_COLUMNS.items():
            cols[name].astype(dtype).tofile(d / f"{name}.bin")
        tokens = int(lengths.sum())
        for name, width in (("ids.bin", 4), ("mask.bin", 1)):
            with open(d / name, "wb") as f:
                f.truncate(tokens * width)
        (d / "report.json").write_text(json.dumps({"rows_read": n, "dropped": {}, "extra_from_trees": 0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/sft-merge-memory")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    make_parts(work / "parts", args.docs, args.parts)

    stage = ["load parts"]
    peaks: dict[str, dict[str, float]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            p = peaks.setdefault(stage[0], {})
            for k, v in status().items():
                p[k] = max(p.get(k, 0.0), v)
            time.sleep(0.02)

    def labelled(name: str) -> None:
        f = getattr(pipeline, name)

        def g(*a, **kw):
            stage[0] = name
            try:
                return f(*a, **kw)
            finally:
                stage[0] = f"merge (after {name})"

        setattr(pipeline, name, g)

    for name in ("_source_report", "_gather_items", "pack_plan", "write_rows"):
        labelled(name)
    cfg = compose(["data.eval_sources=[]", "data.max_length=4096", "data.sources=[{path: /dev/null}]"])
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    parts = [EncodedPart(work / "parts" / f"part{k}") for k in range(args.parts)]
    stage[0] = "merge"
    (work / "out").mkdir()
    t0 = time.perf_counter()
    report = pipeline.merge(cfg.data, [parts], work / "out")
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    result = {
        "benchmark": "merge_memory",
        "docs": args.docs,
        "parts": args.parts,
        "tokens": report["train"]["tokens"],
        "merge_seconds": seconds,
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gib_by_stage": peaks,
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(f"{'stage':<32}{'VmRSS':>8}{'RssAnon':>9}{'RssFile':>9}  (GiB)")
    for name, p in peaks.items():
        print(f"{name:<32}{p.get('VmRSS', 0):>8.2f}{p.get('RssAnon', 0):>9.2f}{p.get('RssFile', 0):>9.2f}")
    print(
        f"merge {seconds:.1f} s, {result['tokens']:,} tokens; peak RSS (ru_maxrss) {result['ru_maxrss_gib']:.2f} GiB"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
