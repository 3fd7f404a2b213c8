"""Pretrained weights through timm's ``pretrained_cfg`` and the real huggingface_hub client, offline.

The Hub cannot be reached from here, so each test lays out a Hugging Face cache folder
(``models--ORG--NAME/{refs/main, snapshots/<commit>/FILE}``, what ``hf download`` leaves behind) and
runs with ``HF_HUB_OFFLINE``; ``huggingface_hub.hf_hub_download`` resolves the files from it.
Also covers ``hf-hub:`` against such a cache and ``torch.hub.load`` of this repository.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch

import repavit
from repavit.export import save_hub_folder
from repavit.models import CheckpointMismatchError, load_checkpoint, record_of
from repavit.models._pretrained import HF_HUB_ID, RELEASED, released_weights

from golden import authors_state_dict

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMALL = dict(img_size=32, depth=2)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def seed_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay out ``files`` in ``cache`` as huggingface_hub stores a downloaded repository."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    return snapshot


_SD: dict = {}


def authors_tiny(depth: int = 2) -> dict[str, torch.Tensor]:
    """The authors' released RePaViT_Tiny layout (deterministic tensors), cut to ``depth`` blocks."""
    if "sd" not in _SD:
        _SD["sd"] = authors_state_dict("RePaViT_Tiny")
    return {k: v for k, v in _SD["sd"].items() if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth)}


def reference(sd, **kwargs) -> torch.nn.Module:
    """The model the released Tiny weights describe (idle ratio 0.5), loaded directly."""
    model = timm.create_model("RePaViT_Tiny", idle_ratio=0.5, **SMALL, **kwargs)
    return load_checkpoint(model, sd).eval()


def released_file(tmp_path: Path, sd: dict, name: str = "RePaViT_Tiny.pth") -> Path:
    path = tmp_path / name
    torch.save({"model": sd}, path)
    return path


def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_released_cfgs_are_registered():
    vit = [e for e in RELEASED if e.names[0].startswith("RePaViT_")]  # families wired to the table so far
    assert len(vit) == 5
    for entry in vit:
        for name in entry.names:
            cfg = timm.models.get_pretrained_cfg(name)
            assert cfg.hf_hub_id == HF_HUB_ID and cfg.hf_hub_filename == entry.filename
            assert cfg.tag == entry.tag and "idle_ratio" in cfg.description
            assert f"{name}.{entry.tag}" in timm.list_pretrained(name)
    assert released_weights("RePaViT_Base").model_args["idle_ratio"] == 0.75
    assert released_weights("repavit_tiny_patch16_224").model_args["idle_ratio"] == 0.5


def test_pretrained_from_hf_cache(tmp_path, offline):
    sd = authors_tiny()
    seed_hf_cache(tmp_path / "hf", HF_HUB_ID, {"RePaViT_Tiny.pth": released_file(tmp_path, sd)})
    model = timm.create_model("RePaViT_Tiny", pretrained=True, cache_dir=tmp_path / "hf", **SMALL).eval()
    # the idle ratio comes with the weights' config, not from the caller
    assert model.idle_ratio == 0.5 and model.blocks[0].mlp.act_dim == 384
    with torch.no_grad():
        torch.testing.assert_close(model(x()), reference(sd)(x()), rtol=0, atol=0)
    # the tagged name and repavit.create_model take the same path; reparameterized on request
    fused = repavit.create_model(
        "RePaViT_Tiny.in1k", pretrained=True, reparameterized=True, cache_dir=tmp_path / "hf", **SMALL
    )
    assert fused.reparameterized
    with torch.no_grad():
        torch.testing.assert_close(fused(x()), reference(sd)(x()), rtol=1e-5, atol=1e-5)


def test_released_training_checkpoint_with_pickled_args(tmp_path, offline):
    sd = authors_tiny()
    path = tmp_path / "RePaViT_Tiny.pth"
    ns = argparse.Namespace(model="RePaViT_Tiny", idle_ratio=0.5, feature_norm="BatchNorm", channel_idle=True)
    torch.save({"model": sd, "epoch": 299, "args": ns}, path)
    seed_hf_cache(tmp_path / "hf", HF_HUB_ID, {"RePaViT_Tiny.pth": path})
    model = timm.create_model("RePaViT_Tiny", pretrained=True, cache_dir=tmp_path / "hf", **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x()), reference(sd)(x()), rtol=0, atol=0)


def test_conflicting_setting_is_a_clear_error():
    with pytest.raises(CheckpointMismatchError, match=r"RePaViT_Tiny\.in1k need idle_ratio=0\.5, got idle_ratio=0\.75"):
        timm.create_model("RePaViT_Tiny", pretrained=True, idle_ratio=0.75, **SMALL)
    with pytest.raises(CheckpointMismatchError, match="feature_norm='BatchNorm'"):
        repavit.create_model("RePaViT_Base", pretrained=True, feature_norm="LayerNorm")


def test_missing_weights_error_says_what_and_how(tmp_path, offline):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        timm.create_model("RePaViT_Base", pretrained=True, cache_dir=tmp_path / "empty", depth=1)
    msg = str(e.value)
    assert "\n" not in msg
    for needed in ("RePaViT_Base.pth", HF_HUB_ID, "HF_HUB_OFFLINE", str(tmp_path / "empty"), "hf download"):
        assert needed in msg
    assert "pretrained_cfg_overlay=dict(file=" in msg and "hf_hub_filename" in msg


def test_overrides_local_file_and_other_hub_filename(tmp_path, offline):
    from safetensors.torch import save_file

    sd = authors_tiny()
    ref = reference(sd)
    local = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, local)
    m1 = timm.create_model("RePaViT_Tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(local)), **SMALL)
    seed_hf_cache(tmp_path / "hf", HF_HUB_ID, {"renamed.pth": released_file(tmp_path, sd, "renamed.pth")})
    m2 = timm.create_model(
        "RePaViT_Tiny",
        pretrained=True,
        pretrained_cfg_overlay=dict(hf_hub_filename="renamed.pth"),
        cache_dir=tmp_path / "hf",
        **SMALL,
    )
    with torch.no_grad():
        for m in (m1, m2):
            torch.testing.assert_close(m.eval()(x()), ref(x()), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        timm.create_model("RePaViT_Tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "no.pth")))


def test_other_num_classes_keeps_backbone_and_drops_head(tmp_path, offline):
    sd = authors_tiny()
    seed_hf_cache(tmp_path / "hf", HF_HUB_ID, {"RePaViT_Tiny.pth": released_file(tmp_path, sd)})
    model = timm.create_model("RePaViT_Tiny", pretrained=True, num_classes=7, cache_dir=tmp_path / "hf", **SMALL)
    assert model.head.out_features == 7
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    with torch.no_grad():
        feats = model.eval().forward_features(x())
        torch.testing.assert_close(feats, reference(sd).forward_features(x()), rtol=0, atol=0)


def test_hf_hub_prefix_against_cached_folder(tmp_path, offline):
    """A folder written by save_hub_folder, served from the cache as a Hub repository."""
    sd = authors_tiny()
    fused = repavit.reparameterize_model(reference(sd))
    folder = save_hub_folder(fused, tmp_path / "folder", record_of(fused, "RePaViT_Tiny"), numbers={"note": "test"})
    files = {p.name: p for p in folder.iterdir()}
    seed_hf_cache(tmp_path / "hf", "someone/repavit-tiny-test", files)
    model = timm.create_model("hf-hub:someone/repavit-tiny-test", pretrained=True, cache_dir=tmp_path / "hf")
    assert model.reparameterized and model.idle_ratio == 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(x()), fused(x()), rtol=0, atol=0)


def test_torch_hub_load_local(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("repavit_hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert set(repavit.list_models()) <= entries  # every registered model is an entry point
    model = torch.hub.load(str(ROOT), "RePaViT_Small", source="local", num_classes=10, **SMALL)
    assert isinstance(model, repavit.RePaViT) and model.embed_dim == 384
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "small.pth"
    torch.save({"model": sd}, path)
    fused = torch.hub.load(
        str(ROOT),
        "RePaViT_Small",
        source="local",
        checkpoint_path=str(path),
        reparameterized=True,
        num_classes=10,
        idle_ratio=0.75,  # a bare state dict records no settings
        **SMALL,
    )
    assert fused.reparameterized
    inp = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(inp), model.eval()(inp), rtol=1e-4, atol=1e-5)
