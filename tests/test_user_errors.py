"""Every user fault is one line and exit code 2; an internal error keeps its traceback.

The cases are the ones a new user hit (each names what was wrong); the files they point at are
made here.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import timm
import torch

from repavit.cli.main import main
from repavit.cli.train import seed_main
from repavit.models import record_of, save_checkpoint

TINY = (
    "--model RePaViT_Tiny --model_kwargs depth=1 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 --channel_idle "
    "--feature_norm BatchNorm --data_set SYNTH --synthetic_train_size 32 --synthetic_val_size 8 --batch_size 8 "
    "--epochs 1 --num_workers 0 --device cpu"
).split()


def one_line(capsys, argv: list[str], prog=main) -> str:
    rc = prog([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model = timm.create_model("RePaViT_Tiny", img_size=32, depth=1, num_classes=3)
    save_checkpoint(folder / "m.pth", model.state_dict(), record_of(model))
    return folder / "m.pth"


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = one_line(capsys, ["train", *TINY, "--output_dir", tmp_path / "afile"])
    assert "--output_dir" in err and "is a file, not a folder" in err


def test_output_dir_inside_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = one_line(capsys, ["train", *TINY, "--output_dir", tmp_path / "afile" / "run"])
    assert "not a directory" in err and "afile" in err


def test_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch):
    # the tests may run as root, which no permission stops: make the folder creation fail as it would
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr("pathlib.Path.mkdir", refuse)
    err = one_line(capsys, ["train", *TINY, "--output_dir", tmp_path / "ro" / "run"])
    assert err.endswith(f"permission denied: {tmp_path / 'ro'}")


@pytest.mark.parametrize("command", ["export", "push-to-hub", "convert"])
def test_deploy_output_under_a_file(tmp_path, capsys, checkpoint, command):
    (tmp_path / "afile").write_text("x")
    target = {
        "export": tmp_path / "afile" / "y.onnx",
        "push-to-hub": tmp_path / "afile",
        "convert": tmp_path / "afile" / "c",
    }
    err = one_line(capsys, [command, checkpoint, "-o", target[command]])
    assert "afile" in err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoints(tmp_path, capsys, checkpoint, suffix, damage):
    if suffix == ".pth":
        data = checkpoint.read_bytes()
    else:
        save_checkpoint(tmp_path / "ok", torch.load(checkpoint, weights_only=True)["model"], record_of(
            timm.create_model("RePaViT_Tiny", img_size=32, depth=1, num_classes=3)))  # fmt: skip
        data = (tmp_path / "ok.safetensors").read_bytes()
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(4096))
    err = one_line(capsys, ["convert", path, "-o", tmp_path / "out"])
    assert str(path) in err and "weights_only=False" not in err
    assert "not a readable" in err or "not a PyTorch checkpoint" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_flag_value_is_one_line_without_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--lr", "abc"])
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 2
        and err == "repavit train: error: argument --lr: invalid float value: 'abc' (see `repavit train --help`)"
    )
    with pytest.raises(SystemExit):
        seed_main(["--epochs", "x"])
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_sync_bn_on_cpu_is_an_error(tmp_path, capsys):
    err = one_line(capsys, ["train", *TINY, "--sync_bn", "--output_dir", tmp_path / "o"])
    assert "--sync_bn needs CUDA" in err and not (tmp_path / "o").exists()


def test_nan_message_counts_like_the_progress_bar(tmp_path, capsys):
    err = one_line(capsys, ["train", *TINY, "--lr", "1e30", "--unscale_lr", "--warmup_epochs", "0", "--mixup", "0",
                            "--cutmix", "0"])  # fmt: skip
    assert "loss is not finite at epoch 1, step" in err


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    fit_module = sys.modules["repavit.train.fit"]
    monkeypatch.setattr(fit_module, "Trainer", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["train", *TINY])
    monkeypatch.setattr(fit_module, "Trainer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        main(["train", *TINY])


def test_written_files_have_the_usual_permissions(tmp_path, checkpoint, capsys):
    assert main(["convert", str(checkpoint), "-o", str(tmp_path / "c")]) == 0
    assert main(["push-to-hub", str(checkpoint), "-o", str(tmp_path / "hub")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "c.safetensors", tmp_path / "c.json", tmp_path / "hub" / "config.json",
                 tmp_path / "hub" / "model.safetensors", tmp_path / "hub" / "README.md"):  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_bench_with_some_forms_writes_its_ratios_and_leaves_no_temporary_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    out = tmp_path / "b.json"
    argv = ["bench", "--models", "RePaViT_Tiny", "--forms", "reparam", "int8", "onnxruntime", "--batch-size", "2"]
    argv += ["--img-size", "32", "--rounds", "2", "--iters", "1", "--warmup", "1", "--no-latency", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and set(result["models"]["RePaViT_Tiny"]["ratios"]) >= {
        "int8/reparam",
        "onnxruntime/reparam",
    }
    left = [p.name for p in (tmp_path / "tmp").iterdir()]
    assert not [n for n in left if n.startswith("repavit-bench-") or n.endswith(".onnx")], left
