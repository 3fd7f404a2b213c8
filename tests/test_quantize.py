"""int8 dynamic quantization of reparameterized models."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import repavit
from repavit.layers import FusedIdleMlp
from repavit.quantize import quantize_int8

from helpers import randomize_bn, rel_err


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("RePaViT_Tiny", img_size=32, depth=4, num_classes=10)).eval()
    return repavit.reparameterize_model(model)


def test_separate_identity_is_the_same_function(fused):
    x = torch.randn(4, 3, 32, 32)
    sep = repavit.reparameterize_model(fused)  # a copy
    for m in sep.modules():
        if isinstance(m, FusedIdleMlp):
            m.separate_identity()
            m.separate_identity()  # idempotent
    with torch.no_grad():
        assert rel_err(sep(x), fused(x)) <= 1e-5


def test_int8_close_and_identity_separation_helps(fused):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = fused(x)
        sep = quantize_int8(fused)(x)
        folded = quantize_int8(fused, keep_identity_separate=False)(x)
    assert F.cosine_similarity(sep, ref).min() > 0.99
    assert rel_err(sep, ref) < rel_err(folded, ref)
    assert not fused.blocks[0].mlp.identity_separate  # the original is untouched


def test_int8_needs_reparameterized_model():
    with pytest.raises(ValueError, match="reparameterize"):
        quantize_int8(timm.create_model("RePaViT_Tiny", img_size=32, depth=1))
