"""int8 against the fp32 reparameterized model on real images, for every int8 path.

Uses the model that `make demo` trains (out/demo/run/checkpoint.pth, scikit-learn's handwritten digits)
and two sets of real images: its validation split, and crops of the two photographs scikit-learn ships
(far from what it was trained on: a check of the numerics, not of accuracy). The static paths calibrate
on 96 images of the training split and 32 other crops of the photos (calibration should look like what
the model will see). Reports top-1 agreement with fp32, logit cosine similarity and
accuracy (digits) per path:

- torch dynamic int8, identity kept as a float add (repavit's default) and folded into the matrix;
- ONNX Runtime dynamic int8 and static int8 (QDQ, calibrated);
- OpenVINO static int8 (NNCF, calibrated).

    python benchmarks/int8_agreement.py [--run out/demo/run] [--output benchmarks/results/int8_demo.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repavit.export import OrtModel, export_onnx
from repavit.export.info import eval_transform, input_size_of
from repavit.export.int8 import (
    calibration_images,
    cpu_int8_features,
    quantize_onnx_static,
    quantize_openvino_static,
    with_identity_separate,
)
from repavit.export.openvino import OvModel, export_openvino
from repavit.models import load_model
from repavit.quantize import quantize_int8


def _photo_crops(n: int = 64, size: int = 96, seed: int = 0) -> list:
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        img = load_sample_images().images[i % 2]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        crops.append(img[y : y + size, x : x + size])
    return crops


def _forms(fused: torch.nn.Module, calib: list, tmp: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    size = input_size_of(fused)
    sep = with_identity_separate(fused)
    onnx = export_onnx(sep, tmp / "m.onnx", size)
    quantize_dynamic(str(onnx), str(tmp / "dyn.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    ort_static = OrtModel(quantize_onnx_static(onnx, tmp / "s8.onnx", calib))
    ov_static = OvModel(quantize_openvino_static(export_openvino(sep, tmp / "m.xml", size), tmp / "s8.xml", calib))
    ort_dynamic = OrtModel(tmp / "dyn.onnx")
    return {
        "fp32": fused,
        "torch_dynamic_int8": quantize_int8(fused),
        "torch_dynamic_int8_identity_folded": quantize_int8(fused, keep_identity_separate=False),
        "onnxruntime_dynamic_int8": lambda x: torch.from_numpy(ort_dynamic(x)),
        "onnxruntime_static_int8": lambda x: torch.from_numpy(ort_static(x)),
        "openvino_static_int8": lambda x: torch.from_numpy(ov_static(x)),
    }


def _scores(out: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None) -> dict:
    cos = F.cosine_similarity(out, ref, dim=1)
    differ = out.argmax(1) != ref.argmax(1)
    top2 = ref.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]) / (ref.max(1).values - ref.min(1).values)  # fp32's lead, share of its range
    row = {
        "top1_agreement_with_fp32": 1.0 - differ.float().mean().item(),
        "logit_cosine_mean": cos.mean().item(),
        "logit_cosine_min": cos.min().item(),
        # where int8 changes the top-1, how far ahead fp32's top-1 was: near 0 means a near-tie
        "largest_fp32_margin_among_disagreements": margin[differ].max().item() if differ.any() else 0.0,
    }
    if labels is not None:
        row["top1_accuracy"] = (out.argmax(1) == labels).float().mean().item()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="out/demo/run")
    p.add_argument("--data", default="out/demo/digits", help="the demo's ImageFolder (train/ and val/)")
    p.add_argument("--output", default="benchmarks/results/int8_demo.json")
    args = p.parse_args()
    run, data = Path(args.run), Path(args.data)
    loaded = load_model(run / "checkpoint.pth", reparameterized=True)
    fused = loaded.model.eval()
    transform = eval_transform(fused)
    from PIL import Image

    # calibration: what the model will see, here both kinds of image (other photo crops than those checked)
    calib, _ = calibration_images(data / "train", transform, limit=96)
    calib += [transform(Image.fromarray(c)) for c in _photo_crops(32, seed=1)]
    val_images, val_paths = calibration_images(data / "val", transform, limit=10**9)
    classes = sorted(p.name for p in (data / "val").iterdir() if p.is_dir())
    labels = torch.tensor([classes.index(Path(q).parent.name) for q in val_paths])

    sets = {
        "digits_val": (torch.stack(val_images), labels),
        "photo_crops": (torch.stack([transform(Image.fromarray(c)) for c in _photo_crops()]), None),
    }
    result: dict = {
        "checkpoint": str(run / "checkpoint.pth"),
        "cpu_int8": cpu_int8_features(),
        "calibration": "96 digits (train) + 32 photo crops",
    }
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        forms = _forms(fused, calib, Path(tmp))
        for name, (x, y) in sets.items():
            ref = fused(x)
            result[name] = {"images": len(x), **{k: _scores(f(x).float(), ref, y) for k, f in forms.items()}}
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
