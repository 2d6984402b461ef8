"""Reference kernels for CUDA-only attention kernels, so our side of them is tested on CPU."""

from __future__ import annotations

import torch


def reference_varlen_attn(
    q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """PyTorch's `varlen_attn` contract, computed per document with plain math (the kernel itself is CUDA-only).

    q/k/v are [N, H, D] over documents laid end to end at `cu_q`; window_size=(left, right) as documented:
    (-1, 0) is causal, (W, 0) is causal with each query seeing itself and the W keys before it.
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
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[a:b] = torch.einsum("hqk,khd->qhd", probs, v[a:b])
    return out
