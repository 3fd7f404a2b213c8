"""RePaMlpMixer: idle_ratio honoured, standard token-mixing normalization, parameter counts, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import repavit
from repavit import CheckpointMismatchError
from repavit.layers import ChannelIdleMlp

from helpers import randomize_bn, randomize_params, rel_err

NAMES = [f"RePaMlpMixer_{s}" for s in ("s32", "s16", "b32", "b16", "l32", "l16")]


@pytest.mark.parametrize(("idle", "act"), [(0.75, 64), (0.5, 128), (0.25, 192), (1.0, 0), (0.0, 256)])
def test_idle_ratio_is_honoured(idle, act):
    model = timm.create_model("RePaMlpMixer_s16", img_size=64, embed_dim=64, idle_ratio=idle)
    assert {blk.mlp.act_dim for blk in model.blocks} == {act} == {math.ceil(256 * (1 - idle))}
    torch.manual_seed(0)
    model = randomize_params(randomize_bn(model), std=0.05).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = repavit.reparameterize_model(model)
        assert rel_err(fused(img), model(img)) <= 1e-5
    assert {blk.mlp.act_dim for blk in fused.blocks} == {act}


def test_token_mixing_normalizes_channels_per_token():
    """Block = x + W2 GELU(W1 LN_C(x)^T + b1) + b2 along tokens (LayerNorm over channels), then the FFN."""
    torch.manual_seed(0)
    model = timm.create_model("RePaMlpMixer_s16", img_size=64, embed_dim=32, depth=1)
    model = randomize_params(randomize_bn(model), std=0.2).double().eval()
    blk = model.blocks[0]
    x = torch.randn(2, 16, 32, dtype=torch.float64)  # (B, N, C)
    with torch.no_grad():
        u = F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)  # per token, over C
        t = blk.mlp_tokens
        mixed = torch.einsum("hn,bnc->bhc", t.fc1.weight, u) + t.fc1.bias[:, None]  # (B, tokens_hidden, C)
        mixed = torch.einsum("nh,bhc->bnc", t.fc2.weight, F.gelu(mixed)) + t.fc2.bias[:, None]
        ref = blk.mlp(x + mixed)
        assert rel_err(blk(x), ref) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    """Train form = timm's vanilla Mixer + BN2 (2h per block); the fused FFN keeps C(C + a) + (C + a) + aC."""
    vanilla_name = name.replace("RePaMlpMixer", "mixer") + "_224"
    with torch.device("meta"):
        train = timm.create_model(name)
        fused = timm.create_model(name, reparameterized=True)
        vanilla = timm.create_model(vanilla_name)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    mlps = [m for m in train.modules() if isinstance(m, ChannelIdleMlp)]
    assert count(train) == count(vanilla) + sum(2 * m.hidden_dim for m in mlps)
    train_ffn = sum(count(m) for m in mlps)
    fused_ffn = sum(m.dim * (m.dim + m.act_dim) + (m.dim + m.act_dim) + m.act_dim * m.dim for m in mlps)
    assert count(train) - count(fused) == train_ffn - fused_ffn
    assert (round(count(train) / 1e6, 2), round(count(fused) / 1e6, 2)) == PARAMS[name]


# Millions, train form / reparameterized, idle 0.75 (no paper numbers exist; the table in docs/backbones.md).
PARAMS = {
    "RePaMlpMixer_s32": (19.14, 8.60),
    "RePaMlpMixer_s16": (18.56, 8.02),
    "RePaMlpMixer_b32": (60.37, 24.86),
    "RePaMlpMixer_b16": (59.95, 24.44),
    "RePaMlpMixer_l32": (207.14, 80.99),
    "RePaMlpMixer_l16": (208.39, 82.24),
}


def test_real_width_reparameterization_small_input():
    torch.manual_seed(0)
    model = timm.create_model("RePaMlpMixer_s16", img_size=64, num_classes=10)
    model = randomize_params(randomize_bn(model), std=0.02)
    img = torch.randn(2, 3, 64, 64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        m = copy.deepcopy(model).to(dtype).eval()
        with torch.no_grad():
            assert rel_err(repavit.reparameterize_model(m)(img.to(dtype)), m(img.to(dtype))) <= tol


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_checkpoint_mismatches_are_named():
    small = dict(img_size=64, embed_dim=64)
    sd = timm.create_model("RePaMlpMixer_s16", **small).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"mixes 16 tokens \(img_size ~64\), model 49") as e:
        repavit.load_checkpoint(timm.create_model("RePaMlpMixer_s16", img_size=112, embed_dim=64), sd)
    _one_line(e)
    with pytest.raises(CheckpointMismatchError, match="depth 8, model 12"):
        repavit.load_checkpoint(timm.create_model("RePaMlpMixer_b16", **small), sd)
    with pytest.raises(CheckpointMismatchError, match="embed_dim 64, model 32"):
        repavit.load_checkpoint(timm.create_model("RePaMlpMixer_s16", img_size=64, embed_dim=32), sd)
    with pytest.raises(CheckpointMismatchError, match="patch_size 16, model 32"):
        repavit.load_checkpoint(timm.create_model("RePaMlpMixer_s32", img_size=128, embed_dim=64), sd)
    with pytest.raises(CheckpointMismatchError, match="feature_norm=BatchNorm.*feature_norm=LayerNorm"):
        repavit.load_checkpoint(timm.create_model("RePaMlpMixer_s16", feature_norm="LayerNorm", **small), sd)
    with pytest.raises(CheckpointMismatchError, match="training form"):
        repavit.load_checkpoint(timm.create_model("RePaMlpMixer_s16", reparameterized=True, **small), sd)
    half = repavit.reparameterize_model(timm.create_model("RePaMlpMixer_s16", idle_ratio=0.5, **small))
    with pytest.raises(CheckpointMismatchError, match=r"activates 128 of 256"):
        repavit.load_checkpoint(timm.create_model("RePaMlpMixer_s16", reparameterized=True, **small), half.state_dict())


def test_model_api_and_bad_arguments():
    model = timm.create_model("RePaMlpMixer_s16", img_size=64, embed_dim=64, num_classes=7).eval()
    img = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(img)
    assert feats.shape == (2, 16, 64) and model.num_features == 64
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    model.reset_classifier(3)
    assert model(img).shape == (2, 3) and model.get_classifier().out_features == 3
    for kwargs, match in [
        (dict(idle_ratio=1.01), "idle_ratio"),
        (dict(feature_norm="RMSNorm"), "feature_norm"),
        (dict(global_pool="token"), "global_pool"),
        (dict(feature_norm="LayerNorm", reparameterized=True), "LayerNorm"),
    ]:
        with pytest.raises(ValueError, match=match):
            timm.create_model("RePaMlpMixer_s16", img_size=64, embed_dim=64, **kwargs)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        repavit.reparameterize_model(model).train()


@pytest.mark.parametrize("size", ["s32", "s16", "b32", "b16", "l32", "l16"])
def test_aliases_match(size):
    with torch.device("meta"):
        a = timm.create_model(f"repamixer_{size}_224")
        b = timm.create_model(f"RePaMlpMixer_{size}")
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_vanilla_counterpart_is_timm_mixer():
    with torch.device("meta"):
        vanilla = timm.create_model("RePaMlpMixer_b16").vanilla_counterpart()
        reference = timm.create_model("mixer_b16_224")
    assert [(k, v.shape) for k, v in vanilla.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
