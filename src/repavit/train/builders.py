"""From a :class:`TrainConfig` to the model, data loaders, optimizer, schedule, loss and mixup (timm parts)."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ..data import (
    EpochPositions,
    RASampler,
    SeededSamples,
    ShardedEvalSampler,
    TransformConfig,
    build_dataset,
    build_transform,
    dataset_classes,
)
from ..data.robust import RobustDataset, check_split
from ..data.token_labels import LabelStore, TokenLabelDataset, TokenLabelTransform, check_labels
from ..errors import ArgumentError, UserError
from ..layers.idle_mlp import LAYERNORM_CANNOT_FOLD
from ..models import Checkpoint, CheckpointMismatchError, Settings, load_model, resolve_settings
from ..models import create_model as repa_create_model
from ..models import is_repa_model as _is_repa_model
from ..models import list_models as repa_list_models
from .config import TrainConfig
from .distributed import DistEnv
from .stop import ignore_stop_signals
from .token_labeling import TokenLabelLoss, check_token_label_model

__all__ = [
    "build_criterion",
    "build_datasets",
    "build_loaders",
    "build_mixup",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_token_label_loss",
    "check_classes",
    "check_model_name",
    "data_desc",
    "is_repa_model",
    "model_kwargs",
    "settings_from_checkpoint",
    "spell",
]

_logger = logging.getLogger(__name__)


# ---- model ------------------------------------------------------------------------------------
def is_repa_model(name: str) -> bool:
    return _is_repa_model(name)


def check_model_name(cfg: TrainConfig) -> None:
    """Raise a one-line error for an unknown model, or for ``--reparam`` on a model that cannot fold."""
    if not timm.is_model(cfg.model):
        names = ", ".join(n for n in repa_list_models() if n.startswith("RePa"))
        raise UserError(f"unknown model {cfg.model!r}; RePa models are: {names}")
    if cfg.reparam and not is_repa_model(cfg.model):
        raise ArgumentError("{reparam} applies to RePa models only; {v0} has no reparameterized form", v0=cfg.model)
    ffn = [f"{{{k}}}" for k in ("channel_idle", "idle_ratio", "feature_norm", "heuristic") if k in cfg.given]
    if ffn and not is_repa_model(cfg.model):
        raise ArgumentError(
            ", ".join(ffn) + " applies to RePa models only; {name} has no channel-idle FFNs", name=cfg.model
        )
    if cfg.reparam and cfg.feature_norm != "BatchNorm":
        raise ArgumentError(
            "{reparam} needs {feature_norm} BatchNorm; this model has LayerNorm FFNs: {why}", why=LAYERNORM_CANNOT_FOLD
        )


# The flags that set model constructor arguments: (TrainConfig field, constructor keyword).
_MODEL_FLAGS = (
    ("channel_idle", "channel_idle"),
    ("idle_ratio", "idle_ratio"),
    ("feature_norm", "feature_norm"),
    ("heuristic", "heuristic"),
    ("input_size", "img_size"),
    ("nb_classes", "num_classes"),
)


def spell(key: str, value: Any) -> str:
    """How the training command line names a model setting in messages (``--idle_ratio 0.5``)."""
    if key == "channel_idle":
        return "--channel_idle" if value else "--no_channel_idle"
    flags = {kw: f"--{name}" for name, kw in _MODEL_FLAGS} | {"model_name": "--model"}
    if key in flags:
        return f"{flags[key]} {value}"
    return f"--model_kwargs {key}={value}"


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """Constructor arguments for ``cfg.model`` (RePa arguments only for RePa models)."""
    kw: dict[str, Any] = {"num_classes": num_classes, "drop_rate": cfg.drop, "drop_path_rate": cfg.drop_path}
    if cfg.input_size != 224:  # not every timm model takes img_size
        kw["img_size"] = cfg.input_size
    if is_repa_model(cfg.model):
        kw.update(
            img_size=cfg.input_size,
            channel_idle=cfg.channel_idle,
            feature_norm=cfg.feature_norm,
            heuristic=cfg.heuristic,
        )
        if "idle_ratio" in cfg.given or "idle_ratio" in cfg.model_kwargs:  # else the model's default
            kw["idle_ratio"] = cfg.idle_ratio
    kw.update(cfg.model_kwargs)
    return kw


def settings_from_checkpoint(cfg: TrainConfig, ckpt: Checkpoint) -> tuple[TrainConfig, Settings]:
    """``cfg`` with the model settings ``ckpt`` holds (its record, or what its shapes tell).

    Settings given explicitly (``cfg.given``) must agree with the record: a contradiction is a
    :class:`CheckpointMismatchError` naming both values. The settings taken from the checkpoint are
    logged in one line.
    """
    given = cfg.given
    explicit = {kw: getattr(cfg, name) for name, kw in _MODEL_FLAGS if name in given}
    explicit.update(cfg.model_kwargs if "model_kwargs" in given else {})
    settings = resolve_settings(ckpt, cfg.model if "model" in given else None, explicit, spell=spell)
    for line in settings.notes:
        _logger.info("%s", line)
    for line in settings.warnings:
        _logger.warning("%s", line)
    args = dict(settings.model_args)
    changes: dict[str, Any] = {"model": settings.model_name}
    for name, kw in _MODEL_FLAGS:
        if kw in args:
            changes[name] = args.pop(kw)
    if "input_size" in changes:
        size = changes["input_size"]
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise UserError(f"{ckpt.name} was trained on {size[0]}x{size[1]} images; training runs on square ones")
            changes["input_size"] = int(size[0])
    changes["model_kwargs"] = {**args, **cfg.model_kwargs}
    return cfg.with_given(given, **changes), settings


def data_desc(cfg: TrainConfig) -> str:
    """Where the run's data comes from, for messages."""
    return cfg.rocksdb or cfg.data_path or f"--data_set {cfg.data_set}"


def check_classes(ckpt: Checkpoint, settings: Settings, dataset: Dataset, data_desc: str) -> None:
    """Refuse data whose classes are not the checkpoint's (a wrong count, or the same count in other names)."""
    classes = [str(c) for c in dataset_classes(dataset)]
    want = settings.class_names
    n = settings.model_args.get("num_classes")
    if isinstance(n, int) and n != len(classes):
        names = f" ({', '.join(want[:3])}{', ...' if len(want) > 3 else ''})" if want else ""
        raise CheckpointMismatchError(
            f"{ckpt.name} has a head of {n} classes{names}, the data at {data_desc} has {len(classes)}"
        )
    if want and want != classes:
        diff = next(i for i, (a, b) in enumerate(zip(want, classes)) if a != b)
        raise CheckpointMismatchError(
            f"{ckpt.name} was trained on other classes than the data at {data_desc} has: class {diff} is "
            f"{want[diff]!r} there, {classes[diff]!r} here; labels would be wrong"
        )


def build_model(
    cfg: TrainConfig,
    num_classes: int,
    checkpoint: Checkpoint | None = None,
    reparameterized: bool | None = False,
    use_ema: bool = False,
) -> nn.Module:
    """Build ``cfg.model``; optionally load a checkpoint (through the one loader) and fold it.

    Errors a user can cause (unknown model, an argument the model does not take, a checkpoint of
    another model) are raised as ``ValueError`` with one line naming the problem.
    """
    check_model_name(cfg)
    kw = model_kwargs(cfg, num_classes)
    if checkpoint is not None:
        return load_model(
            checkpoint, cfg.model, reparameterized=reparameterized, use_ema=use_ema, spell=spell, **kw
        ).model
    try:
        if is_repa_model(cfg.model):
            return repa_create_model(cfg.model, reparameterized=bool(reparameterized), **kw)
        return timm.create_model(cfg.model, **kw)
    except TypeError as e:
        raise UserError(f"model {cfg.model} rejected its arguments: {str(e).splitlines()[0]}") from None


# ---- data -------------------------------------------------------------------------------------
def transform_config(cfg: TrainConfig) -> TransformConfig:
    return TransformConfig(
        input_size=cfg.input_size,
        color_jitter=cfg.color_jitter,
        aa=cfg.aa,
        train_interpolation=cfg.train_interpolation,
        reprob=cfg.reprob,
        remode=cfg.remode,
        recount=cfg.recount,
        hflip=cfg.hflip,
        eval_crop_ratio=cfg.eval_crop_ratio,
        three_augment=cfg.ThreeAugment,
        src=cfg.src,
        crop_padding=cfg.crop_padding,
    )


def build_datasets(cfg: TrainConfig, need_train: bool = True) -> tuple[Dataset | None, Dataset, int]:
    """``(train or None, val, num_classes)``; the two splits must have the same classes."""
    tcfg = transform_config(cfg)
    common: dict[str, Any] = dict(
        data_set=cfg.data_set,
        data_path=cfg.data_path,
        rocksdb=cfg.rocksdb,
        inat_category=cfg.inat_category,
        num_classes=cfg.nb_classes,
        input_size=cfg.input_size,
        seed=cfg.seed,
    )
    train = None
    if need_train and cfg.token_label:
        train = _token_label_train_set(cfg, tcfg, common)
    elif need_train:
        train, _ = build_dataset(
            True, transform=build_transform(True, tcfg), synthetic_size=cfg.synthetic_train_size, **common
        )
    val, num_classes = build_dataset(
        False, transform=build_transform(False, tcfg), synthetic_size=cfg.synthetic_val_size, **common
    )
    if cfg.data_set != "SYNTH":  # generated images cannot be unreadable
        for split, ds in (("training", train), ("validation", val)):
            if ds is not None:
                check_split(ds, split)
        val = RobustDataset(val, fatal=cfg.fatal_bad_images)
        train = None if train is None else RobustDataset(train, fatal=cfg.fatal_bad_images)
    if train is not None:
        tc, vc = dataset_classes(train), dataset_classes(val)
        if tc != vc:
            missing = sorted(set(tc) ^ set(vc))[:3]
            raise UserError(
                f"training and validation splits have different classes ({len(tc)} vs {len(vc)}; "
                f"e.g. {', '.join(map(str, missing)) or 'different order'})"
            )
    return train, val, num_classes


def _token_label_train_set(cfg: TrainConfig, tcfg: TransformConfig, common: dict[str, Any]) -> Dataset:
    """The training split with its score maps and the label-aware augmentation (``--token_label``)."""
    check_token_label_model(cfg.model)
    for flag in ("mixup", "cutmix", "cutmix_minmax"):
        if flag in cfg.given and getattr(cfg, flag):
            raise ArgumentError(
                "{token_label} uses MixToken in place of mixup/cutmix (LV-ViT's recipe); drop {" + flag + "}"
            )
    raw, num_classes = build_dataset(True, transform=None, synthetic_size=cfg.synthetic_train_size, **common)
    store = LabelStore(cfg.token_label_data)
    k, h, w = check_labels(raw, store, num_classes)
    _logger.info("token labels: top-%d score maps on a %dx%d grid from %s", k, h, w, cfg.token_label_data)
    return TokenLabelDataset(raw, store, TokenLabelTransform(tcfg))


def build_loaders(
    cfg: TrainConfig, env: DistEnv, train: Dataset | None, val: Dataset, generator: torch.Generator
) -> tuple[DataLoader | None, DataLoader]:
    """Training loader (random / distributed / repeated-augmentation sampler) and validation loader.

    The training loader's dataset is a :class:`SeededSamples` and its sampler an
    :class:`EpochPositions`: call their ``set_epoch`` each epoch (and set the sampler's ``skip`` to
    resume inside one).
    """
    pin = cfg.pin_mem and env.device.type == "cuda"
    extra: dict[str, Any] = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
    train_loader = None
    if train is not None:
        if env.distributed and cfg.repeated_aug:
            sampler: Any = RASampler(len(train), env.world_size, env.rank, repeats=cfg.ra_repeats, seed=cfg.seed)
        elif env.distributed:
            sampler = DistributedSampler(train, env.world_size, env.rank, shuffle=True, seed=cfg.seed)
        else:
            sampler = RandomSampler(train, generator=generator)
        train_loader = DataLoader(
            SeededSamples(train, cfg.seed, env.rank),  # one random stream per sample: exact mid-epoch resume
            batch_size=cfg.batch_size,
            sampler=EpochPositions(sampler),
            num_workers=cfg.num_workers,
            pin_memory=pin,
            drop_last=True,
            generator=generator,
            worker_init_fn=ignore_stop_signals,
            **extra,
        )
    if env.distributed and cfg.dist_eval:
        val_sampler: Any = ShardedEvalSampler(len(val), env.world_size, env.rank)
    else:
        val_sampler = SequentialSampler(val)
    val_loader = DataLoader(
        val,
        batch_size=max(int(1.5 * cfg.batch_size), 1),
        sampler=val_sampler,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        drop_last=False,
        worker_init_fn=ignore_stop_signals,
        **extra,
    )
    return train_loader, val_loader


# ---- optimization -----------------------------------------------------------------------------
def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm optimizer; no weight decay on biases, norms and ``model.no_weight_decay()``."""
    kwargs: dict[str, Any] = {"momentum": cfg.momentum}
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **kwargs)
    except (ValueError, AssertionError, KeyError) as e:
        raise ArgumentError(
            "{opt} {v0}: {v1}", v0=cfg.opt, v1=str(e).splitlines()[0] if str(e) else type(e).__name__
        ) from None


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, lrs: dict[str, float], updates_per_epoch: int
) -> Scheduler:
    """timm schedule stepped per update (``step_update``), with warmup from ``warmup_lr``."""
    if cfg.sched == "plateau":
        raise ArgumentError("{sched} plateau is not supported: this trainer steps the schedule per update")
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            decay_epochs=cfg.decay_epochs,
            warmup_epochs=cfg.warmup_epochs,
            cooldown_epochs=cfg.cooldown_epochs,
            patience_epochs=cfg.patience_epochs,
            decay_rate=cfg.decay_rate,
            min_lr=lrs["min_lr"],
            warmup_lr=lrs["warmup_lr"],
            noise=cfg.lr_noise,
            noise_pct=cfg.lr_noise_pct,
            noise_std=cfg.lr_noise_std,
            noise_seed=cfg.seed,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
    except (ValueError, AssertionError) as e:
        raise ArgumentError(
            "{sched} {v0}: {v1}", v0=cfg.sched, v1=str(e).splitlines()[0] if str(e) else type(e).__name__
        ) from None
    return scheduler


def build_mixup(cfg: TrainConfig, num_classes: int) -> Mixup | None:
    """Mixup/CutMix with label smoothing folded into the soft targets (none for BCE, see build_criterion)."""
    if not cfg.mixup_active:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        cutmix_minmax=cfg.cutmix_minmax,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=0.0 if cfg.bce_loss else cfg.smoothing,
        num_classes=num_classes,
    )


def build_token_label_loss(cfg: TrainConfig, num_classes: int, grid: tuple[int, int]) -> nn.Module:
    """The token-labeling loss (``--token_label``) with the run's smoothing and weights."""
    return TokenLabelLoss(
        num_classes,
        grid,
        smoothing=cfg.smoothing,
        cls_weight=cfg.cls_weight,
        dense_weight=cfg.dense_weight,
        image_size=(cfg.input_size, cfg.input_size),
    )


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """Training loss, as in DeiT: soft-target CE with mixup, label smoothing without, or BCE.

    With ``--bce_loss`` and mixup the mixed targets are binarized (``> 0``), DeiT III style. The
    authors' code binarizes targets that already carry label smoothing, which makes every target 1;
    here smoothing is left out of the mixed targets so the binarization keeps its meaning.
    """
    if cfg.bce_loss:
        if cfg.mixup_active:
            return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
        return BinaryCrossEntropy(smoothing=cfg.smoothing)
    if cfg.mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()
