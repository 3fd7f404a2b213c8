"""Export: our checkpoint layout, loading any checkpoint, Hub-layout folders, ONNX and TorchScript.

Checkpoints are made here in the authors' layout (training form and their fused fc1/fc2/fc3 form,
built from the training form with the paper's folding formulas in float64) and in ours.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import repavit
from repavit.export import (
    OrtModel,
    export_onnx,
    export_torchscript,
    ort_forward,
    read_onnx_metadata,
    save_hub_folder,
    tensor_bytes,
)
from repavit.models import CheckpointMismatchError, load_model, open_checkpoint, record_of, save_checkpoint

from golden import authors_state_dict
from helpers import randomize_bn, randomize_params, rel_err, run_isolated

SMALL = dict(img_size=32, depth=2, num_classes=10)


def x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """A small training-form model with non-trivial BatchNorm statistics (idle ratio 0.5)."""
    torch.manual_seed(0)
    model = timm.create_model("RePaViT_Tiny", idle_ratio=0.5, **SMALL)
    return randomize_params(randomize_bn(model), std=0.02).eval()


@pytest.fixture(scope="module")
def fused(trained) -> torch.nn.Module:
    return repavit.reparameterize_model(trained)


def authors_fused_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The authors' reparameterized layout, computed independently (paper Eq. 3-6, float64).

    fc1 = W2'[:, a:] W1'[a:, :] + I (linear path + shortcut), fc2 = W1'[:a] (with bias), fc3 = W2'[:, :a].
    """
    sd = {k: v.clone() for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, blk in enumerate(model.blocks):
        m, p = blk.mlp, f"blocks.{i}.mlp."
        d = lambda t: t.detach().double()  # noqa: E731
        s1 = d(m.norm1.weight) / torch.sqrt(d(m.norm1.running_var) + m.norm1.eps)
        w1 = d(m.fc1.weight) * s1
        b1 = d(m.fc1.weight) @ (d(m.norm1.bias) - d(m.norm1.running_mean) * s1) + d(m.fc1.bias)
        s2 = d(m.norm2.weight) / torch.sqrt(d(m.norm2.running_var) + m.norm2.eps)
        w2 = d(m.fc2.weight) * s2
        b2 = d(m.fc2.weight) @ (d(m.norm2.bias) - d(m.norm2.running_mean) * s2) + d(m.fc2.bias)
        a = m.act_dim
        sd[p + "fc1.weight"] = (w2[:, a:] @ w1[a:] + torch.eye(w1.shape[1], dtype=torch.float64)).float()
        sd[p + "fc1.bias"] = (w2[:, a:] @ b1[a:] + b2).float()
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = w1[:a].float(), b1[:a].float()
        sd[p + "fc3.weight"] = w2[:, :a].float()
    return sd


# ---- our checkpoint layout and load_model --------------------------------------------------------
@pytest.mark.parametrize("form", ["training", "fused"])
def test_checkpoint_round_trip(tmp_path, trained, fused, form):
    model = trained if form == "training" else fused
    weights, config_path = save_checkpoint(tmp_path / "ckpt", model.state_dict(), record_of(model, "RePaViT_Tiny"))
    assert weights.name == "ckpt.safetensors" and config_path.name == "ckpt.json"
    config = json.loads(config_path.read_text())
    assert config["model_name"] == "RePaViT_Tiny" and config["reparameterized"] == (form == "fused")
    assert config["model_args"]["idle_ratio"] == 0.5 and config["model_args"]["depth"] == 2
    assert config["tensor_bytes"] == tensor_bytes(model) and config["format"] == "repavit-model"
    loaded = load_model(weights)
    assert loaded.reparameterized == (form == "fused") and loaded.model_args == config["model_args"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x()), model(x()), rtol=0, atol=0)
    # the config also lives in the safetensors header: the weight file alone is enough
    config_path.unlink()
    assert open_checkpoint(weights).record.model_args == config["model_args"]
    assert load_model(weights).model.blocks[0].mlp.act_dim == 384


def test_checkpoint_config_guards_settings(tmp_path, trained):
    weights, _ = save_checkpoint(tmp_path / "ckpt", trained.state_dict(), record_of(trained, "RePaViT_Tiny"))
    with pytest.raises(CheckpointMismatchError, match=r"trained with idle_ratio=0\.5, idle_ratio=0\.75 was given"):
        load_model(weights, idle_ratio=0.75)


def test_deploy_checkpoint_loads_strictly_with_create_model(tmp_path, trained, fused):
    train_file = save_checkpoint(tmp_path / "train", trained.state_dict(), record_of(trained, "RePaViT_Tiny"))[0]
    loaded = load_model(train_file, reparameterized=True)
    weights, _ = save_checkpoint(tmp_path / "deploy", loaded.model.state_dict(), loaded.record)
    model = repavit.create_model("RePaViT_Tiny", checkpoint_path=weights, reparameterized=True, **loaded.model_args)
    assert model.reparameterized
    with torch.no_grad():
        assert rel_err(model(x()), trained(x())) < 1e-5
    # strict: a deploy file with a tensor missing does not load
    from safetensors.torch import load_file

    sd = load_file(weights)
    sd.pop("norm.weight")
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises((RuntimeError, CheckpointMismatchError), match=r"norm\.weight"):
        repavit.create_model(
            "RePaViT_Tiny", checkpoint_path=tmp_path / "broken.safetensors", reparameterized=True, **loaded.model_args
        )


@pytest.mark.parametrize("container", [".pth", ".safetensors"])
@pytest.mark.parametrize("layout", ["authors", "ours"])
def test_load_bare_fused_state_dict(tmp_path, trained, fused, container, layout):
    """A fused state dict without our config: the authors' fc1/fc2/fc3 layout or our in_proj/out_proj."""
    sd = authors_fused_state(trained) if layout == "authors" else fused.state_dict()
    path = tmp_path / f"fused{container}"
    if container == ".pth":
        torch.save({"model": sd}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    loaded = load_model(path, "RePaViT_Tiny", idle_ratio=0.5, **SMALL)
    assert loaded.reparameterized
    with torch.no_grad():
        assert rel_err(loaded.model(x()), trained(x())) < 1e-5
    with pytest.raises(CheckpointMismatchError, match="already reparameterized"):
        load_model(path, "RePaViT_Tiny", reparameterized=False, idle_ratio=0.5, **SMALL)
    # the wrong idle ratio shows in a fused file's shapes
    with pytest.raises(CheckpointMismatchError, match="activates 384"):
        load_model(path, "RePaViT_Tiny", idle_ratio=0.75, **SMALL)


def test_load_authors_released_layout_uses_release_settings(tmp_path):
    sd = authors_state_dict("RePaViT_Tiny")  # full 12 blocks, 224x224: the released Tiny layout
    path = tmp_path / "RePaViT_Tiny.pth"
    torch.save({"model": sd}, path)
    loaded = load_model(path)  # model name from the shapes, settings from the released-weights table
    assert loaded.model_name == "RePaViT_Tiny" and loaded.model_args["idle_ratio"] == 0.5
    assert loaded.model.blocks[0].mlp.act_dim == 384
    assert torch.equal(loaded.model.state_dict()["blocks.11.mlp.fc1.weight"], sd["blocks.11.mlp.fc1.weight"])


def test_base_sizes_before_and_after_on_meta_device():
    with torch.device("meta"):
        train = timm.create_model("RePaViT_Base")
        deploy = timm.create_model("RePaViT_Base", reparameterized=True)
    assert 346e6 < tensor_bytes(train) < 348e6  # ~347 MB fp32
    assert 204e6 < tensor_bytes(deploy) < 206e6  # ~205 MB fp32


# ---- Hub-layout folder --------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["training", "fused"])
def test_hub_folder_loads_with_local_dir(tmp_path, trained, fused, form):
    model = trained if form == "training" else fused
    record = record_of(model, "RePaViT_Tiny")
    out = save_hub_folder(model, tmp_path / "repo", record, numbers={"params_m": 1.23, "gmacs": 0.004})
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "RePaViT_Tiny"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["num_classes"] == 10
    assert config["model_args"]["reparameterized"] == (form == "fused") and config["model_args"]["idle_ratio"] == 0.5
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "| params_m | 1.23 |" in card and "local-dir:" in card
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert loaded.reparameterized == (form == "fused")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x()), model(x()), rtol=0, atol=0)
    assert load_model(out).model_name == "RePaViT_Tiny"
    via_repavit = repavit.create_model(f"local-dir:{out}", pretrained=True).eval()  # passes reparameterized=False
    assert via_repavit.reparameterized == (form == "fused")
    with torch.no_grad():
        torch.testing.assert_close(via_repavit(x()), model(x()), rtol=0, atol=0)


# ---- ONNX and TorchScript -----------------------------------------------------------------------
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, fused, exporter):
    path = export_onnx(fused, tmp_path / "m.onnx", exporter=exporter)
    runner = OrtModel(path)
    inp = runner.session.get_inputs()[0]
    assert inp.name == "input" and isinstance(inp.shape[0], str) and list(inp.shape[1:]) == [3, 32, 32]
    worst = 0.0
    for batch in (1, 3, 5):  # batches other than the export example: the batch axis is dynamic
        inputs = x(batch, seed=batch)
        with torch.no_grad():
            ref = fused(inputs).numpy()
        out = runner(inputs)
        assert out.shape == ref.shape
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    assert worst <= 1e-4, worst
    meta = read_onnx_metadata(path)
    assert meta["input_size"] == [3, 32, 32] and meta["opset"] == 18 and meta["num_classes"] == 10
    assert len(meta["mean"]) == 3 and meta["exporter"] == exporter
    fwd = ort_forward(runner, x(4))
    assert fwd().shape == (4, 10)


def test_onnx_unknown_exporter_is_refused(tmp_path, fused):
    with pytest.raises(ValueError, match="unknown exporter 'jit'"):
        export_onnx(fused, tmp_path / "m.onnx", exporter="jit")


@pytest.mark.parametrize("method", ["auto", "trace"])
def test_torchscript_export(tmp_path, fused, method):
    path = export_torchscript(fused, tmp_path / "m.pt", method=method)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for batch in (1, 3):
            inputs = x(batch, seed=batch)
            assert rel_err(loaded(inputs), fused(inputs)) <= 1e-5


def _isolated(name: str) -> bool:
    """See :func:`helpers.run_isolated`."""
    return run_isolated(__file__, name)


def test_openvino_export_keeps_the_outputs_record_and_dynamic_batch(tmp_path, trained):
    pytest.importorskip("openvino")
    if _isolated("test_openvino_export_keeps_the_outputs_record_and_dynamic_batch"):
        return
    from repavit.export.deploy import export_format, export_model
    from repavit.export.openvino import OvModel, read_openvino_record
    from repavit.models import LoadedModel

    fused = repavit.reparameterize_model(trained)
    loaded = LoadedModel(fused, record_of(fused, "RePaViT_Tiny"), "test")
    assert export_format(tmp_path / "m.xml") == "openvino"
    out = export_model(loaded, tmp_path / "sub" / "m.xml", batch_size=2)
    assert out.check["max_rel_diff"] <= 1e-5 and out.check["batches"] == [1, 3]
    assert (tmp_path / "sub" / "m.bin").is_file() and json.loads(out.sidecar.read_text())["format"] == "openvino"
    assert read_openvino_record(out.path)["model_args"]["idle_ratio"] == 0.5
    runner = OvModel(out.path, threads=1)
    with torch.no_grad():
        for b in (1, 5):  # any batch: the axis is dynamic
            assert rel_err(torch.from_numpy(runner(x(b, seed=b))), fused(x(b, seed=b))) <= 1e-5
    with pytest.raises(repavit.errors.UserError, match="its suffix means openvino"):
        export_format(tmp_path / "m.xml", "onnx")


def test_openvino_missing_extra_is_one_clear_error(tmp_path, fused, monkeypatch):
    import sys

    from repavit.export.openvino import export_openvino

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(repavit.errors.MissingExtraError, match=r"pip install 'repavit\[openvino\]'"):
        export_openvino(fused, tmp_path / "m.xml", (3, 32, 32))
    assert not (tmp_path / "m.xml").exists()


def test_runtime_bench_forms_time_each_runtime_with_its_vanilla(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    if _isolated("test_runtime_bench_forms_time_each_runtime_with_its_vanilla"):
        return
    from repavit.bench.suite import run_suite

    fp32 = ["onnxruntime", "openvino", "vanilla_onnxruntime", "vanilla_openvino"]
    int8 = ["onnxruntime_static_int8", "vanilla_onnxruntime_static_int8", "openvino_int8", "vanilla_openvino_int8"]
    forms = ["vanilla", "reparam", *fp32, *int8]  # one run for every runtime form: each run costs a process
    res = run_suite(["RePaViT_Tiny"], forms, batch_size=4, img_size=32, rounds=1, iters=1, warmup=0, latency=False,
                    depth=1)  # fmt: skip
    entry = res["models"]["RePaViT_Tiny"]
    assert set(entry["forms"]) >= set(forms)
    for runtime in ("onnxruntime", "openvino"):  # the exported fused model gives the fused model's outputs
        assert entry["forms"][runtime]["agreement_with_reparam"]["max_rel_err"] <= 1e-4
    for runtime in ("onnxruntime_static_int8", "openvino_int8"):  # quantized: close, not equal
        assert entry["forms"][runtime]["agreement_with_reparam"]["cosine_min"] > 0.9
    assert {f"{k}/vanilla_{k}" for k in ("onnxruntime", "openvino", "onnxruntime_static_int8", "openvino_int8")} <= set(
        entry["ratios"]
    )
