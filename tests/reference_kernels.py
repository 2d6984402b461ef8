"""Reference kernels for CUDA-only attention kernels, so our side of them is tested on CPU."""

from __future__ import annotations

import collections
import inspect

import torch
import torch.nn.functional as F


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


def reference_causal_conv1d(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
):
    """causal-conv1d's `causal_conv1d_fn` contract (x [B, C, T], weight [C, K], `seq_idx` [B, T] int32 only in the
    channel-last layout), computed with F.conv1d over each run of equal `seq_idx`: no output sees another
    document's inputs."""
    assert activation in (None, "silu", "swish")
    assert initial_states is None and not return_final_states and final_states_out is None
    b, c, t = x.shape
    assert weight.ndim == 2 and weight.shape[0] == c
    if seq_idx is not None:
        reference_causal_conv1d.calls["seq_idx"] += 1
        assert x.stride(1) == 1, "seq_idx is only supported for channel last layout"
        assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous() and tuple(seq_idx.shape) == (b, t)
    ids = seq_idx.tolist() if seq_idx is not None else [[0] * t] * b
    k, rows = weight.shape[1], []
    for i in range(b):
        starts = [j for j in range(t) if j == 0 or ids[i][j] != ids[i][j - 1]] + [t]
        rows.append(
            torch.cat(
                [
                    F.conv1d(x[i : i + 1, :, a:e], weight[:, None], bias, padding=k - 1, groups=c)[
                        ..., : e - a
                    ]
                    for a, e in zip(starts, starts[1:])
                ],
                dim=-1,
            )
        )
    out = torch.cat(rows)
    return F.silu(out) if activation else out


reference_causal_conv1d.calls = collections.Counter()


def _torch_delta_rule():
    """transformers' own torch gated delta rule, under any wrappers installed around it."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    return inspect.unwrap(modeling_qwen3_5.torch_chunk_gated_delta_rule)


_TORCH_DELTA_RULE = _torch_delta_rule()


def reference_chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
):
    """flash-linear-attention's `chunk_gated_delta_rule` contract (q/k [B, T, H, K], v [B, T, HV, V], g/beta
    [B, T, HV]; with `cu_seqlens`, document boundaries (int64 as documented; transformers' own varlen
    batches pass int32), the batch must be one row), computed with
    transformers' torch recurrence on each document alone."""
    assert scale is None and initial_state is None and not output_final_state
    assert g.shape == beta.shape == v.shape[:3] and q.shape[:2] == v.shape[:2]
    if cu_seqlens is None:
        return _TORCH_DELTA_RULE(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    reference_chunk_gated_delta_rule.calls["cu_seqlens"] += 1
    assert q.shape[0] == 1, "The batch size is expected to be 1 rather than B when using `cu_seqlens`"
    bounds = cu_seqlens.tolist()
    assert cu_seqlens.dtype in (torch.int32, torch.long) and bounds[0] == 0 and bounds[-1] == q.shape[1]
    outs = [
        _TORCH_DELTA_RULE(
            q[:, a:e],
            k[:, a:e],
            v[:, a:e],
            g=g[:, a:e],
            beta=beta[:, a:e],
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )[0]
        for a, e in zip(bounds, bounds[1:])
    ]
    return torch.cat(outs, dim=1), None


reference_chunk_gated_delta_rule.calls = collections.Counter()
