"""Activation-checkpoint offload on a real (tiny) Llama: the same loss and gradients as plain checkpointing, the
pack hook sees exactly the layer inputs, and the originals are released once packed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from omegaconf import OmegaConf

from launcher.data import collate, pack_examples
from launcher.long_context.offload import CheckpointOffload, enable_checkpointing
from launcher.long_context.tiled_mlp import install_tiled_mlp
from launcher.loss import target_token_loss
from launcher.model import build_model

LAYERS, HIDDEN = 3, 32


def tiny_llama(tiled_mlp: bool, hidden: int = HIDDEN) -> torch.nn.Module:
    model_cfg = OmegaConf.create(
        {
            "name_or_path": None,
            "trust_remote_code": False,
            "init": {
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": 64,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        }
    )
    torch.manual_seed(0)
    model = build_model(model_cfg, 61, "sdpa", torch.float32)
    if tiled_mlp:
        install_tiled_mlp(model, n_tiles=3)
    return model.train()


def packed_batch(scale: int = 1, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    docs = [{"input_ids": torch.randint(1, 61, (n * scale,), generator=g).tolist()} for n in (7, 5, 9, 11)]
    for d in docs:
        d["labels"] = [-100, *d["input_ids"][1:]]
    batch = collate(pack_examples(docs, max_length=16 * scale), "sdpa")  # 2 rows of 16 x scale tokens
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run(
    offload: bool, tiled_mlp: bool = False, copy: bool | None = None, device: str = "cpu", scale: int = 1
) -> dict:
    """One forward and backward: loss, gradients, the offload's counters after forward and after backward, how
    many layer inputs were still alive after forward, and on a GPU the memory forward left allocated."""
    model = tiny_llama(tiled_mlp, HIDDEN * scale).to(device)
    hooks = enable_checkpointing(model, offload)
    if hooks is not None:
        hooks.copy = copy
    inputs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
    cuda = device == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    loss_sum, n = target_token_loss(model, packed_batch(scale, device))
    gc.collect()
    out = {"alive": sum(r() is not None for r in inputs), "loss": loss_sum.detach()}
    out["forward_allocated"] = torch.cuda.memory_allocated() - before if cuda else None
    out["forward"] = hooks.take() if hooks else None
    (loss_sum / n).backward()
    out["grads"] = torch.cat([p.grad.flatten() for p in model.parameters()])
    if hooks:
        assert hooks.held == 0  # backward freed the graph, and with it every packed input
        out["backward"] = hooks.take()
    return out


@pytest.mark.parametrize("tiled_mlp", [False, True], ids=["mlp", "tiled_mlp"])
def test_offload_same_loss_and_grads_and_only_layer_inputs_packed(tiled_mlp):
    plain, off = run(False, tiled_mlp), run(True, tiled_mlp)
    torch.testing.assert_close(off["loss"], plain["loss"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(off["grads"], plain["grads"], atol=1e-6, rtol=1e-5)
    assert plain["grads"].abs().max() > 1e-4
    # The pack hook saw each layer's input [B, T, hidden] once, and nothing else (no weight, no activation
    # inside a layer: those go through the checkpoint's own hooks and are recomputed).
    fwd = off["forward"]
    assert fwd["shapes"] == {(2, 16, HIDDEN): LAYERS}, fwd
    assert fwd["tensors"] == LAYERS and fwd["bytes"] == LAYERS * 2 * 16 * HIDDEN * 4
    assert fwd["peak_bytes"] == fwd["bytes"]  # all of them at once, between forward and backward
    assert off["backward"]["tensors"] == 0  # the recompute packs nothing


def test_offloaded_layer_inputs_leave_the_graph():
    """Copied to another buffer (as on a GPU), the layer inputs are freed after forward: nothing else (no
    closure, no second reference) keeps the originals; with plain checkpointing all of them stay alive."""
    plain, off = run(False), run(True, copy=True)
    assert plain["alive"] == LAYERS and off["alive"] == 0, (plain["alive"], off["alive"])
    assert off["forward"]["tensors"] == LAYERS
    torch.testing.assert_close(off["grads"], plain["grads"], atol=1e-6, rtol=1e-5)


def test_offload_skips_weights_and_releases_host_memory():
    hooks = CheckpointOffload(copy=True)
    weight = torch.nn.Parameter(torch.ones(4, 4))
    assert hooks.pack(weight) is weight  # weights stay where they are, uncounted
    x = torch.arange(6.0).reshape(2, 3)
    held = hooks.pack(x)
    assert held.tensor is not x and torch.equal(hooks.unpack(held), x)
    assert hooks.take() == {"tensors": 1, "bytes": 24, "peak_bytes": 24, "shapes": {(2, 3): 1}}
    del held
    gc.collect()
    assert hooks.held == 0  # released: nothing held in host memory any more


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_the_gpu_frees_the_layer_inputs_there():
    """On CUDA the inputs are copied to pinned host memory and back: same gradients, the originals freed, and
    the memory forward leaves allocated lower by at least the layer inputs' bytes."""
    scale = 8  # 2 rows of 128 tokens, hidden 256: 256 KiB per layer input in fp32
    plain, off = run(False, device="cuda", scale=scale), run(True, device="cuda", scale=scale)
    torch.testing.assert_close(off["grads"], plain["grads"], atol=1e-6, rtol=1e-5)
    assert plain["alive"] == LAYERS and off["alive"] == 0, (plain["alive"], off["alive"])
    inputs = LAYERS * 2 * 16 * scale * HIDDEN * scale * 4
    assert off["forward"]["bytes"] == inputs
    saved = plain["forward_allocated"] - off["forward_allocated"]
    assert saved >= inputs, (plain["forward_allocated"], off["forward_allocated"], inputs)
