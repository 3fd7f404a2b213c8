"""The one model loader: a checkpoint in, the model it holds out, never a silently different one.

Every reader goes through :func:`load_model` (``repavit eval``/``--resume``/``speed``, ``convert``,
``reparam``, ``export``, ``predict``, ``push-to-hub``, :func:`create_model` with
``checkpoint_path``, ``hubconf``). The rules, applied by :func:`resolve_settings`:

1. A setting the checkpoint's model record holds and the caller did not give is taken from the
   record, and one line says so (``model from checkpoint: RePaViT_Tiny, idle_ratio=0.75,
   BatchNorm FFN, 3 classes``).
2. A setting given that disagrees with the record is a :class:`CheckpointMismatchError` naming both
   values (``checkpoint.pth was trained with idle_ratio=0.75, --idle_ratio 0.5 was given``).
3. A file without a record (the authors' releases, foreign files): its shapes decide what they can
   (the model size, the classes, a ViT's image size, the FFN norm, a fused file's idle ratio), and
   each such reading is reported. A training-form FFN has the same shapes for every idle ratio, so
   its settings come from the caller, or, for a file shaped exactly like a released model
   (1000 classes, 224 px, no size override), from the released-weights table, with a warning saying
   so. Otherwise the file is refused with what to pass.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import Tensor, nn

from ..errors import ArgumentError, UserError
from ..layers.ffn_state import ffn_modules
from ..layers.idle_mlp import LAYERNORM_CANNOT_FOLD, active_channels, idle_ratios_for_depth, reparameterize_module
from ._pretrained import ReleasedWeights, released_weights
from ._registry import ARCHITECTURE, identify_variant, same_architecture
from .checkpoint import Checkpoint, load_checkpoint, open_checkpoint, state_feature_norm, state_form
from .record import (
    FFN_ARGS,
    RUNTIME_ARGS,
    CheckpointMismatchError,
    ModelRecord,
    Spelling,
    _plain,
    _square,
    apply_preprocessing,
    describe_settings,
    python_spelling,
    record_of,
    same_setting,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "Settings",
    "create_model",
    "fold_refusal",
    "foldable",
    "load_model",
    "reparameterize_model",
    "resolve_settings",
]

# Arguments a file shaped like a release may be given without losing the released-weights table.
_RELEASE_NEUTRAL = {*FFN_ARGS, "num_classes", "img_size", "global_pool"}


def fold_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be reparameterized (one line), or None when it can."""
    if getattr(model, "reparameterized", False):
        return "it is already reparameterized"
    if getattr(model, "feature_norm", "BatchNorm") != "BatchNorm":
        return f"its FFNs use LayerNorm: {LAYERNORM_CANNOT_FOLD}"
    if not any(callable(getattr(m, "fuse", None)) for m in model.modules()):
        return "it has no channel-idle FFNs"
    return None


def foldable(model: nn.Module) -> bool:
    """True for a training-form RePa model whose FFNs fold (BatchNorm FFNs)."""
    return fold_refusal(model) is None


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every channel-idle FFN of ``model`` into its inference form and switch to eval mode.

    Works on any module tree holding RePa FFNs (RePa models, or RePa blocks inside another
    network). Idempotent. With ``inplace=False`` (default) the original is left untouched and a
    folded deep copy is returned; parameters keep their device and dtype either way.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    else:
        model.eval()
        reparameterize_module(model)
    return model


# ---- settings -----------------------------------------------------------------------------------
@dataclass
class Settings:
    """What a checkpoint's model is: name and constructor arguments, with how they were decided.

    Attributes:
        model_name: registered name to build.
        model_args: constructor arguments (the record's, or those read off the shapes, plus the given ones).
        notes: lines for the user: what was taken from the record or read off the shapes.
        warnings: lines for assumptions the file did not back (the released-weights table, defaults).
        class_names: the head's class names, when recorded.
        released: the authors' released weights these are (a conversion of ``pretrained=True`` weights).
        release_like: the released weights whose settings were assumed for a record-less file shaped
            like them (an assumption: nothing shows the file is the authors').
        assumed: assumptions an earlier conversion made and recorded with the file.
    """

    model_name: str
    model_args: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    released: ReleasedWeights | None = None
    release_like: ReleasedWeights | None = None
    assumed: list[str] = field(default_factory=list)
    overrides: list[str] | None = None


def resolve_settings(
    ckpt: Checkpoint,
    model_name: str | None = None,
    given: Mapping[str, Any] | None = None,
    *,
    spell: Spelling = python_spelling,
    use_ema: bool = False,
) -> Settings:
    """Decide the model a checkpoint holds from its record and the settings the caller gave (module docstring).

    Args:
        ckpt: the opened checkpoint.
        model_name: the model name the caller gave, or None.
        given: the model settings the caller gave explicitly (constructor keywords); nothing else.
        spell: how the caller's settings are named in messages (``--idle_ratio 0.5``, ``idle_ratio=0.5``).
        use_ema: read shapes from the EMA weights.

    Raises:
        CheckpointMismatchError: a given setting contradicts the record, or the file is ambiguous.
    """
    given = dict(given or {})
    if ckpt.record is not None:
        return _from_record(ckpt, model_name, given, spell)
    return _from_shapes(ckpt, model_name, given, spell, use_ema)


def _from_record(ckpt: Checkpoint, model_name: str | None, given: dict[str, Any], spell: Spelling) -> Settings:
    record = ckpt.record
    assert record is not None
    where = ckpt.name
    if not timm.is_model(record.model_name.split(".")[0]):
        raise UserError(
            f"{where} holds a {record.model_name}, which is not a registered model (see `repavit.list_models()`)"
        )
    if model_name and not same_architecture(model_name, record.model_name):
        raise CheckpointMismatchError(
            f"{where} holds a {record.model_name}, {spell('model_name', model_name)} was given "
            "(leave it out to use the checkpoint's)"
        )
    for key, value in record.model_args.items():
        if key in given and not same_setting(given[key], value, key):
            raise CheckpointMismatchError(
                f"{where} was trained with {key}={_plain(value)}, {spell(key, given[key])} was given "
                "(leave it out to use the checkpoint's)"
            )
    args = {**record.model_args, **given}
    settings = Settings(record.model_name, args, class_names=record.class_names)
    missing = [k for k in FFN_ARGS if k not in args]
    if missing and _is_repa(record.model_name):
        # a record written by timm (or version 1, or edited) that leaves an FFN setting out means the
        # constructor's default, as timm itself reads it: say so instead of letting each reader guess
        defaults = _ffn_defaults(record.model_name, args)
        args.update({k: defaults[k] for k in missing})
        settings.warnings.append(
            f"{where}'s record does not state {', '.join(missing)}; using {record.model_name}'s defaults "
            f"({', '.join(f'{k}={defaults[k]}' for k in missing)}), as its constructor does"
        )
    assumed = ckpt.info.get("assumed")  # what a conversion had to assume, carried with the file
    if isinstance(assumed, list):
        settings.assumed = [str(a) for a in assumed]
    for key in ("released", "release_like"):  # a conversion of the authors' weights (or of a file shaped like them)
        tag = ckpt.info.get(key)
        entry = released_weights(*tag.partition(".")[::2]) if isinstance(tag, str) else None
        if entry is not None and all(same_setting(args.get(k), v, k) for k, v in entry.model_args.items()):
            setattr(settings, key, entry)
    overrides = None if record.overrides is None else [*record.overrides, *given]
    settings.overrides = overrides
    taken = [k for k in record.model_args if k not in given]
    if taken or not model_name:
        settings.notes.append(f"model from checkpoint: {describe_settings(record.model_name, args, False, overrides)}")
    return settings


def _is_repa(name: str) -> bool:
    from . import is_repa_model

    return is_repa_model(name)


def _ffn_defaults(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The FFN settings ``name`` builds with when none is given (read off a model on the meta device)."""
    with torch.device("meta"):
        model = timm.create_model(name, **{k: v for k, v in args.items() if k not in FFN_ARGS})
    return {k: getattr(model, k) for k in FFN_ARGS}


def _supports_linear(name: str) -> bool:
    """Families with per-block idle ratios (``heuristic="linear"``); RePaSwin and RePaPoolFormer have none."""
    return ARCHITECTURE.get(name.split(".")[0], ("",))[0].endswith(("repavit", "repamlpmixer"))


def _from_shapes(
    ckpt: Checkpoint, model_name: str | None, given: dict[str, Any], spell: Spelling, use_ema: bool
) -> Settings:
    where = ckpt.name
    sd = ckpt.state_dict(use_ema)
    read: list[str] = []  # what the shapes said
    name = model_name
    if not name:
        name = identify_variant(sd)
        if name is None:
            raise UserError(
                f"cannot tell which model {where} is for: it records none and its tensor shapes match no registered "
                f"size; pass {spell('model_name', 'NAME')}"
            )
        read.append(name)
    if not timm.is_model(name.split(".")[0]):
        raise UserError(f"unknown model {name!r}; see `repavit.list_models()` for the registered names")
    settings = Settings(name, dict(given))
    args = settings.model_args
    form = state_form(sd)
    if form == "mixed":
        raise CheckpointMismatchError(f"{where} mixes training-form and fused FFNs; no model loads it")
    if form is None and _is_repa(name):
        raise CheckpointMismatchError(f"{where} holds no channel-idle FFN: it is not a {name} checkpoint")
    head = sd.get("head.weight")
    if isinstance(head, Tensor) and head.dim() == 2:
        _read(args, read, "num_classes", int(head.shape[0]), f"{int(head.shape[0])} classes", where, spell, "head")
    img = _image_size_of(sd)
    if img is not None:
        _read(args, read, "img_size", img, f"img_size={img}", where, spell, "position embedding")
    elif "img_size" not in args and _is_repa(name):
        default = _square(timm.models.get_pretrained_cfg_value(name.split(".")[0], "input_size")[-1])
        settings.warnings.append(
            f"{where} records no image size and its weights fit any: img_size={default} assumed "
            f"(pass {spell('img_size', 'S')} if it was trained at another size)"
        )
    if form is not None:
        norm = state_feature_norm(sd)
        _read(args, read, "feature_norm", norm, f"{norm} FFN", where, spell, "FFN keys")
        if form == "fused":
            _idle_from_fused(sd, name, args, given, read, where, spell)
        else:
            _idle_for_training_form(name, args, given, settings, where, spell)
    if read:
        settings.notes.append(f"{where} records no model settings; from its tensor shapes: {', '.join(read)}")
    settings.overrides = list(args)  # nothing recorded: every setting is as given or read
    return settings


def _read(
    args: dict[str, Any], read: list[str], key: str, value: Any, text: str, where: str, spell: Spelling, what: str
) -> None:
    """Take a setting the tensor shapes decide, or refuse a given one that contradicts them."""
    if key in args:
        if not same_setting(args[key], value, key):
            raise CheckpointMismatchError(
                f"{where}'s {what} is for {key}={_plain(value)}, {spell(key, args[key])} was given"
            )
        return
    args[key] = value
    read.append(text)


def _image_size_of(sd: Mapping[str, Tensor]) -> int | None:
    """Input side a ViT's position embedding or a Mixer's token MLP was trained at, or None."""
    proj = sd.get("patch_embed.proj.weight", sd.get("stem.proj.weight"))
    if not isinstance(proj, Tensor) or proj.dim() != 4:
        return None
    if "pos_embed" in sd:
        n = sd["pos_embed"].shape[1] - (1 if "cls_token" in sd else 0)
    elif "blocks.0.mlp_tokens.fc1.weight" in sd:
        n = sd["blocks.0.mlp_tokens.fc1.weight"].shape[1]
    else:
        return None
    side = math.isqrt(n)
    stride = proj.shape[-1] * (2 if "patch_embed.conv1.weight" in sd else 1)  # LV-ViT's stem halves first
    return side * stride if side * side == n else None


def _idle_from_fused(
    sd: Mapping[str, Tensor],
    name: str,
    args: dict[str, Any],
    given: Mapping[str, Any],
    read: list[str],
    where: str,
    spell: Spelling,
) -> None:
    """A fused file's idle settings from its activated widths (exact: the shapes are the structure).

    Given settings are kept and checked by the load; only the missing ones are searched for.
    """
    if "idle_ratio" in given or given.get("channel_idle") is False:
        return
    rest = {k: v for k, v in args.items() if k not in FFN_ARGS}
    probe = _probe(name, rest)
    acts = [_fused_act_dim(sd, prefix) for prefix in probe]
    hidden = [m.hidden_dim for m in probe.values()]
    if not acts:
        return
    if acts == hidden:
        args["channel_idle"] = False
        read.append("no idle channels")
        return
    heuristics = [given["heuristic"]] if "heuristic" in given else ["static", "linear"]
    if not _supports_linear(name):
        heuristics = [h for h in heuristics if h in ("static", "none", "")] or heuristics
    rounding = getattr(next(iter(probe.values())), "rounding", "ceil")
    depth = len(acts)
    # every ratio in steps of 1/1000, then the exact one the first block implies: the candidates that
    # reproduce every block's activated width (computed, not built)
    candidates = sorted({round(i / 1000, 3) for i in range(1001)} | {1 - acts[0] / hidden[0]})
    for heuristic in heuristics:
        for r in candidates:
            ratios = idle_ratios_for_depth(r, depth, heuristic if heuristic == "linear" else "static")
            if all(active_channels(h, q, rounding) == a for h, q, a in zip(hidden, ratios, acts, strict=True)):
                args.update(channel_idle=True, idle_ratio=r, heuristic="linear" if heuristic == "linear" else "static")
                read.append(f"idle_ratio={r:g}" + (" (linear heuristic)" if heuristic == "linear" else ""))
                return
    tried = " or ".join(heuristics)
    raise CheckpointMismatchError(
        f"{where} activates {acts[0]} of {hidden[0]} hidden channels in its first FFN and a pattern over the others "
        f"that fits no idle ratio of {name} with the {tried} heuristic: pass {spell('idle_ratio', 'R')}"
        + (f" and {spell('heuristic', 'linear')}" if _supports_linear(name) and "heuristic" not in given else "")
    )


def _fused_act_dim(sd: Mapping[str, Tensor], prefix: str) -> int:
    out_w = sd.get(prefix + "out_proj.weight", sd.get(prefix + "fc3.weight"))
    return 0 if out_w is None else int(out_w.shape[1])


def _probe(name: str, args: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The FFN modules of ``name`` built with ``args`` on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        return ffn_modules(timm.create_model(name, **args))


def _idle_for_training_form(
    name: str, args: dict[str, Any], given: Mapping[str, Any], settings: Settings, where: str, spell: Spelling
) -> None:
    """A training-form file's idle settings: given, from the released-weights table, or refused."""
    if args.get("channel_idle") is False:
        return
    linear_hint = _supports_linear(name)
    if "idle_ratio" in given:
        if "channel_idle" not in given:
            args["channel_idle"] = True
        if "heuristic" not in given:
            args["heuristic"] = "static"
            if linear_hint:
                settings.warnings.append(
                    f"{where} records no heuristic; assuming heuristic=static, the authors' default "
                    f"(pass {spell('heuristic', 'linear')} if it was trained with per-block ratios)"
                )
        return
    entry = released_weights(name)
    release_shaped = (
        entry is not None
        and args.get("num_classes", 1000) == 1000
        and _square(args.get("img_size", 224)) == 224
        and args.get("feature_norm") == entry.model_args.get("feature_norm")
        and all(k in _RELEASE_NEUTRAL or k in RUNTIME_ARGS or k.endswith("drop_rate") for k in given)
        and all(same_setting(given[k], v, k) for k, v in entry.model_args.items() if k in given)
    )
    if release_shaped and entry is not None:
        args.update({k: v for k, v in entry.model_args.items() if k not in given})
        settings.release_like = entry
        settings.warnings.append(
            f"{where} records no idle ratio; it is shaped like the released {entry.names[0]} weights, so their "
            f"settings are assumed ({', '.join(f'{k}={v}' for k, v in entry.model_args.items())}): pass "
            f"{spell('idle_ratio', 'R')} if it was trained otherwise"
        )
        return
    hint = f" (the released {name} weights use idle_ratio={entry.model_args['idle_ratio']})" if entry else ""
    raise CheckpointMismatchError(
        f"{where} records no model settings, and a training-form FFN has the same shapes for every idle ratio: "
        f"pass {spell('idle_ratio', 'R')} as it was trained{hint}, or {spell('channel_idle', False)} for plain FFNs"
    )


# ---- loading ------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model and what it is.

    Attributes:
        model: the model, in eval mode.
        record: the model record of ``model`` as returned (its form, its classes).
        source: where the weights came from (a path, ``"pretrained"`` or ``"random"``).
        notes: what was taken from the record or read off the shapes (already logged at INFO).
        warnings: assumptions the file did not back (already logged as warnings).
        released: the authors' released weights these are: loaded with ``pretrained=True`` (or a
            conversion of such weights).
        release_like: released weights whose settings were assumed because the file, recording none,
            is shaped like them (nothing shows it is the authors').
        metrics: the evaluation training recorded with the weights (``acc1``, ``epoch``, ...), if any.
        assumed: assumptions an earlier conversion made and recorded with the file.
    """

    model: nn.Module
    record: ModelRecord
    source: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    released: ReleasedWeights | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    assumed: list[str] = field(default_factory=list)
    release_like: ReleasedWeights | None = None

    @property
    def assumptions(self) -> list[str]:
        """Everything about the model that no file recorded (this load's warnings, and earlier conversions')."""
        return [*self.warnings, *self.assumed]

    @property
    def model_name(self) -> str:
        return self.record.model_name

    @property
    def model_args(self) -> dict[str, Any]:
        return dict(self.record.model_args)

    @property
    def reparameterized(self) -> bool:
        return self.record.reparameterized

    @property
    def class_names(self) -> list[str] | None:
        return self.record.class_names


def _build(name: str, args: Mapping[str, Any], fused: bool) -> nn.Module:
    kwargs = dict(args)
    if fused:
        kwargs["reparameterized"] = True
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise UserError(f"model {name} rejected its arguments: {str(e).splitlines()[0]}") from None


def load_model(
    source: str | os.PathLike | Checkpoint | None = None,
    model_name: str | None = None,
    *,
    pretrained: bool = False,
    reparameterized: bool | None = None,
    use_ema: bool = False,
    spell: Spelling = python_spelling,
    **model_kwargs: Any,
) -> LoadedModel:
    """Build the model a checkpoint holds and load its weights (the rules are in the module docstring).

    Args:
        source: a checkpoint file (any layout of :mod:`repavit.models.checkpoint`), a Hub-layout
            folder, or an opened :class:`Checkpoint`. None: ``pretrained`` or random weights.
        model_name: registered name. Optional when the checkpoint records it or its shapes tell it.
        pretrained: with no ``source``, load the released weights.
        reparameterized: True: return the fused form (folding a training-form checkpoint); False: the
            training form (an error for a fused checkpoint); None: whatever form the checkpoint is in.
        use_ema: take the ``model_ema`` weights of a training checkpoint.
        spell: how given settings are named in messages (the CLI passes its flag spellings).
        **model_kwargs: model settings given explicitly (checked against the record) and runtime
            arguments (``drop_path_rate``, ``class_token_shortcut``, ...).

    Returns:
        A :class:`LoadedModel`, model in eval mode.
    """
    if source is None:
        return _load_without_checkpoint(model_name, pretrained, reparameterized, model_kwargs)
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    settings = resolve_settings(ckpt, model_name, model_kwargs, spell=spell, use_ema=use_ema)
    for line in settings.notes:
        _logger.info("%s", line)
    for line in settings.warnings:
        _logger.warning("%s", line)
    sd = ckpt.state_dict(use_ema)
    fused_state = state_form(sd) == "fused"
    if ckpt.record is not None and ckpt.record.reparameterized != fused_state and state_form(sd) is not None:
        raise CheckpointMismatchError(
            f"{ckpt.name}'s record says {'fused' if ckpt.record.reparameterized else 'training form'} but its "
            f"weights are {'fused' if fused_state else 'in training form'}: the file was altered"
        )
    if reparameterized is False and fused_state:
        raise CheckpointMismatchError(
            f"{ckpt.name} is already reparameterized (fused); its training form cannot be recovered "
            f"(load it as it is: {spell('reparameterized', True)})"
        )
    if reparameterized and settings.model_args.get("feature_norm") == "LayerNorm":
        raise CheckpointMismatchError(
            f"{ckpt.name} has LayerNorm FFNs, which have no reparameterized form: run its training form "
            f"({spell('reparameterized', False)})"
        )
    model = _build(settings.model_name, settings.model_args, fused_state)
    load_checkpoint(model, sd)
    model.eval()
    if reparameterized and not fused_state:
        why = fold_refusal(model)
        if why:
            raise UserError(f"{ckpt.name} cannot be reparameterized: {why}")
        reparameterize_model(model, inplace=True)
    prep = ckpt.record.preprocessing if ckpt.record is not None else None
    apply_preprocessing(model, prep)  # how training evaluated: predict, export and sidecars follow it
    record = record_of(
        model, settings.model_name, class_names=settings.class_names, overrides=settings.overrides, preprocessing=prep
    )
    metrics = ckpt.metrics
    if use_ema and metrics:
        metrics = {"acc1": metrics.get("ema_acc1"), **{k: v for k, v in metrics.items() if k in ("epoch", "images")}}
    return LoadedModel(
        model,
        record,
        str(ckpt.path),
        settings.notes,
        settings.warnings,
        settings.released,
        {k: v for k, v in metrics.items() if v is not None},
        settings.assumed,
        settings.release_like,
    )


def _load_without_checkpoint(
    model_name: str | None, pretrained: bool, reparameterized: bool | None, kwargs: dict[str, Any]
) -> LoadedModel:
    if model_name is None:
        raise ArgumentError("a model name is needed when no checkpoint is given (e.g. {model_name} RePaViT_Base)")
    model = create_model(model_name, pretrained=pretrained, reparameterized=bool(reparameterized), **kwargs)
    model.eval()
    name = model_name if ":" not in model_name else (model.pretrained_cfg or {}).get("architecture", model_name)
    record = record_of(model, name)
    released = None
    if pretrained:
        entry = released_weights(name.split(".")[0])
        if entry is not None and all(same_setting(record.model_args.get(k), v, k) for k, v in entry.model_args.items()):
            released = entry
    else:
        _logger.warning("no checkpoint given: %s has random weights", model_name)
    return LoadedModel(model, record, "pretrained" if pretrained else "random", released=released)


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    reparameterized: bool = False,
    use_ema: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally load a checkpoint, optionally in its fused form.

    Args:
        model_name: any name registered in timm, e.g. ``"RePaViT_Base"`` or ``"repavit_base_patch16_224"``.
        pretrained: load the model's released weights through timm's ``pretrained_cfg``.
        checkpoint_path: a checkpoint file or Hub-layout folder in any layout this package reads. Its
            model record (if it has one) gives the settings not passed here; a passed setting that
            contradicts it is a :class:`CheckpointMismatchError` (see :func:`load_model`).
        reparameterized: return the fused inference model. A training-form checkpoint is loaded
            into the training form first and folded afterwards; a fused checkpoint loads directly.
        use_ema: take the ``model_ema`` weights of a training checkpoint.
        **kwargs: model arguments (``idle_ratio``, ``feature_norm``, ``num_classes``, ...).
    """
    if ":" not in model_name and not timm.is_model(model_name.split(".")[0]):
        raise UserError(f"unknown model {model_name!r}; see `repavit.list_models()` for the registered names")
    if checkpoint_path is not None:
        if pretrained:
            raise UserError("pass either pretrained=True or checkpoint_path, not both")
        loaded = load_model(checkpoint_path, model_name, reparameterized=reparameterized, use_ema=use_ema, **kwargs)
        return loaded.model
    if reparameterized and not pretrained:
        kwargs["reparameterized"] = True  # build the fused form directly (non-RePa models do not take the flag)
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if reparameterized and not getattr(model, "reparameterized", False):
        reparameterize_model(model, inplace=True)
    return model
