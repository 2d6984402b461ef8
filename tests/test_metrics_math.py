"""The MFU numerator and denominator: model FLOPs from the real rows, peaks by exact device model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launcher.metrics import peak_tflops, step_flops


@pytest.mark.parametrize("tied", [False, True])
def test_step_flops_counts_matmuls_targets_and_real_document_attention(tied):
    cfg = SimpleNamespace(
        vocab_size=10, hidden_size=4, num_attention_heads=2, num_hidden_layers=3, tie_word_embeddings=tied
    )
    n_params = 1000
    # One row, two documents (3 and 2 tokens); 3 positions have a target.
    row = {"input_ids": [1] * 5, "labels": [-100, 7, 7, -100, 7], "position_ids": [0, 1, 2, 0, 1]}
    head = 10 * 4
    body = n_params - head * (1 if tied else 2)
    attention = 3 * 2 * 2 * ((9 + 4) / 2) * 4 * 3  # causal n^2/2 per document, not (5^2)/2 for the row
    assert step_flops(cfg, n_params, [row]) == 6 * body * 5 + 6 * head * 3 + attention


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),
        ("NVIDIA A10", 125),
        ("NVIDIA A10G", None),  # not listed: no MFU rather than a wrong one
    ],
)
def test_peak_by_exact_device_model(name, tflops):
    assert peak_tflops(name) == tflops
