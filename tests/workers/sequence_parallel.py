"""torchrun worker for test_long_context_dist: Ulysses sequence parallelism (S = world) on a real ZeRO-3 engine.

`logits`: for each architecture and backend, the logits of a micro-batch of two packed rows under SP, gathered
over the group, against each document run alone through a plain copy of the model (no packing, no SP, no
DeepSpeed: sdpa with the model's own causal and sliding-window masks). torch_varlen runs through
tests/reference_kernels.py's kernel (PyTorch's is CUDA-only), and flash_attention_2 through transformers' own
flash integration with a reference in place of flash-attn's varlen kernel: what is tested is our side, the whole
flattened batch's boundaries handed to the kernel. `stock`: one row, with DeepSpeed's own UlyssesSPAttentionHF, which
attends causally over the gathered row. Rank 0 writes the max abs differences per (arch, backend, document).

`gpu` (tests/test_gpu.py, 2 GPUs over NCCL): the varlen kernel `auto` picks (flash-attn, else PyTorch's
torch_varlen) in bf16 under S=2 on longer documents, against each document alone through plain sdpa in bf16; rank
0 writes the relative error (norm of the difference over the reference's norm) per (arch, document). A leaking
document is off by ~1e-1 there, while the loss of a leaking run moves by less than 2.4e-3: logits, not losses.
On CPU (a smoke test of this code) it runs fp32 through tests/reference_kernels.py's varlen kernel."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from launcher import engine as ds_engine
from launcher.data import collate, pack_examples
from launcher.data.packing import doc_lengths
from launcher.long_context.sequence_parallel import SequenceParallel
from launcher.loss import model_inputs
from launcher.model.load import _prepare
from tests import helpers

ARCHS = {name: helpers.ARCHS[name] for name in ("llama", "qwen2_sliding", "mistral_sliding")}
# 39 tokens: one row for `stock`, two for `logits` (varlen: 39, padded to 40 for S=2)
LENGTHS = helpers.LENGTHS


def documents() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(3, 97, (n,), generator=g).tolist(), "labels": [1] * n} for n in LENGTHS
    ]


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def stock_wrapper(sp: SequenceParallel, cfg) -> None:
    """DeepSpeed's UlyssesSPAttentionHF as its register_with_transformers wires it: 4D masks discarded."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    uattn = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS["sdpa"],
        batch_size=1,
        attn_head_count=cfg.num_attention_heads,
        attn_head_size=cfg.hidden_size // cfg.num_attention_heads,
        kv_head_count=cfg.num_key_value_heads,
        num_hidden_layers=cfg.num_hidden_layers,
        process_group=sp.group,
        seq_length_is_variable=True,
    )
    uattn.core_attn_implementation = "sdpa"

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        return uattn(module, query, key, value, None, *args, **kwargs)

    AttentionInterface.register("ds_stock", wrapper)


def gpu_main(out: str) -> None:
    import importlib.util

    info = ds_engine.init_distributed(timeout_minutes=5)
    world, cuda = info.world_size, info.device.type == "cuda"
    sp = SequenceParallel(world, info.rank, world)
    if cuda:
        from launcher.model.attention import varlen_available

        backend = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "torch_varlen"
        assert backend == "flash_attention_2" or varlen_available(), "no varlen kernel on this GPU"
    else:  # the CPU smoke test of this code: the reference varlen kernel, fp32
        import torch.nn.attention.varlen as varlen

        from tests.reference_kernels import reference_varlen_attn

        varlen.varlen_attn, backend = reference_varlen_attn, "torch_varlen"
    if backend == "torch_varlen":
        from launcher.model.attention import register_varlen

        register_varlen()
    dtype = torch.bfloat16 if cuda else torch.float32
    ds_config = helpers.ds_config(1, 1, world, grad_clip=0.0, sp=world)
    ds_config["bf16"] = {"enabled": cuda}
    g = torch.Generator().manual_seed(1)
    docs = [
        {"input_ids": torch.randint(3, 512, (n,), generator=g).tolist(), "labels": [1] * n}
        for n in helpers.GPU_LENGTHS
    ]
    rows = pack_examples(docs, max_length=1024)
    results = {}
    for name, extra in helpers.GPU_ARCHS.items():
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        cfg = helpers.tiny_config(name, **helpers.GPU_SMALL, **extra)
        unset_hf_deepspeed_config()
        torch.manual_seed(0)
        ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa", dtype=dtype)
        ref.to(info.device).eval()
        ds_engine.zero_init_context(ds_config)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        _prepare(model, "sdpa")
        eng = ds_engine.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ds_config)
        eng.eval()
        with ds_engine.gathered_params(list(eng.module.parameters())), torch.no_grad():
            for mine, full in zip(ref.parameters(), eng.module.parameters(), strict=True):
                mine.copy_(full)
        sp.install(eng.module, backend)
        with torch.no_grad(), sp.shard(collate(rows, backend, 0, device=info.device)) as local:
            logits = gather_seq(eng(**model_inputs(local)).logits, sp.group)[0]  # one flattened row
        flat, i = 0, 0
        for row in rows:
            start = 0
            for n in doc_lengths(row["position_ids"]):
                ids = torch.tensor([row["input_ids"][start : start + n]], device=info.device)
                with torch.no_grad():
                    alone = ref(input_ids=ids, use_cache=False).logits[0].float()
                got = logits[flat + start : flat + start + n].float()
                results[(name, i)] = ((got - alone).norm() / alone.norm()).item()
                start, i = start + n, i + 1
            flat += len(row["input_ids"])
    if info.rank == 0:
        torch.save({"backend": backend, "errors": results}, out)
    dist.barrier()
    ds_engine.exit_now(0)


def main(mode: str, out: str) -> None:
    if mode == "gpu":
        return gpu_main(out)
    info = ds_engine.init_distributed(timeout_minutes=5)
    world = info.world_size
    sp = SequenceParallel(world, info.rank, world)
    ds_config = helpers.ds_config(1, 1, world, grad_clip=0.0, sp=world)
    docs = documents()
    # `logits`: a micro-batch of two rows (the varlen batch lays them end to end); `stock`: one row, so every
    # document after the first has others before it.
    rows = pack_examples(docs, max_length=64 if mode == "stock" else 24)
    assert len(rows) == (1 if mode == "stock" else 2)
    archs = {"llama": ARCHS["llama"]} if mode == "stock" else ARCHS
    backends = (
        ["sdpa"]
        if mode == "stock"
        else ["sdpa", "eager", "flex_attention", "torch_varlen", "flash_attention_2"]
    )
    if mode != "stock":
        import torch.nn.attention.varlen as varlen

        from launcher.model.attention import register_varlen
        from tests.reference_kernels import reference_varlen_attn, use_reference_flash

        varlen.varlen_attn = reference_varlen_attn
        register_varlen()
        use_reference_flash()
    results = {}
    for name in archs:
        cfg = helpers.tiny_config(name)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        torch.manual_seed(0)
        # Its own config: installing SP on the engine's model must not touch the reference.
        ref = AutoModelForCausalLM.from_config(
            copy.deepcopy(cfg), attn_implementation="sdpa", dtype=torch.float32
        )
        ref.eval()
        ds_engine.zero_init_context(ds_config)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
        _prepare(model, "sdpa")
        eng = ds_engine.initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ds_config)
        eng.eval()
        with ds_engine.gathered_params(list(eng.module.parameters())), torch.no_grad():
            for mine, full in zip(ref.parameters(), eng.module.parameters(), strict=True):
                mine.copy_(full)
        for backend in backends:
            if mode == "stock":
                stock_wrapper(sp, cfg)
                eng.module.config._attn_implementation = "ds_stock"
            else:
                sp.install(eng.module, backend)
            batch = collate(rows, backend, 0)
            with torch.no_grad(), sp.shard(batch) as local:
                inputs = model_inputs(local)
                if mode == "stock":
                    inputs.pop("attention_mask", None)
                logits = gather_seq(eng(**inputs).logits, sp.group)
            i, flat = 0, 0  # document number, and offset in a varlen batch's one flattened row
            for r, row in enumerate(rows):
                start = 0
                for n in doc_lengths(row["position_ids"]):  # the packer orders documents its way
                    with torch.no_grad():
                        alone = ref(input_ids=torch.tensor([row["input_ids"][start : start + n]])).logits[0]
                    b, at = (0, flat + start) if logits.shape[0] == 1 else (r, start)
                    results[(name, backend, i)] = (logits[b, at : at + n] - alone).abs().max().item()
                    start, i = start + n, i + 1
                flat += len(row["input_ids"])
    if info.rank == 0:
        torch.save(results, out)
    dist.barrier()
    ds_engine.exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
