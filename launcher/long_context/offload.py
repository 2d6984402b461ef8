"""Activation-checkpoint offload: each checkpointed decoder layer's input waits for backward in host memory.

    offload = enable_checkpointing(model, offload=cfg.model.checkpoint_offload)   # before the engine wraps it

With gradient checkpointing a layer keeps only its input ([B, T/S, hidden]) between forward and backward and
recomputes the rest; at long context those inputs, one per layer, are the largest activations left on the
accelerator. With `model.checkpoint_offload=true` every checkpointed layer runs its checkpoint inside a
`saved_tensors_hooks` context whose pack hook copies the input to host memory (pinned, asynchronously, on
CUDA) and whose unpack hook copies it back when backward recomputes the layer.

Why non-reentrant checkpointing, not reentrant: torch (read and tested on 2.13) saves a non-reentrant
checkpoint's tensor inputs as saved variables (`_CheckpointFrame.save_inputs`) before it installs its own
hooks, so the innermost hooks around the call, ours, pack them (they are not held in a closure); the layer's
own activations inside the region go through the checkpoint's hooks and are recomputed as before. Keeping
non-reentrant checkpointing keeps everything it already handles (inputs that do not require grad, keyword
arguments such as the rotary embeddings, ZeRO-3's parameter hooks, the SP all-to-alls in the recompute), and
the same numbers bit for bit. `tests/test_offload.py` shows the pack hook gets exactly the layer inputs and
that the originals are freed. (transformers 5.23's `activation_checkpointing_enable(offload=True)` wraps the
same call in torch's `save_on_cpu`; this module adds what it lacks: counters that make the offload visible,
on CPU too, and weights never packed.)

On a CPU-only machine the inputs already live in host memory: nothing is copied, but every tensor that would
be is counted the same way, so the mechanism stays observable (and tested) there.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

GB = 2**30


class _Held:
    """A packed layer input: the host tensor and the device it returns to."""

    __slots__ = ("tensor", "device", "__weakref__")

    def __init__(self, tensor: torch.Tensor, device: torch.device):
        self.tensor, self.device = tensor, device


class CheckpointOffload:
    """The pack/unpack hooks and what went through them.

    Counters (since the last `take()`): `tensors` and `bytes` handed to host memory, their `shapes`, and
    `peak_bytes`, the most held in host memory at once (one micro-batch's layer inputs). `copy=None` copies
    accelerator tensors only; `copy=True` copies host tensors too (so a CPU test can see the originals freed).
    """

    def __init__(self, copy: bool | None = None):
        self.copy = copy
        self.layers = 0
        self._lock = threading.RLock()  # frees may run on autograd's threads, or in a GC pass inside pack
        self.held = 0  # bytes in host memory now
        self.tensors, self.bytes, self.peak_bytes, self.shapes = 0, 0, 0, Counter()

    def take(self) -> dict[str, Any]:
        """The counters so far, then reset them (the peak restarts from what is held now)."""
        with self._lock:
            out = {"tensors": self.tensors, "bytes": self.bytes, "peak_bytes": self.peak_bytes}
            out["shapes"] = dict(self.shapes)
            self.tensors, self.bytes, self.peak_bytes, self.shapes = 0, 0, self.held, Counter()
        return out

    def pack(self, t: torch.Tensor) -> Any:
        # Weights stay where they are (ZeRO-3 partitions carry a ds_id); non-reentrant checkpointing does not
        # save them as inputs, but a model that passes one positionally must not have it copied every step.
        if isinstance(t, torch.nn.Parameter) or hasattr(t, "ds_id"):
            return t
        n = t.numel() * t.element_size()
        on_device = t.device.type != "cpu"
        if on_device or self.copy:
            # Pinned memory lets the copy run asynchronously; the copy back is queued on the same stream, so
            # it cannot overtake it, and the caching allocator keeps the source until the copy has run.
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            host.copy_(t, non_blocking=on_device)
        else:
            host = t  # already in host memory: nothing to copy
        held = _Held(host, t.device)
        with self._lock:
            self.tensors += 1
            self.bytes += n
            self.shapes[tuple(t.shape)] += 1
            self.held += n
            self.peak_bytes = max(self.peak_bytes, self.held)
        weakref.finalize(held, self._release, n)  # autograd drops it after backward (or with the graph)
        return held

    def _release(self, n: int) -> None:
        with self._lock:
            self.held -= n

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        if isinstance(held, torch.Tensor):
            return held
        return held.tensor.to(held.device, non_blocking=True)

    def checkpoint(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """What transformers calls as each layer's `_gradient_checkpointing_func`."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    def describe(self, device: torch.device) -> str:
        """The start-up line: what is offloaded, and whether anything is copied on this device."""
        where = (
            "copied to pinned host memory in forward and back in backward"
            if device.type == "cuda"
            else f"already in host memory on {device.type}: counted, nothing copied"
        )
        return f"checkpoint offload: {self.layers} layer inputs per micro-batch kept in host memory ({where})"

    def metrics(self) -> dict[str, float]:
        """For the step's log line: host GiB held at most at once since the last call, and tensors per step."""
        got = self.take()
        return {"ckpt_offload_gb": got["peak_bytes"] / GB, "ckpt_offload_tensors": got["tensors"]}


def enable_checkpointing(model: torch.nn.Module, offload: bool = False) -> CheckpointOffload | None:
    """Gradient checkpointing on every decoder layer (non-reentrant), and with `offload` their inputs kept in
    host memory between forward and backward; returns the offload (its counters), or None without it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not offload:
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    hooks = CheckpointOffload()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = hooks.checkpoint
            hooks.layers += 1
    if not hooks.layers:
        raise ValueError("model.checkpoint_offload=true: this model has no checkpointed decoder layers")
    return hooks
