"""Safe checkpoint loading: harmless training checkpoints load, anything that would run code is refused.

Every malicious file here would create a marker file if it were ever unpickled normally; each test
asserts the marker is absent afterwards and the error is one clear line.
"""

from __future__ import annotations

import argparse
import datetime
import pickle
import types

import pytest
import timm
import torch

import repavit
from repavit.cli.main import main as cli
from repavit.models import load_model, read_checkpoint, unwrap_state_dict
from repavit.models.checkpoint import SAFE_GLOBALS

SMALL = dict(img_size=32, depth=1, num_classes=10)


class _RunsCode:
    """Unpickling this calls exec(), which would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("RePaViT_Tiny", **SMALL).state_dict()


def _training_checkpoint(sd: dict, **extra) -> dict:
    """The layout of the authors' training checkpoints (main.py: model, optimizer, ..., args)."""
    args = argparse.Namespace(
        model="RePaViT_Tiny",
        idle_ratio=0.5,
        feature_norm="BatchNorm",
        channel_idle=True,
        heuristic="static",
        nb_classes=10,
        input_size=32,
        lr=4e-3,
        output_dir="/out",
    )
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    return {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3, "betas": (0.9, 0.999), "params": [0, 1]}]},
        "lr_scheduler": {"base_values": [4e-3], "t_in_epochs": False},
        "epoch": 7,
        "model_ema": ema,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": args,
        **extra,
    }


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran.marker"
    yield str(path)
    assert not path.exists(), "a checkpoint ran code while being loaded"


def _malicious_files(tmp_path, marker: str) -> dict[str, str]:
    sd = _small_state()
    files = {}
    files["torch_zip"] = tmp_path / "evil.pth"
    torch.save({"model": sd, "payload": _RunsCode(marker)}, files["torch_zip"])
    files["in_args"] = tmp_path / "evil_args.pth"  # where the authors pickle their Namespace
    torch.save(_training_checkpoint(sd, args=_RunsCode(marker)), files["in_args"])
    files["raw_pickle"] = tmp_path / "evil_raw.pt"
    with open(files["raw_pickle"], "wb") as f:
        pickle.dump({"model": {}, "payload": _RunsCode(marker)}, f)
    return {k: str(v) for k, v in files.items()}


def test_payload_would_run_if_unpickled_normally(tmp_path):
    """Control: the payload used below really runs code under plain pickle, so its absence means something."""
    control = tmp_path / "control.marker"
    pickle.loads(pickle.dumps(_RunsCode(str(control))))
    assert control.exists()


def test_allow_list_holds_only_plain_data_types():
    for g in SAFE_GLOBALS:
        assert isinstance(g, type), g
        assert not issubclass(g, (types.FunctionType, types.BuiltinFunctionType, types.ModuleType))
    assert argparse.Namespace in SAFE_GLOBALS


@pytest.mark.parametrize("kind", ["torch_zip", "in_args", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, marker, kind):
    path = _malicious_files(tmp_path, marker)[kind]
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"refusing to unpickle {path}")
    assert "weights_only=False" in msg  # how to get the weights out of a trusted file
    if kind != "raw_pickle":
        assert "`exec`" in msg  # names what the file wanted


def test_malicious_pickle_refused_on_every_loading_path(tmp_path, marker, capsys):
    path = _malicious_files(tmp_path, marker)["in_args"]
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_model(path, "RePaViT_Tiny", **SMALL)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        repavit.create_model("RePaViT_Tiny", checkpoint_path=path, **SMALL)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        timm.create_model("RePaViT_Tiny", pretrained=True, pretrained_cfg_overlay=dict(file=path), **SMALL)
    assert cli(["convert", path, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repavit convert: error: refusing to unpickle") and "\n" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_authors_training_checkpoint_loads_through_allow_list(tmp_path):
    sd = _small_state()
    path = tmp_path / "checkpoint.pth"
    torch.save(_training_checkpoint(sd), path)
    raw = read_checkpoint(path)
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].idle_ratio == 0.5
    assert raw["epoch"] == 7
    got = unwrap_state_dict(raw)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    ema = unwrap_state_dict(raw, use_ema=True)
    assert torch.equal(ema["head.bias"], sd["head.bias"] + 1)
    # the pickled args give the model settings: no guessing
    loaded = load_model(path, depth=1)
    assert loaded.model_name == "RePaViT_Tiny"
    assert loaded.model_args["idle_ratio"] == 0.5 and loaded.model.blocks[0].mlp.act_dim == 384


def test_harmless_but_unlisted_type_is_refused_with_instructions(tmp_path):
    path = tmp_path / "dated.pth"
    torch.save({"model": _small_state(), "saved_at": datetime.datetime(2025, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"needs `datetime\.datetime`.*weights_only=False"):
        read_checkpoint(path)


def test_safetensors_need_no_unpickling(tmp_path):
    from safetensors.torch import save_file

    sd = _small_state()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    got = read_checkpoint(path)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
