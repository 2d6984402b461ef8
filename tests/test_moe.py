"""Mixture-of-experts training (issue #17 item 4): the router's auxiliary loss over the real tokens of packed rows,
equal to transformers' own loss over the documents run one by one; ZeRO-3 with ranks routed to different experts;
the export; `sft plan`'s total and active parameters. Tiny random models from transformers' own config classes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from launcher.data import pack_examples
from launcher.data.loader import collate
from launcher.long_context.offload import enable_checkpointing
from launcher.long_context.tiled_loss import tiled_target_token_loss
from launcher.loss import model_inputs, target_token_loss
from launcher.model import load_model
from launcher.model.families import family_of
from launcher.model.moe import (
    LOAD_BALANCING,
    MOE_FAMILIES,
    active_params,
    moe_blocks,
    moe_family,
    router_aux,
    router_aux_decision,
    router_recorder,
)
from tests.helpers import ROOT, TINY_MOE, tiny_moe_config, torchrun, worker

AUX_FAMILIES = [t for t in TINY_MOE if MOE_FAMILIES[t].aux_loss == LOAD_BALANCING]


def documents() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    docs = []
    for n in (5, 9, 4, 6, 3):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return docs


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """model type -> a saved tiny checkpoint whose config asks for router logits (as a user would set it)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for model_type in TINY_MOE:
        torch.manual_seed(0)
        config = tiny_moe_config(model_type, output_router_logits=True)
        AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(
            root / model_type
        )
        out[model_type] = root / model_type
    return out


def per_document_reference(path, docs: list[dict]) -> tuple[float, float]:
    """transformers' own `load_balancing_loss_func` over the documents run one by one (router logits
    concatenated token by token), and transformers' own `aux_loss` of the documents as an unpacked padded batch
    with a 2D padding mask."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    lb = sys.modules[type(model).__module__].load_balancing_loss_func
    text = model.config
    experts = getattr(text, "num_experts", None) or text.num_local_experts
    with torch.no_grad():
        outs = [model(input_ids=torch.tensor([d["input_ids"]]), output_router_logits=True) for d in docs]
        layers = zip(*(o.router_logits for o in outs))
        concat = tuple(torch.cat([x.reshape(-1, x.shape[-1]) for x in layer]) for layer in layers)
        one_by_one = lb(concat, experts, text.num_experts_per_tok).item()
        longest = max(len(d["input_ids"]) for d in docs)
        ids = torch.tensor([d["input_ids"] + [0] * (longest - len(d["input_ids"])) for d in docs])
        mask = torch.tensor([[1] * len(d["input_ids"]) + [0] * (longest - len(d["input_ids"])) for d in docs])
        padded = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss.item()
    return one_by_one, padded


@pytest.mark.parametrize("model_type", AUX_FAMILIES)
def test_router_aux_loss_over_packed_rows_equals_transformers_per_document(moe_dirs, model_type, monkeypatch):
    """Packed rows of unequal length (padding in sdpa/eager batches; none in the flattened varlen batch): the
    auxiliary loss over the real tokens equals transformers' own function over the documents run one by one, and
    its own aux_loss of the documents as a padded batch (1e-5 relative). The main loss is unchanged by it."""
    import torch.nn.attention.varlen as varlen

    from tests.reference_kernels import reference_varlen_attn

    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen_attn)  # the CUDA kernel's contract, on CPU
    docs = documents()
    rows = pack_examples(docs, max_length=14)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # rows of unequal length: padding
    one_by_one, padded = per_document_reference(moe_dirs[model_type], docs)
    assert abs(one_by_one - padded) <= 1e-5 * abs(one_by_one)
    # The backends its families row proves exact (gpt-oss's sinks: eager only on CPU)
    row = family_of(tiny_moe_config(model_type))
    backends = [
        b
        for b in ("sdpa", "eager", "torch_varlen")
        if not row.refusal(b, "cpu" if b != "torch_varlen" else "cuda")
    ]
    for attention in backends:
        model = load_model(str(moe_dirs[model_type]), attention).eval()
        assert not model.config.output_router_logits and model.sft_output_router_logits
        aux = router_aux(model, "auto")
        assert aux is not None and aux.coef == model.config.router_aux_loss_coef
        batch = collate(rows, attention, token_mask=True)
        with torch.no_grad():
            loss_sum, n, term = aux.wrap(target_token_loss)(model, batch)
            plain_sum, plain_n = target_token_loss(model, batch)
        real = int(batch["token_mask"].sum())
        assert real == sum(len(d["input_ids"]) for d in docs)
        got = term.sum.item() / real
        rel = abs(got - one_by_one) / abs(one_by_one)
        print(f"router aux check {model_type}/{attention}: relative difference {rel:.2e}")  # -s shows it
        assert rel <= 1e-5, (attention, got, one_by_one)
        assert loss_sum.item() == plain_sum.item() and n == plain_n


def test_router_aux_gradient_and_checkpointing_and_tiled_loss(moe_dirs):
    """Training mode, Qwen3-MoE: the auxiliary term back-propagates into every router; with gradient checkpointing
    (whose recompute runs the routers again in backward) and with the tiled loss, the term and the router
    gradients are the same."""
    rows = pack_examples(documents(), max_length=14)

    def run(checkpointing: bool, loss_fn) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = load_model(str(moe_dirs["qwen3_moe"]), "sdpa").train()
        if checkpointing:
            enable_checkpointing(model)
        aux = router_aux(model, "auto")
        _, _, term = aux.wrap(loss_fn)(model, collate(rows, "sdpa", token_mask=True))
        term.sum.backward()
        return term.sum.item(), [layer.mlp.gate.weight.grad.clone() for layer in model.model.layers]

    value, grads = run(False, target_token_loss)
    assert all(g.abs().sum() > 0 for g in grads)
    for checkpointing, loss_fn in ((True, target_token_loss), (False, tiled_target_token_loss)):
        v, g = run(checkpointing, loss_fn)
        assert abs(v - value) <= 1e-6 * abs(value)
        for a, b in zip(grads, g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_router_aux_setting(moe_dirs, tmp_path):
    """train.router_aux_loss: auto follows the config's output_router_logits; true turns it on with the config's
    coefficient; false off; a family without one (DeepSeek-V3) adds nothing on auto (with a warning) and refuses
    true; a model type outside the table refuses a request in one line; a dense model is unaffected; what was
    decided is said in one line."""
    qwen = load_model(str(moe_dirs["qwen3_moe"]), "sdpa")
    assert router_aux(qwen, "auto") is not None and router_aux(qwen, "false") is None
    quiet = tiny_moe_config("qwen3_moe")  # output_router_logits=False, as released checkpoints ship
    AutoModelForCausalLM.from_config(quiet).save_pretrained(tmp_path / "quiet")
    quiet_model = load_model(str(tmp_path / "quiet"), "sdpa")
    assert router_aux(quiet_model, "auto") is None
    assert router_aux(quiet_model, "true").coef == quiet.router_aux_loss_coef

    deepseek = load_model(str(moe_dirs["deepseek_v3"]), "sdpa")
    assert router_aux(deepseek, "auto") is None
    added, why = router_aux_decision("auto", deepseek.config, asked=True)
    assert not added and why.startswith("none for deepseek_v3: auxiliary-loss-free")
    with pytest.raises(ValueError, match="deepseek_v3 has no router auxiliary loss"):
        router_aux(deepseek, "true")
    added, why = router_aux_decision("auto", quiet)
    assert not added and "does not set output_router_logits" in why

    outside = AutoConfig.for_model(
        "granitemoe", vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        output_router_logits=True,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(outside).save_pretrained(tmp_path / "outside")
    with pytest.raises(ValueError, match="not in the MoE rows.*train.router_aux_loss=false"):
        router_aux(load_model(str(tmp_path / "outside"), "sdpa"), "auto")
    dense = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(dense).save_pretrained(tmp_path / "dense")
    assert router_aux(load_model(str(tmp_path / "dense"), "sdpa"), "auto") is None


def test_preflight_refuses_an_unknown_moe_asking_for_router_logits():
    """Before any rank starts (the launcher's preflight and `sft check` decide as the run does): a model type
    outside the families table's MoE rows whose config asks for router logits
    is refused in one line, naming the way out."""
    from launcher.config import compose
    from launcher.errors import UserError
    from launcher.launch.preflight import check_model_config

    init = (
        "{model_type: granitemoe, vocab_size: 128, hidden_size: 32, intermediate_size: 16, num_hidden_layers: 1, "
        "num_attention_heads: 4, num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, "
        "output_router_logits: true}"
    )
    tokenizer = ROOT / "launcher" / "assets" / "tokenizer"
    cfg = compose(cfg_overrides(init, tokenizer))
    with pytest.raises(UserError, match="granitemoe is not in the MoE rows.*train.router_aux_loss=false"):
        check_model_config(cfg, "cpu")
    check_model_config(compose([*cfg_overrides(init, tokenizer), "train.router_aux_loss=false"]), "cpu")


def cfg_overrides(init: str, tokenizer) -> list[str]:
    return ["model.name_or_path=null", f"+model.init={init}", f"model.tokenizer={tokenizer}"]


def test_token_mask_is_loss_only():
    """collate(token_mask=True) marks real tokens, padding False; the model never sees it; SP pads it False."""
    rows = pack_examples(documents(), max_length=14)
    for attention in ("sdpa", "flex_attention", "torch_varlen"):
        plain = collate(rows, attention)
        batch = collate(rows, attention, token_mask=True)
        assert "token_mask" not in plain and "token_mask" not in model_inputs(batch)
        mask = batch["token_mask"]
        assert int(mask.sum()) == sum(len(r["input_ids"]) for r in rows)
        if attention != "torch_varlen":
            for i, r in enumerate(rows):
                assert mask[i, : len(r["input_ids"])].all() and not mask[i, len(r["input_ids"]) :].any()


@pytest.mark.parametrize("model_type", sorted(TINY_MOE))
def test_moe_table_matches_transformers(model_type):
    """Each MoE row of the families table says what transformers 5.23's code does: the block class is the model's MoE
    block (what ZeRO-3 may gather whole), an auxiliary loss is claimed exactly where the family's modeling module
    has transformers' load_balancing_loss_func and its config the coefficient, no family has a router z-loss,
    and "balanced by a bias" exactly where a correction-bias buffer is all there is."""
    config = tiny_moe_config(model_type)
    family = moe_family(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert moe_blocks(model) == [family.block]
    module = sys.modules[type(model).__module__]
    assert (family.aux_loss == LOAD_BALANCING) == hasattr(module, "load_balancing_loss_func")
    if family.aux_loss:
        assert isinstance(getattr(config, family.coef_key), float)
        assert router_recorder(model) is not None
    assert family.z_loss_coef_key is None and not any("z_loss" in k for k in config.to_dict())
    biased = any(n.endswith("e_score_correction_bias") for n, _ in model.named_buffers())
    assert family.bias_balanced == (biased and family.aux_loss is None)


# ---- sft plan: total and active parameters ----


def closed_form(c, experts: int, top_k: int, moe_inter: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """Total and active parameters of a Mixtral / Qwen3-MoE style model (every layer MoE, no shared experts, no
    biases, untied head), by hand: attention (q, k, v, o, q/k norms for Qwen3), router, experts, 2 norms per
    layer, embeddings, head, final norm."""
    h, layers = c.hidden_size, c.num_hidden_layers
    q = c.num_attention_heads * head_dim
    attn = h * q + 2 * h * kv_heads * head_dim + q * h
    qk_norm = 2 * head_dim if c.model_type == "qwen3_moe" else 0
    expert = 3 * h * moe_inter
    per_layer_fixed = attn + qk_norm + experts * h + 2 * h
    embed = 2 * c.vocab_size * h + h
    total = layers * (per_layer_fixed + experts * expert) + embed
    active = layers * (per_layer_fixed + top_k * expert) + embed
    return total, active


MIXTRAL_8X7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
)
QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    tie_word_embeddings=False,
)
DEEPSEEK_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                   num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
                   num_experts_per_tok=8, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8,
                   topk_group=4)  # fmt: skip


@pytest.mark.parametrize(
    "model_type, sizes, published, unit",
    [
        ("mixtral", MIXTRAL_8X7B, (46.7e9, 12.9e9), 0.1e9),  # Mistral AI: 46.7B total, 12.9B active
        ("qwen3_moe", QWEN3_30B_A3B, (30.5e9, 3.3e9), 0.1e9),  # Qwen: 30.5B total, 3.3B activated
        ("deepseek_v3", DEEPSEEK_V3, (671e9, 37e9), 1e9),  # DeepSeek: 671B total, 37B activated (no MTP)
    ],
)
def test_plan_counts_total_and_active_parameters(model_type, sizes, published, unit, tmp_path):
    """`sft plan` on the public configs (their config.json sizes): the published figures to their last digit
    (Qwen's "3.3B activated" is 3.35B cut, Mistral's "12.9B" 12.88B rounded), and for Mixtral and Qwen3-MoE
    exactly the closed form; printed, and in --json."""
    from launcher.config import compose
    from launcher.launch.plan import Hardware, format_plan, make_plan

    config = AutoConfig.for_model(model_type, **sizes)
    config.save_pretrained(tmp_path)
    cfg = compose(
        ["model=hf", f"model.name_or_path={tmp_path}", "data.max_length=4096", "train.global_batch_size=8",
         "train.micro_batch_size=1"]
    )  # fmt: skip
    plan = make_plan(cfg, Hardware(1, 8, 80.0))
    total, active = plan["model"]["params"], plan["model"]["active_params"]
    assert abs(total - published[0]) < unit and abs(active - published[1]) < unit, (total, active)
    if model_type != "deepseek_v3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        experts = getattr(config, "num_experts", None) or config.num_local_experts
        moe_inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        expected = closed_form(
            config, experts, config.num_experts_per_tok, moe_inter, config.num_key_value_heads, head_dim
        )
        assert (total, active) == expected
    assert f"{active / 1e9:.3f}B active per token" in format_plan(plan)
    assert json.loads(json.dumps(plan))["model"]["active_params"] == active  # what --json prints


def test_plan_active_parameters_of_shared_experts_and_dense_layers():
    """Shared experts and dense first layers count whole; a dense model's active parameters are all of them."""
    for model_type in ("deepseek_v3", "qwen2_moe", "llama4_text"):
        config = tiny_moe_config(model_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
        e, k = 4, config.num_experts_per_tok
        assert active_params(model, total) == total - routed * (e - k) // e, model_type
    dense = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(dense)
    total = sum(p.numel() for p in model.parameters())
    assert active_params(model, total) == total


# ---- 2-rank ZeRO-3 ----


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_dist")
    env = {"HF_MODULES_CACHE": str(out / "hf_modules")}  # the remote-code checkpoint's module, not in $HOME
    proc = torchrun([worker("moe.py"), "all", str(out)], 2, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {**torch.load(out / "results.pt"), "stdout": proc.stdout}


@pytest.mark.slow
def test_zero3_router_aux_loss_equals_the_reference(dist_results):
    """2 ranks x 2 micro-batches of 2 padded rows, every weight partitioned: the logged aux_loss is the
    token-weighted mean of transformers' own loss per micro-batch over its documents run one by one, and the
    gradient norm and each router's gradient equal a single-process reference of the whole objective (token
    losses / targets + coef x aux). Qwen3-MoE (a ZeRO-3 leaf block by DeepSpeed's default) and OLMoE (not), data
    then sequence parallel (the second micro-batch padded by the collator, then by SP)."""
    for case, r in dist_results["aux"].items():
        assert abs(r["got_aux_loss"] - r["ref_aux_loss"]) <= 1e-5 * r["ref_aux_loss"], (case, r)
        assert abs(r["got_loss"] - r["ref_loss"]) <= 1e-5 * r["ref_loss"], (case, r)
        assert abs(r["got_grad_norm"] - r["ref_grad_norm"]) <= 1e-4 * r["ref_grad_norm"], (case, r)
        assert len(r["got_router_grads"]) == len(r["ref_router_grads"]) == 2
        for got, ref in zip(r["got_router_grads"], r["ref_router_grads"], strict=True):
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (case, got, ref)
    assert (
        dist_results["aux"]["qwen3_moe_sp1"]["leaves"] == 2
        and dist_results["aux"]["olmoe_sp1"]["leaves"] == 0
    )


@pytest.mark.slow
def test_zero3_ranks_routed_to_different_experts_train(dist_results):
    """Rank 0's tokens all route to expert 0, rank 1's to experts 1-3: transformers 5's fused experts (one module
    of 3D tensors) train without any leaf module; a trust_remote_code checkpoint whose experts are a ModuleList
    (transformers 4's layout), built as a run builds it, trains with its blocks found and gathered whole."""
    for layout, r in dist_results["routing"].items():
        assert r["experts_by_rank"] == [[0], [1, 2, 3]], (layout, r)
        assert len(r["losses"]) == 2, (layout, r)
    assert dist_results["routing"]["fused"]["leaf_classes"] == []
    assert dist_results["routing"]["remote"]["leaf_classes"] == ["ModuleListMoeBlock"]


@pytest.mark.slow
def test_zero3_moe_export_reloads_with_the_engines_logits(dist_results):
    """Every MoE family: the consolidated ZeRO-3 weights export, reload with from_pretrained in transformers' own
    (fused) layout with the engine's hidden states and logits, and the exported config keeps output_router_logits
    as the checkpoint had it."""
    assert set(dist_results["export"]) == set(TINY_MOE)
    for model_type, r in dist_results["export"].items():
        assert r["export_check_rel"] <= 1e-4, (model_type, r)
        asks = MOE_FAMILIES[model_type].aux_loss is not None
        assert r["output_router_logits"] is asks, (model_type, r)
        assert (r["aux_loss"] is not None) is asks, (model_type, r)


@pytest.mark.slow
def test_train_logs_aux_loss_apart(dist_results):
    """`train(cfg)` on 2 ranks with a Qwen3-MoE whose config sets output_router_logits: the run says what it adds,
    every logged step has `aux_loss` beside `loss` (the language-model loss alone), the packing self-check and
    the export check pass."""
    e2e = dist_results["e2e"]
    assert "router auxiliary loss: 0.001 x load balancing (router_aux_loss_coef)" in dist_results["stdout"]
    assert [x["step"] for x in e2e["logged"]] == [1, 2]
    for x in e2e["logged"]:
        assert 1.5 <= x["aux_loss"] <= 4.0 and x["loss"] > 0, (
            x
        )  # E x sum f P: top-k = 2 balanced, at most E = 4
    assert e2e["results"]["export_check_rel"] <= 1e-4 and e2e["results"]["steps"] == 2


@pytest.mark.slow
def test_zero3_modulelist_experts_without_leaf_modules_do_not_finish(tmp_path):
    """The failure the leaf blocks prevent: the remote-code checkpoint (ModuleList experts), rank 0's tokens on
    expert 0 and rank 1's on experts 1-3, loaded without leaf modules: the ranks gather different experts'
    parameters, so their collectives no longer pair up. gloo notices the sizes differ and aborts in step 0
    (NCCL, which does not check, waits forever); the worker's 30 s collective timeout bounds the case where sizes
    happen to agree."""
    env = {"HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = torchrun([worker("moe.py"), "remote-no-leaf", str(tmp_path)], 2, timeout=240, env=env)
    assert proc.returncode != 0
    assert proc.stdout.count("remote-no-leaf step 0 starts") == 2 and "step 1 starts" not in proc.stdout
    assert "remote-no-leaf finished" not in proc.stdout
    assert "collective mismatch" in proc.stderr or "Timed out" in proc.stderr, proc.stderr[-3000:]
