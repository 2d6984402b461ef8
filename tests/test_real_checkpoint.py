"""A user's own saved Hugging Face checkpoint, trained with `model=hf` under ZeRO-3 on 2 ranks and exported.

Under ZeRO-3 every parameter is already partitioned when `from_pretrained` returns (local shape (0,)); code that
reads the local shape cuts the vocabulary down or skips weight decay. These runs catch both from the outside:
the export must keep the checkpoint's shapes, and embedding rows the data never touches must change by AdamW's
decoupled decay alone, exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from launcher.config import compose
from launcher.optim import lr_factor
from tests.helpers import ASSETS, fixture_path, sft_launch

# Embedding rows: more than the demo tokenizer's 881 entries (a padded vocabulary, like Qwen2.5's).
ROWS = 1024
COMMON = [
    "model=hf",
    "model.attention=auto",
    "data.max_length=256",
    f"data.sources=[{{path: {ASSETS}/demo/train.jsonl, sample: 600}}, "
    f"{{path: {ASSETS}/demo/eval.jsonl, sample: 20, eval: true}}]",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.weight_decay=0.1",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.exact_match_eval=false",
    "logging.wandb_mode=disabled",
    "logging.progress=false",
]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A Llama saved with save_pretrained: 1024 embedding rows, an 881-entry tokenizer, an untied LM head."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("user_model") / "llama"
    config = LlamaConfig(
        vocab_size=ROWS,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(ASSETS / "tokenizer").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(saved_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hf_run") / "run"
    out = sft_launch([*COMMON, f"model.name_or_path={saved_checkpoint}"], run_dir, run_dir.parent / "cache")
    return run_dir, out


@pytest.mark.slow
def test_the_export_keeps_the_checkpoints_vocabulary_and_shapes(saved_checkpoint, trained):
    run_dir, out = trained
    before = load_file(saved_checkpoint / "model.safetensors")
    after = load_file(run_dir / "export" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in after.items()} == {k: tuple(v.shape) for k, v in before.items()}
    assert json.loads((run_dir / "export" / "config.json").read_text())["vocab_size"] == ROWS
    assert "lm_head.weight" in after and not torch.equal(
        after["lm_head.weight"], after["model.embed_tokens.weight"]
    )
    assert f"vocabulary {ROWS} rows (tokenizer 881)" in out and "resized" not in out
    # The export was reloaded and compared with the engine's logits at the end of the run.
    assert "export check:" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["export_check_rel"] < 1e-4


@pytest.mark.slow
def test_rows_the_data_never_touches_change_by_weight_decay_alone(saved_checkpoint, trained):
    """Rows 881..1023 have no token: no gradient ever reaches them, so AdamW's update there is its decoupled
    decay, p <- p * (1 - lr_t * weight_decay) at every step, and nothing else."""
    run_dir, _ = trained
    cfg = compose([*COMMON, f"model.name_or_path={saved_checkpoint}"])
    decay = math.prod(1 - cfg.train.lr * lr_factor(k, cfg.train) * cfg.train.weight_decay for k in range(6))
    before = load_file(saved_checkpoint / "model.safetensors")["model.embed_tokens.weight"]
    after = load_file(run_dir / "export" / "model.safetensors")["model.embed_tokens.weight"]
    untouched = slice(881, ROWS)
    torch.testing.assert_close(after[untouched], before[untouched] * decay, rtol=2e-6, atol=0)
    assert decay < 0.9999, "the test needs a decay large enough to see"
    # Rows the data uses moved by more than decay (they were trained).
    used = after[:881] - before[:881] * decay
    assert used.abs().max() > 1e-3


@pytest.mark.slow
def test_the_real_pretrained_fixture_trains_end_to_end(tmp_path):
    """stories260K (a real pretrained Llama: 512 rows, a tokenizer without a chat template): ChatML is added,
    the embeddings grow to 514 rows, and that is said; the export reloads with the engine's logits."""
    model_dir = fixture_path("models", "stories260K-hf")
    run_dir = tmp_path / "run"
    overrides = [*COMMON, f"model.name_or_path={model_dir}", "train.max_steps=8", "train.warmup_steps=1"]
    out = sft_launch(overrides, run_dir, tmp_path / "cache")
    assert "tokenizer: no chat template, using ChatML" in out
    assert "embeddings resized from 512 to 514 rows" in out
    exported = load_file(run_dir / "export" / "model.safetensors")
    assert exported["model.embed_tokens.weight"].shape[0] == 514
    assert exported["lm_head.weight"].shape[0] == 514
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_loss"] < results["first_loss"] and results["export_check_rel"] < 1e-4
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.model.name_or_path == str(model_dir)
