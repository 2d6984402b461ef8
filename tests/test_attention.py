"""A packed batch computes exactly what the same documents compute one by one, on every CPU backend."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.data import collate, pack_examples
from launcher.data.packing import doc_lengths
from launcher.evaluate import check_packing, packing_error
from launcher.model import load_model
from tests.helpers import ARCHS, LENGTHS, full_logits_loss, tiny_config
from tests.reference_kernels import reference_varlen_attn, use_reference_flash

BACKENDS = ["eager", "sdpa", "flex_attention"]
# transformers has no sdpa path for Gemma2.
UNSUPPORTED = {("gemma2", "sdpa")}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for name in ARCHS:
        torch.manual_seed(0)
        cfg = tiny_config(name)
        d = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        dirs[name] = d
    return dirs


def documents(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, 97, (n,), generator=g).tolist(),
            "labels": torch.randint(3, 97, (n,), generator=g).tolist(),
        }
        for n in LENGTHS
    ]


def per_document(model, rows, attention):
    """Logits of each document alone, in the order the packed rows hold them."""
    outs = []
    for row in rows:
        start = 0
        for n in doc_lengths(row["position_ids"]):
            doc = {k: row[k][start : start + n] for k in row}
            outs.append(model(**collate([doc], attention)).logits[0])
            start += n
    return torch.cat(outs)


def static_shapes():
    """Compile flex attention for static shapes only.

    torch 2.13's CPU inductor emits C++ that does not compile for a sliding-window document BlockMask once a
    second shape turns on dynamic shapes ("cur_qSplitSize5 was not declared"); static shapes compile.
    """
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False)


CASES = [(a, b) for a in ARCHS for b in BACKENDS if (a, b) not in UNSUPPORTED]


@pytest.mark.parametrize("arch,attention", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_packed_logits_equal_per_document(model_dirs, arch, attention):
    model = load_model(str(model_dirs[arch]), attention=attention).eval()
    rows = pack_examples(documents(), max_length=24)  # several rows, several docs per row, padding
    assert any(len(doc_lengths(r["position_ids"])) > 1 for r in rows)
    with torch.no_grad(), static_shapes():
        batch = collate(rows, attention)
        packed = model(**batch).logits
        real = torch.cat([packed[i, : len(r["input_ids"])] for i, r in enumerate(rows)])
        if attention == "flex_attention":
            # Each document length would be one more flex compile (~15 s each on CPU): the per-document
            # reference comes from eager attention on the same weights instead, an independent kernel.
            model, attention = load_model(str(model_dirs[arch]), attention="eager").eval(), "eager"
        ref = per_document(model, rows, attention)
    assert (real - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding", "gemma3"])
def test_packed_loss_and_gradients_equal_unpacked(model_dirs, arch):
    model = load_model(str(model_dirs[arch]), attention="sdpa")
    rows = pack_examples(documents(1), max_length=24)

    def grads(batches):
        model.zero_grad()
        total, count = 0.0, 0
        for b in batches:
            s, n = full_logits_loss(model(**b).logits, b["labels"])
            total, count = total + s, count + n
        (total / count).backward()
        return (total / count).item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss_p, g_p = grads([collate(rows, "sdpa")])
    singles = []
    for row in rows:
        start = 0
        for n in doc_lengths(row["position_ids"]):
            singles.append(collate([{k: row[k][start : start + n] for k in row}], "sdpa"))
            start += n
    loss_u, g_u = grads(singles)
    assert abs(loss_p - loss_u) < 1e-5
    torch.testing.assert_close(g_p, g_u, atol=1e-5, rtol=1e-4)


def test_check_catches_a_mask_that_ignores_documents(model_dirs, monkeypatch):
    import launcher.data.loader as loader

    model = load_model(str(model_dirs["llama"]), attention="sdpa").eval()
    rows = pack_examples(documents(), max_length=24)
    check_packing(model, rows, "sdpa", torch.device("cpu"), tol=1e-4)  # the real mask passes
    # Plant the classic bug: one causal mask over the whole row, so each document sees the previous one.
    real = loader.block_causal_float_mask
    monkeypatch.setattr(
        loader,
        "block_causal_float_mask",
        lambda pos, dtype=torch.float32: real(torch.arange(pos.shape[-1]).expand_as(pos), dtype),
    )
    with pytest.raises(ValueError, match="leaking"):
        check_packing(model, rows, "sdpa", torch.device("cpu"), tol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_check_catches_an_all_ones_attention_mask(model_dirs, monkeypatch, attention):
    # The padding-free collators of other tools hand the model restarting positions and an all-ones [B, T]
    # mask; transformers then builds one causal mask over the whole row.
    import launcher.evaluate as evaluate

    def all_ones(rows, attention, pad_id=0, device=None):
        batch = collate(rows, attention, pad_id, device)
        return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}

    model = load_model(str(model_dirs["llama"]), attention=attention).eval()
    rows = pack_examples(documents(), max_length=24)
    check_packing(model, rows, attention, torch.device("cpu"), tol=1e-4)  # the real collator passes
    monkeypatch.setattr(evaluate, "collate", all_ones)
    with pytest.raises(ValueError, match=f"attention={attention}: .*leaking"):
        check_packing(model, rows, attention, torch.device("cpu"), tol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_check_catches_positions_that_do_not_restart(model_dirs, attention):
    # A packer that forgets to restart positions hides the boundaries the collator derives masks from.
    model = load_model(str(model_dirs["llama"]), attention=attention).eval()
    row = max(pack_examples(documents(), max_length=24), key=lambda r: len(doc_lengths(r["position_ids"])))
    lengths = doc_lengths(row["position_ids"])
    good, _ = packing_error(model, row, lengths, attention, torch.device("cpu"))
    broken = {**row, "position_ids": list(range(len(row["input_ids"])))}
    bad, _ = packing_error(model, broken, lengths, attention, torch.device("cpu"))
    assert good <= 1e-5 and bad > 1e-2, (good, bad)


def test_packed_eval_loss_equals_unpacked(model_dirs):
    model = load_model(str(model_dirs["qwen2_sliding"]), attention="eager").eval()
    docs = documents(2)
    with torch.no_grad():
        packed = [collate(pack_examples(docs, 24), "eager")]
        unpacked = [collate(pack_examples([d], 24), "eager") for d in docs]
        sums = []
        for batches in (packed, unpacked):
            s, n = zip(*(full_logits_loss(model(**b).logits, b["labels"]) for b in batches))
            sums.append((sum(s) / sum(n)).item())
    assert abs(sums[0] - sums[1]) < 1e-6


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_target_only_lm_head_gives_the_same_loss_and_gradients(model_dirs, attention):
    from launcher.loss import target_token_loss

    model = load_model(str(model_dirs["llama_tied"]), attention=attention)
    batch = collate(pack_examples(documents(3), max_length=24), attention)
    results = []
    for fn in (
        lambda: full_logits_loss(model(**batch).logits, batch["labels"]),
        lambda: target_token_loss(model, batch),
    ):
        model.zero_grad()
        s, n = fn()
        (s / n).backward()
        results.append((s.item(), n.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (s0, n0, g0), (s1, n1, g1) = results
    assert n0 == n1 and abs(s0 - s1) < 1e-4
    torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2_sliding", "mistral_sliding", "gemma3"])
def test_torch_varlen_adapter_with_a_reference_kernel(model_dirs, arch, monkeypatch):
    """Our side of `torch_varlen` on CPU: the flattened batch, the kwargs transformers routes to the attention
    function, head layout, GQA, scaling and window conventions. The CUDA kernel runs in tests/test_gpu.py."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen_attn)
    model = load_model(str(model_dirs[arch]), attention="torch_varlen").eval()
    eager = load_model(str(model_dirs[arch]), attention="eager").eval()
    rows = pack_examples(documents(), max_length=24)
    with torch.no_grad():
        batch = collate(rows, "torch_varlen")
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
        packed = model(**batch).logits[0]
        ref = per_document(eager, rows, "eager")
    assert (packed - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2_sliding", "mistral_sliding"])
def test_flash_attention_2_batches_through_transformers_flash_path(model_dirs, arch, monkeypatch):
    """Our flash batches (every row laid end to end, `cu_seq_lens`) through transformers' own flash-attn
    integration, with a reference in place of flash-attn's CUDA varlen kernel: documents stay apart, windows hold."""
    use_reference_flash(monkeypatch.setattr)
    model = load_model(str(model_dirs[arch]), attention="sdpa").eval()
    model.config._attn_implementation = "flash_attention_2"  # loading it so would ask for flash-attn and CUDA
    eager = load_model(str(model_dirs[arch]), attention="eager").eval()
    rows = pack_examples(documents(), max_length=24)
    with torch.no_grad():
        packed = model(**collate(rows, "flash_attention_2")).logits[0]
        ref = per_document(eager, rows, "eager")
    assert (packed - ref).abs().max().item() <= 1e-5


def test_torch_varlen_adapter_under_autocast(model_dirs, monkeypatch):
    """An fp32 model under bf16 autocast (how TRL trains): RoPE leaves q/k in fp32 and v in bf16; the adapter
    hands the kernel one dtype."""
    import torch.nn.attention.varlen as varlen

    seen = set()

    @functools.wraps(reference_varlen_attn)  # keeps its signature, which the adapter reads
    def kernel(q, k, v, *args, **kwargs):
        seen.update((q.dtype, k.dtype, v.dtype))
        return reference_varlen_attn(q, k, v, *args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    model = load_model(str(model_dirs["llama"]), attention="torch_varlen").eval()
    eager = load_model(str(model_dirs["llama"]), attention="eager").eval()
    rows = pack_examples(documents(), max_length=24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(**collate(rows, "torch_varlen")).logits[0].float()
        ref = per_document(eager, rows, "eager").float()
    assert seen == {torch.bfloat16}, "the kernel runs in the autocast dtype only"
    assert rel_err(packed, ref) < 2e-2


@pytest.mark.parametrize(
    "kwargs",
    [{"softcap": 50.0}, {"s_aux": torch.zeros(4)}, {"dropout": 0.1}],
    ids=["softcap", "sinks", "dropout"],
)
def test_torch_varlen_refuses_what_the_kernel_cannot_apply(kwargs):
    from launcher.model.attention import _varlen_forward

    x = torch.zeros(1, 4, 6, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="auto or eager"):
        _varlen_forward(None, x, x, x, None, cu_seq_lens_q=cu, max_length_q=6, **kwargs)


def test_auto_backend_follows_the_model(model_dirs):

    from launcher.model.attention import attention_needs, resolve_backend

    cpu = torch.device("cpu")
    gemma2 = AutoConfig.from_pretrained(model_dirs["gemma2"])
    llama = AutoConfig.from_pretrained(model_dirs["llama"])
    assert resolve_backend("auto", cpu, llama, torch.float32) == "sdpa"
    assert resolve_backend("auto", cpu, gemma2, torch.float32) == "eager"  # softcapping, no sdpa path
    gpt_oss = AutoConfig.for_model("gpt_oss")
    assert attention_needs(gpt_oss)["sinks"] and resolve_backend("auto", cpu, gpt_oss) == "eager"
    dropout = AutoConfig.for_model("llama", attention_dropout=0.1)
    with pytest.raises(ValueError, match="no attention dropout"):
        resolve_backend("flex_attention", cpu, dropout)
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("torch_varlen", cpu, llama, torch.bfloat16)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("flash", cpu, llama)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
