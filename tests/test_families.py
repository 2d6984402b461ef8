"""The families table (launcher/model/families.py) is what the tests measure on each family's real layer pattern.

Every family's tiny config (tests/helpers.py::FAMILY_CONFIGS) runs every attention backend on packed rows: sdpa,
eager and flex attention as they run on CPU, torch_varlen and flash_attention_2 through transformers' own
integrations with reference kernels in place of the CUDA ones (tests/reference_kernels.py). Packed logits are compared with each
document run alone through transformers' own eager path (input ids only: the model's own causal, sliding-window
and chunked masks). A row's claims must match: an exact backend within 1e-5 (relative to the largest logit, fp32),
a refused one refused by `choose_backend` and the preflight in one line, never picked by `auto`, and shown not
exact (or failing) when forced. The tiled loss and the tiled MLP are compared with their untiled forms the same
way. The 2-rank ZeRO-3 runs of every family (training, export, sequence parallelism) are in test_families_e2e.py.
"""

from __future__ import annotations

import copy
import functools
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.data import collate, pack_examples
from launcher.data.packing import doc_lengths
from launcher.loss import target_token_loss
from launcher.model.attention import choose_backend, register_varlen
from launcher.model.families import (
    BY_NAME,
    CPU_BACKENDS,
    FAMILIES,
    family_of,
    format_table,
)
from launcher.model.load import _prepare, register_backend
from tests.helpers import FAMILY_CONFIGS, PACKED_ROWS, family_config, family_documents, family_reference
from tests.reference_kernels import reference_varlen_attn, use_reference_flash

TOL = 1e-5
BACKENDS = ["sdpa", "eager", "flex_attention", "torch_varlen", "flash_attention_2"]
VARLEN = ("torch_varlen", "flash_attention_2")  # measured with reference kernels; claims are for CUDA
# The families issue #17 lists, by their rows' names (and Qwen2-MoE, whose router the MoE work covers).
ISSUE_FAMILIES = [
    "Llama 3.x",
    "Llama 4 (text)",
    "Qwen2 / Qwen2.5",
    "Qwen2-MoE",
    "Qwen3",
    "Qwen3-MoE",
    "Qwen3.5 (dense, text)",
    "Qwen3.5-MoE (text)",
    "Qwen3-Next",
    "Mistral",
    "Mixtral",
    "Gemma 2",
    "Gemma 3 (text)",
    "Gemma 4 (text)",
    "gpt-oss",
    "DeepSeek-V3",
    "GLM-4",
    "GLM-4-MoE",
    "Phi-3 / Phi-4-mini",
    "Phi-MoE",
    "OLMo-2",
    "OLMo-3",
    "OLMoE",
    "Granite",
    "SmolLM3",
    "LFM2",
    "MiniMax-M2",
    "ERNIE-4.5-MoE",
]
# Claims no CPU test can show, and the GPU test that shows each: gpt-oss's sinks on flex attention need the
# log-sum-exp, which torch returns on CUDA only.
SHOWN_ON_GPU = {("gpt_oss", "flex_attention"): "tests/test_gpu.py::test_sinks_on_flex_attention"}


def row(key: str):
    return family_of(family_config(key))


@functools.cache
def measure(key: str, backend: str) -> tuple[float | None, str | None]:
    """(max |packed - alone| / max |alone|, None) for the backend forced on the family, or (None, the error)."""
    state, ref = family_reference(key)
    config = family_config(key)
    try:
        if backend in VARLEN:  # built eager, then named: loading them asks for CUDA kernels
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            model.config._attn_implementation = backend
        else:
            register_backend(backend)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=backend)
        model = _prepare(model, backend).eval()
        model.load_state_dict(state)
        with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            logits = model(**collate(PACKED_ROWS, backend)).logits
        if backend in VARLEN:  # rows laid end to end in one [1, N] row
            packed = logits[0]
        else:
            packed = torch.cat([logits[i, : len(r["input_ids"])] for i, r in enumerate(PACKED_ROWS)])
    except Exception as e:  # what the forced backend does on this family is the finding
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return ((packed - ref).abs().max() / ref.abs().max()).item(), None


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen_attn)
    use_reference_flash(monkeypatch.setattr)
    register_varlen()


def exact(result: tuple[float | None, str | None]) -> bool:
    rel, _ = result
    return rel is not None and rel <= TOL


def device_of(backend: str) -> str:
    return "cuda" if backend in VARLEN else "cpu"


# ---- the table covers the issue's families, one tiny config per row ----


def test_every_family_has_a_row_and_a_tiny_config():
    assert sorted(ISSUE_FAMILIES) == sorted(f.name for f in FAMILIES)
    rows = {key: row(key) for key in FAMILY_CONFIGS}
    assert all(rows.values()), {k for k, v in rows.items() if v is None}
    assert sorted(f.name for f in rows.values()) == sorted(f.name for f in FAMILIES), (
        "one tiny config per row"
    )


# ---- each backend's claim, on each family ----

CASES = [(k, b) for k in FAMILY_CONFIGS for b in BACKENDS]


@pytest.mark.parametrize("key,backend", CASES, ids=[f"{k}-{b}" for k, b in CASES])
def test_backend_claim_is_what_packing_measures(key, backend):
    family, device = row(key), device_of(backend)
    result = measure(key, backend)
    why = family.refusal(backend, device) or (family.packing if family.packing else None)
    if why is None:
        assert exact(result), f"{family.name} claims {backend} exact on {device}; measured {result}"
        return
    # Refused: forcing it shows why (not exact, or it fails), unless only a GPU test can show it.
    assert not exact(result), f"{family.name} refuses {backend} ({why}) but it is exact: update the row"
    if family.refusal(backend, device):  # (a packing refusal is the preflight's, on data.pack)
        assert_refused(key, backend, device)


def assert_refused(key: str, backend: str, device: str) -> None:
    """`choose_backend` refuses the named backend in one line naming the family; `auto` never picks it."""
    family, config = row(key), family_config(key)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for training in (True, False):  # training on CPU refuses flex attention first for the device's sake
        with pytest.raises(ValueError) as e:
            choose_backend(backend, torch.device(device), config, dtype, training)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"model.attention={backend} is refused: ")
        assert choose_backend("auto", torch.device(device), config, dtype, training)[0] != backend
    assert family.name in message and family.refusal(backend, device) in message, message


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_gpu_only_claims_have_a_gpu_test(key):
    """What the CPU cannot run (sinks on flex attention) is claimed on CUDA only with a GPU test behind it."""
    family = row(key)
    for backend in CPU_BACKENDS:
        cpu, gpu = family.refusal(backend, "cpu"), family.refusal(backend, "cuda")
        if cpu and not gpu:
            test = SHOWN_ON_GPU.get((key, backend))
            assert test, f"{family.name}: {backend} claimed on CUDA only, with no GPU test"
            path, name = test.split("::")
            assert f"def {name}(" in (Path(__file__).parent.parent / path).read_text()


# ---- auto ----


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_auto_picks_an_exact_backend_on_cpu_and_gpu(key, monkeypatch):
    import launcher.model.attention as attention

    family, config = row(key), family_config(key)
    picks = {"cpu": choose_backend("auto", torch.device("cpu"), config, torch.float32)[0]}
    # sft check (forward only) decides as sft launch and the ranks do.
    assert (
        choose_backend("auto", torch.device("cpu"), config, torch.float32, training=False)[0] == picks["cpu"]
    )
    # On CUDA (the decision only: a device object, no kernel runs), with flash-attn and without.
    for flash in (True, False):
        monkeypatch.setattr(attention, "_flash_attn_importable", lambda name, flash=flash: flash)
        picks[f"cuda/flash={flash}"] = choose_backend("auto", torch.device("cuda"), config, torch.bfloat16)[0]
    for where, backend in picks.items():
        assert not family.refusal(backend, where.split("/")[0]), (where, backend)
        if (key, backend) in SHOWN_ON_GPU and where.startswith("cuda"):
            continue
        if not family.packing:
            assert exact(measure(key, backend)), (family.name, where, backend, measure(key, backend))


def test_flex_attention_cannot_train_on_cpu_and_is_refused_there():
    """The device rule behind refusing flex attention for training on CPU: torch has no backward for it there."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q)
    with pytest.raises(ValueError, match="no backward on CPU"):
        choose_backend("flex_attention", torch.device("cpu"), family_config("llama3"), torch.float32)
    assert choose_backend("flex_attention", torch.device("cpu"), family_config("llama3"), training=False)[0]


@pytest.mark.slow  # tries to compile the flex kernel first
def test_flex_attention_on_cpu_runs_uncompiled_when_its_kernel_does_not_build(monkeypatch):
    """torch 2.13's CPU inductor cannot build the kernel for a sliding-window BlockMask under dynamic shapes (a
    second shape): the forward falls back to flex attention uncompiled, with the same logits as eager."""
    import launcher.model.attention as attention

    torch._dynamo.reset()  # earlier tests' compiled kernels (and recompile counts) would hide the failure
    monkeypatch.setattr(attention, "_FLEX_UNCOMPILED", False)

    torch.manual_seed(0)
    register_backend("flex_attention")
    flex = AutoModelForCausalLM.from_config(family_config("mistral"), attn_implementation="flex_attention")
    eager = AutoModelForCausalLM.from_config(family_config("mistral"), attn_implementation="eager")
    flex, eager = _prepare(flex, "flex_attention"), _prepare(eager, "eager")
    eager.load_state_dict(flex.state_dict())
    for length in (24, 31, 40):  # new shapes: dynamic-shape compiles
        rows = pack_examples(family_documents(length), max_length=length)
        with torch.no_grad():
            got = flex(**collate(rows, "flex_attention")).logits
            ref = eager(**collate(rows, "eager")).logits
        assert (got - ref).abs().max() <= TOL * ref.abs().max()
    assert attention._FLEX_UNCOMPILED, "the kernel built: the fallback was not exercised"


# ---- tiled loss, tiled MLP, MoE ----


def losses_and_grads(model, fn, batch) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)  # routers with jitter noise (Phi-MoE) draw the same noise in each run
    model.zero_grad()
    s, n = fn(model, batch)
    (s / n).backward()
    return s.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def same(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor]) -> bool:
    return abs(a[0] - b[0]) <= 1e-6 * abs(b[0]) and (a[1] - b[1]).abs().max() <= TOL * b[1].abs().max()


@functools.cache
def trainable(key: str):
    torch.manual_seed(0)
    return _prepare(
        AutoModelForCausalLM.from_config(family_config(key), attn_implementation="eager"), "eager"
    )


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_tiled_loss_claim(key):
    from launcher.long_context.tiled_loss import tiled_target_token_loss, use_tiled_loss

    model, batch = trainable(key), collate(PACKED_ROWS, "eager")
    untiled = losses_and_grads(model, target_token_loss, batch)
    tiled = losses_and_grads(model, lambda m, b: tiled_target_token_loss(m, b, n_tiles=3), batch)
    why = row(key).tiled_loss
    if why is None:
        assert same(tiled, untiled), (key, tiled[0], untiled[0])
    else:
        assert not same(tiled, untiled), f"{row(key).name} refuses the tiled loss ({why}) but it is exact"
        with pytest.raises(ValueError, match=re.escape(why)):
            use_tiled_loss("true", model.config)


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_tiled_mlp_claim(key):
    from launcher.long_context.tiled_mlp import MLP_NAMES, install_tiled_mlp, is_moe_block

    model, batch = trainable(key), collate(PACKED_ROWS, "eager")
    why = row(key).tiled_mlp
    tiled = copy.deepcopy(model)
    if why is None:
        assert install_tiled_mlp(tiled, n_tiles=3) >= 1
        assert same(
            losses_and_grads(tiled, target_token_loss, batch),
            losses_and_grads(model, target_token_loss, batch),
        )
        return
    with pytest.raises(ValueError, match=re.escape(why)):
        install_tiled_mlp(tiled, n_tiles=3)
    blocks = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in MLP_NAMES]
    assert blocks and all(is_moe_block(m) for m in blocks), "refused, yet the model has a dense MLP to tile"


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_moe_claim(key):
    from launcher.long_context.tiled_mlp import is_moe_block

    family, model = row(key), trainable(key)
    blocks = {type(m).__name__ for m in model.modules() if is_moe_block(m) and hasattr(m, "experts")}
    assert (family.moe is not None) == bool(blocks), family.name
    if family.moe is not None:
        assert blocks == {family.moe.block}, (family.name, blocks)
        for key_name in (family.moe.coef_key, family.moe.z_loss_coef_key):
            assert key_name is None or hasattr(model.config, key_name), (family.name, key_name)


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_recurrent_layers_are_made_document_aware(key):
    """A row with linear-attention or convolution layers packs exactly because launcher/model/linear_attention.py
    knows its mixer classes (and refuses SP for them); no row has a stateful mixer that module does not know."""
    from launcher.model.families import LINEAR_SP
    from launcher.model.linear_attention import mixers, recurrent_layer_types, unhandled_mixers

    family, model = row(key), trainable(key)
    recurrent = bool(recurrent_layer_types(model.config))
    assert recurrent == (family.sequence_parallel == LINEAR_SP), family.name
    assert bool(mixers(model)) == recurrent and unhandled_mixers(model) == [], family.name


# ---- refusals before any rank starts ----


def saved(tmp_path: Path, key: str, **overrides) -> Path:
    """A config-only checkpoint dir: what the preflight reads."""
    path = tmp_path / key
    family_config(key, **overrides).save_pretrained(path)
    return path


def preflight_line(path: Path, *extra: str) -> str | None:
    from launcher.config import compose
    from launcher.errors import UserError
    from launcher.launch.preflight import check_model_config

    cfg = compose(["model=hf", f"model.name_or_path={path}", *extra])
    try:
        check_model_config(cfg, "cpu")
    except UserError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


@pytest.mark.parametrize(
    "key,backend", [("gemma2", "sdpa"), ("gpt_oss", "sdpa"), ("olmoe", "flex_attention")]
)
def test_the_preflight_refuses_a_named_backend_the_row_refuses(tmp_path, key, backend):
    """`sft launch` runs this before any rank starts: one line, and what `auto` would pick instead."""
    path, family = saved(tmp_path, key), row(key)
    assert family.refusal(backend, "cpu")
    line = preflight_line(path, f"model.attention={backend}")
    assert line and line.startswith(f"model.attention={backend} is refused") and "auto picks" in line, line
    if backend != "flex_attention":  # on CPU, flex attention is refused for the device first
        assert family.name in line, line
    assert preflight_line(path, "model.attention=auto") is None


def test_a_family_that_cannot_be_packed_is_refused_with_data_pack_false(tmp_path, monkeypatch):
    """No row refuses packing today (linear attention restarts per document); a row that did is refused by the
    preflight unless data.pack=false (shown on LFM2's row with a packing refusal put in)."""
    import dataclasses

    from launcher.model import families

    key = "lfm2"
    monkeypatch.setitem(
        families.BY_MODEL_TYPE, key, dataclasses.replace(row(key), packing="a test's refusal")
    )
    path = saved(tmp_path, key)
    line = preflight_line(path)
    assert line and "data.pack=false" in line and row(key).name in line and "a test's refusal" in line, line
    assert preflight_line(path, "data.pack=false") is None


def test_llama4_rows_must_stay_below_floor_scale(tmp_path):
    """Llama 4's temperature tuning counts positions in the row: past floor_scale, packing is not exact (shown
    with a floor of 8 under 24-token rows), and the preflight refuses data.max_length >= floor_scale."""
    key = "llama4_text"
    torch.manual_seed(0)
    config = family_config(
        key, floor_scale=8, attn_scale=1.0
    )  # a temperature large enough to see on a tiny model
    model = _prepare(AutoModelForCausalLM.from_config(config, attn_implementation="eager"), "eager").eval()
    with torch.no_grad():
        packed = model(**collate(PACKED_ROWS, "eager")).logits
        r, start = PACKED_ROWS[0], doc_lengths(PACKED_ROWS[0]["position_ids"])[0]
        n = doc_lengths(r["position_ids"])[1]
        alone = model(input_ids=torch.tensor([r["input_ids"][start : start + n]])).logits[0]
    assert (packed[0, start : start + n] - alone).abs().max() > 10 * TOL * alone.abs().max()
    path = saved(tmp_path, key)
    line = preflight_line(path, "data.max_length=512")  # the tiny config's floor_scale is 512
    assert line and "floor_scale=512" in line and "data.max_length < 512" in line, line
    assert preflight_line(path, "data.max_length=511") is None


def test_tiled_loss_and_mlp_refusals_come_before_any_rank(tmp_path):
    assert "soft-caps its logits" in preflight_line(saved(tmp_path, "gemma2"), "train.tiled_loss=true")
    assert "mixture of experts" in preflight_line(saved(tmp_path, "mixtral"), "train.tiled_mlp=true")
    assert (
        preflight_line(saved(tmp_path, "deepseek_v3"), "train.tiled_mlp=true", "train.tiled_loss=true")
        is None
    )


# ---- the table, printed and in the README ----


def test_sft_models_prints_the_table():
    from launcher.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["models"]) == 0
    assert out.getvalue().strip() == format_table()
    for family in FAMILIES:
        assert f"| {family.name} |" in out.getvalue()


def test_the_readme_table_is_the_generated_one():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    begin, end = (
        "<!-- families table: generated by `sft models`; do not edit -->",
        "<!-- end of families table -->",
    )
    assert begin in readme and end in readme, "the README has no generated families table"
    table = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert table == format_table(), "README's families table differs from `sft models`: paste its output"


def test_rows_by_name():
    assert BY_NAME["Gemma 2"].refusal("sdpa", "cpu") and not BY_NAME["Llama 3.x"].refusal("sdpa", "cpu")


# ---- a model type not in the table ----


@pytest.mark.parametrize("key,layer", [("qwen3_next", "Qwen3NextGatedDeltaNet"), ("lfm2", "Lfm2ShortConv")])
def test_the_self_check_names_the_layer_that_cannot_be_packed(key, layer, monkeypatch):
    """What a run of an architecture no row vouches for says when packing leaks: one line, the layer, the way out.
    Shown on Qwen3-Next's and LFM2's layers left as transformers has them (state carried across documents), as
    remote code with such layers would be."""
    import launcher.model.load as load
    from launcher.evaluate import check_packing

    monkeypatch.setattr(load, "install_document_reset", lambda model: None)
    torch.manual_seed(0)
    model = _prepare(AutoModelForCausalLM.from_config(family_config(key), attn_implementation="sdpa"), "sdpa")
    with pytest.raises(ValueError) as e:
        check_packing(model, PACKED_ROWS, "sdpa", torch.device("cpu"), tol=1e-5)
    message = str(e.value)
    assert (
        "\n" not in message and f"in {layer} (model.layers.0." in message and "set data.pack=false" in message
    )


def test_code_shipped_with_a_checkpoint_is_vouched_for_by_no_row():
    from launcher.model.families import registered_family

    config = family_config("llama3")
    assert (
        registered_family(config, trust_remote_code=True) is not None
    )  # no auto_map: transformers' own code
    config.auto_map = {"AutoModelForCausalLM": "remote_model.RemoteForCausalLM"}
    assert registered_family(config, trust_remote_code=True) is None
