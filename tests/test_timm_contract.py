"""timm's model contract, checked on every registered RePa model (our own code, after timm's tests/test_models.py).

timm's suite sorts models by name: token-output architectures (its ``vit_*``, ``*mixer_*``,
``poolformer_*``) get the "non-standard" checks, the others the spatial ones. Our names do not
follow timm's, so the families are sorted here by what they compute: RePaSwin (NHWC maps) and
RePaPoolFormer (NCHW maps) get the spatial checks, RePaViT and RePaMlpMixer (tokens) the token
checks. Everything runs on the meta device (shapes only, no memory) in the model's real size.
"""

from __future__ import annotations

import fnmatch
import inspect

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models._manipulate import group_parameters

import repavit
from repavit.models import FAMILIES

NAMES = repavit.list_models()
SPATIAL = ("repaswin", "repapoolformer")


def family(name: str) -> str:
    return next(f for f in FAMILIES if timm.models.is_model_in_modules(name, [f]))


def build(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, device="meta", dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("name", NAMES)
def test_api_contract(name):
    model = build(name)
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)  # unknown arguments are not swallowed
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    names = [n for n, _ in model.named_parameters()]
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1, "group_matcher() puts every parameter in one group"
    for pattern in model.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names), f"no_weight_decay() entry {pattern!r} matches nothing"
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    assert model.in_chans == cfg["input_size"][0]
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state


@pytest.mark.parametrize("name", NAMES)
def test_features_head_and_pooling_shapes(name):
    model = build(name)
    cfg = model.default_cfg
    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    if family(name) in SPATIAL:
        fmt = getattr(model, "output_fmt", "NCHW")
        (h, w), c = get_spatial_dim(fmt), get_channel_dim(fmt)
        assert feats.ndim == 4 and (feats.shape[h], feats.shape[w]) == tuple(cfg["pool_size"])
        assert feats.shape[c] == model.num_features
    else:  # tokens (B, N, C)
        assert feats.ndim == 3 and feats.shape[-1] == model.num_features
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    headless = build(name, num_classes=0)
    assert headless(x).shape == pre.shape
    if family(name) in SPATIAL:
        model.reset_classifier(0, "")
        out = model(x)
        assert out.ndim == 4 and (out.shape[h], out.shape[w]) == tuple(cfg["pool_size"])
        assert build(name, num_classes=0, global_pool="")(x).ndim == 4


@pytest.mark.parametrize("name", NAMES)
def test_device_dtype_and_frozen_weights_survive(name):
    model = build(name)
    placed = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not placed, placed[:5]
    x = torch.randn(1, *model.default_cfg["input_size"], device="meta")
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16  # no cached float32 state after .to()
    model.to(dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    head = list(model.get_classifier().parameters())
    assert head and all(p.device.type == "meta" and p.dtype == torch.float64 for p in head)
    assert all(m.training == model.training for m in model.modules())
    frozen = build(name).requires_grad_(False)
    frozen.reset_classifier(0)
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]


SMALL = {
    "repavit": dict(img_size=32, depth=2),
    "repaswin": dict(img_size=64, window_size=2, embed_dim=24),
    "repapoolformer": dict(embed_dims=(16, 32, 48, 64)),
    "repamlpmixer": dict(img_size=64, embed_dim=64, depth=2),
    "repalvvit": dict(img_size=32, depth=2),
}
AUTHORS_NAMES = [n for n in NAMES if n != n.lower()]


def small(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kw = SMALL[family(name)]
    model = timm.create_model(name, num_classes=10, **kw)
    side = kw.get("img_size", 64)
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", AUTHORS_NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_training_form_scripts_and_fx_traces_to_the_same_outputs(name, train):
    """timm's TorchScript and FX tests, in both modes (FX with timm's leaf modules, as its feature extractor)."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model, x = small(name)
    model.train(train)
    torch.manual_seed(1)
    want = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(torch.jit.script(model)(x), want, rtol=1e-5, atol=1e-5)
    tracer = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    last = get_graph_node_names(model, tracer_kwargs=tracer)[int(train) ^ 1][-1]
    fx = create_feature_extractor(model, return_nodes=[last], tracer_kwargs=tracer)
    torch.manual_seed(1)
    torch.testing.assert_close(next(iter(fx(x).values())), want, rtol=1e-5, atol=1e-5)
