"""A `trust_remote_code` MoE checkpoint's modeling file, as most remote-code MoE checkpoints (DeepSeek-V3's own
modeling_deepseek.py among them) and transformers 4.x write their blocks: experts are separate modules, each run
only for the tokens routed to it (transformers 4.57's Qwen3MoeSparseMoeBlock). tests/workers/moe.py copies this
file next to a tiny checkpoint whose config.json's auto_map points here."""

import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeMLP


class TinyMoeConfig(Qwen3MoeConfig):
    model_type = "tiny_moe_remote"  # not a transformers model type: no weight conversion applies


class ModuleListMoeBlock(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.gate = torch.nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = torch.nn.ModuleList(
            [
                Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size)
                for _ in range(config.num_experts)
            ]
        )

    def forward(self, hidden_states):
        b, t, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        weights, picked = torch.topk(F.softmax(self.gate(x), dim=1, dtype=torch.float), self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(picked, num_classes=self.num_experts).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():  # only the experts some token picked
            idx, top_x = torch.where(mask[e].squeeze(0))
            out.index_add_(0, top_x, self.experts[e](x[top_x]) * weights[top_x, idx, None])
        return out.reshape(b, t, h)


class TinyMoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = TinyMoeConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = ModuleListMoeBlock(config)
        self.post_init()
