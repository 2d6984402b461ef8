#!/usr/bin/env python
"""Training-step benchmark: our DeepSpeed ZeRO-3 step against TRL's SFTTrainer (GPU) or a raw DeepSpeed loop (CPU).

    python bench/train_step.py                              # GPU: ours, trl, ours_padded on a ~0.5B Llama
    python bench/train_step.py --steps 300 --warmup 10 --out bench/results/train_step_h100.json
    python bench/train_step.py --model-size small --steps 5  # CPU: ours vs raw_ds on a tiny model

Every variant trains the same model config (random init, seed 0) on the same documents, on the same device, with
gradient checkpointing, AdamW and (on CUDA) bf16:

| variant       | what runs one optimizer step                                                                        |
|---------------|-----------------------------------------------------------------------------------------------------|
| `ours`        | `launcher.train.train_step` on a ZeRO-3 engine from `launcher.engine`, packed rows, `torch_varlen`   |
|               | on CUDA (`sdpa` + block-diagonal mask on CPU)                                                        |
| `trl`         | TRL `SFTTrainer`, `padding_free=True`, fed the *same* packed rows in the same order (`seq_lengths`,  |
|               | sequential sampler): its collator emits `position_ids` + `cu_seq_lens_q/k` + `max_length_q/k`,       |
|               | which is exactly what our `torch_varlen` attention function reads, so both use the same kernel       |
| `trl_bf16`    | as `trl` with the model's weights in bf16 (pure bf16 AdamW, no fp32 master) -- optional              |
| `ours_padded` | our step with one conversation per row, padded to the longest of its micro-batch, `sdpa` + mask     |
| `raw_ds`      | the same ZeRO-3 engine driven by hand: `eng(**batch).loss` (the model's own HF loss), backward, step |

Step time is wall time from the end of one optimizer step to the end of the next (data collation included) after
`--warmup` steps; tokens are non-pad tokens; MFU = `launcher.metrics.step_flops` / step time / `peak_flops`. Each
GPU variant runs in its own subprocess (clean memory peaks, no global state shared); on CPU `ours` and `raw_ds`
alternate step by step in one process so machine noise hits both alike.

Data: conversations from ../shared/fixtures/data, templated and assistant-masked by the project's own pipeline
with a fixture tokenizer (cached under .cache/sft/bench/), else synthetic lognormal lengths. `--data-cache FILE`
reads/writes that token cache (used to carry it to a machine without the fixtures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT.parent / "shared" / "fixtures"
IGNORE_INDEX = -100

MODEL_SIZES: dict[str, dict[str, Any]] = {
    # ~0.50B with a 32k vocab: 16 x 25.2M (attention 6.3M + MLP 18.9M) + 2 x 49M untied embeddings.
    "0.5b": dict(
        model_type="llama",
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "small": dict(
        model_type="llama",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
}
TOKENIZERS = ("tinyllama-1.1b-chat-v1.0", "qwen2.5-0.5b-instruct")  # first present wins (32k vocab first)
SOURCES: tuple[tuple[str, dict[str, str]], ...] = (  # (file, column mapping); the auto-detected formats
    ("alpaca_cleaned_first1000.json", {}),
    ("alpaca_gpt4_en_demo.json", {}),
    ("alpaca_stanford_first100.json", {}),
    ("dolly15k_partial_instruction_response.jsonl", {"output": "text"}),
    ("sharegpt_vicuna_dummy_conversation.json", {}),
    ("sharegpt_glaive_toolcall_en_demo.json", {}),
    ("sharegpt_dpo_en_demo.json", {}),
)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- data


def _fixture_examples(max_length: int) -> tuple[list[dict], dict[str, Any]]:
    """Conversations from the fixtures through the project's own template + assistant-mask pipeline."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from launcher.config import DataConfig, SourceConfig
    from launcher.data.pipeline import load_source
    from launcher.data.template import ensure_chat_template

    tok_name = next(n for n in TOKENIZERS if (FIXTURES / "tokenizers" / n).is_dir())
    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizers" / tok_name))
    ensure_chat_template(tok, None)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples, per_source = [], {}
    for name, columns in SOURCES:
        path = FIXTURES / "data" / name
        if not path.exists():
            continue
        data_cfg = OmegaConf.structured(
            DataConfig(
                sources=[SourceConfig(path=str(path), columns=columns)],
                max_length=max_length,
                on_error="skip",
            )
        )
        try:
            items, report = load_source(data_cfg.sources[0], data_cfg, tok, None)
        except Exception as e:  # a source the auto-detection cannot read is skipped, and said so
            per_source[name] = f"skipped: {type(e).__name__}: {str(e)[:120]}"
            continue
        per_source[name] = {"kept": len(items), "dropped": dict(report.dropped)}
        examples += [enc for _, enc in items]
    meta = {
        "source": "fixtures",
        "tokenizer": tok_name,
        "vocab_size": len(tok),
        "pad_id": tok.pad_token_id,
        "per_source": per_source,
    }
    return examples, meta


def _synthetic_examples(max_length: int, n: int = 6000, vocab: int = 32000) -> tuple[list[dict], dict]:
    """Lognormal conversation lengths (median ~270 tokens), the first ~35% of each a masked prompt."""
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=5.6, sigma=0.9, size=n).astype(int), 24, max_length)
    examples = []
    for n_tok in lengths.tolist():
        ids = rng.integers(3, vocab, size=n_tok).tolist()
        prompt = max(1, int(0.35 * n_tok))
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples, {"source": "synthetic-lognormal", "tokenizer": None, "vocab_size": vocab, "pad_id": 0}


def _save_cache(path: Path, examples: list[dict], meta: dict) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.concatenate([np.asarray(e["input_ids"], dtype=np.int32) for e in examples])
    mask = np.concatenate([np.asarray(e["labels"]) != IGNORE_INDEX for e in examples])
    offsets = np.cumsum([0] + [len(e["input_ids"]) for e in examples]).astype(np.int64)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, ids=ids, mask=mask, offsets=offsets, meta=np.array(json.dumps(meta)))
    tmp.replace(path)


def _load_cache(path: Path) -> tuple[list[dict], dict]:
    import numpy as np

    z = np.load(path)
    ids, mask, off = z["ids"], z["mask"], z["offsets"]
    labels = np.where(mask, ids, IGNORE_INDEX)
    examples = [
        {"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist()} for a, b in zip(off[:-1], off[1:])
    ]
    return examples, json.loads(str(z["meta"]))


def load_examples(max_length: int, cache: Path | None, synthetic: bool) -> tuple[list[dict], dict]:
    """Documents for the benchmark: the token cache if present, else the fixtures (cached), else synthetic."""
    if synthetic:
        return _synthetic_examples(max_length)
    have_fixtures = (FIXTURES / "data").is_dir() and (FIXTURES / "tokenizers").is_dir()
    if cache is None:
        cache = ROOT / ".cache" / "sft" / "bench" / f"fixtures-L{max_length}.npz"
    if cache.exists():
        examples, meta = _load_cache(cache)
        meta["cache"] = str(cache.relative_to(ROOT) if cache.is_relative_to(ROOT) else cache)
        return examples, meta
    if not have_fixtures:
        print(f"[bench] no {cache} and no {FIXTURES}: synthetic documents", file=sys.stderr)
        return _synthetic_examples(max_length)
    examples, meta = _fixture_examples(max_length)
    _save_cache(cache, examples, meta)
    meta["cache"] = str(cache.relative_to(ROOT) if cache.is_relative_to(ROOT) else cache)
    return examples, meta


def build_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Rows and per-step schedules shared by every variant (pickled to the worker processes)."""
    import numpy as np

    from launcher.data import pack_examples
    from launcher.data.loader import StepSampler

    examples, meta = load_examples(args.max_length, args.data_cache, args.synthetic)
    n_steps = args.warmup + args.steps
    rows = pack_examples(examples, args.max_length, seed=0)
    sampler = StepSampler(rows, 1, 0, args.rows_per_step, seed=0)
    it = iter(sampler)
    packed_schedule = [next(it) for _ in range(n_steps)]

    # Padded: one conversation per row; a fixed number of conversations per step (DeepSpeed's accumulation is
    # fixed) chosen so that the expected non-pad tokens per step equal the packed step's.
    tokens_per_packed_step = float(
        np.mean([sum(len(rows[i]["input_ids"]) for i in s) for s in packed_schedule])
    )
    mean_doc = float(np.mean([len(e["input_ids"]) for e in examples]))
    micro_pad = args.padded_micro
    docs_per_step = max(micro_pad, micro_pad * round(tokens_per_packed_step / mean_doc / micro_pad))
    rng = np.random.default_rng(1)
    stream: list[int] = []
    padded_schedule = []
    for _ in range(n_steps):
        while len(stream) < docs_per_step:
            stream += rng.permutation(len(examples)).tolist()
        padded_schedule.append(stream[:docs_per_step])
        stream = stream[docs_per_step:]
    docs = [
        {
            "input_ids": list(e["input_ids"]),
            "labels": list(e["labels"]),
            "position_ids": list(range(len(e["input_ids"]))),
        }
        for e in examples
    ]
    lengths = [len(e["input_ids"]) for e in examples]
    data_summary = {
        **{k: v for k, v in meta.items() if k != "pad_id"},
        "documents": len(examples),
        "doc_tokens_mean": mean_doc,
        "doc_tokens_median": float(np.median(lengths)),
        "doc_tokens_p90": float(np.percentile(lengths, 90)),
        "doc_tokens_max": int(max(lengths)),
        "trained_fraction": float(
            sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in examples) / max(sum(lengths), 1)
        ),
        "packed_rows": len(rows),
        "packing_efficiency": sum(lengths) / (len(rows) * args.max_length),
        "docs_per_packed_row": len(examples) / len(rows),
        "tokens_per_step_packed": tokens_per_packed_step,
        "docs_per_step_padded": docs_per_step,
        "tokens_per_step_padded": float(np.mean([sum(lengths[i] for i in s) for s in padded_schedule])),
    }
    return {
        "rows": rows,
        "packed_schedule": packed_schedule,
        "docs": docs,
        "padded_schedule": padded_schedule,
        "vocab_size": int(math.ceil(meta["vocab_size"] / 64) * 64),
        "pad_id": int(meta["pad_id"] or 0),
        "data": data_summary,
    }


# ---------------------------------------------------------------- workers


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(name: str, dts: list[float], tokens: list[int], flops: list[float], peak: float | None) -> dict:
    total = sum(dts)
    out = {
        "timed_steps": len(dts),
        "median_step_s": statistics.median(dts),
        "mean_step_s": total / len(dts),
        "min_step_s": min(dts),
        "tokens_per_step": sum(tokens) / len(tokens),
        "tokens_per_s": sum(tokens) / total,
        "model_tflops_per_s": sum(flops) / total / 1e12,
        "mfu": (sum(flops) / total / peak) if peak else None,
    }
    return out


class OursRunner:
    """`ours`, `ours_padded` or `raw_ds`: the model, engine and loss `sft train` builds
    (`launcher.run.build_trainable` on a composed config: the same precision, attention choice, activation
    checkpointing, tiled-loss decision and DeepSpeed config as a user's run)."""

    def __init__(self, name: str, plan: dict, args: argparse.Namespace, info: Any):
        import torch
        from omegaconf import OmegaConf

        from launcher.config import compose
        from launcher.long_context.sequence_parallel import SequenceParallel
        from launcher.run import build_trainable

        self.name, self.args, self.device = name, args, info.device
        cuda = self.device.type == "cuda"
        padded = name == "ours_padded"
        # TRL's padding-free collator feeds transformers' varlen interface: ours runs the same kernel on CUDA.
        attention = "sdpa" if padded or not cuda else "torch_varlen"
        self.rows = plan["docs"] if padded else plan["rows"]
        self.schedule = plan["padded_schedule"] if padded else plan["packed_schedule"]
        self.micro = args.padded_micro if padded else args.micro
        self.pad_id = plan["pad_id"]
        cfg = compose(
            [
                "model=tiny",
                f"model.attention={attention}",
                "model.gradient_checkpointing=true",
                f"train.max_steps={len(self.schedule)}",
                f"train.global_batch_size={len(self.schedule[0])}",
                f"train.micro_batch_size={self.micro}",
                f"train.lr={args.lr}",
                f"train.warmup_steps={min(args.warmup, len(self.schedule) - 1)}",
                "train.grad_clip=1.0",
            ]
        )
        OmegaConf.update(cfg, "model.init", dict(plan["init"]), merge=False)  # the benchmark's model
        torch.manual_seed(0)
        trainable = build_trainable(
            cfg, info, plan["vocab_size"], SequenceParallel(1, 0, 1), say=lambda _: None
        )
        self.attention, self.loss_fn = trainable.choice.attention, trainable.loss_fn
        self.precision, self.tiled_loss = trainable.choice.precision, trainable.choice.tiled_loss
        self.model_config, self.n_params, self.eng = (
            trainable.model.config,
            trainable.n_params,
            trainable.engine,
        )
        self.dts: list[float] = []
        self.tokens: list[int] = []
        self.flops: list[float] = []
        self.losses: list[float] = []

    def step(self, i: int) -> None:
        import time as _time

        from launcher.data.loader import collate
        from launcher.metrics import step_flops
        from launcher.train import train_step

        _sync(self.device)
        t0 = _time.perf_counter()
        rows = [self.rows[j] for j in self.schedule[i]]
        if self.name == "raw_ds":
            loss = None
            for k in range(0, len(rows), self.micro):
                b = collate(rows[k : k + self.micro], self.attention, self.pad_id, device=self.device)
                loss = self.eng(
                    **b
                ).loss  # the model's own (mean) HF loss; DeepSpeed scales by 1/accumulation
                self.eng.backward(loss)
                self.eng.step()
            loss_value = loss.item()
        else:
            out = train_step(
                self.eng, rows, self.micro, self.attention, self.device, self.pad_id, 1, self.loss_fn
            )
            loss_value = out["loss"]
        _sync(self.device)
        dt = _time.perf_counter() - t0
        self.losses.append(loss_value)
        if i >= self.args.warmup:
            self.dts.append(dt)
            self.tokens.append(sum(len(r["input_ids"]) for r in rows))
            self.flops.append(step_flops(self.model_config, self.n_params, rows))

    def result(self, peak: float | None) -> dict:
        return {
            **_summary(self.name, self.dts, self.tokens, self.flops, peak),
            "attention": self.attention,
            "precision": "bf16 params + fp32 master (DeepSpeed bf16, ZeRO-3)"
            if self.precision.bf16
            else "fp32",
            "setup": "production: launcher.run.build_trainable on a composed config (what sft train builds)",
            "tiled_loss": self.tiled_loss,
            "micro_batch_rows": self.micro,
            "rows_per_step": len(self.schedule[0]),
            "n_params": self.n_params,
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
        }


def run_trl(name: str, plan: dict, args: argparse.Namespace) -> dict:
    """TRL SFTTrainer, padding-free, over the same packed rows in the same order as `ours`."""
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from launcher.data.packing import doc_lengths
    from launcher.metrics import peak_flops, step_flops
    from launcher.model.attention import register_varlen, varlen_available

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    attention = "torch_varlen" if cuda and varlen_available() else "sdpa"
    if attention == "torch_varlen":
        register_varlen()  # TRL's padding-free collator emits cu_seq_lens_q/k + max_length_q/k: what it reads
    pure_bf16 = name == "trl_bf16"
    dtype = torch.bfloat16 if (cuda and pure_bf16) else torch.float32
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**plan["init"], "vocab_size": plan["vocab_size"]})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())

    rows, schedule = plan["rows"], plan["packed_schedule"]
    ordered = [rows[j] for s in schedule for j in s]
    # With sdpa (CPU), transformers builds the block-diagonal mask itself from the packed position_ids.
    dataset = Dataset.from_dict(
        {
            "input_ids": [r["input_ids"] for r in ordered],
            "labels": [r["labels"] for r in ordered],
            "seq_lengths": [doc_lengths(r["position_ids"]) for r in ordered],
        }
    )

    # Only the pad token matters to TRL here (the data is pre-tokenized): a word-level stand-in with our pad id.
    vocab = {f"<t{i}>": i for i in range(plan["vocab_size"])}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<t0>")),
        pad_token=f"<t{plan['pad_id']}>",
        eos_token=f"<t{plan['pad_id']}>",
    )
    per_step = len(schedule[0])
    n_steps = len(schedule)
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    sft_args = SFTConfig(
        output_dir=out_dir,
        max_steps=n_steps,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=per_step // args.micro,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        padding_free=True,
        packing=False,
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=not cuda,
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.last: float | None = None
            self.dts: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            _sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            _sync(device)
            now = time.perf_counter()
            self.dts.append(now - self.last)
            self.last = now

        def on_log(self, _args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    timer = Timer()
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tok)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(timer)
    # Step-to-step wall time, as for ours: the next step's timer starts when on_step_end stamps it, so
    # logging and data loading are inside the measured step. (The log's .item() syncs TRL already does.)
    trainer.train()
    dts = timer.dts[args.warmup :]
    timed = schedule[args.warmup :]
    tokens = [sum(len(rows[j]["input_ids"]) for j in s) for s in timed]
    flops = [step_flops(config, n_params, [rows[j] for j in s]) for s in timed]
    expected_tokens = sum(len(r["input_ids"]) for r in ordered)
    return {
        **_summary(name, dts, tokens, flops, peak_flops(device)),
        "attention": attention,
        "precision": "pure bf16 weights + AdamW in bf16"
        if pure_bf16 and cuda
        else ("fp32 master weights + bf16 autocast (Trainer bf16=True)" if cuda else "fp32"),
        "micro_batch_rows": args.micro,
        "rows_per_step": per_step,
        "n_params": n_params,
        "loss_first": timer.losses[0] if timer.losses else None,
        "loss_last": timer.losses[-1] if timer.losses else None,
        "trl_counted_tokens": int(trainer._total_train_tokens),
        "expected_tokens": int(expected_tokens),
        "transformers": transformers.__version__,
    }


def worker(args: argparse.Namespace) -> None:
    """Run args.worker (comma-separated variants; ours-family ones interleave step by step)."""
    import torch

    with open(args.plan, "rb") as f:
        plan = pickle.load(f)
    names = args.worker.split(",")
    results: dict[str, Any] = {}
    if any(n.startswith("trl") for n in names):
        assert len(names) == 1, "a TRL variant runs alone in its process"
        results[names[0]] = run_trl(names[0], plan, args)
    else:
        from launcher import engine as ds_engine
        from launcher.metrics import peak_flops

        info = ds_engine.init_distributed(30)
        runners = [OursRunner(n, plan, args, info) for n in names]
        for i in range(args.warmup + args.steps):
            for r in runners if i % 2 == 0 else reversed(runners):  # alternate who goes first
                r.step(i)
        peak = peak_flops(info.device)
        for r in runners:
            results[r.name] = r.result(peak)
    cuda = torch.cuda.is_available()
    for res in results.values():
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
        if len(results) > 1 and cuda:
            res["peak_mem_note"] = "shared process: peak over all its variants"
    Path(args.result).write_text(json.dumps(results))


# ---------------------------------------------------------------- parent


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "deepspeed", "trl", "accelerate", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def device_info() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": p.name,
            "memory_gib": p.total_memory / 2**30,
            "sms": p.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def table(report: dict) -> str:
    lines = [
        f"{'variant':<16}{'tok/s':>11}{'MFU':>8}{'TFLOP/s':>9}{'median s':>10}{'peak GiB':>10}"
        f"{'tok/step':>10}  attention / precision"
    ]
    for name, r in report["variants"].items():
        if "error" in r:
            lines.append(f"{name:<16}  FAILED: {r['error'][:200]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
        lines.append(
            f"{name:<16}{r['tokens_per_s']:>11.0f}{mfu:>8}{r['model_tflops_per_s']:>9.1f}"
            f"{r['median_step_s']:>10.4f}{mem:>10}{r['tokens_per_step']:>10.0f}  {r['attention']} / {r['precision']}"
        )
    for k, v in report["ratios"].items():
        lines.append(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    for k, v in report.get("goals", {}).items():
        lines.append(f"goal {k}: {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (GPU 200, CPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 10, CPU 2)")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None, help="GPU 0.5b, CPU tiny")
    p.add_argument(
        "--variants", default=None, help="comma list (GPU: ours,trl,ours_padded; CPU: ours,raw_ds)"
    )
    p.add_argument("--max-length", type=int, default=None, help="tokens per packed row (GPU 4096, CPU 512)")
    p.add_argument(
        "--rows-per-step", type=int, default=None, help="packed rows per optimizer step (GPU 8, CPU 4)"
    )
    p.add_argument("--micro", type=int, default=None, help="packed rows per forward (GPU 8, CPU 2)")
    p.add_argument(
        "--padded-micro", type=int, default=None, help="conversations per forward, padded (GPU 16, CPU 8)"
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--data-cache", type=Path, default=None, help="token cache (.npz) to read, or write if absent"
    )
    p.add_argument("--synthetic", action="store_true", help="synthetic lognormal documents, no fixtures")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    cuda = cuda_available()
    defaults = (
        dict(
            steps=200,
            warmup=10,
            model_size="0.5b",
            variants="ours,trl,ours_padded",
            max_length=4096,
            rows_per_step=8,
            micro=8,
            padded_micro=16,
        )
        if cuda
        else dict(
            steps=10,
            warmup=2,
            model_size="tiny",
            variants="ours,raw_ds",
            max_length=512,
            rows_per_step=4,
            micro=2,
            padded_micro=8,
        )
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        worker(args)
        return

    if args.rows_per_step % args.micro:
        p.error("--rows-per-step must be a multiple of --micro")
    t_start = time.time()
    plan = build_plan(args)
    plan["init"] = MODEL_SIZES[args.model_size]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    # CPU: ours-family variants share one process and alternate steps; GPU: one process each.
    groups: list[list[str]]
    ours_family = [v for v in variants if not v.startswith("trl")]
    if cuda:
        groups = [[v] for v in variants]
    else:
        groups = ([ours_family] if ours_family else []) + [[v] for v in variants if v.startswith("trl")]

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        plan_path = Path(tmp) / "plan.pkl"
        with plan_path.open("wb") as f:
            pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
        for group in groups:
            res_path = Path(tmp) / f"{'_'.join(group)}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                ",".join(group),
                "--plan",
                str(plan_path),
                "--result",
                str(res_path),
            ]
            for k in (
                "steps",
                "warmup",
                "model_size",
                "max_length",
                "rows_per_step",
                "micro",
                "padded_micro",
                "lr",
            ):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            env.setdefault("TOKENIZERS_PARALLELISM", "false")
            env.setdefault("WANDB_MODE", "disabled")
            t0 = time.time()
            print(f"[bench] running {group} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0 or not res_path.exists():
                tail = (proc.stdout + proc.stderr)[-4000:]
                print(f"[bench] {group} failed (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
                for v in group:
                    results[v] = {
                        "error": tail.strip().splitlines()[-1] if tail.strip() else f"rc {proc.returncode}",
                        "log_tail": tail,
                    }
                continue
            for v, r in json.loads(res_path.read_text()).items():
                r["process_wall_s"] = time.time() - t0
                results[v] = r
            print(f"[bench] {group} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    ok = {k: v for k, v in results.items() if "error" not in v}
    ratios: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    if "ours" in ok:
        for other in ("trl", "trl_bf16", "ours_padded", "raw_ds"):
            if other in ok:
                ratios[f"ours_over_{other}_tokens_per_s"] = (
                    ok["ours"]["tokens_per_s"] / ok[other]["tokens_per_s"]
                )
                ratios[f"ours_over_{other}_median_step_time"] = (
                    ok["ours"]["median_step_s"] / ok[other]["median_step_s"]
                )
                if ok["ours"].get("peak_mem_gib") and ok[other].get("peak_mem_gib"):
                    ratios[f"ours_over_{other}_peak_mem"] = (
                        ok["ours"]["peak_mem_gib"] / ok[other]["peak_mem_gib"]
                    )
        if "trl" in ok and cuda:
            r = ratios["ours_over_trl_tokens_per_s"]
            goals["ours >= 1.3x trl tokens/s"] = f"{'MET' if r >= 1.3 else 'NOT MET'} ({r:.3f}x)"
        if ok["ours"].get("mfu") is not None:
            m = ok["ours"]["mfu"]
            goals["ours MFU >= 45%"] = f"{'MET' if m >= 0.45 else 'NOT MET'} ({100 * m:.1f}%)"
        if "raw_ds" in ok:
            r = ok["ours"]["mean_step_s"] / ok["raw_ds"]["mean_step_s"]
            goals["ours step time <= 1.05x raw DeepSpeed loop"] = (
                f"{'MET' if r <= 1.05 else 'NOT MET'} ({r:.3f}x)"
            )
    report = {
        "benchmark": "train_step",
        "device": device_info(),
        "versions": versions(),
        "config": {
            "model_size": args.model_size,
            "model_init": plan["init"],
            "vocab_size": plan["vocab_size"],
            "max_length": args.max_length,
            "rows_per_step": args.rows_per_step,
            "micro_batch_rows": args.micro,
            "padded_micro_batch_rows": args.padded_micro,
            "steps": args.steps,
            "warmup": args.warmup,
            "lr": args.lr,
            "gradient_checkpointing": True,
            "optimizer": "AdamW (torch, fused on CUDA)",
            "deepspeed": "ZeRO-3, world size 1",
            "data": plan["data"],
        },
        "variants": results,
        "ratios": ratios,
        "goals": goals,
        "wall_s": time.time() - t_start,
    }
    text = json.dumps(report, indent=2, default=str)
    print(text)
    print()
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
