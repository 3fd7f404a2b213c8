"""OpenVINO IR export (``.xml`` + ``.bin``) and an OpenVINO runner; needs the ``openvino`` extra.

The model is exported to ONNX first (the file ``repavit export`` writes), which OpenVINO converts. The IR keeps fp32
weights (``compress_to_fp16=False``: OpenVINO's default would halve them and change the outputs) and a
dynamic batch axis. The runner asks for fp32 inference (``INFERENCE_PRECISION_HINT``), since OpenVINO
runs bf16 by default on CPUs that have it (AMX, AVX512-BF16), and gives it the thread count asked for.
The model record goes into the IR's ``rt_info`` (``repavit_record``) as JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MissingExtraError
from .onnx import compare_with_pytorch, export_onnx

__all__ = ["OvModel", "export_openvino", "openvino_files_size", "read_openvino_record", "verify_openvino"]


def _ov() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise MissingExtraError("OpenVINO export needs the openvino extra: pip install 'repavit[openvino]'") from e
    return openvino


@torch.no_grad()
def export_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int],
    batch_size: int = 2,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (eval mode) as an OpenVINO IR at ``path`` (``.xml``, with ``.bin`` beside it).

    The model goes through the ONNX file ``repavit export`` writes (dynamo exporter, dynamic batch axis),
    which OpenVINO reads with its ONNX frontend: the same graph ONNX Runtime runs, and no TorchScript
    tracing (OpenVINO's PyTorch frontend traces with the deprecated ``torch.jit.trace``).
    ``metadata`` values are stored as JSON strings in the IR's ``rt_info``.
    """
    ov = _ov()
    path = Path(path)
    with tempfile.TemporaryDirectory(
        prefix=".repavit-openvino-", dir=path.parent if path.parent.exists() else None
    ) as tmp:
        onnx_path = export_onnx(model.eval(), Path(tmp) / "model.onnx", input_size, batch_size)
        converted = ov.convert_model(str(onnx_path))
        converted.reshape({converted.inputs[0]: ov.PartialShape([-1, *input_size])})
        for key, value in (metadata or {}).items():
            converted.set_rt_info(json.dumps(value), key)
        ov.save_model(converted, str(path), compress_to_fp16=False)
    return path


def openvino_files_size(path: str | os.PathLike) -> int:
    """Bytes of an IR: the ``.xml`` and its ``.bin``."""
    path = Path(path)
    return sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.exists())


def read_openvino_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The model record stored in an IR by :func:`export_openvino`, or None."""
    ov = _ov()
    model = ov.Core().read_model(str(path))
    if not model.has_rt_info("repavit_record"):
        return None
    return json.loads(model.get_rt_info("repavit_record").astype(str))


class OvModel:
    """A compiled OpenVINO IR on the CPU: ``OvModel(path)(x) -> numpy logits``.

    Args:
        path: the ``.xml`` file.
        threads: inference threads (None: OpenVINO's default, every core).
        precision: ``"f32"`` (default: the model's own precision) or ``"bf16"`` where the CPU has it.
        hint: OpenVINO's performance hint, ``"LATENCY"`` (one request uses every thread) or ``"THROUGHPUT"``.
    """

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, precision: str = "f32", hint: str = "LATENCY"
    ) -> None:
        ov = _ov()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: Tensor | np.ndarray) -> np.ndarray:
        array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        result = self.request.infer({0: np.ascontiguousarray(array, dtype=np.float32)})
        return next(iter(result.values()))


def verify_openvino(
    path: str | os.PathLike, model: nn.Module, inputs: Sequence[Tensor], rtol: float | None = 1e-4
) -> dict[str, Any]:
    """Run the IR in OpenVINO on each input and compare with ``model`` (see :func:`compare_with_pytorch`)."""
    return compare_with_pytorch(OvModel(path), model, inputs, rtol, "OpenVINO")
