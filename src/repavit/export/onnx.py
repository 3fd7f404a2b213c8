"""ONNX export of (reparameterized) RePa models, verification and ONNX Runtime inference.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch's default and maintained exporter since
2.9; it needs ``onnxscript``) or ``"legacy"`` (``dynamo=False``, the TorchScript-based exporter,
deprecated but needing only ``onnx``). Both give the same graph semantics; with torch 2.14 both
were checked against ONNX Runtime. Opset :data:`DEFAULT_OPSET` (18): the lowest the dynamo exporter
emits natively, supported by ONNX Runtime >= 1.14. The batch axis is dynamic (``"batch"``); the
image size is fixed by the model's position embedding.

The input is named ``input`` (``(batch, 3, H, W)`` float32, normalized as the model's
``pretrained_cfg`` says); the output ``logits``. The preprocessing settings are stored in the
file's metadata (``metadata_props``) so a consumer needs nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MissingExtraError, UserError, VerificationError
from .info import input_size_of, preprocessing

_logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "OrtModel",
    "export_onnx",
    "onnx_files_size",
    "ort_forward",
    "ort_session",
    "read_onnx_metadata",
    "verify_onnx",
]

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "legacy")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_EXTRA_HINT = "install the ONNX extra: pip install 'repavit[onnx]'"


def _require(module: str, why: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{why} needs the '{module}' package; {_EXTRA_HINT}") from None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    batch_size: int = 2,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` (eval mode; pass the reparameterized model) to an ONNX file with a dynamic batch axis.

    Args:
        model: the model to export; it is put in eval mode.
        path: output ``.onnx`` file.
        input_size: ``(C, H, W)``; defaults to the model's ``pretrained_cfg["input_size"]``.
        batch_size: batch of the example input used for tracing (any batch runs afterwards).
        opset: ONNX opset version.
        exporter: ``"dynamo"`` (needs onnxscript) or ``"legacy"`` (TorchScript-based).
        metadata: extra string-able entries for the file's ``metadata_props``.

    Returns:
        The path written.
    """
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    onnx = _require("onnx", "ONNX export")
    if exporter == "dynamo":
        _require("onnxscript", "the dynamo ONNX exporter (use exporter='legacy' / --exporter legacy to avoid it)")
    model = model.eval()
    size = tuple(input_size or input_size_of(model))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(batch_size, *size, device=device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation and tracer notes from torch.onnx / torch.jit
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            with _quiet_loggers("onnxscript", "onnx_ir"):
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},),
                    # one self-contained file unless the weights pass protobuf's 2 GB limit
                    external_data=_too_big_for_one_file(model),
                    verbose=False,
                )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    proto = onnx.load(str(path), load_external_data=False)
    meta = {**preprocessing(model, size), "opset": opset, "exporter": exporter, **dict(metadata or {})}
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))
    _logger.debug("wrote %s (opset %d, %s exporter)", path, opset, exporter)
    return path


def _too_big_for_one_file(model: nn.Module) -> bool:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.8e9


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Silence the per-initializer INFO lines the dynamo exporter's graph passes log."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def onnx_files_size(path: str | os.PathLike) -> int:
    """Bytes of an ONNX file plus its external data files, if any."""
    path = Path(path)
    total = path.stat().st_size
    onnx = _require("onnx", "reading ONNX files")
    locations = set()
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, JSON values decoded."""
    onnx = _require("onnx", "reading ONNX metadata")
    out: dict[str, Any] = {}
    for p in onnx.load(str(path), load_external_data=False).metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def ort_session(path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
    """An ``onnxruntime.InferenceSession`` for ``path`` (CPU unless ``providers`` says otherwise)."""
    ort = _require("onnxruntime", "running ONNX models")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


class OrtModel:
    """Call an ONNX model like a module: ``OrtModel(path)(x) -> np.ndarray`` (logits).

    Args:
        path: ``.onnx`` file (input ``input``, output ``logits``).
        threads: ONNX Runtime intra-op threads (None: its default).
        providers: execution providers (default CPU).
    """

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None
    ) -> None:
        self.path = Path(path)
        self.session = ort_session(path, threads, providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor | np.ndarray) -> np.ndarray:
        arr = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, Tensor) else np.asarray(x, np.float32)
        return self.session.run(None, {self.input_name: np.ascontiguousarray(arr)})[0]


def ort_forward(model: OrtModel | str | os.PathLike, x: Tensor | np.ndarray) -> Callable[[], np.ndarray]:
    """A no-argument callable that runs one batch ``x`` through ONNX Runtime (for throughput timing).

    ``x`` is converted to a NumPy array once, outside the timed call, so the callable measures what
    ``lambda: model(x)`` measures for PyTorch.
    """
    runner = model if isinstance(model, OrtModel) else OrtModel(model)
    arr = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float32))
    feed = {runner.input_name: arr}
    return lambda: runner.session.run(None, feed)[0]


@torch.no_grad()
def compare_with_pytorch(
    runner: Callable[[Tensor], np.ndarray],
    model: nn.Module,
    inputs: Sequence[Tensor],
    rtol: float | None = 1e-4,
    runtime: str = "the runtime",
) -> dict[str, Any]:
    """Run ``runner`` (an exported file in ``runtime``) and ``model`` (PyTorch) on each input and compare.

    Returns ``max_abs_diff`` (over all inputs), ``max_rel_diff`` (max |diff| / max |reference|) and the
    batches. With ``rtol`` set, a relative difference above it raises :class:`VerificationError`.
    """
    model = model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    max_abs, max_rel = 0.0, 0.0
    for x in inputs:
        ref = model(x.to(device)).float().cpu().numpy()
        out = runner(x)
        if out.shape != ref.shape:
            raise VerificationError(
                f"{runtime} output shape {out.shape} differs from PyTorch's {ref.shape} for input {tuple(x.shape)}"
            )
        diff = float(np.abs(out - ref).max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(np.abs(ref).max()), 1e-30))
    result = {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "batches": [int(x.shape[0]) for x in inputs]}
    if rtol is not None and max_rel > rtol:
        raise VerificationError(
            f"{runtime} output differs from PyTorch by {max_rel:.3g} relative (max abs {max_abs:.3g}) > {rtol:g}"
        )
    return result


def verify_onnx(
    path: str | os.PathLike, model: nn.Module, inputs: Sequence[Tensor], rtol: float | None = 1e-4
) -> dict[str, Any]:
    """Run ``path`` in ONNX Runtime on each input and compare with ``model`` (see :func:`compare_with_pytorch`)."""
    return compare_with_pytorch(OrtModel(path), model, inputs, rtol, "ONNX Runtime")
