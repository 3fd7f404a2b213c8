"""Deployment: Hub-layout folders, ONNX, TorchScript and OpenVINO export, what a consumer needs to know.

Checkpoint files and the model loader live in :mod:`repavit.models` (``load_model``,
``save_checkpoint``, ``open_checkpoint``). ONNX functions need the ``onnx`` extra
(``pip install 'repavit[onnx]'``), OpenVINO ones the ``openvino`` extra; both import it lazily.
"""

from .hub import measure_model, model_card, save_hub_folder
from .info import input_size_of, preprocessing, tensor_bytes, write_sidecar
from .onnx import DEFAULT_OPSET, OrtModel, export_onnx, ort_forward, ort_session, read_onnx_metadata, verify_onnx
from .openvino import OvModel, export_openvino, read_openvino_record, verify_openvino
from .torchscript import export_torchscript, verify_torchscript

__all__ = [
    "DEFAULT_OPSET",
    "OrtModel",
    "OvModel",
    "export_onnx",
    "export_openvino",
    "export_torchscript",
    "input_size_of",
    "measure_model",
    "model_card",
    "ort_forward",
    "ort_session",
    "preprocessing",
    "read_onnx_metadata",
    "read_openvino_record",
    "save_hub_folder",
    "tensor_bytes",
    "verify_onnx",
    "verify_openvino",
    "verify_torchscript",
    "write_sidecar",
]
