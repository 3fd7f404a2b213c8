"""Arguments shared by the deployment subcommands: where the weights come from and the model settings."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import UserError
from ..layers.idle_mlp import FEATURE_NORMS, HEURISTIC_CHOICES
from ..utils import parse_value


def add_source_args(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """``CHECKPOINT`` plus the options that say which model it is for."""
    p.add_argument(
        "checkpoint",
        nargs=None if checkpoint_required else "?",
        help="repavit train's checkpoint.pth / best_checkpoint.pth, a convert/reparam output (.safetensors), a "
        "push-to-hub folder, the authors' .pth (released weights or training checkpoint), or a bare state dict",
    )
    add_model_args(p)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "model (taken from the checkpoint's record when it has one; a value given here must agree with it)"
    )
    g.add_argument("--model", default=None, help="registered model name, e.g. RePaViT_Base")
    g.add_argument("--idle-ratio", type=float, default=None, help="share of FFN hidden channels that skip GELU")
    g.add_argument("--feature-norm", choices=FEATURE_NORMS, default=None)
    g.add_argument(
        "--heuristic", choices=HEURISTIC_CHOICES, default=None, help="per-block idle ratios ('none': static)"
    )
    idle = g.add_mutually_exclusive_group()
    idle.add_argument(
        "--channel-idle", dest="channel_idle", action="store_true", default=None, help="channel-idle FFNs (the default)"
    )
    idle.add_argument(
        "--no-channel-idle", dest="channel_idle", action="store_false", default=None, help="plain FFNs (no idling)"
    )
    g.add_argument("--num-classes", "--nb_classes", type=int, default=None)
    g.add_argument("--img-size", "--input_size", type=int, default=None)
    g.add_argument(
        "--model-arg",
        "--model_kwargs",
        dest="model_arg",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="other model arguments (YAML values), e.g. --model-arg depth=2 embed_dim=64; repeatable",
    )
    g.add_argument("--use-ema", action="store_true", help="take the EMA weights (model_ema) of a training checkpoint")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Model keyword arguments given on the command line (unset options left out)."""
    from ..models.record import RUNTIME_ARGS

    out: dict[str, Any] = {}
    for key in ("idle_ratio", "feature_norm", "heuristic", "channel_idle", "num_classes", "img_size"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    for item in getattr(args, "model_arg", []) or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--model-arg expects KEY=VALUE, got {item!r}")
        if key in RUNTIME_ARGS:
            raise UserError(f"--model-arg {key} is not a model setting (the command decides it; see its --help)")
        out[key] = parse_value(value)
    return out


_FLAGS = {
    "model_name": "--model",
    "idle_ratio": "--idle-ratio",
    "feature_norm": "--feature-norm",
    "heuristic": "--heuristic",
    "num_classes": "--num-classes",
    "img_size": "--img-size",
}


def spell(key: str, value: Any) -> str:
    """How these commands name a setting in messages: ``--idle-ratio 0.5``, ``--model-arg depth=2``."""
    if key == "channel_idle":
        return "--channel-idle" if value else "--no-channel-idle"
    if key == "reparameterized":
        return "the default" if value else "--no-reparam"
    if key in _FLAGS:
        return f"{_FLAGS[key]} {value}"
    return f"--model-arg {key}={value}"


def load_from_args(args: argparse.Namespace, reparameterized: bool | None = None, pretrained: bool = False):
    """:func:`repavit.models.load_model` with the command line's source and model settings."""
    from ..models import load_model

    return load_model(
        getattr(args, "checkpoint", None),
        args.model,
        pretrained=pretrained,
        reparameterized=reparameterized,
        use_ema=args.use_ema,
        spell=spell,
        **model_kwargs(args),
    )


def check_output(output: str) -> None:
    """``-o`` of convert/reparam names a stem: ``X`` or ``X.safetensors`` (writes X.safetensors and X.json)."""
    if not output.strip() or output.endswith(("/", os.sep)):
        raise UserError(f"-o {output!r}: give a file path (without suffix), e.g. -o out/model")
    if output.endswith((".pth", ".pt", ".bin", ".onnx")):
        raise UserError(
            f"-o {output}: this command writes OUTPUT.safetensors and OUTPUT.json; give -o without a suffix"
        )


def provenance(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """What a converted file records beside the model: its source, and the accuracy training measured."""
    extra: dict[str, Any] = {"source": str(args.checkpoint) + (" (EMA weights)" if args.use_ema else "")}
    if loaded.metrics:
        extra["metrics"] = loaded.metrics
    for key in ("released", "release_like"):
        entry = getattr(loaded, key)
        if entry is not None:
            extra[key] = f"{entry.names[0]}.{entry.tag}"
    if loaded.assumptions:  # settings the source did not record: the record now states them, so keep why
        extra["assumed"] = loaded.assumptions
    return extra


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"
