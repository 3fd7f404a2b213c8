"""Checkpoint files: read safely, told apart, written atomically. The one authority on their formats.

Layouts read (:func:`open_checkpoint`), each with the model record it carries, if any:

==========================  ======================================================  ==========================
layout                      what the file holds                                     model record
==========================  ======================================================  ==========================
``repavit-train``           ``repavit train``'s ``.pth``: ``model``, ``model_ema``,  ``record`` (v2), or
                            optimizer, schedule, ``epoch``, ``metrics``              ``model_name`` +
                                                                                    ``model_kwargs`` (v1)
``repavit-safetensors``     ``convert``/``reparam`` output: ``X.safetensors``        the header's
                            (+ ``X.json``)                                           ``repavit_config``
``hub-folder``              ``push-to-hub`` output: ``config.json`` +                ``config.json``
                            ``model.safetensors``
``authors-train``           the authors' training checkpoint (pickled ``args``)      from ``args`` (partial)
``state-dict``              a bare state dict, ``{"model": ...}`` or                 none
                            ``{"state_dict": ...}`` (the authors' releases)
==========================  ======================================================  ==========================

Files are read with ``torch.load(weights_only=True)`` plus a short allow-list of harmless types
(the ``argparse.Namespace`` the authors' training checkpoints pickle under ``args``) or with
safetensors: nothing here can execute code from a checkpoint. Writers go through
:func:`atomic_write`: a temporary file in the target folder, fsync, rename; a crash mid-write
leaves the previous file (or none) in place.

The form of a state dict (training form with BatchNorm or LayerNorm FFNs, our fused form, the
authors' fused ``fc1/fc2/fc3`` form) is told by :func:`state_form` and
:func:`repavit.layers.ffn_state.ffn_forms`, which every other module asks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..layers.ffn_state import FORM_NAMES, ffn_forms
from ..utils import atomic_write, write_json
from .record import CheckpointMismatchError, ModelRecord, jsonable

_logger = logging.getLogger(__name__)

__all__ = [
    "SAFE_GLOBALS",
    "TRAIN_FORMAT",
    "Checkpoint",
    "CheckpointMismatchError",
    "check_plain",
    "load_checkpoint",
    "open_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "state_feature_norm",
    "state_form",
    "unwrap_state_dict",
]

# Types that a weights-only unpickler may rebuild: plain containers of values, nothing callable.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
_PREFIXES = ("module.", "_orig_mod.")
TRAIN_FORMAT = "repavit-train-v2"
_TRAIN_FORMATS = ("repavit-train-v1", TRAIN_FORMAT)
METADATA_KEY = "repavit_config"  # safetensors header entry holding the record (JSON)
HUB_RECORD_KEY = "repavit"  # config.json entry holding the record
HUB_WEIGHTS = "model.safetensors"
_FOLDER_FILES = (HUB_WEIGHTS, "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


# ---- reading ------------------------------------------------------------------------------------
def _weights_in_folder(folder: Path) -> Path:
    for name in _FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    for ext in (".safetensors", ".pth", ".pt", ".bin"):
        found = sorted(folder.glob(f"*{ext}"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no weight file in {folder}: expected one of {', '.join(_FOLDER_FILES)} (or any .safetensors/.pth/.pt/.bin)"
    )


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The raw contents of a ``.pth``/``.pt``/``.bin`` (weights-only unpickling) or ``.safetensors`` file.

    A Hub-layout folder reads as its weight file. ``mmap=True`` maps a ``torch.save`` file instead of
    reading its tensors (for a quick look at a large checkpoint).
    """
    path = Path(path)
    if path.is_dir():
        path = _weights_in_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] != b"PK" and not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        # neither torch.save's zip archive nor a pickle (legacy torch.save files start with a pickle too)
        raise UserError(f"{path} is not a PyTorch checkpoint (not a torch.save zip archive or pickle); is it complete?")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head[:2] == b"PK")
    except pickle.UnpicklingError as e:
        raise UserError(_refusal(str(path), e)) from None
    except (RuntimeError, EOFError, OSError) as e:
        if _is_torchscript(path):
            raise UserError(
                f"{path} is a TorchScript export (load it with torch.jit.load), not a checkpoint; use the checkpoint "
                "it was exported from"
            ) from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); is it complete?") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a checkpoint dictionary")
    return raw


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(("/constants.pkl", "/code/__torch__.py")) or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _refusal(path: str, err: Exception) -> str:
    """One line: what weights-only loading refused in ``path`` (nothing in it ran) and how to get the weights out."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported operand \d+)", text)
    what = f"`{found.group(1)}`" if found else "pickled objects"
    return (
        f"refusing to unpickle {path}: it needs {what}, which is not a tensor or plain value, and weights-only "
        "loading never rebuilds such objects (nothing from the file was run). If you trust the file, keep only "
        "its weights: torch.save({'model': torch.load(PATH, weights_only=False)['model']}, 'weights.pth'), "
        "then use weights.pth (e.g. `repavit convert weights.pth`)"
    )


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> dict[str, Tensor]:
    """Return the model state dict from a raw state dict or a training checkpoint.

    Accepts ``{"model": sd}``, ``{"model_ema": sd}``, ``{"state_dict": sd}`` or a bare state dict,
    and strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    sd: Any = checkpoint
    if use_ema:
        if not (isinstance(sd, Mapping) and isinstance(sd.get("model_ema"), Mapping)):
            raise CheckpointMismatchError("the EMA weights were asked for, but the checkpoint has no 'model_ema' entry")
        sd = sd["model_ema"]
    for key in _WRAPPER_KEYS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError("checkpoint holds no state dict of tensors (expected a dict of tensors, or one under 'model')")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


# ---- forms --------------------------------------------------------------------------------------
def state_form(state_dict: Mapping[str, Tensor]) -> str | None:
    """``"train"`` (training-form FFNs), ``"fused"`` (ours or the authors' fused FFNs), or None (no RePa FFN).

    A state dict that mixes the two is reported as ``"mixed"``; no model loads it.
    """
    kinds = set(ffn_forms(state_dict).values())
    if not kinds:
        return None
    fused = kinds & {"fused", "authors_fused"}
    if fused and kinds - fused:
        return "mixed"
    return "fused" if fused else "train"


def state_feature_norm(state_dict: Mapping[str, Tensor]) -> str | None:
    """``"BatchNorm"`` or ``"LayerNorm"`` for training-form FFNs, ``"BatchNorm"`` for fused ones, else None."""
    kinds = set(ffn_forms(state_dict).values())
    if kinds & {"fused", "authors_fused"} or kinds == {"bn"}:
        return "BatchNorm"
    if kinds == {"ln"}:
        return FORM_NAMES["ln"]
    return None


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    use_ema: bool = False,
) -> nn.Module:
    """Load a checkpoint's weights into ``model`` (in place), through the model's key filter.

    The authors' layouts (training form and their reparameterized ``fc1/fc2/fc3``) and ours are
    accepted. This loads weights only: it does not compare the checkpoint's model record with the
    model (:func:`repavit.models.load_model` does). A checkpoint for another configuration raises
    :class:`CheckpointMismatchError`.
    """
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    sd = unwrap_state_dict(raw, use_ema=use_ema)
    filter_fn = getattr(model, "checkpoint_filter", None)
    if filter_fn is not None:
        sd = filter_fn(sd)
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointMismatchError(
                f"checkpoint tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
                + (" (a different number of classes: pass num_classes to match)" if k.startswith("head.") else "")
            )
    if strict:
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
            raise CheckpointMismatchError(f"checkpoint keys do not match {type(model).__name__}: {'; '.join(parts)}")
    result = model.load_state_dict(sd, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        _logger.warning("missing keys %s, unexpected keys %s", result.missing_keys, result.unexpected_keys)
    return model


# ---- one opened checkpoint ----------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint file read once: its contents, its layout and its model record.

    Attributes:
        path: the file (or Hub-layout folder).
        raw: what the file holds (for a safetensors file or folder: its tensors).
        layout: one of the layouts in the module docstring.
        record: the model record, or None for a record-less file (the authors' releases, foreign files).
        record_origin: where the record came from, for messages (``"its model record"``, ``"the training
            args pickled in it"``).
        info: the other entries stored beside a safetensors record (``source``, ``metrics``,
            ``released``, ``assumed``, ...).
    """

    path: Path
    raw: Mapping[str, Any]
    layout: str
    record: ModelRecord | None = None
    record_origin: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    _states: dict[bool, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def state_dict(self, use_ema: bool = False) -> dict[str, Tensor]:
        """The model weights (the EMA weights with ``use_ema``), unwrapped; read once and cached."""
        if use_ema not in self._states:
            try:
                self._states[use_ema] = unwrap_state_dict(self.raw, use_ema=use_ema)
            except CheckpointMismatchError:
                raise CheckpointMismatchError(
                    f"{self.name} has no EMA weights (no 'model_ema' entry); leave out the EMA option"
                ) from None
            except ValueError as e:
                raise UserError(f"{self.name}: {e}") from None
        return self._states[use_ema]

    @property
    def has_ema(self) -> bool:
        return isinstance(self.raw.get("model_ema"), Mapping)

    @property
    def form(self) -> str | None:
        """:func:`state_form` of the weights."""
        return state_form(self.state_dict())

    @property
    def metrics(self) -> dict[str, Any]:
        """The evaluation that training recorded with these weights (``acc1``, ``epoch``, ...), if any."""
        metrics = self.raw.get("metrics", self.info.get("metrics"))
        return dict(metrics) if isinstance(metrics, Mapping) else {}


def _record_from_namespace(ns: argparse.Namespace) -> ModelRecord | None:
    """The settings the authors' training script pickles under ``args``, when they name the model fully.

    Their ``main.py`` always has ``model``, ``channel_idle``, ``idle_ratio`` and ``feature_norm``; a
    Namespace lacking one of them, or naming a model that is not registered, is no record (the
    file is then read like a record-less one).
    """
    import timm

    get = vars(ns).get
    if not isinstance(get("model"), str) or not timm.is_model(get("model")):
        return None
    if any(get(k) is None for k in ("channel_idle", "idle_ratio", "feature_norm")):
        return None
    args: dict[str, Any] = {"channel_idle": bool(get("channel_idle"))}
    for key in ("idle_ratio", "feature_norm", "heuristic"):
        if get(key) is not None:
            args[key] = get(key)
    if args.get("heuristic") in ("none", ""):
        args["heuristic"] = "static"
    if isinstance(get("nb_classes"), int):
        args["num_classes"] = get("nb_classes")
    if isinstance(get("input_size"), int):
        args["img_size"] = [get("input_size")] * 2
    return ModelRecord(get("model"), args)


def _record_in_dict(raw: Mapping[str, Any], where: str) -> tuple[ModelRecord | None, str | None, str]:
    """``(record, origin, layout)`` of a ``.pth`` file's contents."""
    if isinstance(raw.get("record"), Mapping):
        return ModelRecord.from_dict(raw["record"], where), "its model record", "repavit-train"
    if raw.get("format") == TRAIN_FORMAT or "record" in raw:
        raise UserError(f"{where} is a repavit checkpoint whose model record is missing or damaged")
    if raw.get("format") in _TRAIN_FORMATS or (isinstance(raw.get("model_name"), str) and "model_kwargs" in raw):
        kwargs = raw.get("model_kwargs")
        if not isinstance(raw.get("model_name"), str) or not isinstance(kwargs, Mapping):
            raise UserError(f"{where} is a repavit checkpoint whose model_name/model_kwargs are missing or damaged")
        try:
            record = ModelRecord(raw["model_name"], kwargs, reparameterized=bool(raw.get("reparameterized", False)))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        return record, "its model record", "repavit-train"
    if isinstance(raw.get("args"), argparse.Namespace):
        record = _record_from_namespace(raw["args"])
        if record is not None:
            return record, "the training args pickled in it", "authors-train"
    return None, None, "state-dict"


def _safetensors_record(path: Path) -> tuple[ModelRecord | None, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    text = meta.get(METADATA_KEY)
    if text is None:
        # this package always writes the record into the header; a JSON beside a header-less file
        # belongs to other weights (the file was replaced), so it is not trusted
        if path.with_suffix(".json").is_file():
            _logger.warning(
                "%s carries no model record; %s beside it is ignored (it was not written with these weights)",
                path.name,
                path.with_suffix(".json").name,
            )
        return None, {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: its model record is not valid JSON ({e})") from None
    if not isinstance(data, Mapping) or data.get("format") not in ("repavit", "repavit-model"):
        return None, {}
    return ModelRecord.from_dict(data, path.name), dict(data)


def _folder_record(folder: Path) -> ModelRecord:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a Hub-layout model folder: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e})") from None
    if isinstance(config.get(HUB_RECORD_KEY), Mapping):
        record = ModelRecord.from_dict(config[HUB_RECORD_KEY], str(config_file))
        weights = folder / HUB_WEIGHTS
        header = _safetensors_record(weights)[0] if weights.is_file() else None
        if header is not None and (header.model_name, header.model_args, header.reparameterized) != (
            record.model_name,
            record.model_args,
            record.reparameterized,
        ):
            raise CheckpointMismatchError(
                f"{config_file} and {weights.name} describe different models ({record.describe()} vs "
                f"{header.describe()}): the folder was altered; write it again with `repavit push-to-hub`"
            )
        return record
    # a folder written by timm or by version 1 of this package: timm's layout
    args = dict(config.get("model_args") or {})
    fused = bool(args.pop("reparameterized", False))
    if "num_classes" in config:
        args.setdefault("num_classes", config["num_classes"])
    names = (config.get("pretrained_cfg") or {}).get("label_names") or config.get("label_names")
    return ModelRecord(
        config.get("architecture"),
        args,
        reparameterized=fused,
        class_names=list(names) if isinstance(names, list) and len(names) == args.get("num_classes") else None,
    )


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file or Hub-layout folder once: its tensors, layout and model record."""
    path = Path(path)
    if path.is_dir():
        record = _folder_record(path)
        return Checkpoint(path, read_checkpoint(path), "hub-folder", record, "its config.json")
    raw = read_checkpoint(path)
    if path.suffix == ".safetensors":
        record, info = _safetensors_record(path)
        layout = "repavit-safetensors" if record is not None else "state-dict"
        return Checkpoint(path, raw, layout, record, "its model record" if record is not None else None, info)
    record, origin, layout = _record_in_dict(raw, path.name)
    return Checkpoint(path, raw, layout, record, origin)


# ---- writing ------------------------------------------------------------------------------------
def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` if ``obj`` holds anything but tensors, numbers, strings, None, lists/tuples, dicts."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a non-plain key {k!r}")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} holds a {type(obj).__name__}, which weights_only loading would refuse")


def _cpu_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def _tensor_summary(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    return {
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, Tensor],
    record: ModelRecord,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write weights with their model record, atomically; return the files written.

    * ``.pth`` / ``.pt``: one ``torch.save`` file, ``{"model": state_dict, "record": ..., **extra}``
      (``repavit train``'s layout; ``extra`` holds ``model_ema``, optimizer, schedule, ...).
    * ``.safetensors`` or no suffix: ``X.safetensors`` (the record in its header, nothing pickled)
      and ``X.json`` (the same record, readable without tools). ``extra`` entries go into the JSON.
    """
    path = Path(path)
    if path.suffix in (".pth", ".pt"):
        state = {"model": dict(state_dict), "record": record.to_dict(), "format": TRAIN_FORMAT, **dict(extra or {})}
        check_plain(state)
        return [atomic_write(path, lambda tmp: torch.save(state, tmp))]
    from safetensors.torch import save_file

    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    weights, sidecar = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    tensors = _cpu_tensors(state_dict)
    config = {**record.to_dict(), **_tensor_summary(tensors), **jsonable(dict(extra or {}), "checkpoint entry")}
    atomic_write(
        weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
    )
    write_json(sidecar, config)
    return [weights, sidecar]
