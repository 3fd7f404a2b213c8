"""The deployment subcommands end to end: convert, reparam, export, push-to-hub, predict.

Starts from checkpoints in the authors' layout (a training checkpoint with pickled ``args``, and
released-style ``{"model": state_dict}`` weights) and checks every output against the PyTorch
model it came from.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

import repavit
from repavit.cli.main import main as cli
from repavit.export import OrtModel
from repavit.models import load_model

from golden import authors_state_dict
from helpers import randomize_bn, randomize_params, rel_err

SUBCOMMANDS = ["convert", "reparam", "export", "push-to-hub", "predict"]


def x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("RePaViT_Tiny", img_size=32, depth=2, num_classes=10, idle_ratio=0.5)
    return randomize_params(randomize_bn(model), std=0.02).eval()


@pytest.fixture
def training_checkpoint(tmp_path, trained):
    """The authors' training checkpoint layout; its pickled args record the model and its settings."""
    args = argparse.Namespace(
        model="RePaViT_Tiny",
        idle_ratio=0.5,
        feature_norm="BatchNorm",
        channel_idle=True,
        heuristic="static",
        nb_classes=10,
        input_size=32,
    )
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": trained.state_dict(), "optimizer": {}, "epoch": 299, "args": args}, path)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli([command, "--help"])
    assert e.value.code == 0
    assert "usage: repavit" in capsys.readouterr().out


def test_three_commands_from_authors_pth_to_onnx(tmp_path, capsys, trained, training_checkpoint):
    code, out, _ = run(capsys, "convert", training_checkpoint, "--model-arg", "depth=2", "-o", tmp_path / "tiny")
    assert code == 0, out
    config = json.loads((tmp_path / "tiny.json").read_text())
    assert config["model_args"]["idle_ratio"] == 0.5 and config["reparameterized"] is False

    code, out, _ = run(capsys, "reparam", tmp_path / "tiny.safetensors", "-o", tmp_path / "tiny_deploy")
    assert code == 0, out
    sizes = re.search(r"size: ([\d.]+) MB -> ([\d.]+) MB \(float32 tensors", out)
    assert sizes and float(sizes.group(1)) > float(sizes.group(2))
    assert re.search(r"max \|fused - training\| on 2 random images: \S+ \(relative \S+\)", out)
    assert json.loads((tmp_path / "tiny_deploy.json").read_text())["reparameterized"] is True

    code, out, _ = run(capsys, "export", tmp_path / "tiny_deploy.safetensors", "-o", tmp_path / "tiny.onnx")
    assert code == 0, out
    diff = re.search(r"max abs diff (\S+), max relative diff (\S+)", out)
    assert diff and float(diff.group(2)) <= 1e-4
    # independent check: ONNX Runtime against the original training-form model
    with torch.no_grad():
        ref = trained(x(3)).numpy()
    got = OrtModel(tmp_path / "tiny.onnx")(x(3))
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) <= 1e-4


def test_convert_record_less_training_form_needs_the_idle_ratio(tmp_path, capsys, caplog):
    """A record-less training-form file that is not shaped like a release: its idle ratio must be given."""
    sd = authors_state_dict("RePaViT_Tiny")
    sd = {k: v for k, v in sd.items() if not (k.startswith("blocks.") and int(k.split(".")[1]) >= 2)}
    src = tmp_path / "RePaViT_Tiny.pth"
    torch.save({"model": sd}, src)
    argv = [
        "convert",
        src,
        "--model",
        "RePaViT_Tiny",
        "--model-arg",
        "depth=2",
        "-o",
        tmp_path / "c",
    ]
    code, _, err = run(capsys, *argv, "--img-size", "32")  # the position embedding says 224
    assert code == 2 and "position embedding is for img_size=224, --img-size 32 was given" in err
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert "records no model settings" in err and "--idle-ratio R" in err and "--no-channel-idle" in err
    assert not (tmp_path / "c.safetensors").exists()
    code, out, err = run(capsys, *argv, "--idle-ratio", "0.5")
    assert code == 0, out
    assert "assuming heuristic=static" in caplog.text  # the one setting still assumed is said
    loaded = load_model(tmp_path / "c.safetensors")
    assert loaded.model_args["idle_ratio"] == 0.5 and loaded.model.blocks[0].mlp.act_dim == 384
    assert torch.equal(loaded.model.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])


def test_user_errors_are_one_line(tmp_path, capsys, training_checkpoint):
    from safetensors.torch import save_file

    code, _, err = run(capsys, "convert", tmp_path / "missing.pth", "-o", tmp_path / "o")
    assert code == 2 and err.startswith("repavit convert: error: checkpoint not found") and err.count("\n") == 1
    save_file({"foo": torch.zeros(3)}, tmp_path / "foo.safetensors")
    code, _, err = run(capsys, "convert", tmp_path / "foo.safetensors", "-o", tmp_path / "o")
    assert code == 2 and "cannot tell which model" in err
    code, _, err = run(
        capsys, "convert", training_checkpoint, "--idle-ratio", "0.75", "--model-arg", "depth=2", "-o", "o"
    )
    assert code == 2 and "trained with idle_ratio=0.5, --idle-ratio 0.75 was given" in err
    code, _, _ = run(capsys, "reparam", training_checkpoint, "--model-arg", "depth=2", "-o", tmp_path / "d")
    assert code == 0
    code, _, err = run(capsys, "reparam", tmp_path / "d.safetensors", "-o", tmp_path / "d2")
    assert code == 2 and "already reparameterized" in err


def test_export_torchscript(tmp_path, capsys, trained, training_checkpoint):
    argv = ["export", training_checkpoint, "--model-arg", "depth=2", "--format", "torchscript", "-o", tmp_path / "m.pt"]
    code, out, _ = run(capsys, *argv)
    assert code == 0, out
    assert "checked against PyTorch on batches [1, 3]" in out
    with torch.no_grad():
        assert rel_err(torch.jit.load(str(tmp_path / "m.pt"))(x()), trained(x())) < 1e-5


def test_push_to_hub_folder(tmp_path, capsys, trained, training_checkpoint):
    argv = ["push-to-hub", training_checkpoint, "--model-arg", "depth=2", "--reparameterize", "-o", tmp_path / "repo"]
    code, out, _ = run(capsys, *argv, "--repo-id", "me/repavit-tiny")
    assert code == 0, out
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "hf-hub:me/repavit-tiny" in card
    diff = re.search(r"\| max_abs_diff_vs_training_form \| (\S+) \|", card)
    assert diff and float(diff.group(1)) < 1e-4
    assert re.search(r"\| params_m \| [\d.]+ \|", card) and re.search(r"\| gmacs \| \S+ \|", card)
    model = timm.create_model(f"local-dir:{tmp_path / 'repo'}", pretrained=True)
    assert model.reparameterized
    with torch.no_grad():
        assert rel_err(model(x()), trained(x())) < 1e-5


def _images(tmp_path) -> list[str]:
    g = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 48), (64, 64)]):
        arr = (g.random((*size, 3)) * 255).astype(np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("num_classes", [1000, 10])
def test_predict(tmp_path, capsys, num_classes):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("RePaViT_Tiny", img_size=32, depth=1, num_classes=num_classes)).eval()
    ckpt = tmp_path / "m.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    images = _images(tmp_path)
    argv = ["predict", *images, "--checkpoint", ckpt, "--model", "RePaViT_Tiny", "--top-k", "3"]
    argv += ["--img-size", "32", "--model-arg", "depth=1", "--num-classes", str(num_classes), "--idle-ratio", "0.75"]
    code, out, _ = run(capsys, *argv)
    assert code == 0, out
    cfg = resolve_model_data_config(model)
    cfg["input_size"] = (3, 32, 32)
    transform = create_transform(**cfg, is_training=False)
    info = ImageNetInfo()
    blocks = out.strip().split("\n")
    for i, path in enumerate(images):
        lines = blocks[4 * i : 4 * i + 4]
        assert lines[0] == path and len(lines) == 4
        with torch.no_grad():
            probs = model(transform(Image.open(path).convert("RGB")).unsqueeze(0)).softmax(-1)[0]
        top = probs.topk(3)
        for rank, (line, p, c) in enumerate(zip(lines[1:], top.values, top.indices, strict=True), 1):
            name = info.index_to_description(int(c)) if num_classes == 1000 else f"class {int(c)}"
            assert line == f"  {rank}. {float(p):.4f}  {name} ({int(c)})"
    code, _, err = run(capsys, "predict", tmp_path / "nope.png", "--checkpoint", ckpt, "--model", "RePaViT_Tiny")
    assert code == 2 and "image not found" in err


def test_convert_then_create_model_strict(tmp_path, capsys, trained, training_checkpoint):
    """`repavit reparam` output is what create_model(..., reparameterized=True) loads strictly."""
    code, _, _ = run(capsys, "reparam", training_checkpoint, "--model-arg", "depth=2", "-o", tmp_path / "deploy")
    assert code == 0
    args = json.loads((tmp_path / "deploy.json").read_text())["model_args"]
    model = repavit.create_model(
        "RePaViT_Tiny", checkpoint_path=tmp_path / "deploy.safetensors", reparameterized=True, **args
    )
    with torch.no_grad():
        assert rel_err(model(x()), trained(x())) < 1e-5
