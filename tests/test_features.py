"""Dense-prediction features: timm ``features_only`` / ``forward_intermediates``, unchanged by reparameterization."""

from __future__ import annotations

import pytest
import timm
import torch

import repavit
from repavit.layers.reparam import FUSED_TYPES

from helpers import randomize_bn, randomize_params, rel_err

# name -> (small kwargs, input size, expected (channels, stride) of the default feature maps)
CASES = {
    "RePaViT_Tiny": (dict(img_size=32), 32, [(192, 16)] * 3),
    "RePaSwin_Tiny": (dict(img_size=64, window_size=2, embed_dim=24), 64, [(24, 4), (48, 8), (96, 16), (192, 32)]),
    "RePaPoolformer_s12": (dict(img_size=64, embed_dims=(8, 16, 24, 32)), 64, [(8, 4), (16, 8), (24, 16), (32, 32)]),
    "RePaMlpMixer_s16": (dict(img_size=64, embed_dim=32), 64, [(32, 16)] * 3),
}


def _features(name: str, **kwargs) -> torch.nn.Module:
    small, _, _ = CASES[name]
    torch.manual_seed(0)
    return randomize_params(randomize_bn(timm.create_model(name, features_only=True, **small, **kwargs)), std=0.02)


def _img(name: str, batch: int = 2) -> torch.Tensor:
    size = CASES[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_features_only_shapes_and_info(name):
    fnet = _features(name).eval()
    _, size, expected = CASES[name]
    assert list(zip(fnet.feature_info.channels(), fnet.feature_info.reduction())) == expected
    with torch.no_grad():
        maps = fnet(_img(name))
    assert [(m.shape[1], size // m.shape[2], size // m.shape[3]) for m in maps] == [(c, r, r) for c, r in expected]


@pytest.mark.parametrize("name", sorted(CASES))
def test_features_unchanged_by_reparameterization(name):
    fnet = _features(name).eval()
    x = _img(name)
    with torch.no_grad():
        before = fnet(x)
        fused = repavit.reparameterize_model(fnet)
        after = fused(x)
    assert any(isinstance(m, FUSED_TYPES) for m in fused.modules())
    assert not any(isinstance(m, FUSED_TYPES) for m in fnet.modules())
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_intermediates_agree_with_forward_features(name):
    small, _, _ = CASES[name]
    torch.manual_seed(0)
    model = randomize_params(randomize_bn(timm.create_model(name, **small)), std=0.02).eval()
    x = _img(name)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(only[0], maps[0])
    torch.testing.assert_close(only[1], maps[-1])
    torch.testing.assert_close(early[0], maps[0])


def test_swin_last_map_with_norm_is_forward_features():
    small, _, _ = CASES["RePaSwin_Tiny"]
    model = timm.create_model("RePaSwin_Tiny", **small).eval()
    x = _img("RePaSwin_Tiny")
    with torch.no_grad():
        maps = model.forward_intermediates(x, norm=True, intermediates_only=True)
        nhwc = model.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(maps[-1], model.forward_features(x).permute(0, 3, 1, 2))
    assert nhwc[0].shape == (2, 2, 2, 192)


def test_vit_token_formats():
    model = timm.create_model("RePaViT_Tiny", img_size=32).eval()
    x = _img("RePaViT_Tiny")
    with torch.no_grad():
        nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        pairs = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        final = model.forward_features(x)
        normed = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in nlc] == [(2, 4, 192)] * 2
    spatial, cls = pairs[0]
    assert spatial.shape == (2, 192, 2, 2) and cls.shape == (2, 1, 192)
    torch.testing.assert_close(normed[0], final[:, 1:])


def test_out_indices_prune_the_model():
    vit = timm.create_model("RePaViT_Tiny", img_size=32, features_only=True, out_indices=(1, 4))
    assert len(vit.model.blocks) == 5 and vit.feature_info.channels() == [192, 192]
    swin = timm.create_model(
        "RePaSwin_Tiny", img_size=64, window_size=2, embed_dim=24, features_only=True, out_indices=(1,)
    )
    assert len(swin.model.layers) == 2 and swin.model.layers[-1].downsample is None
    with torch.no_grad():
        (m,) = swin(torch.randn(1, 3, 64, 64))
    assert m.shape == (1, 48, 8, 8)


@pytest.mark.parametrize("indices", [5, [4], [-5], []])
def test_bad_indices_are_one_line_errors(indices):
    model = timm.create_model("RePaSwin_Tiny", img_size=64, window_size=2, embed_dim=24)
    with pytest.raises(ValueError, match="feature") as e:
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=indices)
    assert "\n" not in str(e.value)


def test_bad_output_format():
    model = timm.create_model("RePaViT_Tiny", img_size=32)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


def test_swin_backbone_with_fpn_as_documented():
    """The docs/backbones.md recipe: RePaSwin feature maps into torchvision's FPN, then fold for deployment."""
    from collections import OrderedDict

    from torchvision.ops import FeaturePyramidNetwork

    backbone = timm.create_model("RePaSwin_Tiny", features_only=True, out_indices=(1, 2, 3), img_size=256)
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), out_channels=64)
    detector = torch.nn.ModuleDict({"backbone": backbone, "fpn": fpn}).eval()

    def run(model, x):
        feats = model["backbone"](x)
        return model["fpn"](OrderedDict((str(i), f) for i, f in enumerate(feats)))

    x = torch.randn(1, 3, 256, 320)  # not square, not a multiple of 224
    with torch.no_grad():
        ref = run(detector, x)
        deployed = repavit.reparameterize_model(detector)
        out = run(deployed, x)
    assert [tuple(v.shape) for v in out.values()] == [(1, 64, 32, 40), (1, 64, 16, 20), (1, 64, 8, 10)]
    for k in ref:
        assert rel_err(out[k], ref[k]) <= 1e-5
