"""Registry-parametrized tests: every registered RePa model, forward/backward/reparameterization.

Each family gives small construction kwargs in ``SMALL`` (tiny inputs where the architecture
allows), so the whole registry runs in the suite's time budget. Models over 100M parameters
are marked slow (they still run in CI).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import repavit
from repavit.models import FAMILIES

from helpers import randomize_bn, randomize_params, rel_err

# family (timm module name) -> kwargs that make a fast model; input size for the test batch.
SMALL: dict[str, dict] = {
    "repavit": dict(img_size=32),
    # Narrow widths, real depths (real widths: parameter-count, parity and per-family tests). Swin: window 2
    # at 64x64 keeps maps 16, 8, 4, 2 window multiples with a full window in every stage.
    "repaswin": dict(img_size=64, window_size=2, embed_dim=24),
    "repapoolformer": dict(img_size=64, embed_dims=(16, 32, 48, 64)),
    "repamlpmixer": dict(img_size=64, embed_dim=64),
    "repalvvit": dict(img_size=32, embed_dim=96, num_heads=4),
}
BIG = {"RePaViT_Large", "RePaViT_Huge", "repavit_large_patch16_224", "repavit_huge_patch16_224"} | {
    "RePaMlpMixer_l16",
    "RePaMlpMixer_l32",
    "repamixer_l16_224",
    "repamixer_l32_224",
}
# The authors' names and the timm-style aliases build the same networks: test each size once
# by its authors' name, and the aliases in test_aliases_match.
ALIASES = {f"repavit_{s}_patch16_224": f"RePaViT_{s.capitalize()}" for s in ("tiny", "small", "base", "large", "huge")}
# Every family registers its authors' names (with capitals, e.g. RePaSwin_Tiny) and lowercase timm-style
# aliases of the same networks: run the registry tests on the authors' names.
ALL_NAMES = [n for n in repavit.list_models() if n != n.lower()]
# the RePa models (vanilla LV-ViT, registered for its reference checkpoints and the benchmark, has no fold)
NAMES = [n for n in ALL_NAMES if repavit.models.is_repa_model(n)]


def family_of(name: str) -> str:
    for f in FAMILIES:
        if timm.models.is_model_in_modules(name, [f]):
            return f
    raise KeyError(name)


def params(name: str) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in name]


def small_model(name: str, **kwargs) -> torch.nn.Module:
    kw = dict(SMALL[family_of(name)], num_classes=10, **kwargs)
    if name in BIG and family_of(name) == "repavit":
        # Large and Huge at their real widths with 4 of their 24 / 32 blocks: every block runs the same code
        # (the full depths are counted in the parameter-count tests), and the suite saves about a minute
        kw.setdefault("depth", 4)
    return timm.create_model(name, **kw)


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    size = SMALL[family_of(name)].get("img_size", 224)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


_cache: dict[str, torch.nn.Module] = {}


def cached_small(name: str) -> torch.nn.Module:
    """One randomized small model per name, shared by the read-only tests (callers copy it)."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = randomize_params(randomize_bn(small_model(name)), std=0.02)
    return _cache[name]


def test_registry_has_all_authors_names():
    names = set(repavit.list_models())
    for s in ("Tiny", "Small", "Base", "Large", "Huge"):
        assert f"RePaViT_{s}" in names and f"repavit_{s.lower()}_patch16_224" in names


@pytest.mark.parametrize("name", params(ALL_NAMES))
def test_forward_backward_every_param_gets_grad(name):
    model = copy.deepcopy(cached_small(name)).train()
    x = small_input(name)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, missing


@pytest.mark.parametrize("name", params(NAMES))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_reparameterization_is_exact(name, dtype, tol):
    model = copy.deepcopy(cached_small(name)).to(dtype).eval()
    x = small_input(name).to(dtype)
    with torch.no_grad():
        ref = model(x)
        fused = repavit.reparameterize_model(model)
        out = fused(x)
    assert fused.reparameterized and not model.reparameterized
    assert rel_err(out, ref) <= tol
    assert all(p.dtype == dtype for p in fused.parameters())


# Round trips exercise the same code for every size: run them on the models under 100M parameters.
@pytest.mark.parametrize("name", [n for n in NAMES if n not in BIG])
def test_timm_reparameterize_and_fused_round_trip(name, tmp_path):
    model = copy.deepcopy(cached_small(name)).eval()
    x = small_input(name)
    with torch.no_grad():
        ref = model(x)
        via_timm = timm.utils.reparameterize_model(model)
        assert rel_err(via_timm(x), ref) <= 1e-5
        ours = repavit.reparameterize_model(model)
        # fused state dict loads strictly into a model built directly in fused form
        path = tmp_path / "fused.pth"
        torch.save({"model": ours.state_dict()}, path)
        rebuilt = repavit.create_model(
            name, checkpoint_path=path, reparameterized=True, num_classes=10, **SMALL[family_of(name)]
        )
        assert rebuilt.reparameterized and not rebuilt.training
        torch.testing.assert_close(rebuilt(x), ours(x), rtol=0, atol=0)
        # training-form state dict round trip
        path2 = tmp_path / "train.pth"
        torch.save({"model": model.state_dict()}, path2)
        # a bare training-form state dict records no idle ratio and its shapes cannot tell it: it must be given
        with pytest.raises(repavit.CheckpointMismatchError, match="records no model settings"):
            repavit.create_model(name, checkpoint_path=path2, num_classes=10, **SMALL[family_of(name)])
        kw = dict(num_classes=10, idle_ratio=model.idle_ratio, **SMALL[family_of(name)])
        again = repavit.create_model(name, checkpoint_path=path2, **kw).eval()
        torch.testing.assert_close(again(x), ref, rtol=0, atol=0)
        # a training-form checkpoint can also be asked for in fused form directly
        fused_from_train = repavit.create_model(name, checkpoint_path=path2, reparameterized=True, **kw)
        assert rel_err(fused_from_train(x), ref) <= 1e-5


def test_reparameterize_is_idempotent_and_not_inplace_by_default():
    model = copy.deepcopy(cached_small("RePaViT_Tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = repavit.reparameterize_model(model)
    assert not model.reparameterized
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    sd = {k: v.clone() for k, v in fused.state_dict().items()}
    again = repavit.reparameterize_model(fused, inplace=True)
    assert again is fused
    for k, v in fused.state_dict().items():
        assert torch.equal(v, sd[k])
    fused.reparameterize()  # method form, also idempotent
    assert fused.state_dict().keys() == sd.keys()
    inplace = repavit.reparameterize_model(model, inplace=True)
    assert inplace is model and model.reparameterized


def test_reparameterized_model_refuses_training():
    fused = repavit.reparameterize_model(cached_small("RePaViT_Tiny"))
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fused.train()
    direct = timm.create_model("RePaViT_Tiny", img_size=32, reparameterized=True)
    assert not direct.training
    with pytest.raises(RuntimeError, match="cannot be trained"):
        direct.train()


def test_layernorm_model_cannot_be_reparameterized():
    model = timm.create_model("RePaViT_Tiny", img_size=32, feature_norm="LayerNorm")
    for fn in (repavit.reparameterize_model, timm.utils.reparameterize_model, lambda m: m.reparameterize()):
        with pytest.raises(ValueError, match="LayerNorm"):
            fn(model)
    with pytest.raises(ValueError, match="LayerNorm"):
        timm.create_model("RePaViT_Tiny", img_size=32, feature_norm="LayerNorm", reparameterized=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(idle_ratio=1.5), "idle_ratio"),
        (dict(idle_ratio=-0.1), "idle_ratio"),
        (dict(feature_norm="GroupNorm"), "feature_norm"),
        (dict(heuristic="cubic"), "heuristic"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("RePaViT_Tiny", img_size=32, **kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'RePaViT_Gigantic'"):
        repavit.create_model("RePaViT_Gigantic")


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_match(alias):
    with torch.device("meta"):
        a = timm.create_model(alias)
        b = timm.create_model(ALIASES[alias])
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize("name", ["RePaViT_Base", "repavit_tiny_patch16_224"])
def test_timm_data_config(name):
    model = timm.create_model(name, img_size=32) if "tiny" in name else None
    cfg = timm.data.resolve_data_config({}, model=model) if model else None
    pcfg = timm.models.get_pretrained_cfg(name)
    assert pcfg.input_size == (3, 224, 224) and pcfg.crop_pct == 0.875
    assert pcfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and pcfg.std == timm.data.IMAGENET_DEFAULT_STD
    if cfg is not None:
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"


# Parameter counts from the facts table (millions, train form / reparameterized), idle 0.75.
PARAMS = {
    "RePaViT_Tiny": (5.74, 3.49),
    "RePaViT_Small": (22.09, 13.18),
    "RePaViT_Base": (86.64, 51.13),
    "RePaViT_Large": (304.52, 178.38),
    "RePaViT_Huge": (632.53, 369.85),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        train = timm.create_model(name)
        fused = timm.create_model(name, reparameterized=True)
    n_train = sum(p.numel() for p in train.parameters()) / 1e6
    n_fused = sum(p.numel() for p in fused.parameters()) / 1e6
    assert (round(n_train, 2), round(n_fused, 2)) == PARAMS[name]


def test_linear_heuristic_tiny_param_count():
    """The authors count 3.64M; their last (fully activated) block keeps a C x C identity matrix for
    the residual, which ours adds directly, so ours has exactly C^2 fewer parameters."""
    with torch.device("meta"):
        fused = timm.create_model("RePaViT_Tiny", heuristic="linear", reparameterized=True)
    n = sum(p.numel() for p in fused.parameters())
    assert round((n + 192 * 192) / 1e6, 2) == 3.64


def test_model_api():
    model = timm.create_model("RePaViT_Tiny", img_size=32, num_classes=7).eval()
    x = small_input("RePaViT_Tiny")
    feats = model.forward_features(x)
    assert feats.shape == (2, 5, 192) and model.num_features == 192
    assert model.forward_head(feats, pre_logits=True).shape == (2, 192)
    assert model.forward_head(feats).shape == (2, 7)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, 192)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_gmacs_counted_with_attention_matmuls():
    from repavit.bench import count_gmacs

    model = timm.create_model("RePaViT_Tiny").eval()
    c, n, depth, classes = 192, 197, 12, 1000
    embed = 196 * c * 3 * 16 * 16
    attn = 4 * n * c * c + 2 * n * n * c
    ffn = 8 * n * c * c
    # class-token shortcut: the last block has keys/values for all n tokens, the rest for one
    attn_last = 2 * n * c * c + 2 * c * c + 2 * n * c
    model.class_token_shortcut = False
    expected = (embed + depth * (attn + ffn) + c * classes) / 1e9
    assert count_gmacs(model) == pytest.approx(expected, rel=1e-9)
    model.class_token_shortcut = True
    expected = (embed + (depth - 1) * (attn + ffn) + attn_last + ffn / n + c * classes) / 1e9
    assert count_gmacs(model) == pytest.approx(expected, rel=1e-9)
    fused = repavit.reparameterize_model(model)
    ffn_fused = 3 * n * c * c  # C x (C + a) and a x C with a = C
    expected = (embed + (depth - 1) * (attn + ffn_fused) + attn_last + ffn_fused / n + c * classes) / 1e9
    assert count_gmacs(fused) == pytest.approx(expected, rel=1e-9)
    fused.class_token_shortcut = False
    assert count_gmacs(fused) == pytest.approx((embed + depth * (attn + ffn_fused) + c * classes) / 1e9, rel=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reparam", [False, True])
def test_class_token_shortcut_is_exact(dtype, tol, reparam):
    """The last block run for the class token only gives the logits of the full computation."""
    model = randomize_params(randomize_bn(timm.create_model("RePaViT_Tiny", depth=3, idle_ratio=0.5)), std=0.05)
    model = model.to(dtype).eval()
    if reparam:
        model = repavit.reparameterize_model(model)
    x = torch.randn(3, 3, 224, 224, dtype=dtype)
    with torch.no_grad():
        full = model.forward_head(model.forward_features(x))
        fast = model(x)
        model.class_token_shortcut = False
        slow = model(x)
    assert torch.equal(slow, full)
    assert rel_err(fast, full) < tol


def test_class_token_shortcut_only_where_exact():
    """Training mode (BatchNorm over all tokens) and average pooling take the full path."""
    model = timm.create_model("RePaViT_Tiny", depth=2)
    x = torch.randn(2, 3, 224, 224)
    calls = []
    handle = model.blocks[-1].attn.register_forward_hook(lambda *a: calls.append("full"))
    model.train()
    model(x)
    model.eval()
    model.reset_classifier(5, global_pool="avg")
    with torch.no_grad():
        model(x)
    assert calls == ["full", "full"]
    model.reset_classifier(5, global_pool="token")
    with torch.no_grad():
        model(x)
    handle.remove()
    assert calls == ["full", "full"]  # the shortcut calls attn.forward_prefix, not attn.forward


def test_reparameterized_vit_scripts():
    fused = repavit.reparameterize_model(cached_small("RePaViT_Tiny"))
    x = small_input("RePaViT_Tiny")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(fused)(x), fused(x))
