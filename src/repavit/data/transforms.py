"""Training and evaluation transforms of the DeiT recipe (timm's ``create_transform``) and 3-Augment.

Evaluation: resize the shorter side to ``input_size / eval_crop_ratio`` (bicubic), then center-crop
``input_size``. Inputs of 32 pixels or less (CIFAR-sized) are resized to ``input_size`` and, for
training, padded-and-cropped instead of random-resized-cropped, as DeiT does for CIFAR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as _timm_aa
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["TransformConfig", "build_transform", "eval_preprocessing", "three_augment"]

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
SMALL_INPUT = 32


@dataclass
class TransformConfig:
    """Augmentation settings (names follow the training flags).

    Attributes:
        input_size: side of the square model input.
        color_jitter: colour-jitter strength (ignored by timm when RandAugment is on).
        aa: RandAugment/AutoAugment policy string, or ``"none"``.
        train_interpolation: ``"bicubic"``, ``"bilinear"`` or ``"random"``.
        reprob, remode, recount: random-erasing probability, mode and count.
        hflip: horizontal-flip probability.
        eval_crop_ratio: evaluation resize is ``input_size / eval_crop_ratio`` before the center crop.
        three_augment: DeiT III's 3-Augment instead of RandAugment.
        src: simple random crop (resize + padded random crop) for 3-Augment.
        crop_padding: inputs of 32 px or less are randomly cropped after padding by this much (0: no crop).
        mean, std: normalization.
    """

    input_size: int = 224
    color_jitter: float = 0.3
    aa: str = "rand-m9-mstd0.5-inc1"
    train_interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    eval_crop_ratio: float = 0.875
    three_augment: bool = False
    src: bool = False
    crop_padding: int = 4
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN
    std: Sequence[float] = IMAGENET_DEFAULT_STD


def eval_preprocessing(cfg: TransformConfig) -> dict:
    """The evaluation transform of :func:`build_transform` in timm's ``pretrained_cfg`` terms (what a
    model record stores): ``timm.data.create_transform(**these, is_training=False)`` is the same transform."""
    small = cfg.input_size <= SMALL_INPUT
    return {
        "input_size": [3, cfg.input_size, cfg.input_size],
        "interpolation": "bicubic",
        "crop_pct": 1.0 if small else float(cfg.eval_crop_ratio),
        "crop_mode": "center",
        "mean": [float(v) for v in cfg.mean],
        "std": [float(v) for v in cfg.std],
    }


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, valid for 0 bits too (black image). Pillow >= 11 rejects ``bits=0``, which
    timm's ``PosterizeIncreasing`` produces at the top magnitude, crashing RandAugment mid-epoch."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: T.Compose) -> None:
    for t in transform.transforms:
        for op in getattr(t, "ops", ()):
            if getattr(op, "aug_fn", None) is _timm_aa.posterize:
                op.aug_fn = _posterize


def _odd_kernel(img_size: int) -> int:
    k = min(13, img_size)  # covers sigma up to 2
    return k if k % 2 else max(k - 1, 1)


def three_augment(cfg: TransformConfig) -> T.Compose:
    """DeiT III's 3-Augment: crop and flip, one of grayscale/solarize/blur, colour jitter."""
    size = cfg.input_size
    interp = _INTERP.get(cfg.train_interpolation, InterpolationMode.BICUBIC)
    if cfg.src:
        primary = [T.Resize(size, interpolation=interp), T.RandomCrop(size, padding=4, padding_mode="reflect")]
    else:
        primary = [RandomResizedCropAndInterpolation(size, scale=(0.08, 1.0), interpolation=cfg.train_interpolation)]
    primary.append(T.RandomHorizontalFlip(cfg.hflip))
    secondary = [
        T.RandomChoice(
            [
                T.RandomGrayscale(p=1.0),
                T.RandomSolarize(threshold=128, p=1.0),
                T.GaussianBlur(_odd_kernel(size), sigma=(0.1, 2.0)),
            ]
        )
    ]
    if cfg.color_jitter:
        secondary.append(T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    final = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(primary + secondary + final)


def build_transform(is_train: bool, cfg: TransformConfig) -> T.Compose:
    """The training (augmenting) or evaluation transform for PIL images."""
    size = cfg.input_size
    if is_train:
        if cfg.three_augment:
            return three_augment(cfg)
        aa = None if cfg.aa in (None, "", "none", "None") else cfg.aa
        t = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=cfg.color_jitter,
            auto_augment=aa,
            interpolation=cfg.train_interpolation,
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
            hflip=cfg.hflip,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )
        _patch_posterize(t)
        if size <= SMALL_INPUT:
            # Random-resized crops destroy tiny images; pad and crop instead (DeiT's CIFAR rule).
            crop = [T.RandomCrop(size, padding=cfg.crop_padding)] if cfg.crop_padding > 0 else []
            t.transforms[0:1] = [T.Resize(size, interpolation=InterpolationMode.BICUBIC), *crop]
        return t
    resize = size if size <= SMALL_INPUT else int(size / cfg.eval_crop_ratio)
    return T.Compose(
        [
            T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )
