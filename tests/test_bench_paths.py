"""Every benchmarked path computes the same function (timings themselves live in the benchmark)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import repavit
from repavit.bench.reference import with_masked_ffn, with_three_linear_ffn

from helpers import randomize_bn, randomize_params, rel_err


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("RePaViT_Tiny", img_size=32, depth=3, heuristic="linear", num_classes=10)
    return randomize_params(randomize_bn(model), std=0.02)


def test_three_linear_reference_equals_fused(tiny):
    x = torch.randn(2, 3, 32, 32)
    fused = repavit.reparameterize_model(tiny)
    ref = with_three_linear_ffn(fused)
    with torch.no_grad():
        assert rel_err(ref(x), fused(x)) <= 1e-5


def test_masked_training_reference_has_same_outputs_and_gradients(tiny):
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ours = copy.deepcopy(tiny).double().train()
    ref = with_masked_ffn(ours).train()
    ya, yb = ours(x), ref(x)
    assert rel_err(ya, yb) <= 1e-12
    ya.square().sum().backward()
    yb.square().sum().backward()
    ga = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ga[name.replace(".m.", ".")].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
