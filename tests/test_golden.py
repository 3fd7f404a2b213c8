"""Parity with the authors' models on deterministic checkpoints in their layout, and checkpoint errors."""

from __future__ import annotations

import argparse
import pickle

import pytest
import timm
import torch

import repavit
from repavit import CheckpointMismatchError
from repavit.layers.fold import BNStats, fold_idle_ffn

from golden import CASES, authors_state_dict, expected, golden_input, key_list
from helpers import rel_err


@pytest.fixture(scope="module")
def x():
    return golden_input()


@pytest.mark.parametrize("case", CASES)
def test_matches_authors_logits_before_and_after_reparam(case, x):
    exp = expected(case)
    model = timm.create_model(exp["model"], **exp["kwargs"]).eval()
    repavit.load_checkpoint(model, {"model": authors_state_dict(exp["model"])})
    with torch.no_grad():
        assert rel_err(model(x), exp["logits"]) <= 1e-5
        fused = repavit.reparameterize_model(model)
        assert rel_err(fused(x), exp["logits_reparam"]) <= 1e-5


@pytest.mark.parametrize("name", ["RePaViT_Tiny", "RePaViT_Small", "RePaViT_Base", "RePaViT_Large", "RePaViT_Huge"])
def test_state_dict_layout_equals_authors(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    assert ours == key_list(name)


def authors_reparam_layout(sd: dict, kwargs: dict) -> dict:
    """The authors' reparameterized layout (mlp.fc1 = linear branch + identity, fc2 = C->a, fc3 = a->C),
    built from their training-form weights with the folding math written out here."""
    out = {k: v for k, v in sd.items() if ".mlp." not in k}
    model = timm.create_model("RePaViT_Tiny", **kwargs)
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}.mlp."

        def bn(name, p=p):
            return BNStats(
                sd[p + name + ".running_mean"],
                sd[p + name + ".running_var"],
                sd[p + name + ".weight"],
                sd[p + name + ".bias"],
                1e-5,
            )

        f = fold_idle_ffn(
            sd[p + "fc1.weight"],
            sd[p + "fc1.bias"],
            sd[p + "fc2.weight"],
            sd[p + "fc2.bias"],
            bn("norm1"),
            bn("norm2"),
            blk.mlp.act_dim,
        ).to(torch.float32)
        c = f.b_lin.shape[0]
        w_lin = torch.eye(c) if f.w_lin is None else f.w_lin  # the authors keep the identity as a matrix
        out[p + "fc1.weight"], out[p + "fc1.bias"] = w_lin, f.b_lin
        if f.act_dim:
            out[p + "fc2.weight"], out[p + "fc2.bias"], out[p + "fc3.weight"] = f.w_act, f.b_act, f.w_out
    return out


@pytest.mark.parametrize("case", CASES)
def test_authors_reparameterized_layout_loads(case, x):
    exp = expected(case)
    sd = authors_reparam_layout(authors_state_dict("RePaViT_Tiny"), exp["kwargs"])
    model = repavit.create_model("RePaViT_Tiny", reparameterized=True, **exp["kwargs"])
    repavit.load_checkpoint(model, {"model": sd})
    with torch.no_grad():
        assert rel_err(model(x), exp["logits_reparam"]) <= 1e-5


def test_wrappers_and_prefixes(x):
    sd = authors_state_dict("RePaViT_Tiny")
    exp = expected("RePaViT_Tiny")
    for ckpt in ({"model_ema": sd}, {"state_dict": sd}, {f"module.{k}": v for k, v in sd.items()}):
        model = timm.create_model("RePaViT_Tiny").eval()
        repavit.load_checkpoint(model, ckpt)
        with torch.no_grad():
            assert rel_err(model(x), exp["logits"]) <= 1e-5
    model = timm.create_model("RePaViT_Tiny")
    with pytest.raises(CheckpointMismatchError, match="model_ema"):
        repavit.load_checkpoint(model, {"model": sd}, use_ema=True)


def test_authors_training_checkpoint_with_namespace_loads(tmp_path):
    """Training checkpoints pickle an argparse.Namespace under 'args': allowed, as plain data."""
    sd = authors_state_dict("RePaViT_Tiny")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "model_ema": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3, model="x")}, path)
    model = repavit.create_model("RePaViT_Tiny", checkpoint_path=path)
    assert torch.equal(model.pos_embed, sd["pos_embed"])


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "payload": _Exploit()}, f)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        repavit.read_checkpoint(path)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_other_model_size_is_named():
    model = timm.create_model("RePaViT_Tiny")
    with pytest.raises(CheckpointMismatchError, match="embed_dim 384, model 192") as e:
        repavit.load_checkpoint(model, authors_state_dict("RePaViT_Small"))
    _one_line(e)


def test_feature_norm_mismatch_is_named():
    model = timm.create_model("RePaViT_Tiny", feature_norm="LayerNorm")
    with pytest.raises(CheckpointMismatchError, match="feature_norm=BatchNorm.*feature_norm=LayerNorm") as e:
        repavit.load_checkpoint(model, authors_state_dict("RePaViT_Tiny"))
    _one_line(e)
    ln_sd = timm.create_model("RePaViT_Tiny", feature_norm="LayerNorm").state_dict()
    with pytest.raises(CheckpointMismatchError, match="feature_norm=LayerNorm.*feature_norm=BatchNorm"):
        repavit.load_checkpoint(timm.create_model("RePaViT_Tiny"), ln_sd)


def test_idle_ratio_mismatch_is_named():
    fused_half = repavit.reparameterize_model(timm.create_model("RePaViT_Tiny", idle_ratio=0.5))
    model = repavit.create_model("RePaViT_Tiny", reparameterized=True, idle_ratio=0.75)
    with pytest.raises(CheckpointMismatchError, match=r"activates 384 of 768 .*idle_ratio ~0.5.*idle_ratio 0.75") as e:
        repavit.load_checkpoint(model, fused_half.state_dict())
    _one_line(e)


def test_form_mismatches_are_named():
    sd = authors_state_dict("RePaViT_Tiny")
    with pytest.raises(CheckpointMismatchError, match="training form"):
        repavit.load_checkpoint(repavit.create_model("RePaViT_Tiny", reparameterized=True), sd)
    fused = repavit.reparameterize_model(timm.create_model("RePaViT_Tiny"))
    with pytest.raises(CheckpointMismatchError, match="reparameterized=True"):
        repavit.load_checkpoint(timm.create_model("RePaViT_Tiny"), fused.state_dict())


def test_class_count_mismatch_is_named():
    with pytest.raises(CheckpointMismatchError, match="head.weight.*number of classes"):
        repavit.load_checkpoint(timm.create_model("RePaViT_Tiny", num_classes=10), authors_state_dict("RePaViT_Tiny"))


def test_missing_and_unexpected_keys_in_one_line():
    sd = authors_state_dict("RePaViT_Tiny")
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="1 missing .*norm.weight.*1 unexpected .*extra.weight") as e:
        repavit.load_checkpoint(timm.create_model("RePaViT_Tiny"), sd)
    _one_line(e)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        repavit.create_model("RePaViT_Tiny", checkpoint_path=tmp_path / "nope.pth")


def test_pos_embed_resampled_for_other_image_size(x):
    model = timm.create_model("RePaViT_Tiny", img_size=384).eval()
    repavit.load_checkpoint(model, authors_state_dict("RePaViT_Tiny"))
    assert model.pos_embed.shape == (1, 577, 192)
    with torch.no_grad():
        assert torch.isfinite(model(torch.nn.functional.interpolate(x, size=384))).all()


def test_golden_files_are_the_recorded_ones():
    """Every file under tests/data has the digest recorded in SHA256SUMS (see tests/data/README.md)."""
    import hashlib

    from golden import DATA

    listed = {}
    for line in (DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.suffix in (".pt", ".tsv")}
    assert present == set(listed), "a golden file was added or removed without its SHA256SUMS line"
    for name, digest in listed.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, f"{name} changed"
