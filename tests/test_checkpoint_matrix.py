"""One checkpoint from training to deployment: every writer x every reader, with no model flags.

A real `repavit train` run (3 named classes, idle ratio 0.5, a 2-block model: none of it the
defaults) writes the training checkpoint; `convert`, `reparam` and `push-to-hub` turn it into the
other layouts; the authors' layouts are built from the same weights. Every reader must then give
the logits of the trained model, computed here independently (the model built by hand with the
run's settings and its state dict loaded with torch alone), or refuse in one line where the pair
makes no sense.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import repavit
from repavit.cli.main import main
from repavit.export import OrtModel
from test_export import authors_fused_state

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fish"]
SIZE = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)
ARCH = dict(img_size=32, num_classes=3, idle_ratio=0.5, **SIZE)
TRAIN = (
    "--model RePaViT_Tiny --model_kwargs depth=2 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 "
    "--channel_idle --idle_ratio 0.5 --feature_norm BatchNorm --num_workers 0 --device cpu --batch_size 12 "
    "--opt adamw --lr 2e-3 --unscale_lr --warmup_epochs 0 --mixup 0 --cutmix 0 --aa none --reprob 0 "
    "--smoothing 0 --drop_path 0 --model_ema_decay 0.5"
)
# what the readers of a record-less file must be told (the authors' code has no size overrides)
AUTHORS_DEPLOY = "--model RePaViT_Tiny --img-size 32 " + " ".join(f"--model-arg {k}={v}" for k, v in SIZE.items())
AUTHORS_TRAIN = "--model RePaViT_Tiny --input_size 32 --model_kwargs " + " ".join(f"{k}={v}" for k, v in SIZE.items())


def cli(cmd: str) -> int:
    return main(shlex.split(cmd))


def x() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


pytestmark = pytest.mark.usefixtures("one_thread")


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for ci, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.full((40, 40, 3), 60.0)
                base[..., ci] = 160
                img = np.clip(base + rng.normal(0, 70, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Data, the training run, and one file per writer."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("matrix")
    data = _image_folder(root / "data")
    out = root / "run"
    assert cli(f"train {TRAIN} --data_path {data} --epochs 2 --output_dir {out}") == 0
    ckpt = torch.load(out / "best_checkpoint.pth", map_location="cpu", weights_only=True)
    files = {"train": out / "best_checkpoint.pth"}
    assert cli(f"convert {files['train']} -o {root / 'converted'}") == 0
    files["convert"] = root / "converted.safetensors"
    assert cli(f"reparam {files['train']} -o {root / 'deploy'}") == 0
    files["reparam"] = root / "deploy.safetensors"
    assert cli(f"push-to-hub {files['train']} -o {root / 'hub'}") == 0
    files["hub"] = root / "hub"
    assert cli(f"push-to-hub {files['train']} --reparameterize -o {root / 'hub_fused'}") == 0
    files["hub_fused"] = root / "hub_fused"
    args = argparse.Namespace(
        model="RePaViT_Tiny", channel_idle=True, idle_ratio=0.5, feature_norm="BatchNorm", heuristic="static",
        nb_classes=3, input_size=32, lr=2e-3,
    )  # fmt: skip
    files["authors_train"] = root / "authors_checkpoint.pth"
    torch.save(
        {"model": ckpt["model"], "model_ema": ckpt["model_ema"], "epoch": 1, "args": args}, files["authors_train"]
    )
    files["authors_fused"] = root / "authors_fused.pth"
    torch.save({"model": authors_fused_state(_reference(ckpt["model"]))}, files["authors_fused"])
    torch.set_num_threads(n)
    return {"root": root, "data": data, "files": files, "ckpt": ckpt}


def _reference(state_dict: dict) -> torch.nn.Module:
    """The trained model, built by hand with the run's settings, its weights loaded by torch alone."""
    model = timm.create_model("RePaViT_Tiny", **ARCH)
    model.load_state_dict(state_dict)
    return model.eval()


@pytest.fixture(scope="module")
def expected(run) -> torch.Tensor:
    with torch.no_grad():
        return _reference(run["ckpt"]["model"])(x())


WRITERS = ["train", "convert", "reparam", "hub", "hub_fused", "authors_train", "authors_fused"]
OURS = {"train", "convert", "reparam", "hub", "hub_fused"}
FUSED = {"reparam", "hub_fused", "authors_fused"}


def _extra(writer: str, kind: str) -> str:
    """Flags a reader needs for this writer's file: none for ours; sizes the authors' layouts cannot record."""
    if writer in OURS:
        return ""
    if kind == "train":
        return AUTHORS_TRAIN
    return AUTHORS_DEPLOY


def _python_kwargs(writer: str) -> dict:
    return {} if writer in OURS else {"model_name": "RePaViT_Tiny", "img_size": 32, **SIZE}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- Python readers -----------------------------------------------------------------------------
@pytest.mark.parametrize("writer", WRITERS)
def test_python_readers_give_the_trained_logits(run, expected, writer):
    path = run["files"][writer]
    kw = _python_kwargs(writer)
    loaded = repavit.models.load_model(path, **kw)
    kw.pop("model_name", None)
    assert loaded.reparameterized == (writer in FUSED)
    assert loaded.model_args["idle_ratio"] == 0.5 and loaded.model_args["num_classes"] == 3
    assert loaded.class_names == (CLASSES if writer in OURS else None)
    with torch.no_grad():
        _close(loaded.model(x()), expected)
        for reparameterized in (False, True):
            if reparameterized is False and writer in FUSED:
                with pytest.raises(repavit.CheckpointMismatchError, match="already reparameterized"):
                    repavit.create_model("RePaViT_Tiny", checkpoint_path=path, **kw)
                continue
            model = repavit.create_model("RePaViT_Tiny", checkpoint_path=path, reparameterized=reparameterized, **kw)
            assert getattr(model, "reparameterized", False) == reparameterized
            _close(model(x()), expected)
        spec = importlib.util.spec_from_file_location("repavit_hubconf", ROOT / "hubconf.py")
        hubconf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hubconf)
        _close(hubconf.repavit_tiny_patch16_224(checkpoint_path=str(path), reparameterized=True, **kw)(x()), expected)


def test_ema_weights_are_read_with_use_ema(run):
    path = run["files"]["train"]
    with torch.no_grad():
        want = _reference(run["ckpt"]["model_ema"])(x())
        _close(repavit.create_model("RePaViT_Tiny", checkpoint_path=path, use_ema=True)(x()), want)
        assert not torch.allclose(want, _reference(run["ckpt"]["model"])(x()))  # the EMA really differs
    root = run["root"]
    assert cli(f"reparam {path} --use-ema -o {root / 'ema_deploy'}") == 0
    with torch.no_grad():
        _close(repavit.models.load_model(root / "ema_deploy.safetensors").model(x()), want)
    with pytest.raises(repavit.CheckpointMismatchError, match="has no EMA weights"):
        repavit.models.load_model(run["files"]["convert"], use_ema=True)


def test_hub_folders_load_in_plain_timm_with_their_classes(run, expected):
    for writer in ("hub", "hub_fused"):
        model = timm.create_model(f"local-dir:{run['files'][writer]}", pretrained=True).eval()
        assert model.pretrained_cfg["label_names"] == CLASSES
        with torch.no_grad():
            _close(model(x()), expected)


# ---- command-line readers ----------------------------------------------------------------------
def _eval(run, writer: str, capsys, *flags: str) -> dict:
    path = run["files"][writer]
    rc = cli(
        f"eval --resume {path} --data_path {run['data']} --num_workers 0 {_extra(writer, 'train')} {' '.join(flags)}"
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline_eval(run):
    metrics = run["ckpt"]["metrics"]
    return {"acc1": metrics["acc1"], "loss": metrics["loss"]}


@pytest.mark.parametrize("writer", WRITERS)
def test_eval_and_reparam_eval_give_the_accuracy_training_measured(run, writer, capsys, baseline_eval):
    plain = _eval(run, writer, capsys)
    assert plain["reparameterized"] == (writer in FUSED)  # a fused file is evaluated as it is
    fused = _eval(run, writer, capsys, "--reparam")
    for result in (plain, fused):
        assert result["images"] == 24
        assert result["acc1"] == baseline_eval["acc1"]
        assert result["loss"] == pytest.approx(baseline_eval["loss"], rel=1e-4)


@pytest.mark.parametrize("writer", WRITERS)
def test_export_onnx_gives_the_trained_logits_and_carries_the_record(run, expected, writer, capsys, tmp_path):
    out = tmp_path / "m.onnx"
    assert cli(f"export {run['files'][writer]} {_extra(writer, 'deploy')} -o {out} --exporter legacy") == 0
    np.testing.assert_allclose(OrtModel(out)(x()), expected.numpy(), rtol=1e-4, atol=1e-5)
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert sidecar["record"]["model_args"]["idle_ratio"] == 0.5 and sidecar["record"]["reparameterized"]
    assert sidecar["record"]["class_names"] == (CLASSES if writer in OURS else None)
    assert sidecar["preprocessing"]["input_size"] == [3, 32, 32]
    meta = repavit.export.read_onnx_metadata(out)
    assert meta["repavit_record"] == sidecar["record"]


@pytest.mark.parametrize("writer", WRITERS)
def test_predict_prints_the_class_names(run, expected, writer, capsys):
    image = run["data"] / "val" / "dog" / "0.png"
    assert cli(f"predict {image} --checkpoint {run['files'][writer]} {_extra(writer, 'deploy')} --top-k 3") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    labels = [re.match(r"  \d\. [\d.]+  (.+) \((\d)\)$", line).groups() for line in lines[1:]]
    names = {i: name for name, i in labels}
    want = {str(i): (c if writer in OURS else f"class {i}") for i, c in enumerate(CLASSES)}
    assert names == want


@pytest.mark.parametrize("writer", WRITERS)
def test_convert_and_reparam_outputs_round_trip(run, expected, writer, tmp_path):
    extra = _extra(writer, "deploy")
    assert cli(f"convert {run['files'][writer]} {extra} -o {tmp_path / 'c'}") == 0
    converted = repavit.models.load_model(tmp_path / "c.safetensors")  # no flags: the record decides
    assert converted.model_args["idle_ratio"] == 0.5 and converted.reparameterized == (writer in FUSED)
    rc = cli(f"reparam {run['files'][writer]} {extra} -o {tmp_path / 'f'}")
    if writer in FUSED:
        assert rc == 2 and not (tmp_path / "f.safetensors").exists()
        return
    assert rc == 0
    with torch.no_grad():
        _close(converted.model(x()), expected)
        _close(repavit.models.load_model(tmp_path / "f.safetensors").model(x()), expected)


def test_push_to_hub_card_tells_the_truth(run):
    card = (run["files"]["hub"] / "README.md").read_text()
    acc = run["ckpt"]["metrics"]["acc1"]
    assert "not the authors' release" in card and "imagenet-1k" not in card and "paper for these" not in card
    assert "idle_ratio=0.5" in card and "3 classes" in card and "`cat`, `dog`, `fish`" in card
    assert f"top-1 {acc:.2f}%" in card and "24 validation images" in card
    config = json.loads((run["files"]["hub_fused"] / "config.json").read_text())
    assert config["repavit"]["reparameterized"] and config["repavit"]["class_names"] == CLASSES
    assert config["model_args"]["idle_ratio"] == 0.5 and config["label_names"] == CLASSES


@pytest.mark.parametrize("writer", ["train", "convert", "authors_train", "reparam"])
def test_resume_reads_the_model_from_the_checkpoint(run, writer, tmp_path, capsys):
    rc = cli(
        f"train {_extra(writer, 'train')} --resume {run['files'][writer]} --data_path {run['data']} --num_workers 0 "
        f"--batch_size 12 --mixup 0 --cutmix 0 --epochs 3 --output_dir {tmp_path / 'o'}"
    )
    err = capsys.readouterr().err
    if writer == "reparam":
        assert rc == 2 and "already reparameterized" in err and not (tmp_path / "o").exists()
        return
    assert rc == 0, err
    saved = torch.load(tmp_path / "o" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert saved["record"]["model_args"]["idle_ratio"] == 0.5 and saved["record"]["class_names"] == CLASSES
    assert saved["epoch"] == 2  # resumed runs continue to --epochs 3, fresh starts train all 3


# ---- contradicting flags: one line, both values, nothing written --------------------------------
TRAIN_CONFLICTS = [
    ("--model RePaViT_Small", "holds a RePaViT_Tiny, --model RePaViT_Small was given"),
    ("--idle_ratio 0.75", "trained with idle_ratio=0.5, --idle_ratio 0.75 was given"),
    ("--feature_norm LayerNorm", "trained with feature_norm=BatchNorm, --feature_norm LayerNorm was given"),
    ("--heuristic linear", "trained with heuristic=static, --heuristic linear was given"),
    ("--no_channel_idle", "trained with channel_idle=True, --no_channel_idle was given"),
    ("--input_size 64", "trained with img_size=32, --input_size 64 was given"),
    ("--nb_classes 5", "trained with num_classes=3, --nb_classes 5 was given"),
    ("--model_kwargs depth=3", "trained with depth=2, --model_kwargs depth=3 was given"),
    ("--model_kwargs num_heads=1", "trained with num_heads=2, --model_kwargs num_heads=1 was given"),  # same shapes
]


@pytest.mark.parametrize("command", ["eval", "train", "speed"])
@pytest.mark.parametrize(("flag", "message"), TRAIN_CONFLICTS)
def test_training_commands_refuse_contradicting_flags(run, tmp_path, capsys, command, flag, message):
    out = tmp_path / "o"
    rc = cli(
        f"{command} --resume {run['files']['train']} --data_path {run['data']} {flag} --num_workers 0 "
        f"--epochs 3 --output_dir {out}"
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


DEPLOY_CONFLICTS = [
    ("--model RePaViT_Small", "holds a RePaViT_Tiny, --model RePaViT_Small was given"),
    ("--idle-ratio 0.75", "trained with idle_ratio=0.5, --idle-ratio 0.75 was given"),
    ("--feature-norm LayerNorm", "trained with feature_norm=BatchNorm, --feature-norm LayerNorm was given"),
    ("--heuristic linear", "trained with heuristic=static, --heuristic linear was given"),
    ("--no-channel-idle", "trained with channel_idle=True, --no-channel-idle was given"),
    ("--num-classes 5", "trained with num_classes=3, --num-classes 5 was given"),
    ("--img-size 64", "trained with img_size=32, --img-size 64 was given"),
    ("--model-arg depth=3", "trained with depth=2, --model-arg depth=3 was given"),
    ("--model-arg num_heads=1", "trained with num_heads=2, --model-arg num_heads=1 was given"),  # same shapes
]


@pytest.mark.parametrize("command", ["convert", "reparam", "export", "push-to-hub", "predict"])
@pytest.mark.parametrize(("flag", "message"), DEPLOY_CONFLICTS)
def test_deploy_commands_refuse_contradicting_flags(run, tmp_path, capsys, command, flag, message):
    path = run["files"]["train"]
    image = run["data"] / "val" / "cat" / "0.png"
    out = tmp_path / "o"
    target = {
        "convert": f"{path} -o {out}",
        "reparam": f"{path} -o {out}",
        "export": f"{path} -o {out}.onnx",
        "push-to-hub": f"{path} -o {out}",
        "predict": f"{image} --checkpoint {path}",
    }[command]
    rc = cli(f"{command} {target} {flag}")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs",
    [{"idle_ratio": 0.75}, {"feature_norm": "LayerNorm"}, {"num_classes": 1000}, {"img_size": 224}, {"depth": 12}],
)
def test_python_api_refuses_contradicting_settings(run, kwargs):
    key, value = next(iter(kwargs.items()))
    with pytest.raises(repavit.CheckpointMismatchError, match=f"trained with {key}=.*, {key}={value!r} was given"):
        repavit.create_model("RePaViT_Tiny", checkpoint_path=run["files"]["train"], **kwargs)
    with pytest.raises(repavit.CheckpointMismatchError, match="holds a RePaViT_Tiny"):
        repavit.create_model("RePaViT_Base", checkpoint_path=run["files"]["train"])


def test_omitted_flags_are_taken_from_the_record_and_said(run, caplog, capsys):
    with caplog.at_level("INFO"):
        assert cli(f"eval --resume {run['files']['train']} --data_path {run['data']} --num_workers 0") == 0
    line = "model from checkpoint: RePaViT_Tiny, idle_ratio=0.5, BatchNorm FFN, 3 classes, img_size=32, patch_size=8"
    assert line in caplog.text and "depth=2, num_heads=2" in caplog.text
    capsys.readouterr()
    # the seed README's way (every flag given) agrees with the record, so it is accepted
    assert cli(f"eval {TRAIN} --resume {run['files']['train']} --data_path {run['data']}") == 0


def test_data_with_other_classes_is_refused(run, tmp_path, capsys):
    for names, message in (
        (["cat", "dog"], "head of 3 classes (cat, dog, fish), the data at"),
        (["bird", "cat", "fish"], "class 0 is 'cat' there, 'bird' here"),
    ):
        data = tmp_path / "-".join(names)
        for name in names:
            (data / "val" / name).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(data / "val" / name / "0.png")
        assert cli(f"eval --resume {run['files']['train']} --data_path {data} --num_workers 0") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
