"""Data preparation at scale: `sft prepare` on 100k / 1M / 10M conversations vs TRL 1.16, beside the tokenizer.

    python bench/data_scale.py [--sizes 100000,1000000,10000000] [--max-length 4096] [--trl-sizes 100000,1000000]
                               [--out bench/results/data_scale_cpu.json] [--workdir /tmp/sft-data-scale]

Data: messages JSON Lines made by replicating the Alpaca-GPT4 (999) and Dolly (6,400) fixtures of
../shared/fixtures/data, each copy's user turn ending in a unique marker (`[#<n>]`), so no two conversations are
equal. Tokenizer: Qwen2.5's (../shared/fixtures/tokenizers). Per size, each in its own process, one run each:
- ours:  `python -m launcher.cli prepare` (everything `sft prepare` does: read, render, tokenize, mask, pack,
         write the cache), `data.num_proc` left at its default (every core);
- TRL:   `datasets.load_dataset("json")` of the same file, then `SFTTrainer._prepare_dataset` with
         `assistant_only_loss=True` (TRL's Qwen2.5 `{% generation %}` training template), `packing=True,
         packing_strategy="bfd"`, `dataset_num_proc` = every core: what SFTTrainer runs before training;
- limit: the bare tokenizer on the same rendered text and cores (the chat template rendered first, untimed;
         then `encode_batch_fast` on all cores, timed): the throughput any preparation with this tokenizer is
         bound by. At most `--limit-max` conversations (its rate does not depend on the size).
Wall time, tokens/s (packed, non-pad tokens), peak RSS (the whole process tree, sampled every 0.2 s) and packing
efficiency are reported per size, and our time per stage. Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures"
TOKENIZER = FIXTURES / "tokenizers" / "qwen2.5-0.5b-instruct"


def base_conversations() -> list[tuple[str, str]]:
    data = FIXTURES / "data"
    alpaca = json.loads((data / "alpaca_gpt4_en_demo.json").read_text())
    dolly = [json.loads(line) for line in (data / "dolly15k_partial_instruction_response.jsonl").open()]
    out = [(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), r["output"]) for r in alpaca]
    return out + [(r["instruction"], r["text"]) for r in dolly]


def write_mix(n: int, path: Path) -> None:
    """n messages rows: the fixtures over and over, each user turn with its own marker."""
    base = base_conversations()
    with path.open("w") as f:
        for i in range(n):
            user, answer = base[i % len(base)]
            row = {
                "messages": [
                    {"role": "user", "content": f"{user}\n\n[#{i}]"},
                    {"role": "assistant", "content": answer},
                ]
            }
            f.write(json.dumps(row) + "\n")


class PeakRSS:
    """Peak of the summed RSS of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self.stop.wait(0.2)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak / 2**30


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRSS(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"timed_out": True, "seconds": time.perf_counter() - t0, "peak_rss_gb": rss.done()}
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {err[-3000:]}")
    return {"seconds": seconds, "peak_rss_gb": rss.done(), "stdout": out, "stderr": err}


def run_ours(path: Path, max_length: int, cache: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "prepare",
        f"model.tokenizer={TOKENIZER}",
        f"data.sources=[{{path: {path}}}]",
        "data.eval_sources=[]",
        f"data.max_length={max_length}",
        f"cache_dir={cache}",
        "logging.progress=false",
    ]
    res = run_measured(cmd)
    cache_info = json.loads(res["stdout"].strip().splitlines()[-1])
    report = json.loads((Path(cache_info["path"]) / "meta.json").read_text())["report"]
    t = report["train"]
    return {
        "seconds": res["seconds"],
        "tokens": t["tokens"],
        "tokens_per_s": t["tokens"] / res["seconds"],
        "rows": t["packed_rows"],
        "packing_efficiency": t["packing_efficiency"],
        "trained_tokens": t["trained_tokens"],
        "peak_rss_gb": res["peak_rss_gb"],
        "report_peak_rss_gb": {"main": report["peak_rss_gb"], "encoders": report["encode_peak_rss_gb"]},
        "stages_s": {
            "read": report["stages"]["read"],
            "render": report["stages"]["render"],
            "tokenize": report["stages"]["tokenize"],
            "encode_wall": report["stages"]["encode_wall"],
            "pack": report["stages"]["pack"],
            "write": report["stages"]["write"],
            "in_process": report["seconds"],
        },
        "lower_bound_rows": report["train"].get("lower_bound_rows"),
    }


def trl_worker(path: str, max_length: int, num_proc: int, out: str) -> None:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import qwen2_5_training_chat_template

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=path, split="train")
    with __import__("tempfile").TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_length=max_length,
            packing=True,
            packing_strategy="bfd",
            assistant_only_loss=True,
            dataset_num_proc=num_proc if num_proc > 1 else None,
            report_to=[],
            bf16=False,
            use_cpu=True,
        )
        # Only what _prepare_dataset reads from the trainer: the real preparation code, without a model.
        trainer = SFTTrainer.__new__(SFTTrainer)
        trainer._tokenizer = tok
        trainer.chat_template = qwen2_5_training_chat_template
        trainer.completion_only_loss = False
        packed = SFTTrainer._prepare_dataset(trainer, ds, tok, args, True, None, "train")
        seconds = time.perf_counter() - t0
        lengths = packed.data.column("input_ids").combine_chunks().value_lengths().to_numpy()
    tokens = int(lengths.sum())
    Path(out).write_text(
        json.dumps(
            {
                "seconds_in_process": seconds,
                "tokens": tokens,
                "rows": len(lengths),
                "packing_efficiency": tokens / (len(lengths) * max_length),
            }
        )
    )


def run_trl(path: Path, max_length: int, num_proc: int, work: Path, timeout: float) -> dict:
    out = work / "trl.json"
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    cmd = [sys.executable, __file__, "--trl-worker", str(path), str(max_length), str(num_proc), str(out)]
    res = run_measured(cmd, env=env, timeout=timeout)
    shutil.rmtree(work / "hf-datasets", ignore_errors=True)
    if res.get("timed_out"):
        return {"timed_out_after_s": res["seconds"], "peak_rss_gb": res["peak_rss_gb"]}
    r = json.loads(out.read_text())
    return {
        **r,
        "seconds": res["seconds"],
        "tokens_per_s": r["tokens"] / res["seconds"],
        "peak_rss_gb": res["peak_rss_gb"],
    }


def tokenizer_limit(path: Path, limit: int) -> dict:
    """The bare tokenizer on the rendered text of the first `limit` conversations, all cores (untimed render)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    backend = tok.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    seconds, tokens, n, batch = 0.0, 0, 0, []

    def flush() -> None:
        nonlocal seconds, tokens
        texts = tok.apply_chat_template(batch, tokenize=False)
        t0 = time.perf_counter()
        encs = encode(texts, add_special_tokens=False)
        seconds += time.perf_counter() - t0
        tokens += sum(len(e.ids) for e in encs)
        batch.clear()

    with path.open() as f:
        for line in f:
            if n == limit:
                break
            batch.append(json.loads(line)["messages"])
            n += 1
            if len(batch) == 20_000:
                flush()
    if batch:
        flush()
    return {"conversations": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


class Lock:
    """`--lock PATH`: hold an exclusive flock on PATH during each measured run (not while generating data), so
    runs on a shared machine never overlap another heavy job that takes the same lock."""

    def __init__(self, path: str | None):
        self.path = path

    def __enter__(self) -> None:
        if self.path:
            import fcntl

            self.f = open(self.path, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        self.load = os.getloadavg()[0]

    def __exit__(self, *exc: object) -> None:
        if self.path:
            self.f.close()


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "note": "2-core VM shared with other work (other sessions' tests ran beside these runs)",
    }


def main() -> None:
    if sys.argv[1:2] == ["--trl-worker"]:
        path, max_length, num_proc, out = sys.argv[2:6]
        trl_worker(path, int(max_length), int(num_proc), out)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--trl-sizes", default="100000,1000000", help="sizes TRL runs at (it needs > 1 h at 10M)")
    ap.add_argument("--trl-timeout", type=float, default=3600)
    ap.add_argument("--limit-max", type=int, default=1_000_000, help="conversations for the tokenizer limit")
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--workdir", default="/tmp/sft-data-scale")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lock", default=None, help="a file to flock during each measured run (shared machines)")
    args = ap.parse_args()

    import tokenizers
    import transformers
    import trl

    work = Path(args.workdir)
    cores = len(os.sched_getaffinity(0))
    result = {
        "benchmark": "data_scale",
        "machine": machine(),
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "trl": trl.__version__,
        },
        "tokenizer": TOKENIZER.name,
        "max_length": args.max_length,
        "sizes": {},
    }
    trl_sizes = {int(s) for s in args.trl_sizes.split(",") if s}
    for n in (int(s) for s in args.sizes.split(",")):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        path = work / f"mix-{n}.jsonl"
        write_mix(n, path)
        entry = {"conversations": n, "jsonl_gb": path.stat().st_size / 2**30}
        lock = Lock(args.lock)
        with lock:
            entry["ours"] = {
                **run_ours(path, args.max_length, work / "cache"),
                "load_average_1min": lock.load,
            }
        shutil.rmtree(work / "cache", ignore_errors=True)
        with lock:
            limit = tokenizer_limit(path, min(n, args.limit_max))
            entry["tokenizer_limit"] = {**limit, "load_average_1min": lock.load}
        entry["ours_fraction_of_limit"] = (
            entry["ours"]["tokens_per_s"] / entry["tokenizer_limit"]["tokens_per_s"]
        )
        if n in trl_sizes:
            with lock:
                trl_run = run_trl(path, args.max_length, cores, work, args.trl_timeout)
                entry["trl"] = {**trl_run, "load_average_1min": lock.load}
            if "tokens_per_s" in entry["trl"]:
                entry["ratio_ours_over_trl"] = entry["ours"]["tokens_per_s"] / entry["trl"]["tokens_per_s"]
        result["sizes"][str(n)] = entry
        print(json.dumps({str(n): entry}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def table(result: dict) -> str:
    lines = [
        f"{'conversations':>13} {'who':<6}{'wall s':>9}{'tokens/s':>11}{'peak RSS GB':>12}{'efficiency':>11}"
        f"{'rows':>9}  stages (s) / note"
    ]
    for n, e in result["sizes"].items():
        o = e["ours"]
        st = o["stages_s"]
        lines.append(
            f"{int(n):>13,} {'ours':<6}{o['seconds']:>9.1f}{o['tokens_per_s']:>11,.0f}{o['peak_rss_gb']:>12.2f}"
            f"{o['packing_efficiency']:>11.5f}{o['rows']:>9}  read {st['read']:.0f}, render {st['render']:.0f}, "
            f"tokenize {st['tokenize']:.0f} (process-s); encode {st['encode_wall']:.0f}, pack {st['pack']:.1f}, "
            f"write {st['write']:.1f} (wall)"
        )
        t = e.get("trl")
        if t and "tokens_per_s" in t:
            lines.append(
                f"{'':>13} {'TRL':<6}{t['seconds']:>9.1f}{t['tokens_per_s']:>11,.0f}{t['peak_rss_gb']:>12.2f}"
                f"{t['packing_efficiency']:>11.5f}{t['rows']:>9}  ours/TRL {e['ratio_ours_over_trl']:.2f}x"
            )
        elif t:
            lines.append(f"{'':>13} {'TRL':<6} did not finish in {t['timed_out_after_s']:.0f} s")
        else:
            lines.append(f"{'':>13} {'TRL':<6} not run at this size")
        lim = e["tokenizer_limit"]
        lines.append(
            f"{'':>13} {'limit':<6}{lim['seconds']:>9.1f}{lim['tokens_per_s']:>11,.0f}{'':>12}{'':>11}{'':>9}  "
            f"bare tokenizer on {lim['conversations']:,} rendered conversations; ours = "
            f"{e['ours_fraction_of_limit']:.2f} of it"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
