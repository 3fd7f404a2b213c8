"""RePa-LV-ViT and vanilla LV-ViT: parity with LV-ViT's reference, sizes against the paper, exact folding, MixToken."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import repavit
from repavit import CheckpointMismatchError
from repavit.measure import count_gmacs
from repavit.models.repalvvit import identify_state_dict, mix_tokens, unmix_tokens

from golden import authors_state_dict, expected, golden_input, key_list
from helpers import randomize_bn, randomize_params, rel_err

SMALL = dict(img_size=32, depth=2, embed_dim=48, num_heads=3, num_classes=7)


@pytest.fixture(scope="module")
def x():
    return golden_input()


@pytest.mark.parametrize("name", ["LVViT_S", "LVViT_M"])
def test_vanilla_matches_reference_outputs(name, x):
    """The reference's layout loads into the vanilla form; every output the reference gave is reproduced."""
    exp = expected(name)
    model = timm.create_model(name).eval()
    repavit.load_checkpoint(model, {"state_dict": authors_state_dict(name)})
    with torch.no_grad():
        feats = model.forward_features(x)
        assert rel_err(model(x), exp["logits"]) <= 1e-5
        assert rel_err(model.head(feats[:, 0]), exp["logits_cls"]) <= 1e-5
        assert rel_err(model.aux_head(feats[:, 1:]), exp["aux"]) <= 1e-5
        assert rel_err(feats, exp["features"]) <= 1e-5


@pytest.mark.parametrize("name", ["LVViT_S", "LVViT_M"])
def test_state_dict_is_the_reference_layout_with_the_ffn_norm_inside_the_ffn(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = [
        (k.replace(".mlp.norm1.", ".norm2."), tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]
    assert sorted(ours) == sorted(key_list(name))


# (vanilla, RePa training form, RePa reparameterized) parameters in millions: paper Table 1
PAPER_PARAMS = {"S": (26.2, 26.2, 19.1), "M": (55.8, 55.9, 40.1)}
# (vanilla, reparameterized) GMACs without attention products, as Table 1 counts them
PAPER_GMACS = {"S": (6.1, 4.7), "M": (11.9, 8.8)}


@pytest.mark.parametrize("size", ["S", "M"])
def test_parameter_counts_match_paper(size):
    with torch.device("meta"):
        counts = [
            sum(p.numel() for p in m.parameters()) / 1e6
            for m in (
                timm.create_model(f"LVViT_{size}"),
                timm.create_model(f"RePaLVViT_{size}"),
                timm.create_model(f"RePaLVViT_{size}", reparameterized=True),
            )
        ]
    for got, want in zip(counts, PAPER_PARAMS[size], strict=True):
        assert abs(got - want) <= 0.1, (counts, PAPER_PARAMS[size])


def test_default_idle_ratio_activates_embed_dim_channels():
    """The paper's "/0.75" for LV-ViT: C of the 3C hidden channels activated (mu = 1)."""
    for size, dim in (("S", 384), ("M", 512)):
        with torch.device("meta"):
            model = timm.create_model(f"RePaLVViT_{size}")
        assert {b.mlp.act_dim for b in model.blocks} == {dim}
        assert {b.mlp.hidden_dim for b in model.blocks} == {3 * dim}


@pytest.mark.parametrize("size", ["S"])
def test_gmacs_match_paper(size):
    model = timm.create_model(f"RePaLVViT_{size}").eval()
    vanilla = model.vanilla_counterpart().eval()
    fused = repavit.reparameterize_model(model)
    got = (count_gmacs(vanilla, attention=False), count_gmacs(fused, attention=False))
    for g, want in zip(got, PAPER_GMACS[size], strict=True):
        assert abs(g - want) <= 0.05, got
    assert count_gmacs(fused) > got[1] + 0.4  # with attention products (197^2 x 384 x 2 per block)


def _small(**kw):
    torch.manual_seed(0)
    model = timm.create_model("RePaLVViT_S", **{**SMALL, **kw})
    return randomize_params(randomize_bn(model, seed=1), seed=2).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_reparameterization_is_exact_stem_included(dtype, tol):
    model = _small().to(dtype)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        fused = repavit.reparameterize_model(model)
        assert rel_err(fused(x), ref) <= tol
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        assert fused.reparameterized and not model.reparameterized
        again = repavit.reparameterize_model(fused)  # idempotent
        assert rel_err(again(x), ref) <= tol
        for a, b in zip(
            model.forward_intermediates(x, intermediates_only=True),
            fused.forward_intermediates(x, intermediates_only=True),
            strict=True,
        ):
            assert rel_err(b, a) <= tol


def test_skip_lam_is_folded_into_weights_and_bias():
    """With skip_lam 3 (not a power of two) and random BN statistics the fold still matches."""
    model = _small(skip_lam=3.0).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(repavit.reparameterize_model(model)(x), model(x)) <= 1e-10


def test_fused_checkpoint_builds_fused_and_stem_forms_are_checked():
    model = _small()
    x = torch.randn(2, 3, 32, 32)
    fused = repavit.reparameterize_model(model)
    with torch.no_grad():
        built = timm.create_model("RePaLVViT_S", **SMALL, reparameterized=True)
        repavit.load_checkpoint(built, {"model": fused.state_dict()})
        assert rel_err(built(x), fused(x)) <= 1e-6
    train_ffns = {k: v for k, v in model.state_dict().items() if ".mlp." in k}
    fused_stem = {k: v for k, v in fused.state_dict().items() if ".mlp." not in k}
    with pytest.raises(CheckpointMismatchError, match="fused stem"):
        repavit.load_checkpoint(timm.create_model("RePaLVViT_S", **SMALL), {"model": {**fused_stem, **train_ffns}})
    train_stem = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    fused_ffns = {k: v for k, v in fused.state_dict().items() if ".mlp." in k}
    with pytest.raises(CheckpointMismatchError, match="training-form stem"):
        repavit.load_checkpoint(
            timm.create_model("RePaLVViT_S", **SMALL, reparameterized=True), {"model": {**train_stem, **fused_ffns}}
        )


def test_class_token_shortcut_stays_off():
    """The prediction reads every token (aux head): changing a patch token's input changes it."""
    model = _small()
    assert not getattr(model, "class_token_shortcut", False)
    fused = repavit.reparameterize_model(model)
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 16:, 16:] += 1.0  # only the last patch changes
    with torch.no_grad():
        a, b = fused(x), fused(y)
        feats = fused.forward_features(x)
        want = fused.head(feats[:, 0]) + 0.5 * fused.aux_head(feats[:, 1:]).max(1)[0]
    assert not torch.equal(a, b)
    assert rel_err(a, want) <= 1e-6


def test_record_less_reference_file_is_identified_with_its_image_size(tmp_path):
    sd = authors_state_dict("LVViT_S")
    assert identify_state_dict(sd) == "LVViT_S"
    path = tmp_path / "lvvit_s.pth"
    torch.save({"state_dict": sd}, path)
    loaded = repavit.models.load_model(path)
    assert loaded.record.model_name == "LVViT_S"
    assert loaded.record.model_args["img_size"] in (224, [224, 224])
    assert loaded.record.model_args["channel_idle"] is False


def test_repa_name_refuses_a_plain_reference_file(tmp_path):
    path = tmp_path / "lvvit_s.pth"
    torch.save({"state_dict": authors_state_dict("LVViT_S")}, path)
    with pytest.raises(CheckpointMismatchError, match="no channel-idle FFN"):
        repavit.models.load_model(path, model_name="RePaLVViT_S")


def test_mix_tokens_box_is_consistent_between_tokens_and_targets():
    B, C, H, W = 4, 3, 6, 5
    grid = torch.arange(B, dtype=torch.float64).reshape(B, 1, 1, 1).expand(B, C, H, W).clone()
    torch.manual_seed(0)
    for _ in range(20):
        mixed, (y1, x1, y2, x2) = mix_tokens(grid)
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        for i in range(B):
            assert torch.all(mixed[i][:, inside] == B - 1 - i)  # the box holds the flipped sample
            assert torch.all(mixed[i][:, ~inside] == i)
        # per-token outputs of the mixed grid, moved back: every token is its own image's again
        tokens = mixed[:, 0].reshape(B, H * W, 1)
        back = unmix_tokens(tokens, (H, W), (y1, x1, y2, x2))
        assert torch.equal(back, grid[:, 0].reshape(B, H * W, 1))
    _, box = mix_tokens(grid, lam=1.0)
    assert (box[2] - box[0]) * (box[3] - box[1]) == 0  # lam 1: nothing mixed


def test_training_with_token_labels_returns_the_three_outputs_and_eval_one():
    model = _small().train()
    x = torch.randn(4, 3, 32, 32)
    assert model(x).shape == (4, 7)  # plain training: the prediction
    model.token_labeling = True
    cls, aux, box = model(x)
    assert cls.shape == (4, 7) and aux.shape == (4, 4, 7) and len(box) == 4
    (cls.sum() + aux.sum()).backward()
    assert model.eval()(x).shape == (4, 7)


def test_vanilla_counterpart_is_vanilla_lvvit():
    with torch.device("meta"):
        model = timm.create_model("RePaLVViT_S")
        ref = timm.create_model("LVViT_S")
    v = model.vanilla_counterpart()
    assert [(k, t.shape) for k, t in v.state_dict().items()] == [(k, t.shape) for k, t in ref.state_dict().items()]
    assert not v.channel_idle and v.feature_norm == "LayerNorm"


def test_layernorm_model_cannot_fold():
    with pytest.raises(repavit.errors.UserError, match="LayerNorm"):
        repavit.reparameterize_model(copy.deepcopy(timm.create_model("LVViT_S", **{**SMALL})))
