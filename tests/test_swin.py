"""RePaSwin: parity with the authors' model, structural buffers, padding/masking at other sizes, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import repavit
from repavit import CheckpointMismatchError
from repavit.layers.fold import BNStats, fold_idle_ffn
from repavit.models.repaswin import SwinBlock, relative_position_index, window_attention_mask

from golden import authors_state_dict, expected, golden_input, key_list
from helpers import randomize_bn, randomize_params, rel_err

STRUCTURAL = ("relative_position_index", "attn_mask")


@pytest.fixture(scope="module")
def x():
    return golden_input()


@pytest.fixture(scope="module")
def authors_tiny():
    """RePaSwin_Tiny loaded with the deterministic authors'-layout checkpoint (eval mode)."""
    exp = expected("RePaSwin_Tiny")
    model = timm.create_model("RePaSwin_Tiny", **exp["kwargs"]).eval()
    repavit.load_checkpoint(model, {"model": authors_state_dict("RePaSwin_Tiny")})
    return model


def test_matches_authors_logits_before_and_after_reparam(authors_tiny, x):
    exp = expected("RePaSwin_Tiny")
    with torch.no_grad():
        assert rel_err(authors_tiny(x), exp["logits"]) <= 1e-5
        fused = repavit.reparameterize_model(authors_tiny)
        assert rel_err(fused(x), exp["logits_reparam"]) <= 1e-5


def test_structural_buffers_equal_authors(authors_tiny):
    """relative_position_index and attn_mask are computed here; they equal the authors' stored buffers."""
    sd = authors_state_dict("RePaSwin_Tiny")
    checked = 0
    for key, value in sd.items():
        if key.endswith(STRUCTURAL):
            module, name = key.rsplit(".", 1)
            assert torch.equal(authors_tiny.get_submodule(module).get_buffer(name), value), key
            checked += 1
    assert checked == 17  # 12 relative_position_index + 5 attn_mask (the 7x7 last stage does not shift)
    # blocks without a stored mask have none
    assert authors_tiny.layers[3].blocks[1].attn_mask is None
    assert authors_tiny.layers[0].blocks[0].attn_mask is None


def test_relative_position_index_by_offsets():
    """Independent formula: index = (dy + ws - 1) * (2ws - 1) + (dx + ws - 1) for token pairs of a window."""
    ws = 3
    idx = relative_position_index(ws)
    for p in range(ws * ws):
        for q in range(ws * ws):
            dy, dx = p // ws - q // ws, p % ws - q % ws
            assert idx[p, q] == (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)


@pytest.mark.parametrize("name", ["RePaSwin_Tiny", "RePaSwin_Small", "RePaSwin_Base"])
def test_state_dict_layout_equals_authors(name):
    """Same keys, shapes, dtypes and order, except the structural buffers, which are not stored here."""
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    assert ours == [row for row in key_list(name) if not row[0].endswith(STRUCTURAL)]


# Parameter counts from the facts table (millions, train form / reparameterized), idle 0.75.
PARAMS = {"RePaSwin_Tiny": (28.32, 17.48), "RePaSwin_Small": (49.68, 29.93), "RePaSwin_Base": (87.86, 52.81)}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        train = timm.create_model(name)
        fused = timm.create_model(name, reparameterized=True)
    n_train = sum(p.numel() for p in train.parameters()) / 1e6
    n_fused = sum(p.numel() for p in fused.parameters()) / 1e6
    assert (round(n_train, 2), round(n_fused, 2)) == PARAMS[name]


def dense_block_reference(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """``x + attention branch`` of a Swin block written as dense attention over all H*W tokens.

    Independent of the window partition code: a token pair may interact iff, in the padded and
    cyclically shifted grid, both lie in the same window and in the same shift region (the
    original Swin rule) and both are real (not padding). Relative offsets index the bias table.
    """
    B, H, W, C = x.shape
    ws = block.window_size
    shift = 0 if min(H, W) <= ws else block.shift_size
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    attn = block.attn
    heads, hd = attn.num_heads, C // attn.num_heads
    y = block.norm1(x).reshape(B, H * W, C)
    q, k, v = attn.qkv(y).reshape(B, H * W, 3, heads, hd).permute(2, 0, 3, 1, 4)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ry, rx = (ys.flatten() - shift) % Hp, (xs.flatten() - shift) % Wp  # coordinates after the shift

    def region(r, n):
        return torch.zeros_like(r) if shift == 0 else (r >= n - ws).long() + (r >= n - shift).long()

    win = (ry // ws) * (Wp // ws) + rx // ws
    reg = region(ry, Hp) * 3 + region(rx, Wp)
    allowed = (win[:, None] == win[None, :]) & (reg[:, None] == reg[None, :])
    dy, dx = ry[:, None] - ry[None, :], rx[:, None] - rx[None, :]
    index = ((dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)).clamp(0, (2 * ws - 1) ** 2 - 1)
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, HW, HW)
    logits = (q @ k.transpose(-2, -1)) * hd**-0.5 + bias
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(B, H * W, C))
    return x + out.reshape(B, H, W, C)


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("hw", [(7, 7), (10, 10), (5, 5), (14, 9), (9, 16)])
def test_block_matches_dense_reference_with_padding_and_shift(shift, hw):
    torch.manual_seed(0)
    block = SwinBlock(16, (7, 7), num_heads=2, window_size=7, shift_size=shift)
    block = randomize_params(randomize_bn(block), std=0.2).double().eval()
    block.mlp = torch.nn.Identity()  # the FFN is tested elsewhere; check the attention branch
    x = torch.randn(2, *hw, 16, dtype=torch.float64)
    with torch.no_grad():
        ours = block(x)
        ref = dense_block_reference(block, x)
    assert rel_err(ours, ref) <= 1e-12


def test_padding_never_reaches_real_tokens():
    """With padding as its own mask region, a 10x10 map gives what a 7+3 window split gives without padding."""
    mask = window_attention_mask(10, 10, 7, 0)
    assert mask.shape == (4, 49, 49)
    # window 0 holds 49 real tokens; window 1 (rows 0-6, cols 7-13) holds 7x3 real tokens
    assert (mask[0] == 0).all()
    real = torch.tensor([c < 3 for r in range(7) for c in range(7)])
    assert (mask[1][real][:, real] == 0).all() and (mask[1][real][:, ~real] == -100).all()
    assert window_attention_mask(14, 14, 7, 0) is None


@pytest.mark.parametrize("size", [256, 384])
def test_other_input_sizes(size, x):
    """A model built for 256/384 precomputes masks for that size; the 224 model computes them on the fly."""
    torch.manual_seed(0)
    built = timm.create_model("RePaSwin_Tiny", img_size=size, num_classes=10)
    built = randomize_bn(built).eval()
    stage0 = built.layers[0].blocks
    grid = size // 4
    n_windows = math.ceil(grid / 7) ** 2
    assert stage0[1].attn_mask.shape == (n_windows, 49, 49)
    if grid % 7:  # padded: even the unshifted block needs a mask
        assert stage0[0].attn_mask.shape == (n_windows, 49, 49)
    other = timm.create_model("RePaSwin_Tiny", num_classes=10).eval()
    other.load_state_dict(built.state_dict())
    img = F.interpolate(x[:1], size=size, mode="bilinear")
    with torch.no_grad():
        out = built(img)
        assert out.shape == (1, 10) and torch.isfinite(out).all()
        torch.testing.assert_close(other(img), out, rtol=1e-5, atol=1e-5)
        assert rel_err(repavit.reparameterize_model(built)(img), out) <= 1e-5


def test_odd_maps_and_non_square_inputs():
    model = timm.create_model("RePaSwin_Tiny", img_size=64, window_size=2, embed_dim=24, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 72, 40))  # maps 18x10, 9x5 (odd: padded before merging), 5x3, 3x2
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_real_width_reparameterization_small_input():
    torch.manual_seed(0)
    model = randomize_params(randomize_bn(timm.create_model("RePaSwin_Tiny", img_size=64, num_classes=10)), std=0.02)
    img = torch.randn(2, 3, 64, 64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        m = copy.deepcopy(model).to(dtype).eval()
        with torch.no_grad():
            assert rel_err(repavit.reparameterize_model(m)(img.to(dtype)), m(img.to(dtype))) <= tol


def authors_swin_reparam_layout(sd: dict) -> dict:
    """The authors' reparameterized layout (mlp.fc1 = linear branch + identity, fc2 = C->a, fc3 = a->C)."""
    out = {k: v for k, v in sd.items() if ".mlp." not in k}
    prefixes = sorted({k.split("mlp.")[0] + "mlp." for k in sd if ".mlp." in k})
    for p in prefixes:

        def bn(name, p=p):
            return BNStats(*(sd[f"{p}{name}.{s}"] for s in ("running_mean", "running_var", "weight", "bias")), 1e-5)

        c = sd[p + "fc2.bias"].shape[0]
        f = fold_idle_ffn(
            sd[p + "fc1.weight"],
            sd[p + "fc1.bias"],
            sd[p + "fc2.weight"],
            sd[p + "fc2.bias"],
            bn("norm1"),
            bn("norm2"),
            c,
        ).to(torch.float32)
        out[p + "fc1.weight"], out[p + "fc1.bias"] = f.w_lin, f.b_lin
        out[p + "fc2.weight"], out[p + "fc2.bias"], out[p + "fc3.weight"] = f.w_act, f.b_act, f.w_out
    return out


def test_authors_reparameterized_layout_loads(x):
    sd = authors_swin_reparam_layout(authors_state_dict("RePaSwin_Tiny"))
    model = repavit.create_model("RePaSwin_Tiny", reparameterized=True)
    repavit.load_checkpoint(model, {"model": sd})
    with torch.no_grad():
        assert rel_err(model(x), expected("RePaSwin_Tiny")["logits_reparam"]) <= 1e-5


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_checkpoint_mismatches_are_named():
    tiny_sd = authors_state_dict("RePaSwin_Tiny")
    with torch.device("meta"):
        small_sd = timm.create_model("RePaSwin_Small").state_dict()
        base_sd = timm.create_model("RePaSwin_Base").state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"depths \(2, 2, 18, 2\), model \(2, 2, 6, 2\)") as e:
        repavit.load_checkpoint(timm.create_model("RePaSwin_Tiny"), small_sd)
    _one_line(e)
    with pytest.raises(CheckpointMismatchError, match="embed_dim 128, model 96"):
        repavit.load_checkpoint(timm.create_model("RePaSwin_Small"), base_sd)
    with pytest.raises(CheckpointMismatchError, match="window_size 7.*model 2"):
        repavit.load_checkpoint(timm.create_model("RePaSwin_Tiny", img_size=64, window_size=2), tiny_sd)
    with pytest.raises(CheckpointMismatchError, match="feature_norm=BatchNorm.*feature_norm=LayerNorm"):
        repavit.load_checkpoint(timm.create_model("RePaSwin_Tiny", img_size=64, feature_norm="LayerNorm"), tiny_sd)
    with pytest.raises(CheckpointMismatchError, match="training form"):
        repavit.load_checkpoint(timm.create_model("RePaSwin_Tiny", img_size=64, reparameterized=True), tiny_sd)
    half = repavit.reparameterize_model(
        timm.create_model("RePaSwin_Tiny", img_size=64, window_size=2, embed_dim=24, idle_ratio=0.5)
    )
    model = timm.create_model("RePaSwin_Tiny", img_size=64, window_size=2, embed_dim=24, reparameterized=True)
    with pytest.raises(CheckpointMismatchError, match=r"activates 48 of 96 .*idle_ratio ~0.5.*idle_ratio 0.75") as e:
        repavit.load_checkpoint(model, half.state_dict())
    _one_line(e)


def test_model_api_and_bad_arguments():
    model = timm.create_model("RePaSwin_Tiny", img_size=64, window_size=2, embed_dim=24, num_classes=7).eval()
    img = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(img)
    assert feats.shape == (2, 2, 2, 192) and model.num_features == 192
    assert model.forward_head(feats, pre_logits=True).shape == (2, 192)
    assert model.forward_head(feats).shape == (2, 7)
    nwd = model.no_weight_decay()
    assert len(nwd) == 12 and all(n.endswith("relative_position_bias_table") for n in nwd)
    model.reset_classifier(3)
    assert model(img).shape == (2, 3) and model.get_classifier().out_features == 3
    assert timm.models.get_pretrained_cfg("RePaSwin_Tiny").input_size == (3, 224, 224)
    for kwargs, match in [
        (dict(idle_ratio=2.0), "idle_ratio"),
        (dict(feature_norm="GroupNorm"), "feature_norm"),
        (dict(global_pool="max"), "global_pool"),
        (dict(feature_norm="LayerNorm", reparameterized=True), "LayerNorm"),
        (dict(embed_dim=20), "divisible"),
        (dict(heuristic="linear"), "heuristic='static'"),
    ]:
        with pytest.raises(ValueError, match=match):
            timm.create_model("RePaSwin_Tiny", img_size=64, **kwargs)
    fused = repavit.reparameterize_model(model)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fused.train()


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_aliases_match(size):
    with torch.device("meta"):
        a = timm.create_model(f"repaswin_{size}_patch4_window7_224")
        b = timm.create_model(f"RePaSwin_{size.capitalize()}")
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_vanilla_counterpart_is_timm_swin():
    with torch.device("meta"):
        model = timm.create_model("RePaSwin_Tiny")
        vanilla = model.vanilla_counterpart()
        reference = timm.create_model("swin_tiny_patch4_window7_224")
    assert type(vanilla) is type(reference)
    assert sum(p.numel() for p in vanilla.parameters()) == sum(p.numel() for p in reference.parameters())


def test_released_weights_path_loads_authors_checkpoint(authors_tiny, tmp_path, x):
    """``pretrained=True`` with a local file (the released-weights route): authors' logits, also as a backbone."""
    path = tmp_path / "RePaSwin_Tiny.pth"
    torch.save({"model": authors_state_dict("RePaSwin_Tiny")}, path)
    model = timm.create_model("RePaSwin_Tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    backbone = timm.create_model(
        "RePaSwin_Tiny", pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    with torch.no_grad():
        assert rel_err(model(x[:1]), expected("RePaSwin_Tiny")["logits"][:1]) <= 1e-5
        maps = backbone(x[:1])
        ref = authors_tiny.forward_intermediates(x[:1], intermediates_only=True)
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b)


def test_fused_swin_exports_to_onnx(tmp_path):
    """Window attention runs as 4-D SDPA (windows x heads on one axis), which the ONNX exporter supports."""
    from repavit.export.onnx import export_onnx, ort_session

    torch.manual_seed(0)
    small = dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(3, 6), num_classes=10)
    fused = repavit.reparameterize_model(randomize_bn(timm.create_model("RePaSwin_Tiny", **small)).eval())
    path = export_onnx(fused, tmp_path / "swin.onnx", input_size=(3, 64, 64))  # shifted, masked windows
    img = torch.randn(3, 3, 64, 64)
    session = ort_session(path)
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: img.numpy()})[0])
    with torch.no_grad():
        assert rel_err(out, fused(img)) <= 1e-5
