"""The training-step benchmark behind ``repavit bench --train-step``: time, peak memory, and where the time
and memory go.

Forward + backward + SGD step on a fixed random batch, interleaved across ``vanilla`` (timm's plain
counterpart), ``train`` (ours, training form: the idle channels through the covariance of the tokens where
that pays, ``repavit.layers.idle_covariance``), ``train_explicit`` (ours with every hidden channel
materialized, in one autograd node), ``train_split`` (ours with the hidden layer as the split graph of plain
ops) and ``masked`` (the authors' masked training FFN); with
``train_compile`` also ``vanilla_compiled`` and ``train_compiled`` (``torch.compile`` of each, so that
neither side has an advantage the other lacks). With ``breakdown``: the step's time per operator group
from PyTorch's profiler (self time of each aten op: GEMMs, BatchNorm, LayerNorm, GELU, attention,
elementwise, the optimizer, ...) and the bytes autograd keeps for backward (saved-tensor hooks).
"""

from __future__ import annotations

import copy
import statistics
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..measure import inference_precision, interleaved_throughput, peak_memory_mb, summarize
from .reference import MaskedIdleMlp, with_masked_ffn

__all__ = ["bench_train_step", "saved_for_backward_mb", "train_step_breakdown", "train_step_peak_memory",
           "train_step_times", "vanilla_counterpart"]  # fmt: skip


def vanilla_counterpart(model: nn.Module) -> nn.Module | None:
    """The plain timm model of the same size (``model.vanilla_counterpart()``), or None if it has none."""
    fn = getattr(model, "vanilla_counterpart", None)
    return fn() if callable(fn) else None


def _train_steps(
    models: dict[str, nn.Module],
    batch_size: int,
    img_size: int,
    device: torch.device,
    amp: str = "off",
    channels_last: bool = False,
) -> dict[str, Callable[[], None]]:
    """One callable per model doing forward + backward + SGD step on a fixed random batch (train mode);
    ``amp`` autocasts the forward and the loss (no scaler: the timing is the same)."""
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def make(m: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with inference_precision(amp, device):
                loss = F.cross_entropy(m(x), y % m.num_classes if hasattr(m, "num_classes") else y)
            loss.backward()
            opt.step()

        return run

    for m in models.values():
        m.train()
        if channels_last:
            m.to(memory_format=torch.channels_last)
    return {k: make(m) for k, m in models.items()}


def train_step_times(
    models: dict[str, nn.Module],
    batch_size: int,
    img_size: int,
    rounds: int,
    warmup: int,
    device: torch.device,
    desc: str | None = None,
    amp: str = "off",
    channels_last: bool = False,
) -> dict[str, list[float]]:
    """Seconds per training step (forward + backward + SGD step), interleaved across models."""
    steps = _train_steps(models, batch_size, img_size, device, amp, channels_last)
    ips = interleaved_throughput(steps, batch_size, rounds, 1, warmup, device, desc=desc)
    return {k: [batch_size / v for v in vals] for k, vals in ips.items()}


def train_step_peak_memory(
    models: dict[str, nn.Module],
    batch_size: int,
    img_size: int,
    device: torch.device,
    amp: str = "off",
    channels_last: bool = False,
) -> dict[str, float | None]:
    """Peak memory (MiB) of one training step per model: activations kept for backward, gradients."""
    out = {}
    for k, step in _train_steps(models, batch_size, img_size, device, amp, channels_last).items():
        step()  # warm: first-call workspaces, gradient buffers
        out[k] = peak_memory_mb(step, device)
    return out


# Operator groups of the breakdown, by aten op name (first match wins; the rest is "other").
_GROUPS = (
    ("gemm", ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation", "convolution",
              "mkldnn_convolution", "convolution_backward")),
    ("batch_norm", ("batch_norm",)),
    ("layer_norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("attention", ("scaled_dot_product", "_softmax", "softmax")),
    ("optimizer", ("_foreach", "sgd")),
    ("copy_cat_slice", ("copy_", "cat", "slice", "split", "narrow", "contiguous", "clone", "index", "select")),
    ("elementwise", ("add", "mul", "sub", "div", "sum", "mean", "where", "fill", "zero", "ones", "empty",
                     "threshold", "neg", "exp", "log", "sqrt", "rsqrt", "pow")),
)  # fmt: skip


def _group(op: str) -> str:
    name = op.removeprefix("aten::")
    for group, keys in _GROUPS:
        if any(k == name or name.startswith(k + "_") or name.startswith("_" + k) or k in name for k in keys):
            return group
    return "other"


def train_step_breakdown(step: Callable[[], None], repeats: int = 3) -> dict[str, float]:
    """Milliseconds of one training step per operator group (self time of every aten op, PyTorch's
    profiler, CPU side), the median over ``repeats`` profiled steps (one step's split moves by tens of
    percent on a shared CPU); ``total_ms`` is the sum of the medians."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm: workspaces, gradient buffers
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        groups: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                groups[_group(event.key)] += event.self_cpu_time_total / 1e3
        runs.append(groups)
    names = {g for r in runs for g in r}
    med = {g: statistics.median(r.get(g, 0.0) for r in runs) for g in names}
    out = dict(sorted(med.items(), key=lambda kv: -kv[1]))
    out["total_ms"] = sum(med.values())
    return out


def saved_for_backward_mb(model: nn.Module, batch_size: int, img_size: int, device: torch.device) -> float:
    """MiB that autograd keeps for backward in one training forward (distinct storages, saved-tensor hooks)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values()) / 2**20


def with_hidden_path(model: nn.Module, path: str) -> nn.Module:
    """A copy whose channel-idle FFNs train through hidden layer ``path`` (``ChannelIdleMlp.hidden_path``:
    ``"explicit"``, the idle channels materialized in one autograd node; ``"split"``, plain ops), to measure
    what each path gains."""
    from ..layers.idle_mlp import set_hidden_path

    out = copy.deepcopy(model)
    set_hidden_path(out, path)
    return out


def bench_train_step(name: str, entry: dict, model: nn.Module, plan, dev: torch.device) -> None:
    """Every training-step measurement of one model into ``entry`` (see the module docstring)."""
    tmodels = {
        "train": copy.deepcopy(model),
        "train_explicit": with_hidden_path(model, "explicit"),
        "train_split": with_hidden_path(model, "split"),
    }
    masked = with_masked_ffn(model)
    if any(isinstance(m, MaskedIdleMlp) for m in masked.modules()):  # the authors' form exists for this FFN
        tmodels["masked"] = masked
    v = vanilla_counterpart(model)
    if v is not None:
        tmodels = {"vanilla": v.to(dev), **tmodels}
    if plan.train_compile:
        if v is not None:
            tmodels["vanilla_compiled"] = torch.compile(copy.deepcopy(tmodels["vanilla"]))
        tmodels["train_compiled"] = torch.compile(copy.deepcopy(tmodels["train"]))
    rounds = max(3, plan.rounds // 2)
    st = train_step_times(
        tmodels, plan.train_batch_size, plan.img_size, rounds, 1, dev, desc=f"{name} train step",
        amp=plan.amp, channels_last=plan.channels_last,
    )  # fmt: skip
    entry["train_step_peak_memory_mb"] = train_step_peak_memory(
        tmodels, plan.train_batch_size, plan.img_size, dev, plan.amp, plan.channels_last
    )
    entry["train_step_s"] = {k: summarize(s) for k, s in st.items()}
    med = {k: s["median"] for k, s in entry["train_step_s"].items()}
    entry["train_step_ratios"] = {f"{k}/train": med[k] / med["train"] for k in med if k != "train"}
    for ours, theirs in (("train", "vanilla"), ("train_compiled", "vanilla_compiled")):
        if ours in med and theirs in med:
            entry["train_step_ratios"][f"{ours}/{theirs}"] = med[ours] / med[theirs]
    if plan.breakdown:
        steps = _train_steps(tmodels, plan.train_batch_size, plan.img_size, dev, plan.amp, plan.channels_last)
        entry["train_step_breakdown_ms"] = {
            k: train_step_breakdown(f) for k, f in steps.items() if not k.endswith("_compiled")
        }
        entry["train_saved_for_backward_mb"] = {
            k: saved_for_backward_mb(m, plan.train_batch_size, plan.img_size, dev)
            for k, m in tmodels.items() if not k.endswith("_compiled")
        }  # fmt: skip
