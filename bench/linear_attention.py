#!/usr/bin/env python
"""What document-aware linear attention costs on the PyTorch path (CPU): one forward + backward of a small Qwen3.5
(Gated DeltaNet + full attention) and of LFM2 (short convolutions + attention) on packed rows.

    python bench/linear_attention.py                                      # prints a table, writes JSON
    python bench/linear_attention.py --length 2048 --rows 2 --repeat 5 --out bench/results/linear_attention_cpu.json
    python bench/linear_attention.py --doc-median 40 --out bench/results/linear_attention_cpu_short_docs.json

Three ways to train the same documents, fp32, sdpa, one thread per core:
- `leaky`: the packed rows through transformers' own path (state and convolution run across documents: wrong,
  the speed it had before the fix);
- `exact`: the packed rows with each document's state and convolution window restarting
  (`launcher.model.linear_attention`: the convolution over the row with zeros between documents, the recurrence
  with documents as batch rows grouped by chunk count);
- `unpacked`: each document alone, one forward + backward per document (what training without packing runs).
The figure is the shortest of `--repeat` steps after a warm-up round, the settings taking turns (this machine is
shared: the minimum is the least disturbed). The GPU kernel path
(causal-conv1d `seq_idx`, flash-linear-attention `cu_seqlens`) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "qwen3_5_text": dict(
        model_type="qwen3_5_text",
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        head_dim=64,
    ),
    "lfm2": dict(model_type="lfm2", layer_types=["conv", "conv", "full_attention", "conv"], conv_L_cache=3),
}
COMMON = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=65536,
)


def documents(total: int, seed: int, longest: int, median: int = 250) -> list[dict]:
    """SFT-like lengths (log-normal around `median` tokens, 16..`longest`) adding up to about `total` tokens."""
    g = torch.Generator().manual_seed(seed)
    docs, n = [], 0
    while n < total:
        length = int(
            torch.empty(1).log_normal_(mean=math.log(median), std=0.8, generator=g).clamp(16, longest).item()
        )
        ids = torch.randint(3, COMMON["vocab_size"], (length,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": ids})
        n += length
    return docs


def step(model, batches, documents_on: bool) -> float:
    """Seconds of one forward + backward over `batches` (documents restart only with `documents_on`)."""
    import launcher.model.linear_attention as la

    real = la._LastDocuments.of
    if not documents_on:  # transformers' path, leaking across documents
        la._LastDocuments.of = lambda self, pos: None
    try:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for b in batches:
            model(**b).logits.float().sum().backward()
        return time.perf_counter() - t0
    finally:
        la._LastDocuments.of = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=2048, help="packed row length")
    ap.add_argument("--rows", type=int, default=2, help="packed rows per step")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--doc-median", type=int, default=250, help="median document length (tokens)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.data import collate, pack_examples
    from launcher.data.packing import doc_lengths
    from launcher.model.load import _prepare

    rows = pack_examples(
        documents(args.rows * args.length, 0, min(1500, args.length), args.doc_median), max_length=args.length
    )[: args.rows]
    docs = []
    for r in rows:
        start = 0
        for n in doc_lengths(r["position_ids"]):
            docs.append({k: r[k][start : start + n] for k in r})
            start += n
    lengths = [len(d["input_ids"]) for d in docs]
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rows": args.rows,
        "row_length": args.length,
        "documents": len(docs),
        "doc_length_median": int(statistics.median(lengths)),
        "load_average_before": os.getloadavg(),
        "models": {},
    }
    for name, extra in MODELS.items():
        torch.manual_seed(0)
        config = AutoConfig.for_model(**{**COMMON, **extra})
        model = _prepare(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), "sdpa").train()
        settings = {
            "leaky": ([collate(rows, "sdpa")], False),
            "exact": ([collate(rows, "sdpa")], True),
            "unpacked": ([collate([d], "sdpa") for d in docs], True),
        }
        times: dict[str, list[float]] = {k: [] for k in settings}
        for i in range(args.repeat + 1):  # round robin, so load from other processes hits every setting alike
            for k, (batches, on) in settings.items():
                t = step(model, batches, on)
                if i:  # the first round warms up
                    times[k].append(t)
        best = {k: min(v) for k, v in times.items()}
        results["models"][name] = {
            **{f"{k}_s": round(v, 4) for k, v in best.items()},
            "exact_over_leaky": round(best["exact"] / best["leaky"], 3),
            "exact_over_unpacked": round(best["exact"] / best["unpacked"], 3),
        }
        print(
            f"{name:14s} " + "  ".join(f"{k} {v:.3f} s" for k, v in best.items()) + "  "
            f"exact/leaky {best['exact'] / best['leaky']:.2f}x  exact/unpacked {best['exact'] / best['unpacked']:.2f}x",
            flush=True,
        )
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
