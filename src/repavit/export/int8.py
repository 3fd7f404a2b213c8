"""Static post-training int8 of an exported model, calibrated on real images: ONNX Runtime QDQ and OpenVINO (NNCF).

Both start from the fp32 file ``repavit export`` writes, with the fused FFN's residual identity kept out
of the quantized matrix (``FusedIdleMlp.separate_identity``: the identity stays an exact float add;
in ``W_lin`` its diagonal would take the int8 range from the learned entries), and calibrate the
activation ranges on images from a folder, preprocessed as the model's record says.

- ONNX Runtime: ``quantize_static``, QDQ format, per-channel symmetric int8 weights, uint8 activations,
  MinMax calibration, the MatMul/Gemm/Conv inputs quantized. On x86 CPUs without VNNI (AVX2 only),
  ``reduce_range`` is on: ORT's u8 x s8 kernels sum pairs of
  products in int16 (``vpmaddubsw``), which saturates with full-range weights; 7-bit weights avoid that.
- OpenVINO: NNCF's ``quantize`` with the transformer model type (it keeps LayerNorm, softmax and GELU
  inputs out of int8 where accuracy needs it), written with fp32 weights for the layers left in float.

int8 pays where the CPU multiplies int8 natively: VNNI (``avx512_vnni``, ``avx_vnni``) gives 4x the
multiply-adds per instruction of fp32 FMA, AMX far more. On AVX2 without VNNI the int8 path needs
several instructions per four products and gains much less (see the README's runtime table, measured on
a CPU with AVX-512 VNNI).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MissingExtraError, UserError
from ..layers.idle_mlp import FusedIdleMlp

__all__ = [
    "IMAGE_SUFFIXES",
    "INT8_FORMATS",
    "calibration_images",
    "cpu_int8_features",
    "int8_agreement",
    "quantize_onnx_static",
    "quantize_openvino_static",
    "with_identity_separate",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
INT8_FORMATS = ("onnx", "openvino")


def cpu_int8_features() -> dict[str, bool]:
    """Which int8 instructions this CPU has (Linux ``/proc/cpuinfo`` flags; all False elsewhere)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
    }


def with_identity_separate(model: nn.Module) -> nn.Module:
    """A copy of a fused model prepared for an int8 quantizer (same function): its FFNs add the residual
    identity outside ``W_lin`` and compute with plain linear layers (``FusedIdleMlp.split_products``:
    weight slices and an accumulating GEMM would stay float in ONNX Runtime's quantizers)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, FusedIdleMlp):
            m.separate_identity()
            m.split_products()
    return model


def calibration_images(
    folder: str | os.PathLike,
    transform: Callable[[Any], Tensor],
    limit: int = 128,
    seed: int = 0,
) -> tuple[list[Tensor], list[str]]:
    """Up to ``limit`` images under ``folder`` (any depth), each through ``transform``, and their paths.

    A deterministic random choice when the folder has more. Unreadable files are skipped with a
    warning; a folder without a readable image is a one-line error.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"calibration folder {root} does not exist or is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    random.Random(seed).shuffle(paths)
    images, used = [], []
    for p in paths:
        if len(images) >= limit:
            break
        try:
            with Image.open(p) as img:
                images.append(transform(img.convert("RGB")))
            used.append(str(p))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            warnings.warn(f"calibration: skipped unreadable image {p}: {e}", stacklevel=2)
    if not images:
        raise UserError(f"calibration folder {root}: none of its {len(paths)} image files could be read")
    return images, used


def _batches(images: Sequence[Tensor], batch_size: int) -> list[np.ndarray]:
    return [torch.stack(list(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]


@contextlib.contextmanager
def _logging_off():
    """ONNX Runtime's quantizer logs a warning per Gemm whose bias is an activation (the fused FFN's
    residual input): expected here, and not the user's to act on."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_onnx_static(
    src: str | os.PathLike, dst: str | os.PathLike, images: Sequence[Tensor], batch_size: int = 8
) -> Path:
    """ONNX Runtime static int8 (QDQ) of the fp32 ONNX file ``src``, calibrated on ``images``."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise MissingExtraError("ONNX int8 needs the ONNX extra: pip install 'repavit[onnx]'") from e

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": b} for b in _batches(images, batch_size)])

        def get_next(self):
            return next(self.feeds, None)

    features = cpu_int8_features()
    vnni = features["avx512_vnni"] or features["avx_vnni"] or features["amx_int8"]
    with tempfile.TemporaryDirectory(prefix=".repavit-int8-", dir=Path(dst).parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        with warnings.catch_warnings(), _logging_off():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=not vnni,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                calibrate_method=CalibrationMethod.MinMax,
            )
    return Path(dst)


def quantize_openvino_static(
    src: str | os.PathLike, dst: str | os.PathLike, images: Sequence[Tensor], batch_size: int = 8
) -> Path:
    """OpenVINO int8 (NNCF post-training quantization, transformer model type) of the IR ``src``."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise MissingExtraError("OpenVINO int8 needs the openvino extra: pip install 'repavit[openvino]'") from e
    model = ov.Core().read_model(str(src))
    batches = _batches(images, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(
            model,
            nncf.Dataset(batches),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(batches),
        )
    if model.has_rt_info("repavit_record"):  # the record the fp32 IR carries
        quantized.set_rt_info(model.get_rt_info("repavit_record").astype(str), "repavit_record")
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return Path(dst)


@torch.no_grad()
def int8_agreement(
    runner: Callable[[Tensor], np.ndarray], model: nn.Module, images: Sequence[Tensor], batch_size: int = 16
) -> dict[str, float]:
    """Top-1 agreement and logit cosine of an int8 file (``runner``) with the fp32 ``model`` on ``images``."""
    model = model.eval()
    agree, cosines = [], []
    for b in _batches(images, batch_size):
        x = torch.from_numpy(b)
        ref = model(x).float()
        out = torch.from_numpy(np.asarray(runner(x))).float()
        agree.append(out.argmax(1) == ref.argmax(1))
        cosines.append(torch.nn.functional.cosine_similarity(out, ref, dim=1))
    hits, cos = torch.cat(agree), torch.cat(cosines)
    return {
        "images": len(hits),
        "top1_agreement": hits.float().mean().item(),
        "logit_cosine_mean": cos.mean().item(),
        "logit_cosine_min": cos.min().item(),
    }
