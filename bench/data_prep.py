"""Data preparation throughput: our template + assistant mask + best-fit packing vs TRL 1.16's SFT preparation.

    python bench/data_prep.py [--repeat 4] [--max-length 2048] [--out bench/results/data_prep_cpu.json]

Same conversations (real ShareGPT/Alpaca/Dolly-shaped sets from ../shared/fixtures/data, else the bundled demo
set), same tokenizer (Qwen2.5's from ../shared/fixtures, else the demo one), one process each, one run:
- ours: `launcher.data.pipeline.encode_conversations` (the tokenizer's own template, exact assistant spans,
        batched tokenization), then `pack_arrays` (global best-fit decreasing) — what `sft prepare` runs;
- TRL:  `SFTTrainer._prepare_dataset` with `assistant_only_loss=True` (TRL's Qwen2.5 `{% generation %}` training
        template), `packing=True, packing_strategy="bfd"` — the exact code path SFTTrainer runs before training.
Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures"


def load_conversations() -> tuple[list[list[dict]], str]:
    from launcher.data.sources import detect_format, to_messages

    files = [
        ("alpaca_gpt4_en_demo.json", {}),
        ("alpaca_cleaned_first1000.json", {}),
        ("sharegpt_vicuna_dummy_conversation.json", {}),
        ("dolly15k_partial_instruction_response.jsonl", {"output": "text"}),
    ]
    convs, names = [], []
    for name, columns in files:
        path = FIXTURES / "data" / name
        if not path.exists():
            continue
        text = path.read_text()
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if name.endswith(".jsonl")
            else json.loads(text)
        )
        fmt = "alpaca" if columns else detect_format(rows[0], {})
        convs += [to_messages(r, fmt, columns, f"{name}[{i}]") for i, r in enumerate(rows)]
        names.append(name)
    if convs:
        return convs, "fixtures: " + ", ".join(names)
    demo = ROOT / "launcher" / "assets" / "demo" / "train.jsonl"
    return [json.loads(line)["messages"] for line in demo.read_text().splitlines()], "bundled demo set"


def load_tokenizer():
    from transformers import AutoTokenizer

    path = FIXTURES / "tokenizers" / "qwen2.5-0.5b-instruct"
    if not path.exists():
        path = ROOT / "launcher" / "assets" / "tokenizer"
    return AutoTokenizer.from_pretrained(path), path.name


def run_ours(tok, convs: list[list[dict]], max_length: int, num_proc: int) -> dict:
    from launcher.data.packing import pack_arrays
    from launcher.data.pipeline import encode_conversations

    t0 = time.perf_counter()
    # The pipeline's own path: template + spans, tokenizer, masks (in num_proc processes via datasets.map).
    encoded = encode_conversations(tok, convs, "all", None, num_proc)
    kept = [e for e in encoded if len(e["input_ids"]) <= max_length]
    t1 = time.perf_counter()
    rows = pack_arrays([e["input_ids"] for e in kept], [e["labels"] for e in kept], max_length)
    t2 = time.perf_counter()
    tokens = rows.num_tokens
    return {
        "seconds": t2 - t0,
        "encode_s": t1 - t0,
        "pack_s": t2 - t1,
        "tokens": tokens,
        "tokens_per_s": tokens / (t2 - t0),
        "rows": len(rows),
        "packing_efficiency": tokens / (len(rows) * max_length),
        "trained_tokens": rows.num_trained,
        "overlong_dropped_examples": len(encoded) - len(kept),
        "trained_tokens_truncated": 0,
    }


def run_trl(tok, convs: list[list[dict]], max_length: int, num_proc: int) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import qwen2_5_training_chat_template

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list([{"messages": c} for c in convs])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
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
        trainer.chat_template = (
            qwen2_5_training_chat_template if "im_start" in (tok.chat_template or "") else None
        )
        trainer.completion_only_loss = False
        t0 = time.perf_counter()
        packed = SFTTrainer._prepare_dataset(trainer, ds, tok, args, True, None, "train")
        lengths = [len(x) for x in packed["input_ids"]]
        labels = packed["labels"]  # TRL 1.16 turns the assistant mask into -100 labels
        seconds = time.perf_counter() - t0
    tokens = sum(lengths)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "rows": len(lengths),
        "packing_efficiency": tokens / (len(lengths) * max_length),
        "trained_tokens": int(sum(sum(x != -100 for x in row) for row in labels)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--repeat", type=int, default=3, help="repeat the conversation set N times (more stable timing)"
    )
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument(
        "--num-proc",
        type=int,
        default=1,
        help="processes for both (ours: data.num_proc; TRL: dataset_num_proc)",
    )
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    import trl

    convs, source = load_conversations()
    convs = convs * args.repeat
    tok, tok_name = load_tokenizer()
    ours = run_ours(tok, convs, args.max_length, args.num_proc)
    theirs = run_trl(tok, convs, args.max_length, args.num_proc)
    result = {
        "benchmark": "data_prep",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "trl": trl.__version__,
        },
        "data": source,
        "conversations": len(convs),
        "tokenizer": tok_name,
        "max_length": args.max_length,
        "ours": ours,
        "trl": theirs,
        "tokens_per_s_ratio_ours_over_trl": ours["tokens_per_s"] / theirs["tokens_per_s"],
    }
    print(json.dumps(result, indent=2))
    print(f"\n{'':<6}{'seconds':>10}{'tokens/s':>12}{'rows':>8}{'efficiency':>12}{'trained':>10}")
    for name in ("ours", "trl"):
        r = result[name]
        print(
            f"{name:<6}{r['seconds']:>10.2f}{r['tokens_per_s']:>12.0f}{r['rows']:>8}{r['packing_efficiency']:>12.5f}"
            f"{r['trained_tokens']:>10}"
        )
    print(f"ratio ours/trl tokens/s: {result['tokens_per_s_ratio_ours_over_trl']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
