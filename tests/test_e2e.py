"""End to end on 2 CPU ranks: `sft launch` trains a 2-layer model under ZeRO-3, checkpoints, exports, logs."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tests.helpers import sft_launch

OVERRIDES = [
    "model.init.num_hidden_layers=2",
    "model.init.hidden_size=64",
    "model.init.intermediate_size=128",
    "data.max_length=256",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.log_every=1",
    "train.save_every=6",
    "train.eval_every=6",
    "train.keep_last=1",
    "train.exact_match_eval=false",
    "logging.wandb_mode=offline",
    "logging.progress=false",
]


def read_wandb_history(run_file) -> list[dict]:
    """History rows from a .wandb transaction log, decoded with wandb's own protobuf schema.

    The file is a LevelDB-style log (7-byte header ":W&B" + magic + version, 32 KiB blocks, records framed by
    crc32/length/type); each payload is a `wandb_internal_pb2.Record`.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, block, rows, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                )
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    return run_dir, sft_launch(OVERRIDES, run_dir, run_dir.parent / "cache")


@pytest.mark.slow
def test_run_dir_layout_and_loss_falls(run):
    run_dir, stdout = run
    assert stdout.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    for name in ("metrics.jsonl", "config.yaml", "data_report.json", "results.json", "export", "wandb"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    losses = [r["loss"] for r in train_rows]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    for key in ("lr", "grad_norm", "tokens_per_s", "trained_tokens", "tokens_seen", "peak_mem_gb"):
        assert key in train_rows[0], key
    assert 0.05 < train_rows[-1]["peak_mem_gb"] < 24, "CPU runs report the peak RSS"
    # Eval before training (step 0), mid-run on the console too, and at the end.
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [0, 6, 12] and evals[12] < evals[0], evals
    assert f"step 0: eval_loss {evals[0]:.4f}" in stdout and f"step 6: eval_loss {evals[6]:.4f}" in stdout
    assert f"eval_loss {evals[0]:.4f} -> {evals[12]:.4f}" in stdout
    # What the run chose is said on the console.
    assert "fp32, attention=sdpa (auto: no CUDA)" in stdout and "export check:" in stdout


@pytest.mark.slow
def test_checkpoints_are_sharded_per_rank_with_a_manifest_and_rotated(run):
    run_dir, stdout = run
    files = sorted(p.name for p in (run_dir / "checkpoints" / "step12").iterdir())
    assert sum("model_states" in f for f in files) == 2, files  # one shard per rank
    assert sum("optim_states" in f for f in files) == 2, files
    assert sum(f.startswith("rng_rank") for f in files) == 2, files
    manifest = json.loads((run_dir / "checkpoints" / "step12" / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["world_size"] == 2
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert manifest["tokens_seen"] == [r for r in rows if "loss" in r][-1]["tokens_seen"]
    assert manifest["first_loss"] == [r for r in rows if "loss" in r][0]["loss"]
    # train.keep_last=1: step6 was removed once step12 was complete.
    assert not (run_dir / "checkpoints" / "step6").exists() and "removed old checkpoint step6" in stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step12"


@pytest.mark.slow
def test_export_reloads_and_matches_the_engines_gathered_weights(run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "export")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # The engine's own weights, gathered from the rank shards of the final checkpoint.
    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step12")
    reference = AutoModelForCausalLM.from_config(exported.config).eval()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    reference.tie_weights()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Convert 3 km to m."}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, AutoModelForCausalLM.from_config(exported.config)(input_ids=ids).logits)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(run):
    run_dir, _ = run
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history = read_wandb_history(files[0])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses == pytest.approx([r["loss"] for r in logged if "loss" in r])
    assert any("eval_loss" in h for h in history)
