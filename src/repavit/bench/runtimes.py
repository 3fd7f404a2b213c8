"""A shipped ONNX or OpenVINO file timed against the PyTorch model it came from (``repavit export --bench-batch``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..export import OrtModel, input_size_of
from ..export.openvino import OvModel
from ..measure import interleaved_throughput, summarize

__all__ = ["RUNTIME_NAMES", "runtime_vs_eager"]

RUNTIME_NAMES = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}


def runtime_vs_eager(
    model: nn.Module, path: str | os.PathLike, format: str, batch: int, rounds: int = 5
) -> dict[str, float]:
    """Median images/s of PyTorch eager (``pytorch_eager``) and of the runtime on ``path`` (``runtime``).

    ``format`` is ``"onnx"`` (ONNX Runtime) or ``"openvino"``. Both run the same input in the same process,
    interleaved round by round (see :func:`repavit.measure.interleaved_throughput`), eager under
    ``torch.inference_mode()``; ``threads`` is torch's thread count, which the runtime is given too.
    """
    x = torch.randn(batch, *input_size_of(model))
    threads = torch.get_num_threads()
    runner = OrtModel(path, threads=threads) if format == "onnx" else OvModel(path, threads=threads)
    array = x.numpy()
    with torch.inference_mode():
        fns = {"pytorch_eager": lambda: model(x), "runtime": lambda: runner(array)}
        samples = interleaved_throughput(fns, batch, rounds=rounds, iters=2, warmup=1)
    return {**{k: summarize(v)["median"] for k, v in samples.items()}, "threads": threads}
