"""The model record and the rules for files without one (the authors' releases, foreign files)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import repavit
from repavit.layers.ffn_state import ffn_forms
from repavit.models import (
    CheckpointMismatchError,
    ModelRecord,
    load_model,
    open_checkpoint,
    record_of,
    save_checkpoint,
    state_form,
)
from repavit.models.record import same_setting
from test_export import authors_fused_state

from golden import authors_state_dict
from helpers import randomize_bn, randomize_params, rel_err

SMALL = dict(img_size=32, depth=2, num_classes=10)


def x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("RePaViT_Tiny", **{**SMALL, **kwargs})
    return randomize_params(randomize_bn(model), std=0.02).eval()


# ---- the record itself --------------------------------------------------------------------------
def test_record_round_trip_and_validation():
    record = record_of(_model(idle_ratio=0.5), class_names=[f"c{i}" for i in range(10)])
    assert record.model_name == "RePaViT_Tiny" and not record.reparameterized
    args = record.model_args
    assert args["idle_ratio"] == 0.5 and args["depth"] == 2 and args["img_size"] == [32, 32]
    assert "drop_path_rate" not in args and "class_token_shortcut" not in args  # not what the model computes
    assert ModelRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert record.describe() == "RePaViT_Tiny, idle_ratio=0.5, BatchNorm FFN, 10 classes, img_size=32, depth=2"
    with pytest.raises(ValueError, match="3 class names for a head of 10 classes"):
        ModelRecord("RePaViT_Tiny", {"num_classes": 10}, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="newer repavit"):
        ModelRecord.from_dict({**record.to_dict(), "format_version": 99}, "x.pth")
    with pytest.raises(ValueError, match="cannot be recorded"):
        ModelRecord("RePaViT_Tiny", {"act_layer": torch.nn.GELU})


def test_same_setting():
    assert same_setting(0.75, 0.75 + 1e-12) and not same_setting(0.75, 0.5)
    assert same_setting(224, [224, 224]) and not same_setting(224, [224, 192])
    assert same_setting("none", "static", "heuristic") and not same_setting(True, 1)


def test_form_detection_is_one_function_for_every_layout():
    train, fused = _model(), repavit.reparameterize_model(_model())
    assert state_form(train.state_dict()) == "train" and state_form(fused.state_dict()) == "fused"
    assert state_form(authors_fused_state(train)) == "fused"
    assert state_form(timm.create_model("deit_tiny_patch16_224", depth=1).state_dict()) is None  # plain MLP
    assert set(
        ffn_forms(timm.create_model("RePaViT_Tiny", feature_norm="LayerNorm", **SMALL).state_dict()).values()
    ) == {"ln"}
    mixed = {**train.state_dict(), **{k: v for k, v in fused.state_dict().items() if k.startswith("blocks.1.")}}
    mixed = {k: v for k, v in mixed.items() if not (k.startswith("blocks.1.mlp.") and ("fc" in k or "norm" in k))}
    assert state_form(mixed) == "mixed"


# ---- record-less files: shapes decide what they can, assumptions are said ----------------------
def test_released_shaped_file_takes_the_release_settings_with_a_warning(tmp_path, caplog):
    path = tmp_path / "weights.pth"
    torch.save({"model": authors_state_dict("RePaViT_Tiny")}, path)  # 1000 classes, 224 px, 12 blocks
    with caplog.at_level("INFO"):
        loaded = load_model(path)
    assert loaded.model_name == "RePaViT_Tiny" and loaded.model_args["idle_ratio"] == 0.5
    assert loaded.released is None and loaded.release_like.top1 == 69.4  # assumed, not known
    assert "shaped like the released RePaViT_Tiny weights" in caplog.text
    assert "from its tensor shapes: RePaViT_Tiny, 1000 classes, img_size=224, BatchNorm FFN" in caplog.text
    # an explicit setting wins over the table, and is then the caller's claim (no released-weights card)
    other = load_model(path, idle_ratio=0.75)
    assert other.model.blocks[0].mlp.act_dim == 192 and other.released is None


def test_training_form_without_record_is_refused_unless_the_ratio_is_given(tmp_path):
    model = _model(idle_ratio=0.5)
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"records no model settings.*idle_ratio=R") as e:
        load_model(path, "RePaViT_Tiny", depth=2, img_size=32)
    assert "\n" not in str(e.value)
    loaded = load_model(path, "RePaViT_Tiny", depth=2, img_size=32, idle_ratio=0.5)
    assert loaded.model_args["channel_idle"] is True and loaded.model_args["num_classes"] == 10  # from the head
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x()), model(x()), rtol=0, atol=0)
    plain = load_model(path, "RePaViT_Tiny", depth=2, img_size=32, channel_idle=False)  # plain FFNs: nothing to guess
    assert plain.model.blocks[0].mlp.act_dim == 768


@pytest.mark.parametrize(
    ("idle_ratio", "heuristic"), [(0.5, "static"), (0.75, "static"), (0.75, "linear"), (0.0, "static")]
)
def test_fused_file_without_record_has_its_idle_ratio_read_off_its_shapes(tmp_path, caplog, idle_ratio, heuristic):
    model = _model(idle_ratio=idle_ratio, heuristic=heuristic, depth=4)
    path = tmp_path / "fused.pth"
    torch.save({"model": authors_fused_state(model)}, path)
    with caplog.at_level("INFO"):
        loaded = load_model(path, "RePaViT_Tiny", depth=4, img_size=32)
    assert loaded.reparameterized
    assert [blk.mlp.act_dim for blk in loaded.model.blocks] == [blk.mlp.act_dim for blk in model.blocks]
    with torch.no_grad():
        assert rel_err(loaded.model(x()), model(x())) < 1e-5
    assert "from its tensor shapes" in caplog.text


def test_authors_pickled_args_are_a_record(tmp_path):
    import argparse

    model = _model(idle_ratio=0.5)
    ns = argparse.Namespace(model="RePaViT_Tiny", channel_idle=True, idle_ratio=0.5, feature_norm="BatchNorm",
                            heuristic="none", nb_classes=10, input_size=32)  # fmt: skip
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": ns}, path)
    ckpt = open_checkpoint(path)
    assert ckpt.layout == "authors-train" and ckpt.record.model_args["heuristic"] == "static"
    with pytest.raises(CheckpointMismatchError, match="the training args|trained with idle_ratio=0.5"):
        load_model(path, depth=2, idle_ratio=0.75)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path, depth=2).model(x()), model(x()), rtol=0, atol=0)


# ---- RePaViT's filter: the shared FFN helpers, any mlp_ratio ------------------------------------
def test_repavit_filter_has_no_mlp_ratio_assumption(tmp_path):
    """mlp_ratio=3 (RePa-LV-ViT's): the authors' fused layout converts and a wrong idle ratio is named."""
    model = _model(mlp_ratio=3.0, idle_ratio=0.5)
    assert model.blocks[0].mlp.hidden_dim == 576 and model.blocks[0].mlp.act_dim == 288
    path = tmp_path / "fused.pth"
    torch.save({"model": authors_fused_state(model)}, path)
    loaded = load_model(path, "RePaViT_Tiny", mlp_ratio=3.0, depth=2, img_size=32)
    assert loaded.model_args["idle_ratio"] == 0.5
    with torch.no_grad():
        assert rel_err(loaded.model(x()), model(x())) < 1e-5
    with pytest.raises(CheckpointMismatchError, match=r"activates 288 of 576 hidden channels \(idle_ratio ~0\.5\)"):
        load_model(path, "RePaViT_Tiny", mlp_ratio=3.0, depth=2, img_size=32, idle_ratio=0.75)
    # nothing idles: the authors' fc1 is the identity and the shared converter keeps it out of the fused form
    full = _model(mlp_ratio=3.0, channel_idle=False)
    torch.save({"model": authors_fused_state(full)}, path)
    loaded = load_model(path, "RePaViT_Tiny", mlp_ratio=3.0, depth=2, img_size=32)
    assert loaded.model_args["channel_idle"] is False and not loaded.model.blocks[0].mlp.has_linear
    with torch.no_grad():
        assert rel_err(loaded.model(x()), full(x())) < 1e-5


# ---- corrupt files: one line, no traceback ------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_files_are_one_line_errors(tmp_path, suffix):
    model = _model()
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save({"model": model.state_dict()}, good)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, good)
    data = good.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", bytes(range(256)) * 64)):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(ValueError) as e:
            open_checkpoint(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "weights_only=False" not in msg, msg


def test_timm_pretrained_file_overlay_honours_the_record(tmp_path):
    model = _model(idle_ratio=0.5)
    path = tmp_path / "ours.pth"
    repavit.models.save_checkpoint(path, model.state_dict(), record_of(model))
    built = timm.create_model("RePaViT_Tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=2)
    assert built.idle_ratio == 0.5 and built.num_classes == 10 and built.patch_embed.img_size == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(built.eval()(x()), model(x()), rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match="was trained with idle_ratio=0.5"):
        timm.create_model(
            "RePaViT_Tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=2, idle_ratio=0.75
        )


# ---- records that are incomplete, stale, damaged or contradicted (found by probing as a user) ----------
def _saved(tmp_path, model, name="m.pth", **record_changes):
    record = record_of(model)
    data = record.to_dict()
    for key, value in record_changes.items():
        if value is None:
            data["model_args"].pop(key, None)
        else:
            data["model_args"][key] = value
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "record": data, "format": "repavit-train-v2"}, path)
    return path


def test_a_record_without_an_ffn_setting_means_the_constructor_default_for_every_reader(tmp_path, caplog):
    model = _model(idle_ratio=0.5)
    path = _saved(tmp_path, model, channel_idle=None)
    with caplog.at_level("WARNING"):
        loaded = load_model(path)
    assert loaded.model_args["channel_idle"] is True and "does not state channel_idle" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x()), model(x()), rtol=0, atol=0)


def test_every_architecture_argument_is_recorded_and_guarded(tmp_path):
    model = _model(idle_ratio=0.5)
    args = record_of(model).model_args
    assert args["num_heads"] == 3 and args["embed_dim"] == 192 and args["qkv_bias"] is True
    path = _saved(tmp_path, model)
    with pytest.raises(CheckpointMismatchError, match="trained with num_heads=3, num_heads=1 was given"):
        load_model(path, num_heads=1)  # same shapes, another function: never silently accepted


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"idle_ratio": "0.5"}, "idle_ratio='0.5' is not a number"),
        ({"idle_ratio": None, "channel_idle": "true"}, "channel_idle='true' is not true or false"),
        ({"img_size": [32]}, "img_size=\\[32\\] is not a positive"),
        ({"feature_norm": "GroupNorm"}, "feature_norm='GroupNorm' is not"),
        ({"num_classes": -1}, "num_classes=-1 is not"),
    ],
)
def test_damaged_records_are_one_line_errors(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as e:
        load_model(_saved(tmp_path, _model(), **changes))
    assert "\n" not in str(e.value)


def test_damaged_record_containers(tmp_path):
    model = _model()
    torch.save({"model": model.state_dict(), "record": "oops", "format": "repavit-train-v2"}, tmp_path / "a.pth")
    torch.save({"model": model.state_dict(), "format": "repavit-train-v2"}, tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        with pytest.raises(ValueError, match="model record is missing or damaged"):
            load_model(tmp_path / name)
    data = record_of(model).to_dict()
    for bad, message in (
        ({**data, "class_names": "cat"}, "class_names must be a list"),
        ({**data, "format_version": "3"}, "format_version '3' is not a whole number"),
        ({**data, "format": "something-else"}, "has format 'something-else'"),
    ):
        torch.save({"model": model.state_dict(), "record": bad}, tmp_path / "c.pth")
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / "c.pth")


def test_a_json_beside_a_header_less_safetensors_file_is_not_trusted(tmp_path, caplog):
    ours, other = _model(idle_ratio=0.5), _model(idle_ratio=0.25)
    repavit.models.save_checkpoint(tmp_path / "w", ours.state_dict(), record_of(ours))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "w.safetensors")  # replaced
    with caplog.at_level("WARNING"), pytest.raises(CheckpointMismatchError, match="records no model settings"):
        load_model(tmp_path / "w.safetensors", "RePaViT_Tiny", depth=2, img_size=32)
    assert "w.json beside it is ignored" in caplog.text


def test_a_hub_folder_whose_weights_were_replaced_is_refused(tmp_path):
    from repavit.export import save_hub_folder

    ours, other = _model(idle_ratio=0.5), _model(idle_ratio=0.25)
    save_hub_folder(ours, tmp_path / "hub", record_of(ours), numbers={})
    repavit.models.save_checkpoint(tmp_path / "hub" / "model", other.state_dict(), record_of(other))
    with pytest.raises(CheckpointMismatchError, match="describe different models"):
        load_model(tmp_path / "hub")
    with pytest.raises(ValueError, match="describe different models"):
        timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)


def test_timm_local_dir_refuses_a_contradicting_setting(tmp_path):
    from repavit.export import save_hub_folder

    model = _model(idle_ratio=0.5)
    save_hub_folder(model, tmp_path / "hub", record_of(model), numbers={})
    with pytest.raises(CheckpointMismatchError, match="trained with global_pool='token'"):
        timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True, global_pool="avg")
    ok = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True, num_classes=5)  # fine-tuning: new head
    assert ok.num_classes == 5


def test_a_release_shaped_file_is_not_published_as_the_release(tmp_path, capsys):
    from repavit.cli.main import main

    torch.save({"model": authors_state_dict("RePaViT_Tiny")}, tmp_path / "w.pth")
    assert main(["convert", str(tmp_path / "w.pth"), "-o", str(tmp_path / "c")]) == 0
    assert main(["push-to-hub", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "unverified: the source file recorded no settings and is shaped like the authors' released" in card
    assert "reported in the paper" not in card and "imagenet-1k" not in card
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert "tag" not in config["pretrained_cfg"] and "69.4" not in json.dumps(config)


def test_a_contradicted_heuristic_on_a_fused_file_is_refused(tmp_path):
    model = _model(idle_ratio=0.75, heuristic="linear", depth=4)
    torch.save({"model": authors_fused_state(model)}, tmp_path / "f.pth")
    with pytest.raises(CheckpointMismatchError, match="with the static heuristic"):
        load_model(tmp_path / "f.pth", "RePaViT_Tiny", depth=4, img_size=32, heuristic="static")


def test_linear_heuristic_below_one_half_is_read_off_a_fused_file(tmp_path):
    model = _model(idle_ratio=0.25, heuristic="linear", depth=4)  # clipped per-block ratios
    torch.save({"model": authors_fused_state(model)}, tmp_path / "f.pth")
    loaded = load_model(tmp_path / "f.pth", "RePaViT_Tiny", depth=4, img_size=32)
    assert loaded.model_args["heuristic"] == "linear"
    assert [b.mlp.act_dim for b in loaded.model.blocks] == [b.mlp.act_dim for b in model.blocks]
    with torch.no_grad():
        assert rel_err(loaded.model(x()), model(x())) < 1e-5


def test_user_mistakes_in_deploy_commands_are_one_line(tmp_path, capsys):
    from repavit.cli.main import main

    model = _model(idle_ratio=0.5)
    path = _saved(tmp_path, model)
    ln = timm.create_model("RePaViT_Tiny", feature_norm="LayerNorm", **SMALL)
    ln_path = tmp_path / "ln.pth"
    repavit.models.save_checkpoint(ln_path, ln.state_dict(), record_of(ln))
    image = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (40, 40)).save(image)
    deit = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32, num_classes=3)
    deit_path = tmp_path / "deit.pth"
    repavit.models.save_checkpoint(deit_path, deit.state_dict(), record_of(deit, "deit_tiny_patch16_224"))
    cases = [
        (["predict", image, "--checkpoint", path, "--model-arg", "reparameterized=true"], "is not a model setting"),
        (["convert", path, "-o", ""], "give a file path"),
        (["predict", image, "--checkpoint", path, "--device", "cuda"], "no CUDA GPU is available"),
        (["predict", image, "--checkpoint", path, "--pretrained"], "either --checkpoint or --pretrained"),
        (["predict", image, "--checkpoint", ln_path], "no reparameterized form: run its training form (--no-reparam)"),
        (
            ["export", path, "--format", "onnx", "-o", tmp_path / "m.pt"],
            "its suffix means torchscript, but --format is onnx",
        ),
        (["reparam", deit_path, "-o", tmp_path / "d"], "has no channel-idle FFNs"),
    ]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert main(["export", str(path), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", "--resume", str(tmp_path / "m.pt"), "--data_set", "SYNTH", "--num_workers", "0"]) == 2
    assert "is a TorchScript export" in capsys.readouterr().err


def test_heuristic_aliases_are_equal_only_for_the_heuristic():
    """'none' and '' are the authors' spellings of 'static'; for any other setting they are themselves."""
    from repavit.models.record import same_setting

    assert same_setting("none", "static", "heuristic") and same_setting("", "static", "heuristic")
    assert not same_setting("linear", "none", "heuristic")
    assert not same_setting("", "none", "global_pool") and not same_setting("", "static")


# ---- preprocessing: deployment prepares images as training evaluated them ---------------------------------
@pytest.mark.parametrize("size,ratio", [(32, 0.875), (64, 0.875), (64, 0.95)])
def test_recorded_preprocessing_is_the_training_evaluation_transform(size, ratio):
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from repavit.data.transforms import TransformConfig, build_transform, eval_preprocessing

    cfg = TransformConfig(input_size=size, eval_crop_ratio=ratio)
    prep = eval_preprocessing(cfg)
    ours, timms = build_transform(False, cfg), create_transform(**prep, is_training=False)
    rng = np.random.default_rng(0)
    for shape in ((80, 120, 3), (size, size, 3), (29, 41, 3)):  # landscape, square, smaller than the input
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        assert torch.equal(ours(img), timms(img)), shape


def test_preprocessing_travels_with_the_checkpoint(tmp_path):
    from repavit.export.info import eval_transform, preprocessing

    prep = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # fmt: skip
    model = _model()
    record = record_of(model, preprocessing=prep)
    assert ModelRecord.from_dict(json.loads(json.dumps(record.to_dict()))).preprocessing == prep
    save_checkpoint(tmp_path / "m.pth", model.state_dict(), record)
    for loaded in (load_model(tmp_path / "m.pth"), load_model(tmp_path / "m.pth", reparameterized=True)):
        assert loaded.record.preprocessing == prep
        assert preprocessing(loaded.model)["crop_pct"] == 1.0 and preprocessing(loaded.model)["mean"] == [0.5] * 3
        normalize = eval_transform(loaded.model).transforms[-1]
        assert list(normalize.mean) == [0.5] * 3 and list(normalize.std) == [0.25] * 3
    bad_values = [
        ({"crop_pct": 1.5}, "crop_pct=1.5 is not valid"),
        ({"mean": [0.5]}, r"mean=\[0.5\] is not valid"),
        ({"size": 3}, "unknown preprocessing key"),
    ]
    for bad, needle in bad_values:
        with pytest.raises(repavit.errors.UserError, match=needle):
            ModelRecord(model_name="RePaViT_Tiny", preprocessing=bad)
