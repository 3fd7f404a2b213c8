"""``make demo``: train a small RePaViT on real images, reparameterize it, and report accuracy and speed.

The images are scikit-learn's handwritten digits (1,797 8x8 scans of 10 digits, shipped inside the
package), written out as an ImageFolder of 32x32 PNG files (stratified 80/20 split). The run uses the
same pipeline as ``repavit train``/``eval``/``speed``:

1. train a 4-block RePaViT (channel-idle FFNs, idle ratio 0.75, BatchNorm) on the CPU;
2. evaluate the trained checkpoint; reparameterize it; evaluate again (the accuracy is identical);
3. time both forms, interleaved in one process;
4. write ``report.json``, ``training_curves.png`` and ``speed.png`` into the output folder.

    python -m repavit.demo --output-dir out/demo            # about 3 minutes on a busy 2-core machine
    python -m repavit.demo --output-dir out/quick --quick   # a short run for smoke tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .utils import write_json

__all__ = ["main", "write_digits"]

_logger = logging.getLogger(__name__)

# The demo model and recipe. The DeiT regularizers (mixup, cutmix, RandAugment, random erasing, and the
# padded random crop of small images) are off: they are meant for 300 ImageNet epochs and only slow a
# 30-epoch run on 1,437 images down (with the 4-pixel crop: 61% after 20 epochs instead of 84%).
MODEL_KWARGS = {"depth": 4, "embed_dim": 64, "num_heads": 4, "patch_size": 8}
RECIPE: dict[str, Any] = dict(
    model="RePaViT_Tiny",
    model_kwargs=MODEL_KWARGS,
    input_size=32,
    channel_idle=True,
    idle_ratio=0.75,
    feature_norm="BatchNorm",
    opt="adamw",
    lr=2e-3,
    min_lr=1e-5,
    warmup_lr=1e-6,
    warmup_epochs=1,
    unscale_lr=True,
    weight_decay=0.05,
    batch_size=16,
    drop_path=0.0,
    smoothing=0.1,
    mixup=0.0,
    cutmix=0.0,
    aa="none",
    reprob=0.0,
    hflip=0.0,
    crop_padding=0,
    color_jitter=0.0,
    model_ema_decay=0.995,
    num_workers=0,
    device="cpu",
)


def write_digits(root: str | os.PathLike, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write scikit-learn's digits as ``root/{train,val}/<digit>/<index>.png`` (RGB, ``size`` x ``size``).

    Returns the number of images per split. Existing files are rewritten (the split is deterministic).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError:
        raise SystemExit("the demo needs scikit-learn: pip install 'repavit[demo]'") from None
    from PIL import Image

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, val = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=seed)
    root = Path(root)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(folder / f"{i:04d}.png")
    return {"train": len(train), "val": len(val)}


def _cli_equivalent(cfg) -> str:
    """The ``repavit train`` command line that reproduces ``cfg`` (non-default settings only)."""
    from .train import TrainConfig

    default = TrainConfig()
    parts = ["repavit", "train"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v == getattr(default, f.name):
            continue
        if isinstance(v, bool):
            parts.append(f"--{f.name}" if v else f"--no_{f.name}")
        elif isinstance(v, dict):
            parts += [f"--{f.name}", *(f"{k}={x}" for k, x in v.items())]
        else:
            parts += [f"--{f.name}", str(v)]
    return shlex.join(parts)


@torch.no_grad()
def _compare_forms(cfg, checkpoint: Path, num_classes: int) -> dict[str, Any]:
    """Logits of the trained model and of its reparameterized form on the validation images."""
    from .models import reparameterize_model
    from .train.builders import build_datasets, build_loaders, build_model
    from .train.distributed import DistEnv

    model = build_model(cfg, num_classes, checkpoint=str(checkpoint)).eval()
    fused = reparameterize_model(model)
    _, val, _ = build_datasets(cfg, need_train=False)
    _, loader = build_loaders(cfg, DistEnv(), None, val, torch.Generator())
    max_abs, ref_max, agree, n = 0.0, 0.0, 0, 0
    for x, _ in loader:
        a, b = model(x), fused(x)
        max_abs = max(max_abs, (a - b).abs().max().item())
        ref_max = max(ref_max, a.abs().max().item())
        agree += (a.argmax(1) == b.argmax(1)).sum().item()
        n += x.shape[0]
    return {"max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_abs / ref_max, "same_prediction": agree / n}


def _plot(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    hist = report["history"]
    epochs = [h["epoch"] + 1 for h in hist]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["train_loss"] for h in hist], "o-", label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss (label-smoothed cross-entropy)")
    ax1.grid(alpha=0.3)
    lr_ax = ax1.twinx()
    lr_ax.plot(epochs, [h["train_lr"] for h in hist], "--", color="gray", label="learning rate (end of epoch)")
    lr_ax.set_ylabel("learning rate")
    lines = ax1.get_lines() + lr_ax.get_lines()
    ax1.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax1.set_title("Training")
    ax2.plot(epochs, [h["test_acc1"] for h in hist], "o-", label="model")
    if "ema_test_acc1" in hist[0]:
        ax2.plot(epochs, [h["ema_test_acc1"] for h in hist], "s-", alpha=0.7, label="EMA of weights")
    acc = report["accuracy"]
    ax2.plot([epochs[-1]], [acc["reparameterized"]["acc1"]], "r*", ms=14, label="reparameterized (final)")
    ax2.axhline(10, color="gray", ls=":", label="chance (10%)")
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation top-1 accuracy (%)")
    ax2.set_title(f"Validation: {report['dataset']['val_images']} digit images")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="best", fontsize=9)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    kw = report["model"]["kwargs"]
    fig.suptitle(
        f"{report['model']['name']} (depth {kw['depth']}, width {kw['embed_dim']}, {kw['num_heads']} heads, "
        f"patch {kw['patch_size']}, idle ratio {report['model']['idle_ratio']}) on scikit-learn digits"
    )
    fig.tight_layout()
    curves = out / "training_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    sp, cx = report["speed"], report["complexity"]
    forms = [("train", "training form"), ("reparam", "reparameterized")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = ["tab:blue", "tab:orange"]
    panels = [
        ("images / s (higher is better)", [sp["median_images_per_s"][k] for k, _ in forms], sp["images_per_s"]),
        ("parameters (M)", [cx[k]["params_m"] for k, _ in forms], None),
        ("GMACs per image", [cx[k]["gmacs"] for k, _ in forms], None),
    ]
    for ax, (title, values, samples) in zip(axes, panels):
        bars = ax.bar([label for _, label in forms], values, color=colors)
        if samples:
            lo = [values[i] - min(samples[k]) for i, (k, _) in enumerate(forms)]
            hi = [max(samples[k]) - values[i] for i, (k, _) in enumerate(forms)]
            ax.errorbar(range(2), values, yerr=[lo, hi], fmt="none", ecolor="black", capsize=5)
        for b, v in zip(bars, values):
            x = b.get_x() + b.get_width() / 2
            ax.text(x, v / 2, f"{v:.4g}", ha="center", va="center", color="white", fontweight="bold")
        ax.set_title(title)
        ax.set_ylim(0, max(values) * 1.25)
    axes[0].set_xlabel(f"speed-up {sp['speedup']:.2f}x (median of {len(sp['images_per_s']['train'])} rounds)")
    fig.suptitle(
        f"Before / after reparameterization: CPU, fp32, batch {sp['batch_size']} ({report['machine']['cpu']})",
        fontsize=10,
    )
    fig.tight_layout()
    speed = out / "speed.png"
    fig.savefig(speed, dpi=120)
    plt.close(fig)
    return [curves, speed]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m repavit.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", default="out/demo", help="where the data, the run and the report go")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    p.add_argument("--quick", action="store_true", help="a short run (3 epochs, small speed test) for smoke tests")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model's 64-wide matrices gain little from more, and on a shared "
        "machine competing threads slow training several-fold and scramble the speed measurement); 0: torch's choice",
    )
    p.add_argument("--speed-batch-size", type=int, default=256, help="batch of the speed measurement")
    p.add_argument("--seed", type=int, default=0)
    return p


def _run(cfg: Any, quick: bool, speed_batch_size: int) -> dict[str, Any]:
    """Train, evaluate both forms and the EMA, compare logits, time both forms."""
    from .train import evaluate_checkpoint, fit, speed_test

    t_train = time.perf_counter()
    summary = fit(cfg)
    train_s = time.perf_counter() - t_train
    ckpt = Path(cfg.output_dir) / "checkpoint.pth"
    ev = dataclasses.replace(cfg, eval=True, resume=str(ckpt), overwrite=False)
    speed_cfg = dataclasses.replace(
        cfg,
        test_speed=True,
        resume=str(ckpt),
        reparam=True,
        speed_batch_size=speed_batch_size,
        speed_iters=3 if quick else 20,
    )
    return {
        "summary": summary,
        "train_s": train_s,
        "plain": evaluate_checkpoint(ev),
        "fused": evaluate_checkpoint(dataclasses.replace(ev, reparam=True)),
        "ema": evaluate_checkpoint(dataclasses.replace(ev, eval_ema=True)),
        "forms": _compare_forms(cfg, ckpt, num_classes=10),
        "speed": speed_test(speed_cfg),
    }


def _report(cfg: Any, data: Path, counts: dict[str, int], r: dict[str, Any]) -> dict[str, Any]:
    from .measure import machine_info

    history = [json.loads(line) for line in (Path(cfg.output_dir) / "log.txt").read_text().splitlines()]
    metrics = ("acc1", "acc5", "loss")
    plain, fused, speed = r["plain"], r["fused"], r["speed"]
    return {
        "dataset": {
            "name": "scikit-learn digits (load_digits), 8x8 scans upscaled to 32x32 RGB PNG",
            "folder": str(data),
            "train_images": counts["train"],
            "val_images": counts["val"],
            "classes": 10,
            "chance_top1": 10.0,
        },
        "model": {"name": cfg.model, "kwargs": MODEL_KWARGS, "idle_ratio": cfg.idle_ratio},
        "command": _cli_equivalent(cfg),
        "epochs": cfg.epochs,
        "train_time_s": r["train_s"],
        "history": [row for row in history if "event" not in row],
        "accuracy": {
            "training_form": {k: plain[k] for k in metrics},
            "reparameterized": {k: fused[k] for k in metrics},
            "ema": {k: r["ema"][k] for k in metrics},
            "identical_after_reparam": plain["acc1"] == fused["acc1"] and plain["acc5"] == fused["acc5"],
            "best_top1_during_training": r["summary"]["max_accuracy"],
        },
        "logits": r["forms"],
        "complexity": speed["complexity"],
        "speed": {
            "device": speed["device"],
            "batch_size": speed["batch_size"],
            "iters_per_round": speed["iters"],
            "images_per_s": speed["images_per_s"],
            "median_images_per_s": speed["median_images_per_s"],
            "speedup": speed["speedup_reparam_over_train"],
        },
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "total_time_s": None,
    }


def _print_summary(report: dict[str, Any], out: Path, plots: list[Path]) -> None:
    acc, forms, cx = report["accuracy"], report["logits"], report["complexity"]
    print()
    print(
        f"digits, {report['epochs']} epochs in {report['train_time_s']:.0f} s: "
        f"top-1 {acc['training_form']['acc1']:.2f}% (chance 10%)"
    )
    print(
        f"reparameterized: top-1 {acc['reparameterized']['acc1']:.2f}% "
        f"({'identical' if acc['identical_after_reparam'] else 'NOT identical'}; max |logit diff| "
        f"{forms['max_abs_logit_diff']:.2e}); EMA top-1 {acc['ema']['acc1']:.2f}%"
    )
    print(
        f"params {cx['train']['params_m']:.3f} M -> {cx['reparam']['params_m']:.3f} M, "
        f"GMACs {cx['train']['gmacs']:.4f} -> {cx['reparam']['gmacs']:.4f}, "
        f"speed-up {report['speed']['speedup']:.2f}x on {report['speed']['device']}"
    )
    print(f"report: {out / 'report.json'} (plots: {', '.join(str(p) for p in plots)})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from .train import TrainConfig

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = out / "digits"
    counts = write_digits(data, size=RECIPE["input_size"], seed=args.seed)
    print(f"wrote {counts['train']} training and {counts['val']} validation digit images to {data}", flush=True)
    epochs = 3 if args.quick else args.epochs
    # the demo's own folder: each `make demo` replaces the previous demo's run
    cfg = TrainConfig(
        **RECIPE, epochs=epochs, seed=args.seed, data_path=str(data), output_dir=str(out / "run"), overwrite=True
    )
    cfg.save_freq = epochs + 1  # keep checkpoint.pth and best_checkpoint.pth only
    report = _report(cfg, data, counts, _run(cfg, args.quick, args.speed_batch_size))
    plots = _plot(report, out)
    report["plots"] = [p.name for p in plots]
    report["total_time_s"] = time.perf_counter() - t0
    write_json(out / "report.json", report)
    _print_summary(report, out, plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
