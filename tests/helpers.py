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


# ---- tiny configs per family, built from transformers' own config classes ----

# Small enough for a CPU forward in milliseconds; each family keeps what makes it hard to pack (sliding/full and
# chunked layer types, linear-attention and convolution layers, dense and MoE layers, sinks, soft-caps, MLA
# ranks, per-layer head dims). Windows and chunks are shorter than the test documents so a missing one shows.
BASE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=0,
)
SLIDE = ["sliding_attention", "full_attention"]
MOE4 = dict(num_local_experts=4, num_experts_per_tok=2)
LINEAR = dict(
    num_hidden_layers=4,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama3": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "llama4_text": dict(
        model_type="llama4_text",
        num_hidden_layers=4,
        layer_types=["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"],
        attention_chunk_size=4,
        no_rope_layers=[1, 1, 1, 0],
        intermediate_size_mlp=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # dense and MoE layers
        floor_scale=512,  # above the rows of the tests: temperature tuning (row positions >= 511) stays off
    ),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(model_type="qwen3"),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "qwen3_5": dict(model_type="qwen3_5_text", **LINEAR),
    "qwen3_5_moe": dict(
        model_type="qwen3_5_moe_text",
        **LINEAR,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "qwen3_next": dict(
        model_type="qwen3_next",
        **LINEAR,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "mistral": dict(model_type="mistral", sliding_window=5),
    "mixtral": dict(model_type="mixtral", sliding_window=5, **MOE4),
    # Soft-caps small enough to bind on a tiny model's scores and logits, so a kernel that drops one shows.
    "gemma2": dict(
        model_type="gemma2",
        sliding_window=4,
        layer_types=SLIDE,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=0.5,
    ),
    "gemma3": dict(model_type="gemma3_text", sliding_window=4, layer_types=SLIDE),
    "gemma4": dict(
        model_type="gemma4_text",
        num_hidden_layers=4,
        sliding_window=4,
        layer_types=SLIDE * 2,
        global_head_dim=16,  # full-attention layers have a head_dim of their own
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=2,  # the last layers reuse earlier layers' keys and values
    ),
    "gpt_oss": dict(
        model_type="gpt_oss",
        sliding_window=4,
        layer_types=SLIDE,
        **MOE4,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=32.0,
            beta_slow=1.0,
        ),
    ),  # attention sinks
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        num_key_value_heads=4,
        head_dim=4,  # = qk_rope_head_dim, as in DeepSeek-V3's own config
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,  # a dense layer, then MoE
    ),
    "glm4": dict(model_type="glm4"),
    "glm4_moe": dict(
        model_type="glm4_moe",
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        use_qk_norm=True,
    ),
    "phi3": dict(model_type="phi3", sliding_window=5, partial_rotary_factor=0.5),
    # Released Phi-MoE's window is its context (131072): it never binds. (transformers applies it on mask backends
    # only, so a window that binds would make flash/varlen and sdpa disagree, packed or not.)
    "phimoe": dict(model_type="phimoe", **MOE4),
    "olmo2": dict(model_type="olmo2"),
    "olmo3": dict(model_type="olmo3", sliding_window=4, layer_types=SLIDE),
    "olmoe": dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=8.0),
    "granite": dict(
        model_type="granite",
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
    ),
    "smollm3": dict(model_type="smollm3", num_hidden_layers=4, no_rope_layer_interval=2),  # NoPE layers
    "lfm2": dict(model_type="lfm2", layer_types=["conv", "full_attention"], conv_L_cache=3),
    "minimax_m2": dict(model_type="minimax_m2", partial_rotary_factor=0.5, **MOE4),
    "ernie4_5_moe": dict(
        model_type="ernie4_5_moe",
        moe_num_experts=4,
        moe_k=2,
        moe_intermediate_size=16,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    ),
}


def family_config(family: str, vocab_size: int = 97, **overrides):
    """The family's tiny config, built by its transformers config class (`AutoConfig.for_model`)."""
    from transformers import AutoConfig

    kwargs = {**BASE, **FAMILY_CONFIGS[family], "vocab_size": vocab_size, **overrides}
    if kwargs["model_type"] == "gemma4_text":
        kwargs.setdefault("vocab_size_per_layer_input", vocab_size)
    return AutoConfig.for_model(**kwargs)
