"""The benchmark suite behind ``repavit bench``.

For each model, in one process, with the same weights everywhere:

- inference throughput at a throughput batch and latency at batch 1, for the forms
  ``vanilla`` (timm's plain counterpart), ``train`` (training form, eval mode), ``reparam``
  (ours as shipped), ``reparam_all_tokens`` (ours with the class-token shortcut off: every token
  through every block, the computation the paper and timm's vanilla model do), ``reference``
  (ours with the authors' three-linear inference FFN swapped in: isolates the FFN structure),
  ``authors_design`` (the authors' whole inference design: three-linear FFN and every token
  through every block), and the deploy paths ``compile`` (torch.compile of ``reparam``),
  ``int8`` (dynamic quantization), ``onnxruntime`` (the file ``repavit export`` ships, when the ONNX
  extra is installed) and ``openvino`` (the IR ``repavit export -o X.xml`` ships, openvino extra), plus
  ``vanilla_onnxruntime`` and ``vanilla_openvino``: the vanilla counterpart in the same runtime, so the
  RePa speed-up can be read inside each runtime;
- training step time (forward + backward + SGD step) for ``vanilla``, ``train`` and ``masked``
  (the authors' masked training FFN);
- peak memory of each inference form and of each training step (tensors allocated while it runs:
  the activations; see :func:`peak_memory_mb`);
- params, GMACs (PyTorch's FLOP counter, attention matmuls included), output agreement with
  ``reparam`` (max relative error; logit cosine similarity and top-1 agreement for int8);
- optionally the latency breakdown (patch embedding / attention / FFN / other) and a sweep of
  the reparam-over-vanilla ratio across image and batch sizes.

Every timing is interleaved across forms round by round (see :func:`interleaved_throughput`).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MissingExtraError, UserError
from ..layers.attention import PreNormAttention
from ..layers.idle_mlp import ChannelIdleMlp, FusedIdleMlp
from ..measure import (
    count_gmacs,
    count_params,
    inference_precision,
    interleaved_throughput,
    machine_info,
    peak_memory_mb,
    summarize,
)
from ..models import reparameterize_model
from ..utils import write_json
from .reference import ThreeLinearMlp, with_three_linear_ffn
from .train_step import bench_train_step, vanilla_counterpart

_logger = logging.getLogger(__name__)


INFERENCE_FORMS = (
    "vanilla",
    "train",
    "reparam",
    "reparam_all_tokens",
    "reference",
    "authors_design",
    "compile",
    "int8",
    "vanilla_int8",
    "onnxruntime",
    "openvino",
    "vanilla_onnxruntime",
    "vanilla_openvino",
    "onnxruntime_int8",
    "vanilla_onnxruntime_int8",
    "onnxruntime_static_int8",
    "vanilla_onnxruntime_static_int8",
    "openvino_int8",
    "vanilla_openvino_int8",
)
# Forms that run an exported file in another runtime: form -> (export format, built from the vanilla model)
RUNTIME_FORMS = {
    "onnxruntime": ("onnx", False),
    "openvino": ("openvino", False),
    "vanilla_onnxruntime": ("onnx", True),
    "vanilla_openvino": ("openvino", True),
    "onnxruntime_int8": ("onnx_int8", False),
    "vanilla_onnxruntime_int8": ("onnx_int8", True),
    "onnxruntime_static_int8": ("onnx_static_int8", False),
    "vanilla_onnxruntime_static_int8": ("onnx_static_int8", True),
    "openvino_int8": ("openvino_int8", False),
    "vanilla_openvino_int8": ("openvino_int8", True),
}
# Forms that are plain float PyTorch modules (params and GMACs are meaningful); also the default set.
FLOAT_FORMS = ("vanilla", "train", "reparam", "reparam_all_tokens", "reference", "authors_design")
DEFAULT_FORMS = FLOAT_FORMS
TRAIN_FORMS = ("vanilla", "train", "masked")


# ---- building the forms ----------------------------------------------------------------------
def _runtime_runner(model: nn.Module, fmt: str, example: Tensor, tmpdir: str, name: str) -> Callable[[Tensor], Tensor]:
    """ONNX Runtime or OpenVINO on the file ``repavit export`` ships: the same exporter, opset and settings.

    The runtime gets torch's thread count. The static int8 forms calibrate on the timing batch: right
    for timing; their agreement on real images is ``benchmarks/int8_agreement.py``'s.
    """
    from ..export import OrtModel, export_onnx
    from ..export.int8 import quantize_onnx_static, quantize_openvino_static, with_identity_separate
    from ..export.openvino import OvModel, export_openvino

    threads = torch.get_num_threads()
    # one name per form: OpenVINO maps its .bin, so a later export over the same name would change the weights
    # under a compiled model (ids of freed models are reused, so no id-based names)
    stem = os.path.join(tmpdir, name)
    size = tuple(example.shape[1:])
    if "int8" in fmt:  # the identity kept out of the quantized matrix, as the torch int8 path does
        model = with_identity_separate(model)
    calibration = list(example.detach().cpu())  # static int8: ranges from the timing batch (speed only)
    if fmt.startswith("onnx"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise MissingExtraError("the onnxruntime forms need the ONNX extra: pip install 'repavit[onnx]'") from e
        path = export_onnx(model, stem + ".onnx", size)
        if fmt == "onnx_int8":
            path = _ort_dynamic_int8(path, stem + ".int8.onnx")
        elif fmt == "onnx_static_int8":
            path = quantize_onnx_static(path, stem + ".s8.onnx", calibration)
        runner: Callable = OrtModel(path, threads=threads)
    else:
        path = export_openvino(model, stem + ".xml", size)
        if fmt == "openvino_int8":
            path = quantize_openvino_static(path, stem + ".int8.xml", calibration)
        runner = OvModel(path, threads=threads)

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(runner(x))

    return run


def _ort_dynamic_int8(src: str | os.PathLike, dst: str) -> str:
    """ONNX Runtime's dynamic int8 quantization of the MatMul/Gemm weights (per output channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), dst, per_channel=True, weight_type=QuantType.QInt8)
    return dst


def _all_tokens(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the class-token shortcut off (every token through every block)."""
    model = copy.deepcopy(model)
    model.class_token_shortcut = False
    return model


def build_inference_forms(
    model: nn.Module, forms: Sequence[str], example: Tensor, tmpdir: str | None = None
) -> dict[str, Callable]:
    """Callables ``f(x) -> logits`` for each requested form of a training-form ``model``.

    ``tmpdir`` holds files a form needs (the ``onnxruntime`` model); the caller removes it.
    """
    model = model.eval()
    fused = reparameterize_model(model)
    out: dict[str, Callable] = {}
    for form in forms:
        if form == "vanilla":
            v = vanilla_counterpart(model)
            if v is None:
                continue
            out[form] = v.to(example.device).eval()
        elif form == "train":
            out[form] = model
        elif form == "reparam":
            out[form] = fused
        elif form == "reparam_all_tokens":
            if getattr(fused, "class_token_shortcut", False):
                out[form] = _all_tokens(fused)
        elif form in ("reference", "authors_design"):
            if any(isinstance(m, FusedIdleMlp) for m in fused.modules()):
                ref = with_three_linear_ffn(fused)
                out[form] = ref if form == "reference" else _all_tokens(ref)
        elif form == "compile":
            out[form] = torch.compile(copy.deepcopy(fused))
        elif form == "int8":
            if example.device.type != "cpu":
                continue
            from ..quantize import quantize_int8

            out[form] = quantize_int8(fused)
            out["int8_identity_folded"] = quantize_int8(fused, keep_identity_separate=False)
        elif form == "vanilla_int8":
            v = vanilla_counterpart(model)
            if v is not None and example.device.type == "cpu":
                from ..quantize import quantize_int8

                out[form] = quantize_int8(v.to(example.device))
        elif form in RUNTIME_FORMS:
            if tmpdir is None:
                raise UserError(f"the {form} form needs a folder for its model file (tmpdir)")
            fmt, plain = RUNTIME_FORMS[form]
            source = vanilla_counterpart(model) if plain else fused
            if source is not None:
                out[form] = _runtime_runner(source.eval(), fmt, example, tmpdir, form)
        else:
            raise UserError(f"unknown form {form!r}; expected one of {', '.join(INFERENCE_FORMS)}")
    return out


# ---- agreement -------------------------------------------------------------------------------
@torch.no_grad()
def agreement(y: Tensor, ref: Tensor) -> dict:
    y, ref = y.float().cpu(), ref.float().cpu()
    return {
        "max_rel_err": ((y - ref).abs().max() / ref.abs().max()).item(),
        "cosine_min": F.cosine_similarity(y, ref, dim=1).min().item(),
        "top1_agreement": (y.argmax(1) == ref.argmax(1)).float().mean().item(),
    }


# ---- latency breakdown -----------------------------------------------------------------------
def _category(module: nn.Module) -> str | None:
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Attention as TimmAttention
    from timm.models.vision_transformer import Mlp as TimmMlp

    if isinstance(module, PatchEmbed):
        return "patch_embed"
    if isinstance(module, (PreNormAttention, TimmAttention)):
        return "attention"
    if isinstance(module, (ChannelIdleMlp, FusedIdleMlp, ThreeLinearMlp, TimmMlp)):
        return "ffn"
    return None


@torch.no_grad()
def latency_breakdown(model: nn.Module, x: Tensor, iters: int = 3) -> dict[str, float]:
    """Share of forward time in patch embedding, attention, FFN and the rest (module hooks, CPU sync).

    For timm's vanilla blocks the pre-FFN LayerNorm (``norm2``) sits outside ``Mlp`` and counts as
    "other"; in RePa blocks the FFN's BatchNorms are part of the FFN module.
    """
    totals: dict[str, float] = defaultdict(float)
    starts: dict[nn.Module, float] = {}
    handles = []
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for m in model.modules():
        cat = _category(m)
        if cat is None:
            continue

        def pre(mod, _inp):
            sync()
            starts[mod] = time.perf_counter()

        def post(mod, _inp, _out, cat=cat):
            sync()
            totals[cat] += time.perf_counter() - starts[mod]

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        model(x)
        totals.clear()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    shares = {k: v / total for k, v in totals.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


# ---- the suite -------------------------------------------------------------------------------
def run_suite(
    model_names: Sequence[str],
    forms: Sequence[str] = DEFAULT_FORMS,
    batch_size: int = 16,
    img_size: int = 224,
    rounds: int = 7,
    iters: int = 3,
    warmup: int = 2,
    latency: bool = True,
    train_step: bool = False,
    train_batch_size: int = 32,
    breakdown: bool = False,
    sweep_sizes: Sequence[int] = (),
    sweep_batches: Sequence[int] = (),
    device: str = "cpu",
    output: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    amp: str = "off",
    channels_last: bool = False,
    train_compile: bool = False,
    **model_kwargs,
) -> dict:
    """Time every form of each model (see the module docstring); ``amp`` (off, fp16, bf16) autocasts the
    PyTorch forms, forward and training step, with SDPA's flash kernel preferred; ``channels_last`` puts
    them and their input in that memory format."""
    dev = torch.device(device)
    results: dict = {
        "machine": machine_info(),
        "settings": dict(
            forms=list(forms),
            batch_size=batch_size,
            img_size=img_size,
            rounds=rounds,
            iters=iters,
            warmup=warmup,
            train_batch_size=train_batch_size,
            amp=amp,
            channels_last=channels_last,
            train_compile=train_compile,
            model_kwargs=model_kwargs,
        ),
        "models": {},
        "complete": False,
    }

    plan = _Plan(forms, batch_size, img_size, rounds, iters, warmup, latency, train_step, train_batch_size,
                 breakdown, sweep_sizes, sweep_batches, model_kwargs, amp, channels_last, train_compile)  # fmt: skip

    def save() -> None:  # after every measurement: an interrupted run keeps what it measured
        if output:
            write_json(Path(output), results)

    with tempfile.TemporaryDirectory(prefix="repavit-bench-") as tmpdir:
        for name in model_names:
            entry: dict = {"forms": {}}
            results["models"][name] = entry
            _bench_model(name, entry, plan, dev, tmpdir, save)
            print(format_entry(name, entry), flush=True)
    results["complete"] = True
    save()
    if output:
        print(f"wrote {output}")
    if plot:
        plot_results(results, Path(plot))
        print(f"wrote {plot}")
    return results


def _ratios(med: dict[str, float]) -> dict[str, float]:
    """Throughput ratios among the forms measured: each over the first present of vanilla / train / reparam."""
    base = next((b for b in ("vanilla", "train", "reparam") if b in med), None)
    if base is None:
        return {}
    out = {f"{k}/{base}": med[k] / med[base] for k in med if k != base}
    for other in ("reparam_all_tokens", "reference", "authors_design"):
        if other in med and "reparam" in med:
            out[f"reparam/{other}"] = med["reparam"] / med[other]
    for runtime in (
        "int8",
        "onnxruntime",
        "openvino",
        "onnxruntime_int8",
        "onnxruntime_static_int8",
        "openvino_int8",
    ):  # the RePa speed-up inside each runtime
        if runtime in med and f"vanilla_{runtime}" in med:
            out[f"{runtime}/vanilla_{runtime}"] = med[runtime] / med[f"vanilla_{runtime}"]
    return out


@dataclass
class _Plan:
    """What to measure for every model (the arguments of :func:`run_suite`)."""

    forms: Sequence[str]
    batch_size: int
    img_size: int
    rounds: int
    iters: int
    warmup: int
    latency: bool
    train_step: bool
    train_batch_size: int
    breakdown: bool
    sweep_sizes: Sequence[int]
    sweep_batches: Sequence[int]
    model_kwargs: dict
    amp: str = "off"
    channels_last: bool = False
    train_compile: bool = False


def _runners(fns: dict[str, Callable], x: Tensor, plan: _Plan, dev: torch.device) -> tuple[dict[str, Callable], Tensor]:
    """``fns`` as the timing calls them, and the input: the PyTorch float forms (and ``compile``) under
    ``plan.amp``'s autocast and in channels-last if asked; int8 and the runtimes keep their own precision."""
    torch_forms = [k for k in fns if k in FLOAT_FORMS or k == "compile"]
    if plan.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        for k in torch_forms:
            fns[k].to(memory_format=torch.channels_last)
    if plan.amp == "off":
        return dict(fns), x

    def precise(f: Callable) -> Callable:
        def run(inp: Tensor) -> Tensor:
            with inference_precision(plan.amp, dev):
                return f(inp)

        return run

    return {k: precise(f) if k in torch_forms else f for k, f in fns.items()}, x


def _bench_model(name: str, entry: dict, plan: _Plan, dev: torch.device, tmpdir: str, save: Callable) -> None:
    """Every measurement of one model, written into ``entry`` (and saved) as each one finishes."""
    forms, batch_size, img_size, rounds, iters, warmup = (
        plan.forms, plan.batch_size, plan.img_size, plan.rounds, plan.iters, plan.warmup
    )  # fmt: skip
    model_kwargs = plan.model_kwargs
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, **model_kwargs).to(dev).eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    fns = build_inference_forms(model, forms, x, tmpdir)
    run, x = _runners(fns, x, plan, dev)
    with torch.no_grad(), inference_precision(plan.amp, dev):
        ref = fns["reparam"](x) if "reparam" in fns else model(x)
        train_out = model(x)
    entry["reparam_vs_train"] = agreement(ref, train_out)
    for k, f in fns.items():
        info: dict = {}
        if k in FLOAT_FORMS:  # float modules: counts are meaningful
            info["params_m"] = count_params(f) / 1e6
            info["gmacs"] = count_gmacs(f, img_size)
        with torch.no_grad():
            y = run[k](x)  # also warms up (first-call workspaces, compilation) before the memory measurement
            if k not in ("vanilla", "train") and not k.startswith("vanilla_"):
                info["agreement_with_reparam"] = agreement(y, ref)
            if k not in RUNTIME_FORMS:  # the runtimes allocate outside PyTorch
                info["peak_memory_mb"] = peak_memory_mb(lambda f=run[k], x=x: f(x), dev)
        entry["forms"][k] = info
    save()
    with torch.no_grad():
        t = interleaved_throughput(
            {k: (lambda f=f, x=x: f(x)) for k, f in run.items()}, batch_size, rounds, iters, warmup, dev,
            desc=f"{name} throughput (batch {batch_size})",
        )  # fmt: skip
    for k, v in t.items():
        entry["forms"][k]["throughput"] = summarize(v)
    entry["ratios"] = _ratios({k: v["throughput"]["median"] for k, v in entry["forms"].items()})
    save()
    if plan.latency:
        x1 = x[:1]
        with torch.no_grad():
            lat = interleaved_throughput(
                {k: (lambda f=f, x1=x1: f(x1)) for k, f in run.items()}, 1, rounds, iters, warmup, dev,
                desc=f"{name} latency (batch 1)",
            )  # fmt: skip
        for k, v in lat.items():
            entry["forms"][k]["latency_ms"] = summarize([1000.0 / s for s in v])
        save()
    if plan.train_step:
        bench_train_step(name, entry, model, plan, dev)
        save()
    if plan.breakdown:
        entry["breakdown"] = {k: latency_breakdown(fns[k], x) for k in ("vanilla", "reparam", "train") if k in fns}
        save()
    if plan.sweep_sizes or plan.sweep_batches:
        entry["sweep"] = sweep(
            name,
            plan.sweep_sizes or (img_size,),
            plan.sweep_batches or (batch_size,),
            rounds,
            iters,
            warmup,
            dev,
            **model_kwargs,
        )
        save()


def sweep(name, sizes, batches, rounds, iters, warmup, dev, **model_kwargs) -> list[dict]:
    """reparam / vanilla throughput ratio across image sizes and batch sizes."""
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        model = timm.create_model(name, img_size=size, **model_kwargs).to(dev).eval()
        fns = build_inference_forms(model, ("vanilla", "reparam"), torch.zeros(1, 3, size, size, device=dev))
        for b in batches:
            x = torch.randn(b, 3, size, size, device=dev)
            with torch.no_grad():
                t = interleaved_throughput(
                    {k: (lambda f=f, x=x: f(x)) for k, f in fns.items()}, b, rounds, iters, warmup, dev,
                    desc=f"{name} sweep (img {size}, batch {b})",
                )  # fmt: skip
            med = {k: summarize(v)["median"] for k, v in t.items()}
            base = "vanilla" if "vanilla" in med else "reparam"
            rows.append(
                {"img_size": size, "batch_size": b, "images_per_s": med, "reparam/vanilla": med["reparam"] / med[base]}
            )
    return rows


def format_entry(name: str, entry: dict) -> str:
    a = entry["reparam_vs_train"]
    lines = [
        f"{name}  (reparam vs train: max rel err {a['max_rel_err']:.2e})",
        f"  {'form':<22}{'params(M)':>10}{'GMACs':>8}{'img/s med':>11}{'[min':>9}{'max]':>9}{'lat ms':>9}"
        f"{'peak MiB':>10}{'rel err':>10}",
    ]
    for k, v in entry["forms"].items():
        t = v["throughput"]
        lat = v.get("latency_ms", {}).get("median")
        err = v.get("agreement_with_reparam", {}).get("max_rel_err")
        mem = v.get("peak_memory_mb")
        lines.append(
            f"  {k:<22}{v.get('params_m', float('nan')):>10.2f}{v.get('gmacs', float('nan')):>8.2f}"
            f"{t['median']:>11.1f}{t['min']:>9.1f}{t['max']:>9.1f}"
            f"{'' if lat is None else f'{lat:9.1f}':>9}{'' if mem is None else f'{mem:10.1f}':>10}"
            f"{'' if err is None else f'{err:10.1e}':>10}"
        )
    lines.append("  throughput ratios: " + ", ".join(f"{k} = {r:.3f}x" for k, r in entry["ratios"].items()))
    if "train_step_s" in entry:
        ts = ", ".join(f"{k} {v['median']:.3f}s" for k, v in entry["train_step_s"].items())
        tr = ", ".join(f"{k} = {r:.3f}x" for k, r in entry["train_step_ratios"].items())
        lines.append(f"  train step (median): {ts}; time ratios: {tr}")
        mems = entry.get("train_step_peak_memory_mb", {})
        if any(v is not None for v in mems.values()):
            lines.append("  train step peak memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mems.items() if v))
    for k, groups in entry.get("train_step_breakdown_ms", {}).items():
        total = groups["total_ms"]
        parts = ", ".join(f"{g} {ms:.0f} ms ({100 * ms / total:.0f}%)" for g, ms in groups.items() if g != "total_ms")
        saved = entry.get("train_saved_for_backward_mb", {}).get(k)
        lines.append(f"  train step breakdown {k}: {total:.0f} ms: {parts}; saved for backward {saved:.0f} MiB")
    for k, shares in entry.get("breakdown", {}).items():
        lines.append(f"  breakdown {k}: " + ", ".join(f"{c} {100 * s:.1f}%" for c, s in shares.items()))
    for row in entry.get("sweep", []):
        lines.append(
            f"  sweep img {row['img_size']} batch {row['batch_size']}: reparam/vanilla {row['reparam/vanilla']:.3f}x"
        )
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> None:
    """A bar chart of median throughput per form (one panel per model), with min-max whiskers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingExtraError("plotting needs matplotlib: pip install 'repavit[bench]'") from e
    models = results["models"]
    width = max(5.5, 0.7 * max(len(e["forms"]) for e in models.values()) + 1.5)
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 4.6), squeeze=False)
    for ax, (name, entry) in zip(axes[0], models.items()):
        forms = list(entry["forms"])
        med = [entry["forms"][k]["throughput"]["median"] for k in forms]
        lo = [m - entry["forms"][k]["throughput"]["min"] for m, k in zip(med, forms)]
        hi = [entry["forms"][k]["throughput"]["max"] - m for m, k in zip(med, forms)]
        colors = [
            "#999999"
            if k.startswith("vanilla")
            else "#4C72B0"
            if k in ("train", "reference", "authors_design")
            else "#DD8452"
            for k in forms
        ]
        ax.bar(forms, med, yerr=[lo, hi], color=colors, capsize=3)
        base = med[0]
        for i, (m, h) in enumerate(zip(med, hi)):
            ax.text(i, m + h, f"{m / base:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{name} (batch {results['settings']['batch_size']})")
        ax.set_ylabel("images / s (median of interleaved rounds)")
        ax.set_xticks(range(len(forms)), forms, rotation=35, ha="right", rotation_mode="anchor")
    m = results["machine"]
    fig.suptitle(f"{m['cpu']} · {m['torch_threads']} threads · torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
