"""torchrun worker for tests/test_moe.py: MoE models under real 2-rank ZeRO-3 (gloo), every weight partitioned.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/moe.py all OUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/workers/moe.py remote-no-leaf OUT_DIR

`all` runs, in one process: the router's auxiliary loss through `train_step` (2 micro-batches of 2 padded rows
per rank; data parallel, then sequence parallel) against a plain single-process reference built from
transformers' own `load_balancing_loss_func` over the documents run one by one; disjoint routing (rank 0's
tokens all go to expert 0, rank 1's to experts 1-3) with transformers 5's fused experts and no leaf modules, and
with a `trust_remote_code` checkpoint whose experts are an `nn.ModuleList`, built as a run builds it (its blocks
found and gathered whole); the export of each MoE family reloaded by `from_pretrained`; `train(cfg)` end to end.
Rank 0 writes `OUT_DIR/results.pt`. `remote-no-leaf` is the remote-code checkpoint without leaf modules:
expected to stop in a collective. Set HF_MODULES_CACHE: the remote code is imported from there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from launcher import engine as ds_engine
from launcher.data import pack_examples
from launcher.export import export_hf, verify_export
from launcher.long_context.sequence_parallel import SequenceParallel
from launcher.loss import target_token_loss
from launcher.model import load_model
from launcher.model.moe import MOE_FAMILIES, router_aux
from launcher.train import train_step
from tests.helpers import MOE_VOCAB, TINY_MOE, ds_config, tiny_moe_config, tiny_moe_kwargs

CPU = torch.device("cpu")
REMOTE_CODE = Path(__file__).resolve().parent / "remote_moe" / "modeling_tiny_moe.py"


class _Tok:
    """What export_hf asks of a tokenizer (the export check compares logits, not text)."""

    def save_pretrained(self, out_dir):
        return None


def zero3(world: int, global_batch: int, micro: int, sp: int = 1, leaf: bool = True) -> dict:
    """ZeRO-3 as the engine builds it (no clipping), every parameter partitioned however small (DeepSpeed keeps
    small ones whole on every rank by default)."""
    config = ds_config(global_batch, micro, world, grad_clip=1e6, sp=sp)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if not leaf:  # DeepSpeed's own default marks Mixtral / Qwen2-MoE / Qwen3-MoE blocks as leaves
        config["zero_optimization"]["leaf_module"] = {"classes": []}
    return config


def documents(seed: int, lengths: tuple[int, ...]) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return docs


def rank_rows(rank: int) -> list[dict]:
    """4 packed rows, documents of 3 to 11 tokens: the second micro-batch of 2 rows is padded (17 and 15 tokens),
    and under sequence parallelism of 2 its 17 positions get one more of padding."""
    lengths = [(3 + (5 * i + 3 * rank) % 9) for i in range(10)]
    rows = pack_examples(documents(10 + rank, tuple(lengths)), max_length=17)
    assert [len(r["input_ids"]) for r in rows[:4]] == [17, 17, 17, 15], rows
    return rows[:4]


def saved_model(model_type: str, root: Path, name: str = "", **overrides) -> str:
    """A tiny random checkpoint (rank 0 writes, every rank reads)."""
    path = root / "models" / (name or model_type)
    if dist.get_rank() == 0 and not path.exists():
        torch.manual_seed(0)
        config = tiny_moe_config(model_type, **overrides)
        with ds_engine.local_construction():  # whole, on rank 0 alone (not under ZeRO-3's zero.Init)
            AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(path)
    dist.barrier()
    return str(path)


# ---- the router's auxiliary loss under ZeRO-3 ----


def reference(path: str, rows_by_rank: list[list[dict]], micro: int) -> dict[str, float]:
    """The step's objective on one process, from transformers' own pieces: sum of token losses / targets, plus
    coef x (sum over micro-batches of real tokens x load_balancing_loss_func over the micro-batch's documents run
    one by one) / real tokens. Returns its aux part, the gradient norm of the whole and the routers' gradients."""
    with ds_engine.local_construction():
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model.config.use_cache = False
    model.train()  # as the engine runs (no dropout in these configs either way)
    lb = sys.modules[type(model).__module__].load_balancing_loss_func
    coef, experts, top_k = model.config.router_aux_loss_coef, model.num_experts, model.num_experts_per_tok
    batches = [rows[i : i + micro] for rows in rows_by_rank for i in range(0, len(rows), micro)]
    n_targets = sum(sum(t != -100 for t in r["labels"][1:]) for b in batches for r in b)
    n_tokens = sum(len(r["input_ids"]) for b in batches for r in b)
    loss, aux_weighted = 0.0, 0.0
    for rows in batches:
        per_layer, tokens = None, 0
        for row in rows:
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                ids = torch.tensor([row["input_ids"][a:b]])
                labels = torch.tensor([row["labels"][a:b]])
                out = model(input_ids=ids, output_router_logits=True)
                targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
                loss = loss + F.cross_entropy(
                    out.logits[0].float(), targets[0], ignore_index=-100, reduction="sum"
                )
                logits = [x.reshape(-1, x.shape[-1]) for x in out.router_logits]
                per_layer = logits if per_layer is None else [torch.cat(p) for p in zip(per_layer, logits)]
                tokens += b - a
        aux_weighted = aux_weighted + tokens * lb(tuple(per_layer), experts, top_k)
    objective = loss / n_targets + coef * aux_weighted / n_tokens
    objective.backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
    routers = [m.weight.grad.clone() for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    return {
        "aux_loss": float(aux_weighted / n_tokens),
        "grad_norm": norm,
        "loss": float(loss / n_targets),
        "router_grads": routers,
    }


def aux_case(model_type: str, root: Path, world: int, sp_size: int) -> dict:
    """One step of `train_step` with the auxiliary loss on (the model's config asks for it, with a coefficient of
    0.1 so that its share of the routers' gradients is far above rounding), on 2 ranks. Plain SGD with lr 1 and no
    clipping: each router's update is its gradient."""
    path = saved_model(
        model_type, root, f"{model_type}_aux", output_router_logits=True, router_aux_loss_coef=0.1
    )
    micro, sp = 2, SequenceParallel(sp_size, dist.get_rank(), world)
    config = zero3(world, 2 * micro * sp.dp_world, micro, sp_size)
    model = load_model(path, "sdpa", torch.float32, init_context=ds_engine.zero_init_context(config))
    sp.install(model, "sdpa")
    aux = router_aux(model, "auto", sp.group)
    assert aux is not None and aux.coef == model.config.router_aux_loss_coef == 0.1
    routers = [m.weight for m in model.modules() if isinstance(m, aux.router_cls)]
    eng = ds_engine.initialize(model, torch.optim.SGD(model.parameters(), lr=1.0), None, config)
    assert eng.zero_optimization_partition_weights()
    with ds_engine.gathered_params(routers):
        before = [w.detach().clone() for w in routers]
    got = train_step(
        eng, rank_rows(sp.dp_rank), micro, "sdpa", CPU, 0, world, aux.wrap(target_token_loss), sp
    )
    got["grad_norm"] = float(eng.get_global_grad_norm())
    with ds_engine.gathered_params(routers):
        got["router_grads"] = [b - w.detach() for b, w in zip(before, routers, strict=True)]
    ref = reference(path, [rank_rows(r) for r in range(sp.dp_world)], micro) if dist.get_rank() == 0 else {}
    leaves = sum(getattr(m, "_z3_leaf", False) for m in eng.module.modules())
    return {
        **{f"got_{k}": v for k, v in got.items()},
        **{f"ref_{k}": v for k, v in ref.items()},
        "leaves": leaves,
    }


# ---- disjoint routing ----

ROUTE = 10.0  # embedding feature size that decides each token's expert


def expert_of(token: int) -> int:
    """Rank 0's tokens (ids < 64) go to expert 0; rank 1's to experts 1, 2, 3."""
    return 0 if token < 64 else 1 + token % 3


def force_routing(model: torch.nn.Module, gates: list[torch.nn.Module]) -> None:
    """Token t's embedding carries a large feature in dimension expert_of(t); each router reads those 4 dims, so
    every layer sends t to expert_of(t) alone (top-1) whatever attention adds."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, :4] = 0
        for t in range(emb.shape[0]):
            emb[t, expert_of(t)] = ROUTE
        for gate in gates:
            gate.weight.zero_()
            gate.weight[:, :4] = torch.eye(4) * ROUTE


def remote_code_checkpoint(root: Path) -> str:
    """A `trust_remote_code` checkpoint whose MoE blocks keep their experts in an `nn.ModuleList`
    (tests/workers/remote_moe/modeling_tiny_moe.py), top-1 of 4 experts, routing forced (rank 0 writes it)."""
    import importlib.util

    path = root / "models" / "remote_moe"
    if dist.get_rank() == 0:
        spec = importlib.util.spec_from_file_location("modeling_tiny_moe", REMOTE_CODE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["modeling_tiny_moe"] = module
        spec.loader.exec_module(module)
        module.TinyMoeConfig.register_for_auto_class()  # auto_map in config.json, the file copied beside it
        module.TinyMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        torch.manual_seed(0)
        config = module.TinyMoeConfig(
            **{
                k: v
                for k, v in tiny_moe_kwargs("qwen3_moe", num_experts_per_tok=1).items()
                if k != "model_type"
            }
        )
        with ds_engine.local_construction():
            model = module.TinyMoeForCausalLM(config)
        force_routing(model, [layer.mlp.gate for layer in model.model.layers])
        model.save_pretrained(path)
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path, trust_remote_code=True)  # the module cache, written once
    dist.barrier()
    return str(path)


def record_routing(model: torch.nn.Module) -> list[list[int]]:
    """The experts each router's top-1 picks, per forward (fused routers return (logits, ...); Linear ones logits)."""
    seen: list[list[int]] = []

    def record(_m, _i, out):
        logits = out[0] if isinstance(out, tuple) else out
        seen.append(sorted(set(logits.argmax(-1).flatten().tolist())))

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(record)
    return seen


def fused_model() -> torch.nn.Module:
    """transformers 5's Qwen3-MoE (experts fused into 3D tensors), top-1 of 4, routing forced."""
    torch.manual_seed(0)
    config = tiny_moe_config("qwen3_moe", num_experts_per_tok=1)
    with ds_engine.local_construction():  # every rank builds it whole; initialize partitions it
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    force_routing(model, [layer.mlp.gate for layer in model.model.layers])
    return model


def remote_model(path: str, config: dict, through_run: bool) -> torch.nn.Module:
    """The remote-code checkpoint loaded under ZeRO-3: as a run builds it (`build_training_model`, which marks
    the blocks found as leaves), or plainly (`load_model`, no leaves)."""
    init = ds_engine.zero_init_context(config)
    if not through_run:
        return load_model(path, "sdpa", torch.float32, trust_remote_code=True, init_context=init)
    from launcher.config import compose
    from launcher.model import model_config
    from launcher.run import build_training_model, decide

    tokenizer = Path(__file__).resolve().parents[2] / "launcher" / "assets" / "tokenizer"
    cfg = compose(
        [
            "model=hf",
            f"model.name_or_path={path}",
            "model.trust_remote_code=true",
            f"model.tokenizer={tokenizer}",
        ]
    )
    choice = decide(cfg, CPU, model_config(cfg.model))
    sp = SequenceParallel(1, dist.get_rank(), dist.get_world_size())
    model, _ = build_training_model(cfg, choice, MOE_VOCAB, sp, CPU, init, say=lambda _m: None)
    return model


def routing_rows(rank: int) -> list[dict]:
    lo = 1 if rank == 0 else 64
    ids = list(range(lo, lo + 30))
    return pack_examples([{"input_ids": ids, "labels": ids}], max_length=32)


def routing_case(layout: str, root: Path, world: int, steps: int = 2) -> dict:
    """Two steps with rank 0's tokens on expert 0 and rank 1's on experts 1-3: `fused` (transformers 5, no leaf
    modules at all), `remote` (ModuleList experts built as a run builds them), `remote-no-leaf`."""
    leaf = layout == "remote"
    config = zero3(world, world, 1, leaf=leaf)
    model = fused_model() if layout == "fused" else remote_model(remote_code_checkpoint(root), config, leaf)
    seen = record_routing(model)
    eng = ds_engine.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, config)
    losses = []
    for step in range(steps):
        print(f"rank {dist.get_rank()} {layout} step {step} starts", flush=True)
        losses.append(train_step(eng, routing_rows(dist.get_rank()), 1, "sdpa", CPU, 0, world)["loss"])
    experts = sorted({e for s in seen for e in s})
    everyone = [None] * world
    dist.all_gather_object(everyone, experts)
    leaves = sorted({type(m).__name__ for m in eng.module.modules() if getattr(m, "_z3_leaf", False)})
    return {"losses": losses, "experts_by_rank": everyone, "leaf_classes": leaves}


# ---- export ----


def export_case(model_type: str, root: Path, world: int) -> dict:
    """One step, then export_hf + verify_export (reload with from_pretrained in transformers' layout)."""
    asks = MOE_FAMILIES[model_type].aux_loss is not None
    path = saved_model(model_type, root, output_router_logits=asks)
    config = zero3(world, world, 1)
    model = load_model(path, "eager", torch.float32, init_context=ds_engine.zero_init_context(config))
    aux = router_aux(model, "auto")
    loss_fn = aux.wrap(target_token_loss) if aux else target_token_loss
    eng = ds_engine.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-2), None, config)
    rows = rank_rows(dist.get_rank())[:1]
    got = train_step(eng, rows, 1, "eager", CPU, 0, world, loss_fn)
    out_dir = root / "export" / model_type
    export_hf(eng, _Tok(), out_dir)
    check = verify_export(eng, out_dir, rank_rows(0)[0], "eager", 1e-4)
    saved = {}
    if dist.get_rank() == 0:
        import json

        saved = json.loads((out_dir / "config.json").read_text())
    return {
        **check,
        "aux_loss": got.get("aux_loss"),
        "output_router_logits": saved.get("output_router_logits"),
    }


# ---- end to end ----


def e2e_case(root: Path) -> dict:
    """`train(cfg)` as `sft launch` runs it: a tiny random Qwen3-MoE whose config asks for router logits, the demo
    data, 2 steps, the packing self-check, export and its check; what metrics.jsonl logged."""
    import json

    from omegaconf import open_dict

    from launcher.config import compose
    from launcher.train import train

    run_dir = root / "e2e"
    cfg = compose(
        [
            f"run_dir={run_dir}",
            f"cache_dir={root / 'cache'}",
            "data.max_length=128",
            "train.max_steps=2",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.log_every=1",
            "train.eval_every=0",
            "train.exact_match_eval=false",
            "logging.wandb_mode=disabled",
            "logging.progress=false",
        ]
    )
    with open_dict(cfg):
        cfg.model.init = {  # the vocabulary is the tokenizer's
            **{k: v for k, v in tiny_moe_kwargs("qwen3_moe").items() if k != "vocab_size"},
            "model_type": "qwen3_moe",
            "output_router_logits": True,
        }
    results = train(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "results": {k: v for k, v in results.items() if isinstance(v, (int, float))},
        "logged": [x for x in lines if "loss" in x],
    }


def main(mode: str, out: str) -> None:
    root = Path(out)
    info = ds_engine.init_distributed(timeout_minutes=0.5 if mode == "remote-no-leaf" else 2)
    world = info.world_size
    if mode == "remote-no-leaf":
        routing_case("remote-no-leaf", root, world)
        print("remote-no-leaf finished", flush=True)
        ds_engine.exit_now(0)
    results: dict = {"aux": {}, "routing": {}, "export": {}, "seconds": {}}
    for model_type, sp in (("qwen3_moe", 1), ("olmoe", 1), ("qwen3_moe", 2)):
        t0 = time.time()
        results["aux"][f"{model_type}_sp{sp}"] = aux_case(model_type, root, world, sp)
        results["seconds"][f"aux_{model_type}_sp{sp}"] = time.time() - t0
    for layout in ("fused", "remote"):
        t0 = time.time()
        results["routing"][layout] = routing_case(layout, root, world)
        results["seconds"][f"routing_{layout}"] = time.time() - t0
    for model_type in TINY_MOE:
        t0 = time.time()
        results["export"][model_type] = export_case(model_type, root, world)
        results["seconds"][f"export_{model_type}"] = time.time() - t0
    t0 = time.time()
    results["e2e"] = e2e_case(root)
    results["seconds"]["e2e"] = time.time() - t0
    if info.rank == 0:
        torch.save(results, root / "results.pt")
    dist.barrier()
    ds_engine.exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
