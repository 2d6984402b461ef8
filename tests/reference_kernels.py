"""Reference kernels for CUDA-only attention kernels, so our side of them is tested on CPU."""

from __future__ import annotations

import torch


def reference_varlen_attn(
    q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False, softcap=0.0
):
    """PyTorch's `varlen_attn` contract, computed per document with plain math (the kernel itself is CUDA-only).

    q/k/v are [N, H, D] over documents laid end to end at `cu_q`; window_size=(left, right) as documented:
    (-1, 0) is causal, (W, 0) is causal with each query seeing itself and the W keys before it. `softcap` is
    flash-attn's (scores -> softcap * tanh(scores / softcap)); PyTorch's kernel has none.
    """
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert q.dtype == k.dtype == v.dtype, "the kernel takes one dtype for q, k and v"
    if k.shape[1] != q.shape[1]:
        assert enable_gqa, "GQA inputs without enable_gqa=True"
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    left, right = window_size
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_q == max_k
    for a, b in zip(bounds, bounds[1:]):
        i = torch.arange(b - a)
        allowed = torch.ones(b - a, b - a, dtype=torch.bool)
        if right >= 0:
            allowed &= i[None, :] <= i[:, None] + right
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * (scale or q.shape[-1] ** -0.5)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[a:b] = torch.einsum("hqk,khd->qhd", probs, v[a:b])
    return out


def reference_flash_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    deterministic=False,
):
    """flash-attn's `flash_attn_varlen_func` contract (the argument names transformers' flash integration passes),
    computed by `reference_varlen_attn`: so transformers' own flash path runs on CPU, with a plain-math kernel."""
    assert dropout_p == 0.0, "not applied by the reference"
    left, right = window_size
    if causal:
        right = 0
    max_q = int(max_seqlen_q)
    assert max_q == int(max_seqlen_k)
    return reference_varlen_attn(
        q,
        k,
        v,
        cu_seqlens_q.to(torch.int32),
        cu_seqlens_k.to(torch.int32),
        max_q,
        max_q,
        scale=softmax_scale,
        window_size=(left, right),
        enable_gqa=k.shape[1] != q.shape[1],
        softcap=softcap,
    )


def use_reference_flash(setattr=setattr) -> None:
    """Route transformers' `flash_attention_2` (its real integration: kwargs, layout, windows, cu_seq_lens) to
    `reference_flash_varlen`: flash-attn itself is CUDA-only. `setattr`: pytest's monkeypatch.setattr in tests."""
    from transformers import modeling_flash_attention_utils as fa

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        assert implementation == "flash_attention_2", implementation  # what the model's config must name
        return None, reference_flash_varlen, None, fa._pad_input, fa._unpad_input

    setattr(fa, "_lazy_imports", lazy_imports)
    setattr(fa, "_loaded_implementation", None)
