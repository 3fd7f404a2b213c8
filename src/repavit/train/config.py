"""Run settings: one dataclass whose fields are the command-line flags (the authors' spellings).

Precedence: dataclass defaults < ``--config`` YAML file < flags given on the command line. The YAML
keys are the flag names without the leading dashes (``batch_size: 512``, ``ThreeAugment: true``).
Defaults are the authors' ``main.py`` defaults (DeiT recipe), except where a field's help says why not:
``channel_idle`` and ``feature_norm`` default to the paper's form (channel-idle, BatchNorm), so that a run
without FFN flags trains a model that folds (the authors' script defaults to a plain LayerNorm ViT; the
seed README's commands pass both flags and mean the same either way).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..data.datasets import DATASETS
from ..data.inat import INAT_CATEGORIES
from ..errors import ArgumentError, UserError
from ..layers.idle_mlp import FEATURE_NORMS, HEURISTIC_CHOICES, HIDDEN_PATHS

__all__ = ["GROUPS", "TrainConfig", "config_fields", "load_yaml"]

GROUPS = ("model", "optimizer", "schedule", "augmentation", "data", "run", "tracking")
AMP_MODES = ("auto", "fp16", "bf16", "off")
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _default_workers() -> int:
    """Data-loading workers per process: the cores this process may use, at most 10 (the authors' value)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(10, cores))


def _f(default: Any, help: str, group: str, **meta: Any) -> Any:
    """A config field carrying its CLI help, group and extras (choices, aliases)."""
    meta = {"help": help, "group": group, **meta}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of ``repavit train|eval|speed`` (and of the root ``main.py``)."""

    # ---- model ------------------------------------------------------------------------------
    model: str = _f("RePaViT_Base", "registered model name (RePa models or any timm model)", "model")
    input_size: int = _f(224, "input image side", "model", aliases=("--img_size",))
    nb_classes: int | None = _f(
        None,
        "classes of the head; None: from the dataset (for --test_speed: the checkpoint's, or 1000)",
        "model",
        aliases=("--num_classes",),
    )
    drop: float = _f(0.0, "dropout rate", "model")
    drop_path: float = _f(0.1, "stochastic depth rate (rises linearly over the blocks)", "model")
    channel_idle: bool = _f(
        True,
        "channel-idle FFNs, the paper's form (on by default here; the authors' main.py has it off)",
        "model",
        negatable=True,
    )
    idle_ratio: float = _f(
        0.75,
        "share of FFN hidden channels that skip the activation (not given: the model's default, 0.75; "
        "2/3 for RePa-LV-ViT, whose paper name '/0.75' means C of its 3C hidden channels active)",
        "model",
    )
    feature_norm: str = _f(
        "BatchNorm",
        "FFN normalization; BatchNorm (the paper's, the default here) folds after training, LayerNorm does not",
        "model",
        choices=FEATURE_NORMS,
    )
    heuristic: str = _f("static", "per-block idle ratios: static or linear", "model", choices=HEURISTIC_CHOICES)
    reparam: bool = _f(False, "reparameterize the model for --eval / --test_speed (and after training)", "model")
    model_kwargs: dict = _f(  # noqa: RUF009 (_f wraps dataclasses.field)
        {},
        "extra model arguments as KEY=VALUE (e.g. depth=4 embed_dim=96); repeatable",
        "model",
        aliases=("--model_arg",),
    )
    model_ema: bool = _f(True, "keep an exponential moving average of the weights", "model")
    model_ema_decay: float = _f(0.99996, "EMA decay per update", "model")
    model_ema_force_cpu: bool = _f(False, "keep the EMA on the CPU", "model")

    # ---- optimizer --------------------------------------------------------------------------
    opt: str = _f("adamw", "optimizer (timm name: lamb, adamw, sgd, ...)", "optimizer")
    opt_eps: float | None = _f(1e-8, "optimizer epsilon", "optimizer")
    opt_betas: list[float] | None = _f(None, "optimizer betas", "optimizer")  # noqa: RUF009 (_f wraps dataclasses.field)
    clip_grad: float | None = _f(None, "clip the gradient norm to this value", "optimizer")
    momentum: float = _f(0.9, "SGD momentum", "optimizer")
    weight_decay: float = _f(0.05, "weight decay (not applied to biases, norms, position embedding)", "optimizer")
    accumulation_steps: int = _f(
        1, "micro-batches per update; lr, warmup_lr and min_lr are multiplied by it", "optimizer"
    )
    unscale_lr: bool = _f(False, "use lr as given instead of lr * batch_size * world_size / 1024", "optimizer")

    # ---- schedule ---------------------------------------------------------------------------
    sched: str = _f("cosine", "learning-rate schedule (timm name), stepped per update", "schedule")
    lr: float = _f(5e-4, "base learning rate", "schedule")
    lr_noise: list[float] | None = _f(None, "learning-rate noise on/off epoch percentages", "schedule")  # noqa: RUF009 (_f wraps dataclasses.field)
    lr_noise_pct: float = _f(0.67, "learning-rate noise limit", "schedule")
    lr_noise_std: float = _f(1.0, "learning-rate noise std", "schedule")
    warmup_lr: float = _f(1e-6, "learning rate at the start of the warmup", "schedule")
    min_lr: float = _f(1e-5, "learning rate at the end of the cosine", "schedule")
    decay_epochs: float = _f(30.0, "epoch interval of step decay", "schedule")
    warmup_epochs: int = _f(5, "warmup epochs", "schedule")
    cooldown_epochs: int = _f(10, "accepted for compatibility; training stops after --epochs", "schedule")
    patience_epochs: int = _f(10, "patience of the plateau schedule", "schedule")
    decay_rate: float = _f(0.1, "decay rate of step schedules", "schedule", aliases=("--dr",))
    epochs: int = _f(300, "training epochs", "schedule")
    start_epoch: int = _f(0, "first epoch (overridden by a --resume checkpoint)", "schedule")
    batch_size: int = _f(64, "images per process and micro-batch", "schedule")

    # ---- augmentation -----------------------------------------------------------------------
    color_jitter: float = _f(0.3, "colour-jitter strength", "augmentation")
    aa: str = _f("rand-m9-mstd0.5-inc1", "RandAugment policy, or 'none'", "augmentation")
    smoothing: float = _f(0.1, "label smoothing", "augmentation")
    train_interpolation: str = _f("bicubic", "training interpolation (bicubic, bilinear, random)", "augmentation")
    repeated_aug: bool = _f(True, "repeated augmentation across processes (distributed runs)", "augmentation")
    ra_repeats: int = _f(3, "copies of each image per epoch with --repeated_aug", "augmentation")
    ThreeAugment: bool = _f(False, "DeiT III 3-Augment instead of RandAugment", "augmentation")
    src: bool = _f(False, "simple random crop for 3-Augment", "augmentation")
    reprob: float = _f(0.25, "random-erasing probability", "augmentation")
    remode: str = _f("pixel", "random-erasing mode", "augmentation", choices=("pixel", "rand", "const"))
    recount: int = _f(1, "random-erasing count", "augmentation")
    hflip: float = _f(0.5, "horizontal-flip probability", "augmentation")
    crop_padding: int = _f(4, "inputs <= 32 px: random crop after this much padding (0: none)", "augmentation")
    mixup: float = _f(0.8, "mixup alpha (0 disables)", "augmentation")
    cutmix: float = _f(1.0, "cutmix alpha (0 disables)", "augmentation")
    cutmix_minmax: list[float] | None = _f(None, "cutmix min/max ratio (overrides alpha)", "augmentation")  # noqa: RUF009 (_f wraps dataclasses.field)
    mixup_prob: float = _f(1.0, "probability of mixup or cutmix per batch", "augmentation")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup", "augmentation")
    mixup_mode: str = _f("batch", "mixup granularity", "augmentation", choices=("batch", "pair", "elem"))
    bce_loss: bool = _f(False, "binary cross-entropy on (mixed) targets, DeiT III style", "augmentation")
    token_label: bool = _f(
        False,
        "token labeling (LV-ViT): train on dense score maps with MixToken instead of mixup/cutmix; needs "
        "--token_label_data and a model with a dense head (RePaLVViT_*, LVViT_*)",
        "augmentation",
    )
    token_label_data: str = _f(
        "", "score maps of the training images: a folder (LV-ViT's layout) or a RocksDB *.db", "augmentation"
    )
    token_label_size: int = _f(
        0, "token-label grid side; 0: the model's token grid (another value must equal it)", "augmentation"
    )
    dense_weight: float = _f(1.0, "weight of the dense (per-token) token-labeling loss", "augmentation")
    cls_weight: float = _f(1.0, "weight of the class-token token-labeling loss", "augmentation")
    mix_token: bool = _f(True, "MixToken with --token_label (token-level CutMix)", "augmentation", negatable=True)

    # ---- data -------------------------------------------------------------------------------
    data_path: str = _f("", "dataset folder (ImageFolder: train/ and val/, one sub-folder per class)", "data")
    data_set: str = _f("IMNET", "dataset kind", "data", choices=DATASETS)
    inat_category: str = _f("name", "iNaturalist label level", "data", choices=INAT_CATEGORIES)
    rocksdb: str | None = _f(None, "folder with train.db / val.db, instead of --data_path", "data")
    synthetic_train_size: int = _f(512, "images in the synthetic training split (--data_set SYNTH)", "data")
    synthetic_val_size: int = _f(128, "images in the synthetic validation split", "data")
    eval_crop_ratio: float = _f(0.875, "evaluation resize is input_size / eval_crop_ratio, then center crop", "data")
    fatal_bad_images: bool = _f(
        False, "stop at the first unreadable image (default: skip it with one warning, count it per epoch)", "data"
    )
    num_workers: int = _f(
        _default_workers(),
        "data-loading processes per training process (default: this machine's cores, at most 10)",
        "data",
    )
    pin_mem: bool = _f(True, "pin host memory of batches (CUDA only)", "data")
    prefetch_factor: int = _f(2, "batches prefetched per worker", "data")

    # ---- run --------------------------------------------------------------------------------
    output_dir: str = _f("", "where checkpoints, log.txt and config.yaml go (empty: save nothing)", "run")
    save_freq: int = _f(10, "also keep checkpoint_{N}epoch.pth every N epochs", "run")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N", "run")
    amp: str = _f(
        "auto",
        "mixed precision: auto (fp16 on CUDA, off on CPU), fp16 (with a gradient scaler, any device), bf16, off; "
        "--test_speed runs fp32 unless fp16 or bf16 is given",
        "run",
        choices=AMP_MODES,
    )
    channels_last: bool = _f(
        False,
        "channels-last memory format for the model and its input batches (conv models gain: RePaPoolformer "
        "about 2x at inference on a CPU; ViTs are unaffected)",
        "run",
    )
    seed: int = _f(0, "random seed", "run")
    resume: str = _f(
        "",
        "checkpoint to resume from (or to evaluate with --eval); 'auto': the last good checkpoint in --output_dir, "
        "or a fresh start if there is none (for requeued jobs)",
        "run",
    )
    overwrite: bool = _f(False, "replace the run that --output_dir holds (its checkpoints, log and summary)", "run")
    eval: bool = _f(False, "evaluate only", "run")
    eval_ema: bool = _f(False, "with --eval: evaluate the checkpoint's EMA weights", "run")
    dist_eval: bool = _f(False, "shard evaluation over the processes", "run")
    sync_bn: bool = _f(False, "synchronize BatchNorm statistics across processes (CUDA)", "run")
    compile: bool = _f(
        False,
        "torch.compile the training step's model (inductor; the first steps compile); evaluation, EMA and "
        "checkpoints use the uncompiled module",
        "run",
        aliases=("--torchcompile",),
    )
    hidden_path: str = _f(
        "auto",
        "how the channel-idle FFNs' hidden layer trains, all computing the same: auto (the idle channels through "
        "the tokens' covariance where that is cheaper, else every channel computed in one autograd node), "
        "covariance, explicit, split (plain ops, the straightforward graph)",
        "run",
        choices=HIDDEN_PATHS,
    )
    dist_backend: str = _f(
        "auto",
        "process-group backend: auto (nccl on CUDA, gloo on CPU); given explicitly, a single torchrun/Slurm "
        "process also gets a process group (DDP, SyncBatchNorm) of size 1",
        "run",
    )
    world_size: int = _f(1, "accepted for compatibility; taken from torchrun or Slurm", "run")
    dist_url: str = _f("env://", "accepted for compatibility; rendezvous uses MASTER_ADDR/MASTER_PORT", "run")
    test_speed: bool = _f(
        False, "measure inference throughput (no dataset needed)", "run", aliases=("--only_test_speed",)
    )
    speed_batch_size: int | None = _f(
        None, "batch of the speed test (default: 128 on a GPU, the authors' setting; on a CPU sized to ~1 min)", "run"
    )
    speed_iters: int | None = _f(
        None, "forward passes per speed measurement (default: 100 on a GPU; on a CPU sized to ~1 min)", "run"
    )
    log_freq: int = _f(10, "log a progress line every N steps when not on a terminal", "run")

    # ---- tracking ---------------------------------------------------------------------------
    wandb: bool = _f(False, "log to Weights & Biases (needs WANDB_MODE=online|offline)", "tracking")
    wandb_suffix: str = _f("", "project name suffix (project = model name + '_' + suffix)", "tracking")
    wandb_entity: str = _f("", "wandb entity (team or user)", "tracking")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                choices = ", ".join(map(str, choices))
                raise ArgumentError(
                    "{" + f.name + "} {value!r} is not one of {choices}", value=getattr(self, f.name), choices=choices
                )
        checks: list[tuple[bool, str]] = [
            (bool(self.model), "{model} must name a model"),
            (self.input_size >= 1, "{input_size} must be >= 1"),
            (self.nb_classes is None or self.nb_classes >= 1, "{nb_classes} must be >= 1"),
            (0.0 <= self.drop < 1.0, "{drop} must be in [0, 1)"),
            (0.0 <= self.drop_path < 1.0, "{drop_path} must be in [0, 1)"),
            (0.0 <= self.idle_ratio <= 1.0, "{idle_ratio} must be in [0, 1]"),
            (0.0 <= self.model_ema_decay <= 1.0, "{model_ema_decay} must be in [0, 1]"),
            (bool(self.opt), "{opt} must name an optimizer"),
            (self.clip_grad is None or self.clip_grad > 0, "{clip_grad} must be > 0"),
            (self.weight_decay >= 0, "{weight_decay} must be >= 0"),
            (self.accumulation_steps >= 1, "{accumulation_steps} must be >= 1"),
            (self.lr > 0, "{lr} must be > 0"),
            (self.min_lr >= 0 and self.warmup_lr >= 0, "{min_lr} and {warmup_lr} must be >= 0"),
            (self.warmup_epochs >= 0, "{warmup_epochs} must be >= 0"),
            (self.epochs >= 1, "{epochs} must be >= 1"),
            (0 <= self.start_epoch, "{start_epoch} must be >= 0"),
            (self.batch_size >= 1, "{batch_size} must be >= 1"),
            (self.seed >= 0, "{seed} must be >= 0"),
            (self.color_jitter >= 0, "{color_jitter} must be >= 0"),
            (0.0 <= self.smoothing < 1.0, "{smoothing} must be in [0, 1)"),
            (self.ra_repeats >= 1, "{ra_repeats} must be >= 1"),
            (0.0 <= self.reprob <= 1.0, "{reprob} must be in [0, 1]"),
            (self.recount >= 1, "{recount} must be >= 1"),
            (self.crop_padding >= 0, "{crop_padding} must be >= 0"),
            (0.0 <= self.hflip <= 1.0, "{hflip} must be in [0, 1]"),
            (self.mixup >= 0 and self.cutmix >= 0, "{mixup} and {cutmix} must be >= 0"),
            (0.0 <= self.mixup_prob <= 1.0, "{mixup_prob} must be in [0, 1]"),
            (0.0 <= self.mixup_switch_prob <= 1.0, "{mixup_switch_prob} must be in [0, 1]"),
            (
                self.cutmix_minmax is None or len(self.cutmix_minmax) == 2,
                "{cutmix_minmax} takes two values (min max)",
            ),
            (self.synthetic_train_size >= 1 and self.synthetic_val_size >= 1, "synthetic split sizes must be >= 1"),
            (0.0 < self.eval_crop_ratio <= 1.0, "{eval_crop_ratio} must be in (0, 1]"),
            (self.num_workers >= 0, "{num_workers} must be >= 0"),
            (self.prefetch_factor >= 1, "{prefetch_factor} must be >= 1"),
            (self.save_freq >= 1, "{save_freq} must be >= 1"),
            (bool(_DEVICE.match(self.device)), "{device} {device_value!r} is not auto, cpu, cuda or cuda:N"),
            (self.dist_backend in ("auto", "gloo", "nccl"), "{dist_backend} must be auto, gloo or nccl"),
            (
                all(v is None or v >= 1 for v in (self.speed_batch_size, self.speed_iters)),
                "{speed_batch_size} and {speed_iters} must be >= 1",
            ),
            (self.log_freq >= 1, "{log_freq} must be >= 1"),
            (not (self.eval and self.test_speed), "{eval} and {test_speed} cannot be combined; run them separately"),
            (not self.token_label or bool(self.token_label_data), "{token_label} needs {token_label_data} DIR"),
            (not self.token_label_data or self.token_label, "{token_label_data} is given but {token_label} is not"),
            (not (self.token_label and self.ThreeAugment), "{token_label} cannot be combined with {ThreeAugment}"),
            (not (self.token_label and self.bce_loss), "{token_label} cannot be combined with {bce_loss}"),
            (self.token_label_size >= 0, "{token_label_size} must be >= 0"),
            (self.dense_weight >= 0 and self.cls_weight >= 0, "{dense_weight} and {cls_weight} must be >= 0"),
            (self.dense_weight + self.cls_weight > 0, "{dense_weight} and {cls_weight} cannot both be 0"),
            (
                not (self.mixup_active and self.batch_size % 2),
                "mixup/cutmix needs an even {batch_size}, got {batch_size_value} (or pass {mixup} 0 {cutmix} 0)",
            ),
        ]
        values = {"device_value": self.device, "batch_size_value": self.batch_size}
        for ok, msg in checks:
            if not ok:
                raise ArgumentError(msg, **values)
        if not all(isinstance(k, str) for k in self.model_kwargs):
            raise ArgumentError("{model_kwargs} keys must be strings")

    # ---- derived values ---------------------------------------------------------------------
    @property
    def mixup_active(self) -> bool:
        """Mixup/CutMix on: never with token labels (MixToken takes their place, as in LV-ViT's recipe)."""
        if self.token_label:
            return False
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    @property
    def mode(self) -> str:
        """``"speed"``, ``"eval"`` or ``"train"``."""
        return "speed" if self.test_speed else "eval" if self.eval else "train"

    def scaled_lrs(self, world_size: int) -> dict[str, float]:
        """``lr``, ``warmup_lr``, ``min_lr`` after the batch-size rule and the accumulation factor."""
        scale = 1.0 if self.unscale_lr else self.batch_size * world_size / 1024.0
        scale *= self.accumulation_steps
        return {"lr": self.lr * scale, "warmup_lr": self.warmup_lr * scale, "min_lr": self.min_lr * scale}

    # ---- (de)serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values only (str, int, float, bool, None, list, dict): safe for YAML, JSON and checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping of field names; unknown names are an error naming them.

        The names in ``values`` are the settings given explicitly (:attr:`given`).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown setting(s) in {source}: {', '.join(unknown)}")
        cfg = cls(**values)
        cfg._given = frozenset(values)
        return cfg

    @property
    def given(self) -> frozenset[str]:
        """The settings given explicitly: on the command line or in a ``--config`` file.

        A config built in Python (``TrainConfig(...)``, ``dataclasses.replace``) counts the settings
        that differ from the defaults. Settings a checkpoint records are taken from it unless given.
        """
        explicit = self.__dict__.get("_given")
        if explicit is not None:
            return explicit
        return frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _default(f))

    def with_given(self, given: frozenset[str], **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied, whose :attr:`given` is ``given``."""
        cfg = dataclasses.replace(self, **changes)
        cfg._given = frozenset(given)
        return cfg

    def save_yaml(self, path: str | os.PathLike) -> None:
        """Write the resolved settings atomically (loadable again with ``--config``)."""
        from ..utils import write_text

        text = "# Resolved settings of this run; reload with `repavit train --config <this file>`.\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        write_text(path, text)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def config_fields() -> list[dataclasses.Field]:
    """The dataclass fields, in declaration order (the CLI builds its flags from them)."""
    return list(dataclasses.fields(TrainConfig))


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a dict of settings (validated when the config is built)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path} must hold a mapping of settings (flag names without dashes), not {type(data).__name__}"
        )
    return data


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotation; ints are accepted for floats (YAML writes 1 for 1.0)."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ArgumentError("{" + name + "} needs a value")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    origin = typing.get_origin(base) or base
    if origin is bool:
        if not isinstance(value, bool):
            raise ArgumentError("{" + name + "} must be true or false, got {value!r}", value=value)
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError("{" + name + "} must be an integer, got {value!r}", value=value)
        return value
    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads 4e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ArgumentError("{" + name + "} must be a number, got {value!r}", value=value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArgumentError("{" + name + "} must be a number, got {value!r}", value=value)
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise ArgumentError("{" + name + "} must be a string, got {value!r}", value=value)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ArgumentError("{" + name + "} must be a list of numbers, got {value!r}", value=value)
        return [float(v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ArgumentError("{" + name + "} must be a mapping, got {value!r}", value=value)
        return dict(value)
    return value
