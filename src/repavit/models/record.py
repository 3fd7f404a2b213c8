"""The model record: what a checkpoint says about the model its weights belong to.

Every file this package writes carries one (training checkpoints, ``convert``/``reparam``
outputs, Hub-layout folders, ONNX and TorchScript exports)::

    {"format": "repavit-model", "format_version": 2,
     "model_name": "RePaViT_Tiny",
     "model_args": {"channel_idle": true, "idle_ratio": 0.75, "feature_norm": "BatchNorm",
                    "heuristic": "static", "num_classes": 3, "global_pool": "token", "img_size": [224, 224]},
     "reparameterized": false,
     "class_names": ["cat", "dog", "fish"],
     "repavit_version": "0.1.0"}

``model_args`` holds every constructor argument that changes what the model computes: the FFN
settings (always, even at their defaults, so a later change of defaults cannot change a file's
meaning), the head, the input size and any size override (``depth=2``). Settings that only
matter for training (dropout, stochastic depth) and exact inference switches
(``class_token_shortcut``) are not recorded. The rules readers apply to it are in
:func:`repavit.models.resolve_settings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UserError
from ..layers.idle_mlp import HEURISTIC_CHOICES

__all__ = [
    "FFN_ARGS",
    "RECORD_FORMAT",
    "CheckpointMismatchError",
    "ModelRecord",
    "Spelling",
    "apply_preprocessing",
    "check_preprocessing",
    "model_args_of",
    "python_spelling",
    "record_of",
    "same_setting",
]

RECORD_FORMAT = "repavit-model"
RECORD_VERSION = 2
# Settings that decide what a training-form weight file means but not its tensor shapes.
FFN_ARGS = ("channel_idle", "idle_ratio", "feature_norm", "heuristic")
# Constructor keywords that never go into a record: how a model is built or trained, not what it computes.
RUNTIME_ARGS = frozenset(
    {
        "device",
        "dtype",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_model_args",
        "pretrained_strict",
        "cache_dir",
        "checkpoint_path",
        "reparameterized",
        "features_only",
        "out_indices",
        "feature_cls",
        "class_token_shortcut",
        "scriptable",
        "exportable",
        "no_jit",
    }
)
_STATIC_ALIASES = {"none": "static", "": "static"}  # the authors' spellings of the constant schedule
_TRAINING_ONLY = ("drop_rate", "drop_path_rate", "attn_drop_rate", "pos_drop_rate", "proj_drop_rate")

# How a setting is spelled in a message: ``spell("idle_ratio", 0.5) -> "--idle_ratio 0.5"``.
Spelling = Callable[[str, Any], str]


class CheckpointMismatchError(UserError):
    """A checkpoint does not fit the model or the settings given; the message names what differs."""


def python_spelling(key: str, value: Any) -> str:
    """How the Python API names a setting: ``idle_ratio=0.5`` (``model_name='RePaViT_Tiny'``)."""
    if isinstance(value, str) and value in ("R", "S", "NAME"):  # a placeholder, not a value
        return f"{key}={value}"
    return f"{key}={value!r}"


def same_setting(a: Any, b: Any, key: str | None = None) -> bool:
    """Equal model settings: floats to 1e-9, ``224 == [224, 224]``; for ``key="heuristic"``, the authors'
    ``'none'``/``''`` mean ``'static'``."""
    a, b = _square(a), _square(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    if key == "heuristic" and isinstance(a, str) and isinstance(b, str):
        return _STATIC_ALIASES.get(a, a) == _STATIC_ALIASES.get(b, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b))
    return a == b


def _square(value: Any) -> Any:
    """``[224, 224]`` -> ``224``: one spelling for square sizes."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return value[0]
    return value


def jsonable(value: Any, what: str = "model argument") -> Any:
    """``value`` as JSON types (tuples become lists); anything else is a ``ValueError`` naming it."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v, what) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise UserError(f"{what} {value!r} ({type(value).__name__}) cannot be recorded: only plain values can")


def _plain(value: Any) -> str:
    """``0.75`` for 0.75, ``224`` for ``[224, 224]``: a setting as a person writes it."""
    value = _square(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _package_version() -> str:
    from .. import __version__

    return __version__


def check_settings(args: Mapping[str, Any]) -> None:
    """Refuse recorded settings of the wrong type or range (a hand-edited or damaged record), naming the key."""

    def bad(key: str, want: str) -> UserError:
        return UserError(f"model record: {key}={args[key]!r} is not {want}")

    number = (int, float)
    if "channel_idle" in args and not isinstance(args["channel_idle"], bool):
        raise bad("channel_idle", "true or false")
    if "idle_ratio" in args:
        r = args["idle_ratio"]
        if isinstance(r, bool) or not isinstance(r, number) or not 0.0 <= r <= 1.0:
            raise bad("idle_ratio", "a number in [0, 1]")
    if "feature_norm" in args and args["feature_norm"] not in ("BatchNorm", "LayerNorm"):
        raise bad("feature_norm", "'BatchNorm' or 'LayerNorm'")
    if "heuristic" in args and args["heuristic"] not in (*HEURISTIC_CHOICES, ""):
        raise bad("heuristic", "'static' or 'linear'")
    if "num_classes" in args:
        n = args["num_classes"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad("num_classes", "a whole number >= 0")
    if "img_size" in args:
        size = args["img_size"]
        sides = size if isinstance(size, (list, tuple)) else [size]
        if len(sides) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
            raise bad("img_size", "a positive whole number or [height, width]")
        if len(sides) == 1 and isinstance(size, (list, tuple)):
            raise bad("img_size", "a positive whole number or [height, width]")


@dataclass
class ModelRecord:
    """What a checkpoint's weights are: the model, its settings, its form and its classes.

    Attributes:
        model_name: registered name (``timm.create_model`` name).
        model_args: constructor arguments that change what the model computes (see the module docstring).
        reparameterized: the weights are the fused inference form.
        class_names: one name per output of the head, when the training data had names.
        repavit_version: version of the package that wrote the record.
        overrides: the arguments that were given when the model was built (the rest are the model
            name's defaults); only used to describe the model briefly.
        preprocessing: how the model's evaluation prepared images, in timm's ``pretrained_cfg`` terms
            (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``); written
            by ``repavit train`` (its evaluation transform), applied to the model's ``pretrained_cfg``
            on load, so ``predict``, ``export --int8`` and the sidecars prepare images as training
            evaluated them. None: the model name's ``pretrained_cfg``.
    """

    model_name: str
    model_args: dict[str, Any] = field(default_factory=dict)
    reparameterized: bool = False
    class_names: list[str] | None = None
    repavit_version: str | None = None
    overrides: list[str] | None = None
    preprocessing: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise UserError(f"model record: model_name must be a registered name, got {self.model_name!r}")
        if not isinstance(self.model_args, Mapping):
            raise UserError(f"model record: model_args must be a mapping, got {type(self.model_args).__name__}")
        self.model_args = {
            k: jsonable(v) for k, v in self.model_args.items() if k not in RUNTIME_ARGS and k not in _TRAINING_ONLY
        }
        check_settings(self.model_args)
        if not isinstance(self.reparameterized, bool):
            raise UserError(f"model record: reparameterized={self.reparameterized!r} is not true or false")
        if self.class_names is not None:
            names = self.class_names
            if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(c, str) for c in names):
                raise UserError("model record: class_names must be a list of strings")
            self.class_names = list(names)
            n = self.model_args.get("num_classes")
            if isinstance(n, int) and n != len(self.class_names):
                raise UserError(f"model record: {len(self.class_names)} class names for a head of {n} classes")
        if self.overrides is not None:
            self.overrides = [str(k) for k in self.overrides]
        if self.preprocessing is not None:
            self.preprocessing = check_preprocessing(self.preprocessing)

    # ---- (de)serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "format_version": RECORD_VERSION,
            "model_name": self.model_name,
            "model_args": dict(self.model_args),
            "reparameterized": self.reparameterized,
            "class_names": self.class_names,
            "repavit_version": self.repavit_version or _package_version(),
            "overrides": self.overrides,
            **({"preprocessing": self.preprocessing} if self.preprocessing is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "checkpoint") -> ModelRecord:
        """Read a record written by :meth:`to_dict` (or by version 1 of this package)."""
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: the model record is a {type(data).__name__}, not a mapping")
        if data.get("format", RECORD_FORMAT) not in (RECORD_FORMAT, "repavit"):
            raise UserError(f"{where}: the model record has format {data.get('format')!r}, not {RECORD_FORMAT!r}")
        version = data.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int):
            raise UserError(f"{where}: the model record's format_version {version!r} is not a whole number")
        if version > RECORD_VERSION:
            raise UserError(
                f"{where} was written by a newer repavit (record version {version}, this one reads up to "
                f"{RECORD_VERSION}); upgrade repavit"
            )
        try:
            return cls(
                model_name=data.get("model_name"),  # type: ignore[arg-type]
                model_args=data.get("model_args") or {},
                reparameterized=data.get("reparameterized", False),
                class_names=data.get("class_names"),
                repavit_version=data.get("repavit_version"),
                overrides=data.get("overrides") if isinstance(data.get("overrides"), list) else None,
                preprocessing=data.get("preprocessing"),
            )
        except UserError as e:
            raise UserError(f"{where}: {e}") from None

    # ---- for people -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        n = self.model_args.get("num_classes")
        return n if isinstance(n, int) else None

    def describe(self) -> str:
        """One line: ``RePaViT_Tiny, idle_ratio=0.75, BatchNorm FFN, 3 classes``."""
        return describe_settings(self.model_name, self.model_args, self.reparameterized, self.overrides)


def describe_settings(
    model_name: str, args: Mapping[str, Any], reparameterized: bool = False, overrides: Sequence[str] | None = None
) -> str:
    """``RePaViT_Tiny, idle_ratio=0.75, BatchNorm FFN, 3 classes`` (+ size overrides, the form).

    Other arguments are listed when they were given (``overrides``; all of them when unknown).
    """
    parts = [model_name]
    shown = {"channel_idle", "idle_ratio", "heuristic", "feature_norm", "num_classes", "img_size", "global_pool"}
    if args.get("channel_idle") is False:
        parts.append("no idle channels")
    elif "idle_ratio" in args:
        heuristic = args.get("heuristic")
        parts.append(f"idle_ratio={_plain(args['idle_ratio'])}" + (f" ({heuristic})" if heuristic == "linear" else ""))
    if "feature_norm" in args:
        parts.append(f"{args['feature_norm']} FFN")
    if isinstance(args.get("num_classes"), int):
        parts.append(f"{args['num_classes']} classes")
    size = _square(args.get("img_size"))
    if size is not None and size != 224:
        parts.append(f"img_size={size}")
    if args.get("global_pool") not in (None, "token", "avg"):
        parts.append(f"global_pool={args['global_pool']!r}")
    listed = set(args) if overrides is None else set(overrides)
    parts += [
        f"{k}={v}"
        for k, v in args.items()
        if k in listed and k not in shown and k not in RUNTIME_ARGS and k not in _TRAINING_ONLY
    ]
    if reparameterized:
        parts.append("reparameterized")
    return ", ".join(parts)


# ---- records of live models ---------------------------------------------------------------------
def model_args_of(model: nn.Module) -> dict[str, Any]:
    """The recordable constructor arguments of a timm-built ``model``.

    timm's record of the keywords it was built with (``model._model_args``), plus the FFN
    settings, head size, pooling and input size read off the model itself, so that defaults are
    written out.
    """
    built_with = getattr(model, "_arch_args", None) or getattr(model, "_model_args", {})
    args = {k: v for k, v in built_with.items() if k not in RUNTIME_ARGS and k not in _TRAINING_ONLY}
    for key in (*FFN_ARGS, "num_classes", "global_pool"):
        value = getattr(model, key, None)
        if isinstance(value, (str, int, float, bool)):
            args[key] = value
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "img_size", None)
    if isinstance(img_size, int):
        args["img_size"] = [img_size, img_size]
    elif isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        args["img_size"] = [int(s) for s in img_size]
    return {k: jsonable(v) for k, v in args.items()}


def model_name_of(model: nn.Module) -> str | None:
    """The registered name a timm-built model was created under (its ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def record_of(
    model: nn.Module,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    overrides: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> ModelRecord:
    """The record of a live model (its form is read off the model).

    ``overrides`` names the arguments given on top of the model name's defaults (for descriptions);
    by default the keywords the model was built with. ``preprocessing``: see :class:`ModelRecord`.
    """
    name = model_name or model_name_of(model)
    if not name:
        raise UserError("the model has no pretrained_cfg naming its architecture; pass model_name")
    args = dict(model_args_of(model))
    args.update(model_args or {})
    given = overrides if overrides is not None else getattr(model, "_model_args", None)
    return ModelRecord(
        model_name=name,
        model_args=args,
        reparameterized=bool(getattr(model, "reparameterized", False)),
        class_names=list(class_names) if class_names is not None else None,
        repavit_version=_package_version(),
        overrides=sorted(k for k in given if k in args) if given is not None else None,
        preprocessing=dict(preprocessing) if preprocessing is not None else None,
    )


_PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def check_preprocessing(prep: Any) -> dict[str, Any]:
    """``prep`` as a plain dict of the keys :class:`ModelRecord` knows, type- and range-checked."""
    if not isinstance(prep, Mapping):
        raise UserError(f"model record: preprocessing must be a mapping, got {type(prep).__name__}")
    unknown = sorted(set(prep) - set(_PREPROCESSING_KEYS))
    if unknown:
        raise UserError(f"model record: unknown preprocessing key(s) {unknown}; known: {list(_PREPROCESSING_KEYS)}")
    out: dict[str, Any] = {}
    for key, value in prep.items():
        if key in ("interpolation", "crop_mode"):
            ok = isinstance(value, str) and value
        elif key == "crop_pct":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0
        else:
            n = 3
            ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            value = [int(v) for v in value] if ok and key == "input_size" else list(value) if ok else value
        if not ok:
            raise UserError(f"model record: preprocessing {key}={value!r} is not valid")
        out[key] = value
    return out


def apply_preprocessing(model: nn.Module, prep: Mapping[str, Any] | None) -> nn.Module:
    """Put a record's ``preprocessing`` into ``model.pretrained_cfg`` (a copy), where timm's data config reads it."""
    if prep:
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in prep.items()})
        model.pretrained_cfg = cfg
    return model
