"""The model families this launcher trains, and what each supports: one table, proven by tests.

    family = family_of(model_config)            # the row of a transformers config (None: not in the table)
    why = family.refusal("sdpa", "cpu")         # None when the backend keeps packed documents exact here
    print(format_table())                       # `sft models`; the README's table is this text

Every decision about a family reads its row: the attention backend (`launcher.model.attention.choose_backend`),
the run's decisions (`launcher.run.decide`, which the preflight and `sft check` call too), the tiled loss, the tiled
MLP and sequence parallelism. A row's claims are checked by running them on the family's tiny config
(tests/helpers.py::FAMILY_CONFIGS): tests/test_families.py measures packed against per-document logits for
every backend, the tiled loss and the tiled MLP against their untiled forms, and fails when a row claims what the
measurement does not show (or refuses what it shows to be exact); tests/test_families_e2e.py trains every family
under ZeRO-3 and checks sequence parallelism. A model type not in the table trains packed only when the start-up
self-check proves packing exact on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# Backends by device: what runs on a CPU, and what a CUDA GPU adds (the varlen kernels, bf16/fp16 only).
CPU_BACKENDS = ("sdpa", "eager", "flex_attention")
GPU_BACKENDS = ("torch_varlen", "flash_attention_2", "flash_attention_3", *CPU_BACKENDS)
# `auto` takes the first of these that the device offers and the row does not refuse.
AUTO_ORDER = {
    "cuda": ("flash_attention_2", "torch_varlen", "sdpa", "flex_attention", "eager"),
    "cpu": ("sdpa", "eager"),  # flex attention has no backward on CPU (see `device_refusal`)
}
FLASH = ("flash_attention_2", "flash_attention_3")  # one integration in transformers; refused together


LOAD_BALANCING = "load_balancing"  # transformers' load_balancing_loss_func (the Switch Transformer loss)
SWITCH = "the Switch load-balancing loss over softmax router probabilities"


@dataclasses.dataclass(frozen=True)
class MoE:
    """A mixture-of-experts family's router, as transformers 5.23's modeling code has it (read by
    launcher/model/moe.py: the auxiliary loss, ZeRO-3 leaf blocks, `sft plan`'s active parameters)."""

    block: str
    """Class of the sparse MoE block (router + experts [+ shared experts]): the unit ZeRO-3 may gather whole."""
    aux_loss: str | None = LOAD_BALANCING
    """`load_balancing` when transformers adds the router's load-balancing loss; None when it adds none."""
    coef_key: str | None = "router_aux_loss_coef"
    """Config key of the auxiliary loss coefficient."""
    z_loss_coef_key: str | None = None
    """Config key of a router z-loss coefficient (no family here has one in transformers 5.23)."""
    bias_balanced: bool = False
    """Balanced without an auxiliary loss, by a per-expert bias on the top-k choice (DeepSeek-V3's scheme)."""
    note: str = ""
    """How its router balances (one line; the table shows it without the SWITCH prefix)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One row of the table: a family of architectures and what the launcher proves on it."""

    name: str
    """As users call it (`Qwen3-MoE`)."""
    model_types: tuple[str, ...]
    """transformers `model_type` values (the text model's, for composite checkpoints)."""
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Backend -> why it cannot keep packed documents exact on this family. `backend@cpu` / `backend@cuda`
    refuses it on one device only. Every other backend is exact."""
    packing: str | None = None
    """Why packed rows cannot be exact on any backend (then only `data.pack=false` trains); None: they are."""
    sequence_parallel: str | None = None
    """Why Ulysses sequence parallelism is refused; None: exact."""
    tiled_loss: str | None = None
    """Why the tiled loss does not apply; None: it equals the untiled loss."""
    tiled_mlp: str | None = None
    """Why the tiled MLP does not apply; None: it equals the untiled MLP."""
    moe: MoE | None = None
    """The router, for mixture-of-experts families; None for dense ones."""
    limit: Callable[[Any, int], str | None] | None = None
    """(model config, data.max_length) -> why this run would not be exact; None when it is."""
    notes: str = ""
    """What else a user should know (one line)."""

    def refusal(self, backend: str, device_type: str) -> str | None:
        """Why `backend` is refused for this family on `device_type` (cpu, cuda); None: it is exact there."""
        return self.refused.get(f"{backend}@{device_type}") or self.refused.get(backend)

    def packing_refusal(self, config: Any, max_length: int) -> str | None:
        """Why packed rows of `max_length` tokens would not be exact for this config; None: they are."""
        if self.packing:
            return self.packing
        return self.limit(config, max_length) if self.limit else None


def _refuse(backends: tuple[str, ...] | str, why: str) -> dict[str, str]:
    return dict.fromkeys((backends,) if isinstance(backends, str) else backends, why)


def _llama4_limit(config: Any, max_length: int) -> str | None:
    # Llama 4 scales the queries of its NoPE layers by a temperature computed from the position in the *row*
    # (torch.arange), not the position ids: it is 1 for every position below floor_scale - 1.
    floor = getattr(config, "floor_scale", None)
    if getattr(config, "attn_temperature_tuning", False) and floor and max_length >= floor:
        return (
            f"data.max_length={max_length}: Llama 4's attention temperature tuning counts positions in the row, "
            f"not in each document, from floor_scale={floor} on: keep data.max_length < {floor}"
        )
    return None


SINKS = "attention sinks (s_aux): the varlen kernels do not apply them (flash-attn 2 drops them silently)"
NO_FLEX = "transformers has no flex_attention path for it"
ALL_MOE = "every layer's feed-forward block is a mixture of experts, which the tiled MLP leaves untiled"
LINEAR_SP = (
    "linear-attention and short-convolution layers restart per document on one rank only (a recurrence split "
    "across ranks would need its state passed between them)"
)
LINEAR_NOTE = "Gated DeltaNet and its short convolution restart at each packed document (linear_attention.py)"

FAMILIES: tuple[Family, ...] = (
    Family("Llama 3.x", ("llama",)),
    Family(
        "Llama 4 (text)",
        ("llama4_text",),
        refused={
            "torch_varlen": "chunked-attention layers: the varlen kernels take no chunk boundaries",
            **_refuse(FLASH, "chunked-attention layers: transformers' flash path refuses chunks"),
        },
        sequence_parallel="chunked-attention layers: the sequence-parallel wrapper rebuilds only document and "
        "sliding-window masks",
        moe=MoE(
            "Llama4TextMoe",
            None,
            None,
            note="transformers computes no auxiliary loss for Llama 4 (sigmoid top-1 router, shared expert)",
        ),
        limit=_llama4_limit,
        notes="chunked layers get document-relative chunks; rows must stay below floor_scale (8192) tokens",
    ),
    Family("Qwen2 / Qwen2.5", ("qwen2",)),
    Family(
        "Qwen2-MoE",
        ("qwen2_moe",),
        tiled_mlp=ALL_MOE,
        moe=MoE("Qwen2MoeSparseMoeBlock", note=SWITCH),
    ),
    Family("Qwen3", ("qwen3",)),
    Family("Qwen3-MoE", ("qwen3_moe",), tiled_mlp=ALL_MOE, moe=MoE("Qwen3MoeSparseMoeBlock", note=SWITCH)),
    Family(
        "Qwen3.5 (dense, text)",
        ("qwen3_5_text",),
        refused=_refuse("flex_attention", NO_FLEX),
        sequence_parallel=LINEAR_SP,
        notes=LINEAR_NOTE,
    ),
    Family(
        "Qwen3.5-MoE (text)",
        ("qwen3_5_moe_text",),
        refused=_refuse("flex_attention", NO_FLEX),
        sequence_parallel=LINEAR_SP,
        tiled_mlp=ALL_MOE,
        notes=LINEAR_NOTE,
        moe=MoE("Qwen3_5MoeSparseMoeBlock", note=SWITCH),
    ),
    Family(
        "Qwen3-Next",
        ("qwen3_next",),
        refused=_refuse("flex_attention", NO_FLEX),
        sequence_parallel=LINEAR_SP,
        tiled_mlp=ALL_MOE,
        notes=LINEAR_NOTE,
        moe=MoE("Qwen3NextSparseMoeBlock", note=SWITCH),
    ),
    Family("Mistral", ("mistral",)),
    Family("Mixtral", ("mixtral",), tiled_mlp=ALL_MOE, moe=MoE("MixtralSparseMoeBlock", note=SWITCH)),
    Family(
        "Gemma 2",
        ("gemma2",),
        refused={
            "sdpa": "attention logit soft-capping: transformers has no sdpa path for Gemma 2",
            "torch_varlen": "attention logit soft-capping: PyTorch's varlen kernel has none",
        },
        tiled_loss="soft-caps its logits after the LM head (final_logit_softcapping)",
    ),
    Family("Gemma 3 (text)", ("gemma3_text",)),
    Family("Gemma 4 (text)", ("gemma4_text",), notes="full-attention layers have their own head_dim"),
    Family(
        "gpt-oss",
        ("gpt_oss",),
        refused={
            "sdpa": "attention sinks: transformers has no sdpa path for gpt-oss",
            "torch_varlen": SINKS,
            **_refuse(FLASH, SINKS),
            "flex_attention@cpu": "attention sinks need flex attention's log-sum-exp, which torch does not "
            "return on CPU",
        },
        tiled_mlp=ALL_MOE,
        notes="auto on CUDA picks flex attention, which applies the sinks: shown only by tests/test_gpu.py, "
        "not yet run on a GPU",
        moe=MoE(
            "GptOssMLP",
            note=SWITCH
            + " (the router itself takes the top-k of the biased logits, then a softmax over them)",
        ),
    ),
    Family(
        "DeepSeek-V3",
        ("deepseek_v3",),
        moe=MoE(
            "DeepseekV3MoE",
            None,
            None,
            bias_balanced=True,
            note="auxiliary-loss-free balancing: a per-expert bias (e_score_correction_bias, a buffer) steers "
            "top-k choice; its pretraining updated it by load, transformers neither adds a loss nor updates it, so "
            "in SFT the bias stays as loaded",
        ),
    ),
    Family("GLM-4", ("glm4",)),
    Family(
        "GLM-4-MoE",
        ("glm4_moe",),
        moe=MoE(
            "Glm4MoeMoE",
            None,
            None,
            bias_balanced=True,
            note="auxiliary-loss-free balancing with a frozen correction bias, as DeepSeek-V3",
        ),
    ),
    Family("Phi-3 / Phi-4-mini", ("phi3",)),
    Family(
        "Phi-MoE",
        ("phimoe",),
        tiled_mlp=ALL_MOE,
        moe=MoE("PhimoeSparseMoeBlock", note=SWITCH + " (SparseMixer routing, with jitter while training)"),
        notes="transformers applies PhiMoE's sliding_window on mask backends only (released: 131072, no effect)",
    ),
    Family("OLMo-2", ("olmo2",)),
    Family("OLMo-3", ("olmo3",)),
    Family(
        "OLMoE",
        ("olmoe",),
        refused=_refuse("flex_attention", NO_FLEX),
        tiled_mlp=ALL_MOE,
        moe=MoE(
            "OlmoeSparseMoeBlock",
            note=SWITCH + " (its pretraining's router z-loss, 0.001, is in neither transformers nor here)",
        ),
    ),
    Family(
        "Granite",
        ("granite",),
        tiled_loss="divides its logits by logits_scaling after the LM head",
    ),
    Family("SmolLM3", ("smollm3",)),
    Family(
        "LFM2",
        ("lfm2",),
        sequence_parallel=LINEAR_SP,
        notes="its short convolutions restart at each packed document (linear_attention.py)",
    ),
    Family(
        "MiniMax-M2",
        ("minimax_m2",),
        tiled_mlp=ALL_MOE,
        moe=MoE(
            "MiniMaxM2SparseMoeBlock",
            note=SWITCH + " (over the raw logits, as transformers computes it; the router picks experts by "
            "sigmoid score plus a correction bias, frozen here)",
        ),
    ),
    Family(
        "ERNIE-4.5-MoE",
        ("ernie4_5_moe",),
        moe=MoE(
            "Ernie4_5_MoeSparseMoeBlock",
            note=SWITCH + " (the router picks experts with a correction bias, frozen here)",
        ),
    ),
)

BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
assert len(BY_MODEL_TYPE) == sum(len(f.model_types) for f in FAMILIES), "a model type in two rows"
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def model_type(config: Any) -> str | None:
    """The config's model type; a composite (vision-language) config answers with its text model's."""
    kind = getattr(config, "model_type", None)
    if kind not in BY_MODEL_TYPE and hasattr(config, "get_text_config"):
        return getattr(config.get_text_config(), "model_type", kind)
    return kind


def family_of(config: Any) -> Family | None:
    """The row of a transformers config; None for a model type not in the table (or no config)."""
    return BY_MODEL_TYPE.get(model_type(config)) if config is not None else None


def registered_family(config: Any, trust_remote_code: bool = False) -> Family | None:
    """The row that vouches for this checkpoint: None for a model type not in the table, and for code shipped
    with the checkpoint (`trust_remote_code` with an `auto_map`), which is not the code the row was proven on."""
    if trust_remote_code and getattr(config, "auto_map", None):
        return None
    return family_of(config)


def device_refusal(backend: str, device_type: str, training: bool = True) -> str | None:
    """Why `backend` cannot run on `device_type` at all, whatever the family (None: it can)."""
    if device_type != "cuda" and backend not in CPU_BACKENDS:
        return "it needs CUDA (the varlen kernels are CUDA-only)"
    if device_type == "cpu" and backend == "flex_attention" and training:
        return "torch's flex attention has no backward on CPU (it runs there for `sft check` only)"
    return None


def auto_backend(family: Family, device_type: str, offered: tuple[str, ...] | None = None) -> str:
    """The backend `auto` picks for a family on a device, from `offered` (default: every backend in AUTO_ORDER)."""
    for name in AUTO_ORDER[device_type]:
        if (offered is None or name in offered) and not family.refusal(name, device_type):
            return name
    raise AssertionError(f"{family.name}: no exact backend on {device_type}")


# ---- the table (`sft models`, README) ----

COLUMNS = ("sdpa", "eager", "flex_attention", "torch_varlen", "flash_attention_2")
HEADER = (
    "| Family | model_type | sdpa | eager | flex | torch_varlen | flash | auto (CPU / GPU) | sequence parallel "
    "| tiled loss | tiled MLP | MoE aux loss | notes |"
)


def _mark(why: str | None) -> str:
    return "yes" if why is None else "no"


def _cell_backend(family: Family, backend: str) -> str:
    if family.packing:
        return "no" if family.refusal(backend, "cuda") else "unpacked only"
    cpu = family.refusal(backend, "cpu") if backend in CPU_BACKENDS else "n/a"
    gpu = family.refusal(backend, "cuda")
    if backend not in CPU_BACKENDS or cpu == gpu:
        return _mark(gpu)
    return f"CPU {_mark(cpu)}, GPU {_mark(gpu)}"


def _moe_cell(moe: MoE | None) -> str:
    if moe is None:
        return "dense"
    if moe.aux_loss is None:
        return "none (aux-loss-free bias)" if moe.bias_balanced else "none in transformers"
    return f"load balancing ({', '.join(k for k in (moe.coef_key, moe.z_loss_coef_key) if k)})"


def _notes(family: Family) -> str:
    if family.packing:
        parts = [f"packing: {family.packing}"]
    else:
        parts = [f"{k}: {v}" for k, v in family.refused.items() if not k.startswith(("flash_attention_3",))]
    parts += [f"SP: {family.sequence_parallel}"] if family.sequence_parallel else []
    parts += [f"tiled loss: {family.tiled_loss}"] if family.tiled_loss else []
    parts += [f"tiled MLP: {family.tiled_mlp}"] if family.tiled_mlp else []
    moe_note = family.moe.note.removeprefix(SWITCH).strip() if family.moe else ""
    if moe_note.startswith("(") and moe_note.endswith(")"):
        moe_note = moe_note[1:-1]
    parts += [moe_note] if moe_note else []
    parts += [family.notes] if family.notes else []
    return "; ".join(parts).replace("|", "/")


def format_table() -> str:
    """The support table as Markdown: one row per family (`sft models` prints it; the README holds it)."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for f in FAMILIES:
        cpu, gpu = auto_backend(f, "cpu"), auto_backend(f, "cuda")
        cells = [
            f.name,
            ", ".join(f.model_types),
            *(_cell_backend(f, b) for b in COLUMNS),
            f"{cpu} / {gpu}",
            _mark(f.sequence_parallel),
            _mark(f.tiled_loss),
            _mark(f.tiled_mlp),
            _moe_cell(f.moe),
            _notes(f),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
