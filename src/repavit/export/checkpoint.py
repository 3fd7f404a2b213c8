"""Our checkpoint layout (safetensors + a JSON config) and loading a model from any checkpoint.

A checkpoint written by :func:`save_checkpoint` is two files side by side::

    out/repavit_base.safetensors   the state dict (our key layout), nothing pickled
    out/repavit_base.json          {"format": "repavit", "model_name": ..., "model_args": {...}, "reparameterized": ...}

The same JSON is also stored in the safetensors header (``metadata["repavit_config"]``), so the
weight file alone is enough. :func:`load_model` rebuilds a model from such a checkpoint, from the
authors' ``.pth`` files (released weights or training checkpoints, whose pickled ``args`` give the
model settings), from a bare state dict, from a Hub-layout folder, or from the released weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from ..models import CheckpointMismatchError, load_checkpoint, read_checkpoint, reparameterize_model, unwrap_state_dict
from ..models._pretrained import FFN_ARGS, released_weights, same_setting

_logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FORMAT",
    "LoadedModel",
    "input_size_of",
    "is_reparameterized_state",
    "load_model",
    "model_args_of",
    "read_config",
    "save_checkpoint",
    "tensor_bytes",
]

CONFIG_FORMAT = "repavit"
CONFIG_VERSION = 1
METADATA_KEY = "repavit_config"
# create_model keywords that are not architecture: never recorded in a config.
_RUNTIME_ARGS = {
    "device",
    "dtype",
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_model_args",
    "cache_dir",
    "reparameterized",
    "checkpoint_path",
}
_BLOCK_NORM = re.compile(r"(^|\.)mlp\.norm1\.")


@dataclass
class LoadedModel:
    """A model and what rebuilds it.

    Attributes:
        model: the model, in eval mode.
        model_name: registered name (``timm.create_model`` name).
        model_args: keyword arguments that rebuild the architecture (without ``reparameterized``).
        reparameterized: whether ``model`` is the fused inference form.
        source: where the weights came from (a path, ``"pretrained"`` or ``"random"``).
    """

    model: nn.Module
    model_name: str
    model_args: dict[str, Any]
    reparameterized: bool
    source: str


def tensor_bytes(state: nn.Module | Mapping[str, Tensor]) -> int:
    """Bytes of all tensors of a state dict (or of ``module.state_dict()``)."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    return sum(t.numel() * t.element_size() for t in sd.values() if isinstance(t, Tensor))


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model takes: its real image size, not just its ``pretrained_cfg`` default."""
    try:
        from timm.models._input import get_model_input_config

        size = get_model_input_config(model).get("input_size")
        if size:
            return tuple(int(s) for s in size)
    except (ImportError, AttributeError, KeyError, TypeError):
        pass
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c = cfg.get("input_size", (3, 224, 224))[0]
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        return (c, *(tuple(img) if isinstance(img, (tuple, list)) else (img, img)))
    return tuple(cfg.get("input_size", (3, 224, 224)))


def is_reparameterized_state(state_dict: Mapping[str, Tensor]) -> bool:
    """True for a fused (deploy) state dict: FFN weights but no FFN normalization layers."""
    has_mlp = any(".mlp." in k or k.startswith("mlp.") for k in state_dict)
    return has_mlp and not any(_BLOCK_NORM.search(k) for k in state_dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise ValueError(f"model argument value {value!r} is not JSON-serializable; pass model_args explicitly")


def model_args_of(model: nn.Module) -> dict[str, Any]:
    """Arguments that rebuild ``model``'s architecture: timm's recorded kwargs plus the FFN settings."""
    args = {
        k: v
        for k, v in getattr(model, "_model_args", {}).items()
        if k not in _RUNTIME_ARGS and not k.endswith(("drop_rate", "drop_path_rate"))
    }
    for key in (*FFN_ARGS, "num_classes", "global_pool"):
        if hasattr(model, key) and isinstance(getattr(model, key), (str, int, float, bool)):
            args[key] = getattr(model, key)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        args["img_size"] = list(img_size) if isinstance(img_size, (tuple, list)) else img_size
    return {k: _jsonable(v) for k, v in args.items()}


def _model_name_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> tuple[Path, Path]:
    """Write ``model`` as ``<path>.safetensors`` + ``<path>.json``; returns both paths.

    Args:
        model: the model (training form or reparameterized).
        path: output path; a ``.safetensors`` or ``.json`` suffix is replaced by both.
        model_name: registered name; defaults to ``model.pretrained_cfg["architecture"]``.
        model_args: architecture arguments; defaults to :func:`model_args_of`.
        source: where the weights came from, recorded for reference.
    """
    from safetensors.torch import save_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    name = model_name or _model_name_of(model)
    if not name:
        raise ValueError("model_name is needed: the model has no pretrained_cfg naming its architecture")
    fused = bool(getattr(model, "reparameterized", False))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    config = {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "model_name": name,
        "model_args": {k: _jsonable(v) for k, v in dict(model_args or model_args_of(model)).items()},
        "reparameterized": fused,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_params": sum(p.numel() for p in model.parameters()),
        "tensor_bytes": tensor_bytes(tensors),
        "source": source,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights, config_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    save_file(tensors, weights, metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    _logger.debug("wrote %s and %s", weights, config_path)
    return weights, config_path


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config of one of our checkpoints (sidecar JSON, else the safetensors header), or None."""
    path = Path(path)
    config = None
    sidecar = path.with_suffix(".json")
    if path.suffix == ".safetensors" and sidecar.is_file():
        config = json.loads(sidecar.read_text())
    elif path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if METADATA_KEY in meta:
            config = json.loads(meta[METADATA_KEY])
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        return None
    if not isinstance(config.get("model_name"), str) or not isinstance(config.get("model_args"), dict):
        raise ValueError(f"{path}: repavit config lacks model_name/model_args; re-create it with `repavit convert`")
    return config


def _args_from_namespace(ns: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """Model name and settings from the ``args`` the authors' training script pickles."""
    get = vars(ns).get
    args: dict[str, Any] = {}
    if get("channel_idle") is not None:
        args["channel_idle"] = bool(get("channel_idle"))
    for key in ("idle_ratio", "feature_norm", "heuristic"):
        if get(key) is not None:
            args[key] = get(key)
    if args.get("heuristic") in ("none", ""):
        args["heuristic"] = "static"
    if isinstance(get("nb_classes"), int):
        args["num_classes"] = get("nb_classes")
    if isinstance(get("input_size"), int):
        args["img_size"] = get("input_size")
    return get("model"), args


def _infer_model_name(state_dict: Mapping[str, Tensor]) -> str | None:
    """RePaViT size from the embedding width and depth of a state dict, or None."""
    from ..models.repavit import ARCHS

    if "cls_token" not in state_dict:
        return None
    dim = state_dict["cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    for size, (d, n, _) in ARCHS.items():
        if (d, n) == (dim, depth):
            return f"RePaViT_{size.capitalize()}"
    return None


def _merge(stored: Mapping[str, Any], given: Mapping[str, Any], where: str, strict_keys=FFN_ARGS) -> dict[str, Any]:
    """``given`` over ``stored``; a conflict on a key the weights depend on is an error."""
    out = dict(stored)
    for k, v in given.items():
        if k in strict_keys and k in stored and not same_setting(stored[k], v):
            raise CheckpointMismatchError(
                f"{where} records {k}={stored[k]!r} but {k}={v!r} was given: the weights need {k}={stored[k]!r}"
            )
        out[k] = v
    return out


def _build_and_load(
    name: str, args: dict[str, Any], state: Mapping[str, Tensor], reparameterized: bool | None, source: str
) -> LoadedModel:
    fused_state = is_reparameterized_state(state)
    if reparameterized is False and fused_state:
        raise CheckpointMismatchError(
            f"{source} is already reparameterized (fused); its training form cannot be recovered"
        )
    model = timm.create_model(name, reparameterized=True, **args) if fused_state else timm.create_model(name, **args)
    load_checkpoint(model, state)
    model.eval()
    want_fused = fused_state if reparameterized is None else reparameterized
    if want_fused and not fused_state:
        reparameterize_model(model, inplace=True)
    return LoadedModel(model, name, dict(args), bool(want_fused), source)


def load_model(
    source: str | os.PathLike | None = None,
    model_name: str | None = None,
    *,
    pretrained: bool = False,
    reparameterized: bool | None = None,
    use_ema: bool = False,
    **model_kwargs: Any,
) -> LoadedModel:
    """Build a model and load weights from any supported source.

    Args:
        source: one of our checkpoints (``.safetensors`` + config), the authors' ``.pth`` (released
            weights or a training checkpoint), a bare state dict (``.pth``/``.pt``/``.safetensors``),
            or a Hub-layout folder (``config.json`` + weights). None: ``pretrained`` or random weights.
        model_name: registered model name. Optional when the checkpoint records it (our config,
            the authors' pickled ``args``) or, for RePaViT, when the state dict's shape tells it.
        pretrained: with no ``source``, load the released weights (see :mod:`repavit.models._pretrained`).
        reparameterized: True: return the fused form; False: the training form (an error for a fused
            checkpoint); None: whatever form the checkpoint is in.
        use_ema: take ``model_ema`` from a training checkpoint.
        **model_kwargs: model arguments. Settings the weights depend on (``idle_ratio``,
            ``feature_norm``, ``channel_idle``, ``heuristic``) must agree with a config that records them.

    Returns:
        A :class:`LoadedModel` (model in eval mode).
    """
    if source is None:
        if model_name is None:
            raise ValueError("a model name is needed when no checkpoint is given (e.g. --model RePaViT_Base)")
        model = timm.create_model(model_name, pretrained=pretrained, **model_kwargs).eval()
        args = model_args_of(model)
        if reparameterized:
            reparameterize_model(model, inplace=True)
        if not pretrained:
            _logger.warning("no checkpoint given: %s has random weights", model_name)
        return LoadedModel(model, model_name, args, bool(reparameterized), "pretrained" if pretrained else "random")

    path = Path(source)
    if path.is_dir():
        return _load_hub_folder(path, model_name, reparameterized, model_kwargs)
    config = read_config(path)
    raw = read_checkpoint(path)
    state = unwrap_state_dict(raw, use_ema=use_ema)
    if config is not None:
        name = config["model_name"]
        if model_name and timm.is_model(model_name) and model_name != name:
            _logger.info("checkpoint config names %s; building %s as asked", name, model_name)
            name = model_name
        args = _merge(config["model_args"], model_kwargs, f"the config of {path.name}")
        return _build_and_load(name, args, state, reparameterized, str(path))

    ns = raw.get("args") if isinstance(raw, Mapping) else None
    ns_name, ns_args = _args_from_namespace(ns) if isinstance(ns, argparse.Namespace) else (None, {})
    name = model_name or ns_name or _infer_model_name(state)
    if not name:
        raise ValueError(f"cannot tell which model {path.name} is for; pass the model name (--model / model_name=)")
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see `repavit.list_models()` for the registered names")
    args = _merge(ns_args, model_kwargs, f"the training args pickled in {path.name}")
    entry = released_weights(name)
    missing = [k for k in FFN_ARGS if k not in args]
    if entry is not None and missing:
        defaults = {k: v for k, v in entry.model_args.items() if k in missing}
        _logger.warning(
            "%s does not record %s; assuming the settings of the released %s weights %s (pass them explicitly, "
            "e.g. --idle-ratio, if this checkpoint was trained otherwise)",
            path.name,
            ", ".join(missing),
            name,
            defaults,
        )
        args.update(defaults)
    elif "idle_ratio" not in args and args.get("channel_idle", True):
        raise ValueError(
            f"{path.name} does not record the idle ratio it was trained with and {name} has no released-weights "
            "entry; pass it (--idle-ratio / idle_ratio=)"
        )
    return _build_and_load(name, args, state, reparameterized, str(path))


def _load_hub_folder(
    folder: Path, model_name: str | None, reparameterized: bool | None, model_kwargs: dict[str, Any]
) -> LoadedModel:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a Hub-layout model folder: no config.json")
    config = json.loads(config_file.read_text())
    stored = dict(config.get("model_args") or {})
    fused = bool(stored.get("reparameterized", False))
    if reparameterized is False and fused:
        raise CheckpointMismatchError(f"{folder} holds reparameterized weights; the training form cannot be recovered")
    _merge(stored, model_kwargs, f"{config_file}")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, **model_kwargs).eval()
    if reparameterized and not fused:
        reparameterize_model(model, inplace=True)
    name = model_name or config.get("architecture")
    args = {k: v for k, v in stored.items() if k != "reparameterized"} | {
        k: v for k, v in model_kwargs.items() if k != "reparameterized"
    }
    return LoadedModel(model, name, args, bool(fused or reparameterized), str(folder))
