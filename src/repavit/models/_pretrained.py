"""Released weights: where they live, which model settings they need, and how they load.

The authors published ImageNet-1k weights in the Hugging Face Hub repository ``Ackesnal/RePaViT``
as ``torch.save({"model": state_dict, ...})`` files. Their file list could not be seen from here,
so the file names in :data:`RELEASED` are **assumed**; every one can be overridden per call::

    timm.create_model("RePaViT_Base", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_filename="other.pth"))
    timm.create_model("RePaViT_Base", pretrained=True, pretrained_cfg_overlay=dict(file="/path/to/weights.pth"))

A weight file trained with one idle ratio cannot be told apart by its tensor shapes from one trained
with another (the training-form FFN has the same shapes for every ratio), so each entry also records
the model settings the weights need. With ``pretrained=True`` they are applied automatically, and an
explicit argument that disagrees raises :class:`CheckpointMismatchError`.

How a model family uses this (two lines in its model file)::

    from ._pretrained import build_model_with_cfg, with_released_weights   # instead of timm's
    default_cfgs = generate_default_cfgs(with_released_weights({name: _cfg() for name in MODEL_NAMES}))

and, if it has released weights, an entry in :data:`RELEASED` (or :func:`register_released` at import).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg as _timm_build_model_with_cfg
from timm.models import resolve_pretrained_cfg
from torch import nn

from .checkpoint import _weights_in_folder, open_checkpoint
from .record import FFN_ARGS, CheckpointMismatchError, ModelRecord, same_setting

_logger = logging.getLogger(__name__)

__all__ = [
    "HF_HUB_ID",
    "RELEASED",
    "ReleasedWeights",
    "build_model_with_cfg",
    "register_released",
    "released_weights",
    "required_model_args",
    "resolve_weights_file",
    "with_released_weights",
]

HF_HUB_ID = "Ackesnal/RePaViT"
# File names tried, in order, in a Hub repository whose pretrained_cfg names none (timm's convention).
_HUB_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
# pretrained_cfg keys that say where weights come from.
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source")


@dataclass(frozen=True)
class ReleasedWeights:
    """One released weight file.

    Attributes:
        names: registered model names these weights are for (authors' name first, then aliases).
        filename: file name in the Hub repository (assumed, see the module docstring).
        model_args: model settings the weights were trained with (``idle_ratio``, ``feature_norm``, ...).
        top1: ImageNet-1k top-1 reported in the paper (Table 1), for the model card.
        tag: timm pretrained tag; ``timm.create_model("RePaViT_Base.in1k", pretrained=True)``.
        hf_hub_id: Hub repository.
    """

    names: tuple[str, ...]
    filename: str
    model_args: Mapping[str, Any] = field(default_factory=dict)
    top1: float | None = None
    tag: str = "in1k"
    hf_hub_id: str = HF_HUB_ID

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.model_args.items())
        acc = f", ImageNet-1k top-1 {self.top1}% (paper)" if self.top1 is not None else ""
        return f"{self.names[0]} weights from {self.hf_hub_id}/{self.filename} (needs {args}){acc}"


def _idle(ratio: float) -> dict[str, Any]:
    return {"idle_ratio": ratio, "feature_norm": "BatchNorm", "channel_idle": True, "heuristic": "static"}


# The paper's Table 1 models: Tiny and Small at idle ratio 0.50, every other one at 0.75.
RELEASED: list[ReleasedWeights] = [
    ReleasedWeights(("RePaViT_Tiny", "repavit_tiny_patch16_224"), "RePaViT_Tiny.pth", _idle(0.5), 69.4),
    ReleasedWeights(("RePaViT_Small", "repavit_small_patch16_224"), "RePaViT_Small.pth", _idle(0.5), 78.9),
    ReleasedWeights(("RePaViT_Base", "repavit_base_patch16_224"), "RePaViT_Base.pth", _idle(0.75), 81.3),
    ReleasedWeights(("RePaViT_Large", "repavit_large_patch16_224"), "RePaViT_Large.pth", _idle(0.75), 82.0),
    ReleasedWeights(("RePaViT_Huge", "repavit_huge_patch16_224"), "RePaViT_Huge.pth", _idle(0.75), 81.4),
    ReleasedWeights(("RePaSwin_Tiny", "repaswin_tiny_patch4_window7_224"), "RePaSwin_Tiny.pth", _idle(0.75), 78.4),
    ReleasedWeights(("RePaSwin_Small", "repaswin_small_patch4_window7_224"), "RePaSwin_Small.pth", _idle(0.75), 81.4),
    ReleasedWeights(("RePaSwin_Base", "repaswin_base_patch4_window7_224"), "RePaSwin_Base.pth", _idle(0.75), 82.6),
]


def register_released(entry: ReleasedWeights) -> None:
    """Add (or replace, by first name and tag) an entry of :data:`RELEASED`."""
    RELEASED[:] = [e for e in RELEASED if (e.names[0], e.tag) != (entry.names[0], entry.tag)] + [entry]


def released_weights(name: str | None, tag: str | None = None) -> ReleasedWeights | None:
    """The released weights of a registered model name (and tag, if given), or None."""
    if not name:
        return None
    for entry in RELEASED:
        if name in entry.names and (tag is None or tag == entry.tag):
            return entry
    return None


def with_released_weights(cfgs: Mapping[str, dict]) -> dict[str, dict]:
    """Turn ``{model_name: cfg}`` into the input of timm's ``generate_default_cfgs``.

    Names with released weights get them under their tag (``"RePaViT_Base.in1k"``, the default
    cfg of ``"RePaViT_Base"``): ``hf_hub_id``, ``hf_hub_filename`` and a description naming the
    settings they need. Other names are passed through unchanged.
    """
    out: dict[str, dict] = {}
    for name, cfg in cfgs.items():
        entry = released_weights(name)
        if entry is None:
            out[name] = cfg
            continue
        out[f"{name}.{entry.tag}"] = {
            **cfg,
            "hf_hub_id": entry.hf_hub_id,
            "hf_hub_filename": entry.filename,
            "description": entry.describe(),
        }
    return out


def required_model_args(pretrained_cfg: Mapping[str, Any], pretrained_model_args: Mapping | None = None) -> dict:
    """The FFN settings the weights named by ``pretrained_cfg`` need.

    For a Hub-layout folder or repository (``local-dir:`` / ``hf-hub:``), they come from its
    ``config.json`` (``pretrained_model_args``); otherwise from :data:`RELEASED`.
    """
    if pretrained_cfg.get("source") in ("local-dir", "hf-hub"):
        return {k: v for k, v in (pretrained_model_args or {}).items() if k in FFN_ARGS}
    entry = released_weights(pretrained_cfg.get("architecture"), pretrained_cfg.get("tag"))
    return dict(entry.model_args) if entry is not None else {}


def _apply_required_args(pretrained_cfg: Mapping[str, Any], kwargs: dict, record: ModelRecord | None = None) -> dict:
    """Apply the settings the weights need to the model's keyword arguments; a conflicting FFN setting is an error.

    The settings come from the weight file's own model record if it has one, else from a Hub
    folder's ``config.json``, else from :data:`RELEASED`. Recorded settings other than the FFN ones
    fill in what is not given; ``num_classes`` and ``img_size`` may be overridden (timm's fine-tuning
    semantics: a new head, resampled position embeddings), any other override is an error.
    """
    name = pretrained_cfg.get("architecture", "model")
    if record is not None:
        where = pretrained_cfg.get("file") or pretrained_cfg.get("hf_hub_id") or name
        for key, value in record.model_args.items():
            if key not in kwargs:
                kwargs[key] = value
            elif key not in ("num_classes", "img_size") and not same_setting(kwargs[key], value, key):
                raise CheckpointMismatchError(
                    f"{where} was trained with {key}={value!r}, the model would be built with {key}={kwargs[key]!r}: "
                    f"pass {key}={value!r}, or load it with repavit.create_model(name, checkpoint_path=...), which "
                    "takes every setting from the file's record"
                )
        if record.reparameterized and not kwargs.get("reparameterized"):
            _logger.info("%s holds reparameterized weights: building the fused model", where)
            kwargs["reparameterized"] = True
        return kwargs
    required = required_model_args(pretrained_cfg, kwargs.get("pretrained_model_args"))
    tag = f".{pretrained_cfg['tag']}" if pretrained_cfg.get("tag") else ""
    for key, value in required.items():
        if key in kwargs and not same_setting(kwargs[key], value, key):
            raise CheckpointMismatchError(
                f"the pretrained weights of {name}{tag} need {key}={value!r}, got {key}={kwargs[key]!r}: "
                f"leave {key} out (it comes with the weights' config) or pass {key}={value!r}"
            )
        kwargs[key] = value
    stored = kwargs.get("pretrained_model_args") or {}
    if stored.get("reparameterized") and not kwargs.get("reparameterized"):
        # fused weights (a reparameterized Hub-layout folder) only fit the fused model; callers such as
        # repavit.create_model pass reparameterized=False by default when loading pretrained weights
        _logger.info("%s holds reparameterized weights: building the fused model", pretrained_cfg.get("file") or name)
        kwargs["reparameterized"] = True
    return kwargs


def _hub_download(repo: str, filenames: tuple[str, ...], cache_dir: str | os.PathLike | None, what: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    repo_id, _, revision = repo.partition("@")
    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir))
        except (EntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, ConnectionError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            errors.append(f"{filename}: {type(e).__name__}: {first}")
    cache = os.fspath(cache_dir) if cache_dir else constants.HF_HUB_CACHE
    offline = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub could not be reached"
    wanted = filenames[0]
    raise FileNotFoundError(
        f"pretrained weights for {what} are not available: looked for {' or '.join(filenames)} in the Hugging Face "
        f"repository {repo} (cache {cache}; {offline}). Provide them by downloading once on a connected machine "
        f"(`hf download {repo_id} {wanted}`, then copy the cache or set HF_HUB_CACHE), or by passing the local file: "
        f"pretrained_cfg_overlay=dict(file='/path/to/{wanted}') / checkpoint_path=... / `--checkpoint /path/to/"
        f"{wanted}`; if the repository names the file differently, pass pretrained_cfg_overlay="
        f"dict(hf_hub_filename='...'). Details: {'; '.join(errors)}"
    )


def _find_in_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise NotADirectoryError(f"pretrained weights folder not found: {folder}")
    return _weights_in_folder(folder)


def resolve_weights_file(pretrained_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the weight file a ``pretrained_cfg`` names, fetched through ``huggingface_hub`` if needed.

    Order: a ``local-dir`` folder, then ``file``, then ``hf_hub_id`` (+ ``hf_hub_filename``; the Hub
    client honours ``HF_HUB_OFFLINE`` and its cache, ``cache_dir`` overriding the cache location),
    then ``url``. Raises ``FileNotFoundError`` naming what was looked for and how to provide it.
    """
    name = pretrained_cfg.get("architecture") or "this model"
    source = pretrained_cfg.get("source")
    file = pretrained_cfg.get("file")
    if source == "local-dir":
        return _find_in_folder(Path(file or ""))
    if file and source != "hf-hub":
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file for {name} not found: {path}")
        return path
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        filename = pretrained_cfg.get("hf_hub_filename")
        return _hub_download(hub_id, (filename,) if filename else _HUB_DEFAULT_FILES, cache_dir, name)
    url = pretrained_cfg.get("url")
    if url:
        from timm.models._hub import download_cached_file

        try:
            return Path(download_cached_file(url, check_hash=False, cache_dir=cache_dir))
        except OSError as e:
            raise FileNotFoundError(
                f"pretrained weights for {name} could not be fetched from {url} ({e}); download the file and pass "
                "pretrained_cfg_overlay=dict(file=...) or checkpoint_path=..."
            ) from None
    raise FileNotFoundError(
        f"no released weights are known for {name}; pass a local file with pretrained_cfg_overlay=dict(file=...) "
        "or checkpoint_path=..."
    )


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict | None = None,
    pretrained_filter_fn: Callable | None = None,
    pretrained_strict: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Drop-in for ``timm.models.build_model_with_cfg`` that loads released weights safely.

    Differences from timm's: with ``pretrained=True`` the model settings the weights need are
    applied (a conflicting explicit argument raises :class:`CheckpointMismatchError`); the weight
    file is read with weights-only unpickling plus the allow-list of
    :func:`repavit.models.read_checkpoint` (the authors' files hold ``{"model": ...}`` and may
    pickle ``args``), unwrapped, and passed through ``pretrained_filter_fn``; a missing file
    raises a ``FileNotFoundError`` that says how to provide it. The rest is timm's own loading
    (classifier and input-channel adaptation, ``features_only`` wrapping after the load). timm's
    ``device`` and ``dtype`` factory arguments build the model on that device (``"meta"``: no memory)
    and in that dtype.
    """
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model, used = _build(
            model_cls, variant, pretrained, pretrained_cfg, pretrained_cfg_overlay, pretrained_filter_fn,
            pretrained_strict, cache_dir, kwargs,
        )  # fmt: skip
    # every constructor argument, the name's defaults included, for the model record (repavit.models.record)
    model._arch_args = {**_signature_defaults(model_cls), **{k: v for k, v in used.items() if _plain_value(v)}}
    return model.to(dtype=dtype) if dtype is not None else model


def _plain_value(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _signature_defaults(model_cls: Callable[..., nn.Module]) -> dict[str, Any]:
    import inspect

    return {
        p.name: p.default
        for p in inspect.signature(model_cls.__init__).parameters.values()
        if p.name != "self" and p.default is not inspect.Parameter.empty and _plain_value(p.default)
    }


def _build(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool,
    pretrained_cfg: Any,
    pretrained_cfg_overlay: dict | None,
    pretrained_filter_fn: Callable | None,
    pretrained_strict: bool,
    cache_dir: str | os.PathLike | None,
    kwargs: dict[str, Any],
) -> tuple[nn.Module, dict[str, Any]]:
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    cfg = cfg.to_dict()
    if not pretrained:
        model = _timm_build_model_with_cfg(
            model_cls, variant, False, pretrained_cfg=cfg, pretrained_strict=pretrained_strict, **kwargs
        )
        return model, kwargs
    # a weight file may carry its own record: read it first; for released weights the table decides before downloading
    released = not cfg.get("file") and cfg.get("source") not in ("local-dir", "hf-hub")
    if released:
        kwargs = _apply_required_args(cfg, dict(kwargs))
    path = resolve_weights_file(cfg, cache_dir)
    _logger.info("loading pretrained weights from %s", path)
    ckpt = open_checkpoint(path.parent if cfg.get("source") == "local-dir" else path)
    if not released:
        kwargs = _apply_required_args(cfg, dict(kwargs), ckpt.record)
    state = ckpt.state_dict()
    # timm loads an in-memory state dict when the cfg carries one and names no other source. It keeps the
    # weights' classifier only when the model's num_classes equals the cfg's: give it the weights' own head size.
    load_cfg = {k: v for k, v in cfg.items() if k not in _SOURCE_KEYS} | {"state_dict": state}
    head = state.get("head.weight")
    if head is not None and head.dim() == 2:
        load_cfg["num_classes"] = int(head.shape[0])
    model = _timm_build_model_with_cfg(
        model_cls,
        variant,
        True,
        pretrained_cfg=load_cfg,
        pretrained_filter_fn=pretrained_filter_fn,
        pretrained_strict=pretrained_strict,
        **kwargs,
    )
    for m in model.modules():  # the model (and a features wrapper) keep the cfg: give back the real one
        kept = getattr(m, "pretrained_cfg", None)
        if isinstance(kept, dict) and "state_dict" in kept:
            restored = {k: v for k, v in kept.items() if k != "state_dict"}
            restored.update({k: cfg[k] for k in _SOURCE_KEYS if cfg.get(k) is not None})
            m.pretrained_cfg = m.default_cfg = restored
    return model, kwargs
