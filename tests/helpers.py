"""Shared test helpers: reference computations, tiny model configs per family, the ZeRO-3 dict, `run_cli`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from launcher.data.template import IGNORE_INDEX


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss from whole [B, T, V] logits: (sum of next-token cross-entropies, target count); labels are
    unshifted (HF style). The production loss (`launcher.loss.target_token_loss`) must equal it."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


# ---- tiny MoE configs (launcher/model/moe.py's families), built from transformers' own config classes ----

MOE_BASE = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
}
# 4 experts, 2 per token (Llama 4: 1); what makes each family's MoE itself kept: shared experts, dense first
# layers, biased routers, grouped routing. Qwen3.5 / Qwen3-Next keep full attention only here: their linear
# attention leaks across packed documents until #17 item 3 lands, and routing follows the hidden states.
TINY_MOE: dict[str, dict] = {
    "qwen2_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen3_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen3_5_moe_text": {
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "layer_types": ["full_attention", "full_attention"],
    },
    "qwen3_next": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "layer_types": ["full_attention", "full_attention"],
    },
    "mixtral": {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {
        "intermediate_size": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 4,
    },
    "deepseek_v3": {
        "head_dim": None,  # MLA: the rotary part of each head (qk_rope_head_dim)
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
    },
    "glm4_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    "phimoe": {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2},
    "llama4_text": {
        "intermediate_size": 16,
        "intermediate_size_mlp": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "moe_layers": [0, 1],
    },
    "minimax_m2": {"intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "ernie4_5_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 0,
    },
}


def tiny_moe_config(model_type: str, **overrides):
    """A tiny random-init config of an MoE family (`TINY_MOE`), from transformers' own config class."""
    from transformers import AutoConfig

    kwargs = {**MOE_BASE, **TINY_MOE[model_type], **overrides}
    return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v is not None})
