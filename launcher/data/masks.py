"""Document masks of packed rows, built from position resets: what keeps packed documents apart on every backend.

    mask = block_causal_float_mask(position_ids)          # sdpa, eager: [B, 1, T, T] additive (0 / -inf)
    mask = document_block_mask(position_ids)              # flex_attention: a BlockMask
    cu, longest = cu_seq_lens(position_ids)               # varlen kernels: boundaries of the flattened batch
    mask = with_window(mask, 4096)                        # a sliding-window layer's version of either mask

A new document starts wherever the position resets to 0. Pure torch, no model and no distributed state: the
collator, the model's packing hook and sequence parallelism all build their masks here.
"""

from __future__ import annotations

from typing import Any

import torch

# What a batch carries for each attention backend (the collator builds it, the model's backend reads it).
VARLEN_BACKENDS = (
    "torch_varlen",
    "flash_attention_2",
    "flash_attention_3",
)  # cu_seq_lens over a [1, N] batch
MASK_BACKENDS = ("sdpa", "eager")  # a float block-diagonal causal mask
ALL_BACKENDS = (*VARLEN_BACKENDS, *MASK_BACKENDS, "flex_attention")  # flex: a document BlockMask


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Number the documents of each row: a new document starts wherever the position resets to 0."""
    starts = (position_ids == 0).to(torch.int32)
    starts[:, 0] = 1
    return starts.cumsum(-1)


def block_causal_float_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, T, T] additive mask: 0 where query may attend key (same document, key not after query)."""
    doc = document_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def document_block_mask(position_ids: torch.Tensor) -> Any:
    """A flex-attention BlockMask that is causal within each document and blocks every other pair."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(position_ids)
    b, t = doc.shape

    def mask_mod(bi, h, q, k):
        return (doc[bi, q] == doc[bi, k]) & (q >= k)

    return create_block_mask(mask_mod, b, None, t, t, device=position_ids.device)


def cu_seq_lens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document boundaries over a flattened [1, N] batch, and the longest document."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def with_window(mask: Any, window: int) -> Any:
    """`mask` (a float [B, 1, T, T] mask or a flex BlockMask) restricted to a sliding window: a query attends only
    keys fewer than `window` positions back (transformers' convention for `sliding_window`)."""
    if type(mask).__name__ == "BlockMask":
        from torch.nn.attention.flex_attention import and_masks, create_block_mask

        def in_window(b, h, q, k):
            return q - k < window

        b, _, t, _ = mask.shape
        return create_block_mask(
            and_masks(mask.mask_mod, in_window), b, None, t, t, device=mask.kv_num_blocks.device
        )
    t = mask.shape[-1]
    idx = torch.arange(t, device=mask.device)
    far = (idx[:, None] - idx[None, :]) >= window
    return mask.masked_fill(far, torch.finfo(mask.dtype).min)
