"""torchrun worker for tests/test_families_e2e.py: every family of the table trains end to end, in one process pair.

    torchrun --nproc_per_node 2 tests/workers/families.py OUT_DIR TOKENIZER [family ...]

Per family (tests/helpers.py::FAMILY_CONFIGS, built at the tokenizer's vocabulary and saved with save_pretrained):
- `train`: `sft train`'s production path (preflight.check, then launcher.train.train) with `model=hf` on the saved
  checkpoint, ZeRO-3 over the 2 ranks, 4 steps, the start-up self-check, the export and its check. A config the
  preflight refuses (packing a family that cannot be packed) is recorded and run again as the line says.
- `tiled`: the same run's first step with `train.tiled_loss=true` (and the same start-up, so a router that draws
  noise while training, Phi-MoE's, draws the same): its loss must equal the untiled one, or the preflight refuses
  it with the row's reason.
- `sp`: sequence parallelism (S=2) on a plain copy of the model on each rank: whole-row final hidden states and
  the gradients of the summed loss against the same model without SP. Run whether the row allows it or not (refused rows must
  show why).
Rank 0 writes OUT_DIR/results.json: {family: {...}}.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from launcher import engine as ds_engine
from launcher.config_errors import compose_config
from launcher.data import collate, pack_examples
from launcher.launch import preflight
from launcher.launch.rankerrors import one_line
from launcher.long_context.sequence_parallel import PREFIX, SequenceParallel, _sp_attention
from launcher.loss import final_hidden_states, target_token_loss
from launcher.model import load_model
from launcher.model.families import family_of
from launcher.train import train
from tests.helpers import ASSETS, FAMILY_CONFIGS, family_config


def overrides(path: Path, tokenizer: str, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "model=hf",
        f"model.name_or_path={path}",
        f"model.tokenizer={tokenizer}",
        "model.attention=auto",
        "data.max_length=128",
        f"data.sources=[{{path: {ASSETS}/demo/train.jsonl, sample: 48}}]",
        "train.max_steps=4",
        "train.warmup_steps=0",
        "train.schedule=constant",
        "train.lr=1e-2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.save_final_checkpoint=false",
        "train.exact_match_eval=false",
        "train.tiled_loss=false",
        "logging.wandb_mode=disabled",
        "logging.progress=false",
        f"run_dir={run_dir}",
        f"cache_dir={cache}",
        *extra,
    ]


def sft_train(args: list[str]) -> dict:
    """What `sft train` does on each rank: compose, preflight (one line on a refusal), train."""
    try:
        cfg = compose_config(args)
        preflight.check(cfg, dist.get_world_size(), "cpu")
    except ValueError as e:
        return {"refused": one_line(e)}
    return train(cfg)


def sequence_parallel(path: Path, attention: str) -> dict:
    """S=2 against no SP on the same weights: max relative logit and gradient differences (or the error)."""
    rows = pack_examples(documents(), max_length=24)
    sp = SequenceParallel(2, dist.get_rank(), 2)
    with ds_engine.local_construction():  # plain models: no ZeRO-3 partitioning
        plain = load_model(str(path), attention=attention)
        wrapped = load_model(str(path), attention=attention)
    wrapped.load_state_dict(plain.state_dict())
    # Bypass check_sequence_parallel: a row that refuses SP must show here why.
    from transformers import AttentionInterface

    AttentionInterface.register(PREFIX + attention, _sp_attention)
    wrapped.config._attn_implementation = PREFIX + attention
    for m in (plain, wrapped):
        m.eval()  # no dropout or router jitter: the two runs must draw nothing random
    batch = collate(rows, attention)
    whole, n = target_token_loss(plain, batch)
    whole.backward()
    with torch.no_grad():  # the LM head's input: the same head then maps both (never [T, vocab] here)
        hidden = final_hidden_states(plain, collate(rows, attention))
    with sp.shard(collate(rows, attention)) as local:
        part, _ = target_token_loss(wrapped, local)
    part.backward()
    with torch.no_grad():
        sp_hidden = sp.hidden_states(wrapped, collate(rows, attention))
    grads = []
    for p, q in zip(plain.parameters(), wrapped.parameters(), strict=True):
        g = q.grad if q.grad is not None else torch.zeros_like(q)
        dist.all_reduce(g)  # the group's slices together make the rows' gradient
        grads.append(((p.grad if p.grad is not None else torch.zeros_like(p)) - g).abs().max().item())
    scale_g = max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)
    d_hidden = max(
        (hidden[i, : len(r["input_ids"])] - sp_hidden[i, : len(r["input_ids"])]).abs().max().item()
        for i, r in enumerate(rows)
    )
    return {
        "hidden_rel": d_hidden / hidden.abs().max().item(),
        "grad_rel": max(grads) / scale_g,
    }


def documents() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(3, 1000, (n,), generator=g).tolist(),
            "labels": torch.randint(3, 1000, (n,), generator=g).tolist(),
        }
        for n in (9, 13, 6, 11)
    ]


REMOTE_CODE = """from transformers import {Config}, {Model}


class RemoteConfig({Config}):
    model_type = "{kind}"


class RemoteForCausalLM({Model}):
    config_class = RemoteConfig
"""
# Remote code ships its own mixer classes: Qwen3-Next's Gated DeltaNet under a name no launcher code knows, so
# nothing makes it restart per document (the self-check must catch it).
REMOTE_MIXER = """from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet


class RemoteGatedDeltaNet(Qwen3NextGatedDeltaNet):
    pass


_init = RemoteForCausalLM.__init__


def __init__(self, config):
    _init(self, config)
    for layer in self.model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn.__class__ = RemoteGatedDeltaNet


RemoteForCausalLM.__init__ = __init__
"""


def save_checkpoint(family: str, path: Path, vocab: int) -> None:
    """The family's tiny model, saved; `remote-<family>`: the same layers as code shipped with the checkpoint
    (`trust_remote_code`, a model type no row knows)."""
    from transformers import AutoModelForCausalLM

    remote = family.startswith("remote-")
    config = family_config(family.removeprefix("remote-"), vocab_size=vocab)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    if remote:
        kind = f"sft_test_{config.model_type}"
        code = REMOTE_CODE.format(Config=type(config).__name__, Model=type(model).__name__, kind=kind)
        if config.model_type == "qwen3_next":
            code += "\n\n" + REMOTE_MIXER
        (path / "remote_model.py").write_text(code)
        meta = json.loads((path / "config.json").read_text())
        meta.update(
            model_type=kind,
            auto_map={
                "AutoConfig": "remote_model.RemoteConfig",
                "AutoModelForCausalLM": "remote_model.RemoteForCausalLM",
            },
        )
        (path / "config.json").write_text(json.dumps(meta, indent=1))


def main(out: Path, tokenizer: str, families: list[str]) -> None:
    info = ds_engine.init_distributed(timeout_minutes=10)

    from transformers import AutoTokenizer

    vocab = (
        -(-len(AutoTokenizer.from_pretrained(tokenizer)) // 64) * 64
    )  # padded, as released vocabularies are
    results: dict[str, dict] = {}
    for family in families:
        t0 = time.time()
        path = out / "models" / family
        if info.rank == 0:
            with ds_engine.local_construction():
                save_checkpoint(family, path, vocab)
        dist.barrier()
        r: dict = {}
        try:
            remote = ["model.trust_remote_code=true"] if family.startswith("remote-") else []
            row = family_of(family_config(family.removeprefix("remote-")))
            asks = (
                row.moe is not None and row.moe.aux_loss and not remote
            )  # (remote: no row knows its router)
            aux = ["train.router_aux_loss=true"] if asks else []
            args = overrides(path, tokenizer, out / "runs" / family, out / "cache", *remote, *aux)
            got = sft_train(args)
            if "refused" in got:
                r["train_refused"] = got["refused"]
                got = sft_train([*args, "data.pack=false"])  # what the line says to do
            r["train"] = {k: v for k, v in got.items() if isinstance(v, (int, float, str))}
            logged = [
                json.loads(x) for x in (out / "runs" / family / "metrics.jsonl").read_text().splitlines()
            ]
            r["train"]["aux_losses"] = [m["aux_loss"] for m in logged if "aux_loss" in m]
            if remote:  # what is asked of code no row vouches for: the self-check
                raise StopIteration
            tiled = sft_train(
                overrides(
                    path,
                    tokenizer,
                    out / "runs" / f"{family}-tiled",
                    out / "cache",
                    "train.tiled_loss=true",
                    "train.max_steps=1",
                    "train.export=false",
                    *(["data.pack=false"] if "train_refused" in r else []),
                )
            )
            r["tiled"] = {k: v for k, v in tiled.items() if isinstance(v, (int, float, str))}
        except StopIteration:
            pass
        except ValueError as e:  # a user's error, raised on every rank: `sft train` prints this one line
            r["error"] = one_line(e)
        except Exception:  # a bug: the ranks may no longer agree on the next collective, so stop here
            traceback.print_exc()
            raise
        try:
            from transformers import AutoConfig

            from launcher.model.attention import resolve_backend

            if not family.startswith("remote-"):
                attention = resolve_backend("auto", torch.device("cpu"), AutoConfig.from_pretrained(path))
                r["sp"] = sequence_parallel(path, attention)
        except Exception as e:
            r["sp"] = {"error": one_line(e)}
        r["seconds"] = time.time() - t0
        results[family] = r
        if info.rank == 0:
            print(family, json.dumps(r), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    ds_engine.exit_now(0)


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        sys.argv[2],
        sys.argv[3:] or [*FAMILY_CONFIGS, "remote-llama3", "remote-qwen3_next"],
    )
