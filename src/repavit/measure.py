"""Timing and counting primitives: interleaved throughput, peak memory, GMACs, parameters, machine info.

Below ``train``, ``bench`` and ``export``, which all count and time models, and where they check the
device they are given; imports nothing of the package but :mod:`repavit.utils` and :mod:`repavit.errors`.

Single timings on a shared CPU drift by tens of percent between runs, so every variant of a model
is timed in the same process, interleaved round by round (the order rotates each round), after a
warm-up; the report gives the median images/s with its spread, and ratios of medians.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .errors import ArgumentError
from .utils import format_eta

__all__ = [
    "HALF_DTYPES",
    "attention_kernels",
    "check_device",
    "count_gmacs",
    "count_params",
    "inference_precision",
    "interleaved_throughput",
    "machine_info",
    "peak_memory_mb",
    "summarize",
]

_logger = logging.getLogger(__name__)


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _no_flops(*args, **kwargs) -> int:
    return 0


_SDPA_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


@torch.no_grad()
def count_gmacs(model: nn.Module, img_size: int = 224, in_chans: int = 3, attention: bool = True) -> float:
    """Multiply-accumulates (G) for one image, from PyTorch's FLOP counter.

    ``attention=False`` leaves out the products of scaled-dot-product attention (``q k^T`` and the
    weighted sum of values), as the RePaViT paper's Table 1 counts (e.g. RePa-LV-ViT-S: 4.7 GMACs
    without them, 5.2 with them); the linear layers, convolutions and FFNs are counted either way.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    # PyTorch's counter knows the CUDA attention kernels but not the CPU one; count it the same way.
    # In-place addmm_ (the fused FFN's accumulation) is not in its table either: same formula as addmm.
    extra = {torch.ops.aten.addmm_: _addmm_flops}
    sdpa = _sdpa_flops if attention else _no_flops
    for op in _SDPA_OPS:
        packet = getattr(torch.ops.aten, op, None)
        if packet is not None and (attention is False or op.endswith("_for_cpu")):
            extra[packet] = sdpa
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or a one-line error if this machine cannot run on it
    (not a device name, no CUDA GPU, a GPU index past the last one)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArgumentError("{device} {v0} is not a device: expected cpu, cuda or cuda:N", v0=device) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(
                "{device} {v0} was asked for but no CUDA GPU is available (use {device} cpu)", v0=device
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ArgumentError(
                "{device} {v0}: this machine has {v1} CUDA GPU(s), numbered 0 to {v2}",
                v0=device,
                v1=count,
                v2=count - 1,
            )
    elif dev.type not in ("cpu", "meta"):
        raise ArgumentError("{device} {v0}: only cpu and cuda are supported", v0=device)
    return dev


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def inference_precision(mode: str | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """``off``/None: fp32, nothing changed. ``fp16``/``bf16``: autocast to that type, with scaled-dot-product
    attention preferring the flash kernel, then the memory-efficient one, then math (a kernel that cannot
    take the call, e.g. flash with Swin's window mask on CUDA, passes it to the next)."""
    if mode in (None, "off"):
        yield
        return
    if mode not in HALF_DTYPES:
        raise ValueError(f"precision {mode!r}: expected off, fp16 or bf16")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.autocast(device_type=torch.device(device).type, dtype=HALF_DTYPES[mode]):
        with sdpa_kernel(order, set_priority=True):
            yield


def attention_kernels(fn: Callable[[], object]) -> list[str]:
    """The attention kernels (aten op names, e.g. ``_scaled_dot_product_flash_attention``) that ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    names = {e.name.removeprefix("aten::") for e in p.events()}
    return sorted(n for n in names if n in _SDPA_OPS or n.startswith("_scaled_dot_product"))


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the duration (Python exceptions are unaffected)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """Peak memory (MiB) of the tensors ``fn`` allocates while it runs, above what existed before.

    Weights and inputs that exist beforehand are not counted: this is the activation (and, for a
    training step, gradient and optimizer-state) footprint. CUDA: the caching allocator's peak
    (``max_memory_allocated``). CPU: PyTorch's profiler memory timeline, which records every
    allocation and free of the CPU allocator, so the number is deterministic (RSS would depend on
    what the C allocator kept from earlier work). Memory that does not go through PyTorch's
    allocator (ONNX Runtime, BLAS workspaces) is not seen; returns None if the profiler cannot
    give a timeline.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action

        with _native_stderr_silenced():  # the profiler's C++ side prints start/stop lines on stderr
            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            ) as p:
                fn()
            timeline = p._memory_profile().timeline
    except Exception as e:  # a private API: degrade to "not measured" rather than fail the benchmark
        _logger.warning("peak memory not measured: %s", e)
        return None
    live = peak = 0
    for _t, action, _key, size in timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak / 2**20


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_throughput(
    fns: dict[str, Callable[[], object]],
    batch_size: int,
    rounds: int = 5,
    iters: int = 5,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> dict[str, list[float]]:
    """Images/s per round for each callable, timed interleaved with a rotating order.

    Gradient mode is the caller's: wrap inference callables in ``torch.no_grad()``. With ``desc``, one
    line per round is logged (``desc round 2/7: a 123.4 img/s, b 234.5 img/s; eta 0:00:40``).
    """
    device = torch.device(device)
    names = list(fns)
    t_start = time.perf_counter()
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    t_rounds = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            _sync(device)
            samples[name].append(batch_size * iters / (time.perf_counter() - t0))
        if desc:
            spent = time.perf_counter() - t_rounds
            eta = spent / (r + 1) * (rounds - r - 1)
            rates = ", ".join(f"{n} {samples[n][-1]:.1f} img/s" for n in names)
            _logger.info("%s round %d/%d: %s; eta %s", desc, r + 1, rounds, rates, format_eta(eta))
    if desc:
        _logger.debug("%s took %.1f s", desc, time.perf_counter() - t_start)
    return samples


def summarize(samples: Sequence[float]) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": list(samples),
    }
