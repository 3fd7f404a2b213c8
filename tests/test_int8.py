"""Static int8 with calibration: ONNX Runtime QDQ and OpenVINO (NNCF), `repavit export --int8`, bench forms.

Calibration and checks use real photographs: crops of the two sample photos scikit-learn ships.
The quantizing tests run in their own process (see :func:`helpers.run_isolated`); the bench forms are
tested with the other runtime forms in ``tests/test_export.py``.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import repavit
from repavit.cli.main import main
from repavit.errors import UserError, VerificationError
from repavit.export.int8 import calibration_images, cpu_int8_features, with_identity_separate
from repavit.layers.idle_mlp import FusedIdleMlp
from repavit.models import LoadedModel, record_of

from helpers import randomize_bn, randomize_params, run_isolated

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 real-photo crops (64x64) in a class-folder layout, and one corrupt file."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k, img in enumerate(load_sample_images().images):
        (root / f"photo{k}").mkdir()
        for i in range(20):
            y, x = rng.integers(0, img.shape[0] - 96), rng.integers(0, img.shape[1] - 96)
            Image.fromarray(img[y : y + 96, x : x + 96]).save(root / f"photo{k}" / f"{i}.jpg")
    (root / "photo0" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    model = randomize_params(randomize_bn(timm.create_model("RePaViT_Tiny", **SMALL)), std=0.05).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # confident predictions: top-1 agreement then measures int8, not ties
    fused = repavit.reparameterize_model(model)
    return LoadedModel(fused, record_of(fused, "RePaViT_Tiny"), "test")


def test_calibration_images_skip_unreadable_files_and_refuse_empty_folders(photos, tmp_path):
    from repavit.export.info import eval_transform

    transform = eval_transform(timm.create_model("RePaViT_Tiny", **SMALL))
    with pytest.warns(UserWarning, match="skipped unreadable image .*broken.jpg"):
        images, _ = calibration_images(photos, transform, limit=100)
    assert len(images) == 40 and images[0].shape == (3, 32, 32)
    assert calibration_images(photos, transform, limit=8)[1] == calibration_images(photos, transform, limit=8)[1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        calibration_images(tmp_path / "empty", transform)
    with pytest.raises(UserError, match="does not exist or is not a folder"):
        calibration_images(tmp_path / "missing", transform)


def test_identity_kept_out_of_the_quantized_matrix_changes_nothing_in_fp32(loaded):
    sep = with_identity_separate(loaded.model)
    ffns = [m for m in sep.modules() if isinstance(m, FusedIdleMlp)]
    assert ffns and all(m.identity_separate and m.plain_products for m in ffns)
    assert not any(m.plain_products for m in loaded.model.modules() if isinstance(m, FusedIdleMlp))  # a copy
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sep(x), loaded.model(x), rtol=1e-5, atol=1e-5)
        ref64, sep64 = copy.deepcopy(loaded.model).double(), copy.deepcopy(sep).double()
        torch.testing.assert_close(sep64(x.double()), ref64(x.double()), rtol=1e-12, atol=1e-12)


def test_cpu_int8_features_reads_the_flags():
    features = cpu_int8_features()
    assert set(features) == {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"}


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_int8_export_agrees_with_fp32_on_held_out_photos(suffix, photos, loaded, tmp_path):
    pytest.importorskip("onnxruntime" if suffix == ".onnx" else "nncf")
    if run_isolated(__file__, f"test_int8_export_agrees_with_fp32_on_held_out_photos[{suffix}]"):
        return
    from repavit.export.deploy import Int8Settings, export_model

    out = export_model(loaded, tmp_path / f"m{suffix}", int8=Int8Settings(photos, size=40, min_agreement=0.9))
    check = out.check
    assert check["images"] == 10 and check["top1_agreement"] >= 0.9 and check["logit_cosine_mean"] > 0.98
    sidecar = json.loads(out.sidecar.read_text())
    assert sidecar["int8"]["calibration_images"] == 30 and sidecar["int8"]["check"] == check
    assert "static int8" in out.description
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_int8_export_below_the_agreement_asked_for_writes_nothing(photos, loaded, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from repavit.export import deploy

    # the quantizer is replaced by a copy (no ORT quantizer in this process) and the check reports poor agreement
    monkeypatch.setattr(deploy, "quantize_onnx_static", lambda src, dst, images: shutil.copy(src, dst))
    poor = {"images": 10, "top1_agreement": 0.5, "logit_cosine_mean": 0.9, "logit_cosine_min": 0.1}
    monkeypatch.setattr(deploy, "int8_agreement", lambda *a, **k: poor)
    with pytest.raises(VerificationError, match=r"agrees with the fp32 model on top-1 for 50.0% of 10 check images"):
        deploy.export_model(loaded, tmp_path / "out" / "m.onnx", int8=deploy.Int8Settings(photos, size=16))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,needle",
    [
        ("-o OUT/m.onnx --int8", "--int8 needs --calibration DIR"),
        ("-o OUT/m.onnx --calibration PHOTOS", "--calibration is for --int8 exports"),
        ("-o OUT/m.pt --int8 --calibration PHOTOS", "--int8 is for ONNX (.onnx) and OpenVINO (.xml) files"),
        ("-o OUT/m.onnx --int8 --calibration PHOTOS --min-agreement 2", "--min-agreement between 0 and 1"),
    ],
)
def test_int8_flag_mistakes_are_one_line(flags, needle, photos, tmp_path, capsys):
    flags = flags.replace("OUT", str(tmp_path / "o")).replace("PHOTOS", str(photos))
    rc = main(shlex.split(f"export {tmp_path / 'ckpt.pth'} {flags}"))  # refused before the file is read
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
