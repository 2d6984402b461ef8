"""Linear attention (Gated DeltaNet) and short convolutions restart at each packed document, on every CPU backend.

Each family is a tiny random model built from transformers' own config class with its real layer pattern (linear
and full attention layers, MoE where the family has it), saved with save_pretrained and loaded as users load it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import launcher.model.linear_attention as la
from launcher.data import collate, pack_examples
from launcher.data.packing import doc_lengths
from launcher.evaluate import check_packing
from launcher.model import load_model
from tests.helpers import fixture_path, full_logits_loss, sft_launch
from tests.reference_kernels import (
    reference_causal_conv1d,
    reference_chunk_gated_delta_rule,
    use_reference_flash,
)

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    num_hidden_layers=4,
)
DELTANET = dict(
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
SHORT_CONV = dict(layer_types=["conv", "conv", "full_attention", "conv"], conv_L_cache=3)
ARCHS = {
    "qwen3_5_text": dict(model_type="qwen3_5_text", **DELTANET),
    "qwen3_5_moe_text": dict(
        model_type="qwen3_5_moe_text", **DELTANET, **MOE, shared_expert_intermediate_size=16
    ),
    "qwen3_next": dict(model_type="qwen3_next", **DELTANET, **MOE, shared_expert_intermediate_size=16),
    "lfm2": dict(model_type="lfm2", **SHORT_CONV),
    "lfm2_moe": dict(model_type="lfm2_moe", **SHORT_CONV, **MOE, num_dense_layers=1),
}
BACKENDS = ["sdpa", "eager", "flex_attention"]
# Documents longer than transformers' 64-token recurrence chunk, shorter than the convolution window, and rows
# with padding (its own document).
LENGTHS = [9, 70, 2, 13, 6, 40, 11, 1, 30]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for name, extra in ARCHS.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**COMMON, **extra})).save_pretrained(d)
        dirs[name] = d
    return dirs


def documents(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist(),
            "labels": torch.randint(3, VOCAB, (n,), generator=g).tolist(),
        }
        for n in LENGTHS
    ]


def packed_rows() -> list[dict]:
    rows = pack_examples(documents(), max_length=96)
    assert len(rows) > 1 and all(len(doc_lengths(r["position_ids"])) > 1 for r in rows)
    return rows


def split(rows: list[dict]) -> list[dict]:
    """Each document of the packed rows alone, in order, positions from 0."""
    docs = []
    for row in rows:
        start = 0
        for n in doc_lengths(row["position_ids"]):
            docs.append({k: row[k][start : start + n] for k in row})
            start += n
    return docs


def per_document(model, rows, attention) -> torch.Tensor:
    return torch.cat([model(**collate([d], attention)).logits[0] for d in split(rows)])


def real_tokens(logits: torch.Tensor, rows: list[dict]) -> torch.Tensor:
    """The packed logits of the rows' tokens (padding dropped), in document order ([1, N] batches pass as is)."""
    if logits.shape[0] == 1 and len(rows) > 1:
        return logits[0]
    return torch.cat([logits[i, : len(r["input_ids"])] for i, r in enumerate(rows)])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def flex_refused(arch: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.for_model(**{**COMMON, **ARCHS[arch]})
    return not MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_flex_attn


CASES = [(a, b) for a in ARCHS for b in BACKENDS]


@pytest.mark.parametrize("arch,attention", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_packed_logits_equal_per_document(model_dirs, arch, attention):
    if attention == "flex_attention" and flex_refused(arch):
        pytest.skip(f"transformers refuses flex_attention for {arch} (_supports_flex_attn=False)")
    model = load_model(str(model_dirs[arch]), attention=attention).eval()
    assert la.mixers(model) and not la.unhandled_mixers(model), "the family's mixers are all known"
    rows = packed_rows()
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        packed = real_tokens(model(**collate(rows, attention)).logits, rows)
        if attention == "flex_attention":  # one flex compile per document length: the reference runs eager
            model, attention = load_model(str(model_dirs[arch]), attention="eager").eval(), "eager"
        ref = per_document(model, rows, attention)
    assert rel(packed, ref) <= 1e-5


@pytest.mark.parametrize("arch", ["qwen3_5_text", "qwen3_next", "lfm2"])
def test_flattened_varlen_batch_equals_per_document(model_dirs, arch, monkeypatch):
    """The padding-free [1, N] layout of the varlen backends (every row end to end, `cu_seq_lens` in the batch),
    through transformers' own flash integration with a reference kernel in place of flash-attn's CUDA one."""
    use_reference_flash(monkeypatch.setattr)
    # Documents are batched by their number of recurrence chunks; smaller groups than the 64-token chunks of the
    # recurrence itself make the groups interleave in token order (the grouping never changes what is computed).
    monkeypatch.setattr(la, "CHUNK", 8)
    model = load_model(str(model_dirs[arch]), attention="sdpa").eval()
    model.config._attn_implementation = "flash_attention_2"  # loading it so would ask for flash-attn and CUDA
    eager = load_model(str(model_dirs[arch]), attention="eager").eval()
    rows = packed_rows()
    with torch.no_grad():
        batch = collate(rows, "flash_attention_2")
        assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch
        packed = model(**batch).logits[0]
        ref = per_document(eager, rows, "eager")
    assert rel(packed, ref) <= 1e-5


@pytest.mark.parametrize(
    "arch,checkpointing",
    [("qwen3_5_text", False), ("qwen3_5_moe_text", True), ("qwen3_next", True), ("lfm2", True)],
)
def test_packed_loss_and_gradients_equal_unpacked(model_dirs, arch, checkpointing):
    """Backward through the document-aware paths; with activation checkpointing the recompute sees the same
    documents (the decoder layer's kwargs are what it replays)."""
    model = load_model(str(model_dirs[arch]), attention="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if hasattr(model.config, "router_aux_loss_coef"):
        model.config.output_router_logits = False  # the router's own loss is not ours to test here
    rows = packed_rows()

    def grads(batches):
        model.zero_grad()
        total, count = 0.0, 0
        for b in batches:
            s, n = full_logits_loss(model(**b).logits, b["labels"])
            total, count = total + s, count + n
        (total / count).backward()
        return (total / count).item(), torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        )

    # Two packed micro-batches, both forwards before the backward: a recompute that read the documents of the
    # latest forward instead of its own would mix them up.
    loss_p, g_p = grads([collate(rows[:1], "sdpa"), collate(rows[1:], "sdpa")])
    loss_u, g_u = grads([collate([d], "sdpa") for d in split(rows)])
    assert abs(loss_p - loss_u) < 1e-5
    torch.testing.assert_close(g_p, g_u, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_5_text", "qwen3_next", "lfm2"])
def test_start_up_self_check_passes(model_dirs, arch):
    model = load_model(str(model_dirs[arch]), attention="sdpa").eval()
    result = check_packing(model, packed_rows(), "sdpa", torch.device("cpu"), tol=1e-5)
    assert result["packing_check_rel"] <= 1e-5


def test_mixers_run_once_per_layer_whatever_the_documents(model_dirs):
    """Under ZeRO-3 each submodule call gathers its parameters collectively, so every rank must make the same calls
    whatever its documents: the mixers' projections run once per layer, only the parameter-free recurrence runs
    per group of documents."""
    model = load_model(str(model_dirs["qwen3_5_text"]), attention="sdpa").eval()
    calls = []
    for _, mixer in la.mixers(model):
        for child in mixer.modules():
            child.register_forward_hook(lambda m, i, o: calls.append(m))
    rows = packed_rows()
    counts = []
    for batch_rows in (rows[:1], [split(rows)[0]], rows):
        calls.clear()
        with torch.no_grad():
            model(**collate(batch_rows, "sdpa"))
        counts.append(len(calls))
    assert len(set(counts)) == 1, counts


@pytest.mark.parametrize("arch", ["qwen3_5_text", "lfm2"])
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_kernel_path_with_reference_kernels(model_dirs, arch, attention, monkeypatch):
    """Our side of the GPU kernel path on CPU: what reaches causal-conv1d (`seq_idx`, int32, channel-last) and
    flash-linear-attention (`cu_seqlens` over one flattened row), with plain-math references that follow the
    kernels' contracts. The kernels themselves run in test_gated_deltanet_kernels_on_gpu."""
    reference_causal_conv1d.calls.clear()
    reference_chunk_gated_delta_rule.calls.clear()
    model = load_model(str(model_dirs[arch]), attention="sdpa").eval()
    module = __import__(type(la.mixers(model)[0][1]).__module__, fromlist=["_"])
    monkeypatch.setattr(module, la.CONV, la._document_conv(reference_causal_conv1d))
    if hasattr(module, la.DELTA_RULE):
        monkeypatch.setattr(module, la.DELTA_RULE, la._document_delta_rule(reference_chunk_gated_delta_rule))
    monkeypatch.setattr(la, "_kernel", lambda fn, x: True)
    if attention == "flash_attention_2":
        use_reference_flash(monkeypatch.setattr)
        model.config._attn_implementation = "flash_attention_2"
    rows = packed_rows()
    with torch.no_grad():
        packed = real_tokens(model(**collate(rows, attention)).logits, rows)
        ref = per_document(load_model(str(model_dirs[arch]), attention="eager").eval(), rows, "eager")
    assert rel(packed, ref) <= 1e-5
    assert reference_causal_conv1d.calls["seq_idx"] and (
        arch == "lfm2" or reference_chunk_gated_delta_rule.calls["cu_seqlens"]
    ), "the kernels were handed the documents"


def test_generation_with_a_cache_is_unchanged(model_dirs):
    """Generation carries state across calls through the cache: no documents, transformers' path as it is."""
    path = str(model_dirs["qwen3_5_text"])
    ours = load_model(path, attention="sdpa").eval()
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = torch.tensor([documents()[1]["input_ids"][:20]])
    with torch.no_grad():
        a = ours.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        b = theirs.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(a, b)


def test_documents_from_position_resets(monkeypatch):
    monkeypatch.setattr(la, "CHUNK", 2)  # groups of 1 and 2 chunks, interleaved in token order
    # A row's first token starts a document whatever its position (as in launcher.data.masks.document_ids).
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 0, 1, 2, 3]])
    docs = la.Documents(pos)
    assert docs.starts == [0, 3, 5, 6, 8] and docs.lengths == [3, 2, 1, 2, 4] and docs.packed
    assert docs.seq_idx.tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 4, 4, 4, 4]]
    assert docs.seq_idx.dtype == torch.int32 and docs.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12]
    dest, width = docs.spread_index(2)
    assert dest.tolist() == [0, 1, 2, 5, 6, 9, 12, 13, 16, 17, 18, 19] and width == 20
    groups, inverse = docs.groups
    tokens = torch.cat([torch.arange(12), torch.tensor([-1])])  # -1: the padding row
    kept = torch.cat([tokens[index].reshape(-1)[keep] for index, keep in groups])
    assert kept[inverse].tolist() == list(range(12))
    assert not la.Documents(torch.tensor([[0, 1, 2], [0, 1, 2]])).packed


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sequence_parallelism_is_refused_with_the_reason(arch):
    config = AutoConfig.for_model(**{**COMMON, **ARCHS[arch]})
    problem = la.sequence_parallel_problem(config)
    assert problem and arch in problem and "train.sequence_parallel_size=1" in problem
    assert "\n" not in problem
    assert la.sequence_parallel_problem(AutoConfig.for_model("llama")) is None


def test_sequence_parallel_install_refuses_before_wrapping(model_dirs):
    from launcher.long_context.sequence_parallel import SequenceParallel

    model = load_model(str(model_dirs["lfm2"]), attention="sdpa")
    sp = SequenceParallel(1, 0, 1)
    sp.size = 2  # a group of two, without starting a process group for it
    with pytest.raises(
        ValueError, match="sequence_parallel_size=2: LFM2: linear-attention and short-convolution"
    ):
        sp.install(model, "sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_unhandled_mixers_are_named():
    """A stateful mixer this module does not know (Granite 4's Mamba layers) is named, for the families registry."""
    config = AutoConfig.for_model(
        "granitemoehybrid",
        **{k: v for k, v in COMMON.items() if k != "head_dim"},
        layer_types=["mamba", "attention", "mamba", "mamba"],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        num_local_experts=0,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert la.unhandled_mixers(model) == ["GraniteMoeHybridMambaLayer"] and not la.mixers(model)
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON))
    assert la.unhandled_mixers(llama) == [] and la.install_document_reset(llama) == 0
    assert la.sequence_parallel_problem(config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["sdpa", "torch_varlen"])
def test_gated_deltanet_kernels_on_gpu(tmp_path, attention, monkeypatch):
    """The kernel path itself: causal-conv1d with `seq_idx` and flash-linear-attention with `cu_seqlens` (bf16, the
    kernels' dtype), packed rows against each document alone through the same kernels; without the documents the
    same rows leak."""
    import importlib.util

    from launcher.model.attention import varlen_available

    missing = [name for name in ("fla", "causal_conv1d") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs flash-linear-attention and causal-conv1d ({', '.join(missing)} not importable)")
    if attention == "torch_varlen" and not varlen_available():
        pytest.skip("torch.nn.attention.varlen is not in this torch")
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, head_dim=64, max_position_embeddings=4096
    )
    sizes.update(linear_key_head_dim=64, linear_value_head_dim=64)
    config = AutoConfig.for_model(**{**COMMON, **DELTANET, "model_type": "qwen3_5_text", **sizes})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), attention=attention, dtype=torch.bfloat16).cuda().eval()
    module = __import__(type(la.mixers(model)[0][1]).__module__, fromlist=["_"])
    # transformers resolved both functions to their packages: the kernel path is what runs below
    originals = [getattr(getattr(module, name), la._WRAPPED) for name in (la.CONV, la.DELTA_RULE)]
    assert all(la._uses_package(fn) for fn in originals), originals
    g = torch.Generator().manual_seed(1)
    docs = [
        {"input_ids": torch.randint(3, 512, (n,), generator=g).tolist(), "labels": [1] * n}
        for n in (300, 41, 700, 129, 17, 500, 3)
    ]
    rows = pack_examples(docs, max_length=1024)

    def errors() -> list[float]:
        with torch.no_grad():
            packed = real_tokens(model(**collate(rows, attention, device="cuda")).logits, rows).float()
            errs, offset = [], 0
            for doc in split(rows):
                ref = model(**collate([doc], attention, device="cuda")).logits[0].float()
                n = len(doc["input_ids"])
                errs.append(((packed[offset : offset + n] - ref).norm() / ref.norm()).item())
                offset += n
        return errs

    exact = errors()
    # bf16 operands, packed and unpacked kernels: a few 1e-3 relative; a leaking document is off by ~1e-1.
    assert max(exact) < 2e-2, exact
    monkeypatch.setattr(la._LastDocuments, "of", lambda self, pos: None)  # no documents: the kernels run on
    leaking = errors()
    assert max(leaking) > 3 * max(exact), (exact, leaking)


@pytest.mark.slow
def test_qwen3_5_trains_end_to_end_under_zero3(tmp_path):
    """A user's saved Qwen3.5 checkpoint (`model=hf`), a real chat tokenizer and real conversations, 2 ranks under
    ZeRO-3 with activation checkpointing: the start-up self-check passes on packed rows, the loss falls, and the
    export reloads with the engine's logits."""
    tokenizer = fixture_path("tokenizers", "qwen2.5-0.5b-instruct")
    data = fixture_path("data", "oasst_en_100_trees.jsonl")
    sizes = dict(vocab_size=151936, max_position_embeddings=1024, tie_word_embeddings=True)
    config = AutoConfig.for_model(**{**COMMON, **DELTANET, "model_type": "qwen3_5_text", **sizes})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen3_5")
    run_dir = tmp_path / "run"
    out = sft_launch(
        [
            "model=hf",
            f"model.name_or_path={tmp_path / 'qwen3_5'}",
            f"model.tokenizer={tokenizer}",
            "model.gradient_checkpointing=true",
            f"data.sources=[{{path: {data}}}]",
            "data.eval_size=4",
            "data.max_length=512",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.lr=1e-2",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.log_every=1",
            "train.eval_every=0",
            "train.save_every=0",
            "train.exact_match_eval=false",
            "logging.wandb_mode=disabled",
            "logging.progress=false",
        ],
        run_dir,
        tmp_path / "cache",
    )
    check = re.search(r"packing self-check: .*'packing_check_rel': ([0-9.e-]+)", out)
    assert check and float(check.group(1)) <= 1e-5, out[-3000:]
    assert "attention=sdpa" in out and "ZeRO stage 3" in out
    assert "reloads with the engine's hidden states and logits" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
