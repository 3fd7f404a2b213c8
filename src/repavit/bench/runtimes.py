"""A shipped ONNX file timed against the PyTorch model it came from (``repavit export --bench-batch``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..export import OrtModel, input_size_of, ort_forward
from ..measure import interleaved_throughput, summarize

__all__ = ["onnxruntime_vs_eager"]


def onnxruntime_vs_eager(model: nn.Module, path: str | os.PathLike, batch: int, rounds: int = 5) -> dict[str, float]:
    """Median images/s of PyTorch eager (``pytorch_eager``) and ONNX Runtime on ``path`` (``onnxruntime``).

    Both run the same input in the same process, interleaved round by round (see
    :func:`repavit.measure.interleaved_throughput`); ``threads`` is torch's thread count, which
    ONNX Runtime is given too.
    """
    x = torch.randn(batch, *input_size_of(model))
    runner = OrtModel(path, threads=torch.get_num_threads())
    with torch.inference_mode():
        fns = {"pytorch_eager": lambda: model(x), "onnxruntime": ort_forward(runner, x)}
        samples = interleaved_throughput(fns, batch, rounds=rounds, iters=2, warmup=1)
    return {**{k: summarize(v)["median"] for k, v in samples.items()}, "threads": torch.get_num_threads()}
