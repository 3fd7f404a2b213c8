"""One call from a loaded checkpoint to a verified deployment file: :func:`export_model`.

The file is written and checked in a temporary folder beside the target, then moved into place
with its JSON sidecar: a failed export or a failed check leaves nothing under the target name
(and never replaces an earlier good file with a bad one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentError, VerificationError
from .info import eval_transform, input_size_of, write_sidecar
from .int8 import (
    INT8_FORMATS,
    calibration_images,
    cpu_int8_features,
    int8_agreement,
    quantize_onnx_static,
    quantize_openvino_static,
    with_identity_separate,
)
from .onnx import DEFAULT_OPSET, OrtModel, export_onnx, onnx_files_size, verify_onnx
from .openvino import OvModel, export_openvino, openvino_files_size, verify_openvino
from .torchscript import export_torchscript, verify_torchscript

__all__ = ["FORMATS", "Exported", "Int8Settings", "export_format", "export_model"]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}
_SUFFIX_FORMAT = {
    ".onnx": "onnx",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
    ".xml": "openvino",
}


@dataclass
class Exported:
    """What :func:`export_model` wrote: the file, its sidecar, its size, and the check's result."""

    path: Path
    sidecar: Path
    nbytes: int
    description: str
    check: dict[str, Any] | None


def export_format(output: str | os.PathLike, format: str | None = None) -> str:
    """The format to write ``output`` in: ``format`` if given (it must agree with the suffix), else the
    suffix's (``.onnx``: ONNX; ``.pt``, ``.pth``, ``.ts``: TorchScript; ``.xml``: OpenVINO IR), else ONNX."""
    if not os.fspath(output).strip() or os.fspath(output).endswith(("/", os.sep)):
        raise ArgumentError("{output} {path!r}: give a file path, e.g. model.onnx", path=os.fspath(output))
    output = Path(output)
    implied = _SUFFIX_FORMAT.get(output.suffix.lower())
    if format is None:
        return implied or "onnx"
    if format not in FORMATS:
        known = ", ".join(FORMATS)
        raise ArgumentError("unknown {format} {value!r}; expected one of {known}", value=format, known=known)
    if implied is not None and implied != format:
        raise ArgumentError(
            "{output} {path}: its suffix means {implied}, but {format} is {value}: choose {format} {implied} "
            "or name the file *{suffix}",
            path=output,
            implied=implied,
            value=format,
            suffix=FORMATS[format],
        )
    return format


def export_model(
    loaded: Any,
    output: str | os.PathLike,
    format: str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    method: str = "auto",
    batch_size: int = 2,
    rtol: float = 1e-4,
    verify: bool = True,
    extra: Mapping[str, Any] | None = None,
    int8: Int8Settings | None = None,
) -> Exported:
    """Export ``loaded.model`` (a :class:`repavit.models.LoadedModel`) with its record, and check it.

    Args:
        loaded: what :func:`repavit.models.load_model` returned (the model in the form to export).
        output: the file to write (``.onnx`` for ONNX, ``.pt`` for TorchScript, ``.xml`` for an OpenVINO IR,
            whose ``.bin`` goes beside it); ``<output>.json`` beside it.
        format: ``"onnx"``, ``"torchscript"`` or ``"openvino"``; None: from the suffix (see :func:`export_format`).
        opset, exporter: ONNX opset and exporter (``"dynamo"`` or ``"legacy"``).
        method: TorchScript ``"auto"``, ``"script"`` or ``"trace"``.
        batch_size: batch of the example input used to export; the check runs batches 1 and ``batch_size + 1``.
        rtol: largest relative difference from PyTorch the check accepts.
        verify: run the exported file and compare it with PyTorch.
        extra: more entries for the sidecar (source, metrics, provenance).
        int8: static int8 with calibration (ONNX and OpenVINO; see :class:`Int8Settings`): the fp32 file
            is quantized, and checked on real images for top-1 agreement with the fp32 PyTorch model
            instead of the fp32 check.

    Raises:
        ArgumentError: a format the file name contradicts.
        VerificationError: the exported file does not reproduce the model (nothing is kept).
    """
    format = export_format(output, format)
    if int8 is not None and format not in INT8_FORMATS:
        raise ArgumentError("int8 export is for {v0} files, not {v1}", v0=" and ".join(INT8_FORMATS), v1=format)
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if int8 is not None:
            return _export_int8(folder, output, format, loaded, opset, exporter, batch_size, int8, extra)
        return _export_in(folder, output, format, loaded, opset, exporter, method, batch_size, rtol, verify, extra)
    except BaseException:
        for p in created:  # innermost first: leave no empty folders behind either
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _export_in(folder, output, format, loaded, opset, exporter, method, batch_size, rtol, verify, extra) -> Exported:
    model = loaded.model.eval()
    record = loaded.record
    size = input_size_of(model)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", suffix=".tmp", dir=folder) as tmp:
        staged = Path(tmp) / output.name
        if format == "onnx":
            meta = {"repavit_record": record.to_dict()}
            export_onnx(model, staged, size, batch_size, opset, exporter, metadata=meta)
            verifier, nbytes = verify_onnx, onnx_files_size(staged)
            description = f"ONNX opset {opset}, {exporter} exporter, dynamic batch axis"
        elif format == "openvino":
            export_openvino(model, staged, size, batch_size, metadata={"repavit_record": record.to_dict()})
            verifier, nbytes = verify_openvino, openvino_files_size(staged)
            description = "OpenVINO IR, fp32 weights, dynamic batch axis"
        else:
            extra_files = {"repavit_record.json": json.dumps(record.to_dict())}
            export_torchscript(model, staged, method, extra_files=extra_files)
            verifier, nbytes, description = verify_torchscript, staged.stat().st_size, "TorchScript"
        check = None
        if verify:
            g = torch.Generator().manual_seed(0)
            inputs = [torch.randn(b, *size, generator=g) for b in (1, batch_size + 1)]
            check = verifier(staged, model, inputs, rtol=rtol)
        write_sidecar(staged, model, record, format=format, **dict(extra or {}))
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p == staged):  # the main file last
            os.replace(f, folder / f.name)
    return Exported(output, output.with_name(output.name + ".json"), nbytes, description, check)


@dataclass
class Int8Settings:
    """Static int8 for :func:`export_model`.

    Args:
        calibration: a folder of images (any depth, any layout: ImageFolder or flat).
        size: how many of its images to use (a deterministic random choice when it has more).
        min_agreement: the top-1 agreement with the fp32 model, on the check images, below which the
            export fails and nothing is kept.
        holdout: share of the images kept out of calibration for the check (when at least 2 are read).
    """

    calibration: str | os.PathLike
    size: int = 128
    min_agreement: float = 0.95
    holdout: float = 0.25


def _int8_images(model: torch.nn.Module, settings: Int8Settings) -> tuple[list, list]:
    """``(calibration images, check images)``, preprocessed as the model's record says."""
    images, _ = calibration_images(settings.calibration, eval_transform(model), settings.size)
    held = max(1, int(len(images) * settings.holdout)) if len(images) >= 2 else 0
    calib, check = images[held:], images[:held]
    return calib, check or calib


def _export_int8(folder, output, format, loaded, opset, exporter, batch_size, settings, extra) -> Exported:
    model = loaded.model.eval()
    record = loaded.record
    size = input_size_of(model)
    calib, check_images = _int8_images(model, settings)
    source = with_identity_separate(model)
    meta = {"repavit_record": record.to_dict()}
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", suffix=".tmp", dir=folder) as tmp:
        staged, work = Path(tmp) / output.name, Path(tmp) / "fp32"
        work.mkdir()
        if format == "onnx":
            fp32 = export_onnx(source, work / "model.onnx", size, batch_size, opset, exporter, metadata=meta)
            quantize_onnx_static(fp32, staged, calib)
            runner, nbytes = OrtModel(staged), onnx_files_size(staged)
            how = f"ONNX opset {opset}, static int8 (QDQ, per-channel weights, MinMax on {len(calib)} images)"
        else:
            fp32 = export_openvino(source, work / "model.xml", size, batch_size, metadata=meta)
            quantize_openvino_static(fp32, staged, calib)
            runner, nbytes = OvModel(staged), openvino_files_size(staged)
            how = f"OpenVINO IR, static int8 (NNCF, transformer preset, {len(calib)} calibration images)"
        shutil.rmtree(work)
        check = int8_agreement(runner, model, check_images)
        if check["top1_agreement"] < settings.min_agreement:
            raise VerificationError(
                f"int8 {format} file agrees with the fp32 model on top-1 for {100 * check['top1_agreement']:.1f}% "
                f"of {check['images']} check images, below the {100 * settings.min_agreement:.0f}% asked for "
                "(more or more typical calibration images may help; nothing was written)"
            )
        info = {"calibration_images": len(calib), "check": check, "cpu_int8": cpu_int8_features()}
        write_sidecar(staged, model, record, format=format, int8=info, **dict(extra or {}))
        for f in sorted(Path(tmp).iterdir(), key=lambda p: p == staged):  # the main file last
            os.replace(f, folder / f.name)
    return Exported(output, output.with_name(output.name + ".json"), nbytes, how + ", dynamic batch axis", check)
