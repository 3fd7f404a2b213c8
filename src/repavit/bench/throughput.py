"""Inference throughput, measured as ratios in one process.

Single timings on a shared CPU drift by tens of percent between runs, so every variant of a model
is timed in the same process, interleaved round by round (the order rotates each round), after a
warm-up; the report gives the median images/s with its spread, and ratios of medians.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..models._factory import reparameterize_model

_logger = logging.getLogger(__name__)


def vanilla_counterpart(model: nn.Module) -> nn.Module | None:
    """The plain timm model of the same size (``model.vanilla_counterpart()``), or None if it has none."""
    fn = getattr(model, "vanilla_counterpart", None)
    return fn() if callable(fn) else None


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def count_gmacs(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> float:
    """Multiply-accumulates (G) for one image, from PyTorch's FLOP counter (attention matmuls included)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, img_size, img_size, device=device)
    # PyTorch's counter knows the CUDA attention kernels but not the CPU one; count it the same way.
    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        extra[cpu_sdpa] = _sdpa_flops
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


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


@torch.no_grad()
def interleaved_throughput(
    fns: dict[str, Callable[[], object]],
    batch_size: int,
    rounds: int = 5,
    iters: int = 5,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Images/s per round for each callable, timed interleaved with a rotating order."""
    device = torch.device(device)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            _sync(device)
            samples[name].append(batch_size * iters / (time.perf_counter() - t0))
    return samples


def summarize(samples: Sequence[float]) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": list(samples),
    }


def build_variants(model_name: str, img_size: int = 224, **model_kwargs) -> dict[str, nn.Module]:
    """``vanilla`` (timm counterpart, if any), ``train`` (eval mode) and ``reparam`` forms, same weights."""
    model = timm.create_model(model_name, img_size=img_size, **model_kwargs).eval()
    variants: dict[str, nn.Module] = {}
    vanilla = vanilla_counterpart(model)
    if vanilla is not None:
        variants["vanilla"] = vanilla.eval()
    variants["train"] = model
    variants["reparam"] = reparameterize_model(model)
    return variants


def run_benchmark(
    model_names: Sequence[str],
    batch_size: int = 16,
    img_size: int = 224,
    rounds: int = 7,
    iters: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    output: str | os.PathLike | None = None,
    **model_kwargs,
) -> dict:
    """Benchmark each model's forms; print a table; write JSON (and return it)."""
    dev = torch.device(device)
    results = {
        "machine": machine_info(),
        "batch_size": batch_size,
        "img_size": img_size,
        "rounds": rounds,
        "iters": iters,
        "model_kwargs": model_kwargs,
        "models": {},
    }
    for name in model_names:
        variants = {k: m.to(dev) for k, m in build_variants(name, img_size, **model_kwargs).items()}
        x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
        with torch.no_grad():
            ref = variants["train"](x)
            err = ((variants["reparam"](x) - ref).abs().max() / ref.abs().max()).item()
        fns = {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}
        samples = interleaved_throughput(fns, batch_size, rounds, iters, warmup, dev)
        entry = {"reparam_max_rel_err": err, "forms": {}}
        for k, m in variants.items():
            entry["forms"][k] = {
                "params_m": count_params(m) / 1e6,
                "gmacs": count_gmacs(m, img_size),
                "throughput": summarize(samples[k]),
            }
        base = "vanilla" if "vanilla" in variants else "train"
        med = {k: v["throughput"]["median"] for k, v in entry["forms"].items()}
        entry["ratios"] = {f"{k}/{base}": med[k] / med[base] for k in med if k != base}
        if base == "vanilla":
            entry["ratios"]["reparam/train"] = med["reparam"] / med["train"]
        results["models"][name] = entry
        print(format_table(name, entry), flush=True)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(path)
        print(f"wrote {path}")
    return results


def format_table(name: str, entry: dict) -> str:
    lines = [
        f"{name}  (reparam vs train max rel err {entry['reparam_max_rel_err']:.2e})",
        f"  {'form':<10}{'params(M)':>10}{'GMACs':>8}{'img/s med':>11}{'min':>9}{'max':>9}",
    ]
    for k, v in entry["forms"].items():
        t = v["throughput"]
        lines.append(
            f"  {k:<10}{v['params_m']:>10.2f}{v['gmacs']:>8.2f}{t['median']:>11.1f}{t['min']:>9.1f}{t['max']:>9.1f}"
        )
    lines.append("  ratios: " + ", ".join(f"{k} = {r:.3f}x" for k, r in entry["ratios"].items()))
    return "\n".join(lines)
