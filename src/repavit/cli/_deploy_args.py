"""Arguments shared by the deployment subcommands: where the weights come from and the model settings."""

from __future__ import annotations

import argparse
from typing import Any

import yaml


def add_source_args(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """``CHECKPOINT`` plus the options that say which model it is for."""
    p.add_argument(
        "checkpoint",
        nargs=None if checkpoint_required else "?",
        help="the authors' .pth (released weights or training checkpoint), one of ours (.safetensors + .json), "
        "a bare state dict (.pth/.pt/.safetensors), or a Hub-layout folder",
    )
    add_model_args(p)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (needed only where the checkpoint does not record it)")
    g.add_argument("--model", default=None, help="registered model name, e.g. RePaViT_Base")
    g.add_argument("--idle-ratio", type=float, default=None, help="share of FFN hidden channels that skip GELU")
    g.add_argument("--feature-norm", choices=["BatchNorm", "LayerNorm"], default=None)
    g.add_argument("--heuristic", choices=["static", "linear"], default=None, help="per-block idle ratio schedule")
    g.add_argument(
        "--no-channel-idle", dest="channel_idle", action="store_false", default=None, help="plain FFNs (no idling)"
    )
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other model argument (YAML value), e.g. --model-arg depth=2; repeatable",
    )
    g.add_argument("--use-ema", action="store_true", help="take model_ema from a training checkpoint")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Model keyword arguments given on the command line (unset options left out)."""
    out: dict[str, Any] = {}
    for key in ("idle_ratio", "feature_norm", "heuristic", "channel_idle", "num_classes", "img_size"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    for item in getattr(args, "model_arg", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_from_args(args: argparse.Namespace, reparameterized: bool | None = None, pretrained: bool = False):
    """:func:`repavit.export.load_model` with the command line's source and model settings."""
    from ..export import load_model

    return load_model(
        getattr(args, "checkpoint", None),
        args.model,
        pretrained=pretrained,
        reparameterized=reparameterized,
        use_ema=args.use_ema,
        **model_kwargs(args),
    )


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"
