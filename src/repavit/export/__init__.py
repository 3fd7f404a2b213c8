"""Deployment: Hub-layout folders, ONNX and TorchScript export, what a consumer needs to know.

Checkpoint files and the model loader live in :mod:`repavit.models` (``load_model``,
``save_checkpoint``, ``open_checkpoint``). ONNX functions need the ``onnx`` extra
(``pip install 'repavit[onnx]'``); they import it lazily.
"""

from .hub import measure_model, model_card, save_hub_folder
from .info import input_size_of, preprocessing, tensor_bytes, write_sidecar
from .onnx import DEFAULT_OPSET, OrtModel, export_onnx, ort_forward, ort_session, read_onnx_metadata, verify_onnx
from .torchscript import export_torchscript, verify_torchscript

__all__ = [
    "DEFAULT_OPSET",
    "OrtModel",
    "export_onnx",
    "export_torchscript",
    "input_size_of",
    "measure_model",
    "model_card",
    "ort_forward",
    "ort_session",
    "preprocessing",
    "read_onnx_metadata",
    "save_hub_folder",
    "tensor_bytes",
    "verify_onnx",
    "verify_torchscript",
    "write_sidecar",
]
