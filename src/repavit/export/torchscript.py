"""TorchScript export of (reparameterized) RePa models, and its verification.

``torch.jit.script`` keeps every shape symbolic. ``trace`` records one run on an example input;
shapes stay symbolic where the code reads them from tensors (these models do), but Python-level
decisions are fixed to the example's. ``"auto"`` (default) scripts and falls back to tracing when
the scripting compiler rejects a module. TorchScript is deprecated upstream in favour of
``torch.export``, but it is still what many C++ and mobile runtimes load.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError, VerificationError
from .info import input_size_of

_logger = logging.getLogger(__name__)

__all__ = ["TORCHSCRIPT_METHODS", "export_torchscript", "verify_torchscript"]

TORCHSCRIPT_METHODS = ("auto", "script", "trace")


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    method: str = "auto",
    example_input: Tensor | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Save ``model`` (eval mode; pass the reparameterized model) as a TorchScript file.

    Args:
        model: the model to export.
        path: output file (``.pt`` by convention).
        method: ``"auto"``, ``"script"`` or ``"trace"``.
        example_input: input for tracing; defaults to 2 random images of the model's input size.
        extra_files: text files stored inside the archive (``torch.jit.load(..., _extra_files=...)``
            reads them back), e.g. ``{"repavit_record.json": ...}``.

    Returns:
        The path written.
    """
    if method not in TORCHSCRIPT_METHODS:
        raise UserError(f"unknown TorchScript method {method!r}; expected one of {', '.join(TORCHSCRIPT_METHODS)}")
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notes
        scripted = None
        if method in ("auto", "script"):
            try:
                scripted = torch.jit.script(model)
            except (RuntimeError, torch.jit.frontend.FrontendError) as e:
                if method == "script":
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _logger.warning("torch.jit.script failed (%s); tracing instead", first)
        if scripted is None:
            if example_input is None:
                param = next(model.parameters())
                example_input = torch.randn(2, *input_size_of(model), device=param.device)
            scripted = torch.jit.trace(model, example_input)
        scripted.save(str(path), _extra_files=dict(extra_files or {}))
    used = "trace" if isinstance(scripted, torch.jit.TopLevelTracedModule) else "script"
    _logger.debug("wrote %s (torch.jit.%s)", path, used)
    return path


@torch.no_grad()
def verify_torchscript(
    path: str | os.PathLike, model: nn.Module, inputs: Sequence[Tensor], rtol: float | None = 1e-5
) -> dict[str, Any]:
    """Load ``path`` and compare its outputs with ``model`` on each input (see :func:`verify_onnx`)."""
    param = next(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the file is TorchScript
        loaded = torch.jit.load(str(path), map_location=param.device).eval()
    max_abs, max_rel = 0.0, 0.0
    for x in inputs:
        x = x.to(param.device)
        ref, out = model.eval()(x), loaded(x)
        diff = (out - ref).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(ref.abs().max().item(), 1e-30))
    result = {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "batches": [int(x.shape[0]) for x in inputs]}
    if rtol is not None and max_rel > rtol:
        raise VerificationError(f"TorchScript output differs from PyTorch by {max_rel:.3g} relative > {rtol:g}")
    return result
