"""Deployment: our checkpoint layout, Hub-layout folders, ONNX and TorchScript export.

ONNX functions need the ``onnx`` extra (``pip install 'repavit[onnx]'``); they import it lazily.
"""

from .checkpoint import (
    LoadedModel,
    input_size_of,
    is_reparameterized_state,
    load_model,
    model_args_of,
    read_config,
    save_checkpoint,
    tensor_bytes,
)
from .hub import measure_model, model_card, save_hub_folder
from .onnx import DEFAULT_OPSET, OrtModel, export_onnx, ort_forward, ort_session, read_onnx_metadata, verify_onnx
from .torchscript import export_torchscript, verify_torchscript

__all__ = [
    "DEFAULT_OPSET",
    "LoadedModel",
    "OrtModel",
    "export_onnx",
    "export_torchscript",
    "input_size_of",
    "is_reparameterized_state",
    "load_model",
    "measure_model",
    "model_args_of",
    "model_card",
    "ort_forward",
    "ort_session",
    "read_config",
    "read_onnx_metadata",
    "save_checkpoint",
    "save_hub_folder",
    "tensor_bytes",
    "verify_onnx",
    "verify_torchscript",
]
