"""Token labeling (LV-ViT): the loss, the model switch, and making score maps with a teacher.

The loss (LV-ViT's ``TokenLabelCrossEntropy``, its defaults: both weights 1)::

    loss = cls_weight * CE(head(cls), t_cls) + dense_weight * mean_tokens CE(aux_head(token_i), t_i)

with soft-target cross-entropy ``CE(z, t) = -sum_k t_k log softmax(z)_k``. ``t_i`` is token ``i``'s
target and ``t_cls`` the class token's (the score map over the whole crop; see
:func:`repavit.data.token_labels.token_targets`). With MixToken the token outputs are moved back to
their own images (so ``t_i`` are unchanged) and the class target is mixed by the share of tokens kept:
``t_cls = lam * t_cls + (1 - lam) * flip(t_cls)``, ``lam = 1 - box area / tokens``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data.token_labels import LabelStore, sample_key, token_targets
from ..errors import ArgumentError, UserError
from .progress import Progress

__all__ = [
    "TokenLabelLoss",
    "check_token_label_model",
    "dense_logits",
    "enable_token_labeling",
    "generate_token_labels",
]

_logger = logging.getLogger(__name__)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``mean_rows -sum_k target_k log softmax(logits)_k``."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class TokenLabelLoss(nn.Module):
    """LV-ViT's token-labeling loss on the model's ``(class logits, token logits, box)`` (see the module docstring).

    ``target`` is the batch of dicts :class:`~repavit.data.token_labels.TokenLabelDataset` yields.
    """

    def __init__(
        self,
        num_classes: int,
        grid: tuple[int, int],
        smoothing: float = 0.1,
        cls_weight: float = 1.0,
        dense_weight: float = 1.0,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes, self.grid, self.smoothing = num_classes, tuple(grid), smoothing
        self.image_size = image_size
        self.cls_weight, self.dense_weight = cls_weight, dense_weight

    def forward(self, output: Any, target: Mapping[str, Tensor]) -> Tensor:
        if not (isinstance(output, tuple) and len(output) == 3):
            raise UserError("token labeling needs the model's (class logits, token logits, box) training output")
        cls, aux, box = output
        B, N, K = aux.shape
        if N != self.grid[0] * self.grid[1]:
            raise UserError(f"the model gave {N} token outputs; the token-label grid is {self.grid[0]}x{self.grid[1]}")
        t_cls, t_dense = token_targets(target, self.num_classes, self.grid, self.smoothing, self.image_size)
        y1, x1, y2, x2 = box
        lam = 1.0 - (y2 - y1) * (x2 - x1) / N
        if lam < 1.0:
            t_cls = lam * t_cls + (1.0 - lam) * t_cls.flip(0)
        loss = self.cls_weight * soft_cross_entropy(cls, t_cls)
        return loss + self.dense_weight * soft_cross_entropy(aux.reshape(B * N, K), t_dense.reshape(B * N, K))


def check_token_label_model(model_name: str) -> None:
    """Refuse, before any data is read, a model without a dense head (only the LV-ViT family has one)."""
    import timm

    if not timm.models.is_model_in_modules(model_name.split(".")[0], ["repalvvit"]):
        raise ArgumentError(
            "{token_label} needs a model with a dense (per-token) head: RePaLVViT_S/M or LVViT_S/M, not {v0}",
            v0=model_name,
        )


def enable_token_labeling(model: nn.Module, model_name: str, mix_token: bool = True, label_size: int = 0) -> tuple:
    """Switch ``model`` to its token-labeling training output; return its token grid ``(H, W)``.

    Refuses models without a dense head, and a ``label_size`` that is not the model's grid.
    """
    if not hasattr(model, "token_labeling") or getattr(model, "aux_head", None) is None:
        raise ArgumentError(
            "{token_label} needs a model with a dense (per-token) head: RePaLVViT_S/M or LVViT_S/M, not {v0}",
            v0=model_name,
        )
    grid = tuple(model.patch_embed.grid_size)
    if label_size and (label_size, label_size) != grid:
        raise ArgumentError(
            "{token_label_size} {v0} does not match the model's token grid {v1}x{v2} (pass 0, or {v1})",
            v0=label_size,
            v1=grid[0],
            v2=grid[1],
        )
    model.token_labeling, model.mix_token = True, mix_token
    return grid


# ---- generation --------------------------------------------------------------------------------------------
@torch.no_grad()
def dense_logits(model: nn.Module, x: Tensor) -> Tensor:
    """A classifier's scores at every position of its last feature map: ``(B, K, h, w)``.

    Token models (ViT-like, ``(B, N, C)`` features): the prefix tokens are dropped and the rest form a
    square grid; their classifier is the dense head ``aux_head`` when the model has one (LV-ViT), else
    the class head applied to every token. Convolutional models (``(B, C, h, w)``): the classifier
    applied at every position. The classifier must be one ``nn.Linear``.
    """
    feats = model.forward_features(x)
    head = getattr(model, "aux_head", None) or model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UserError(
            f"the teacher's classifier is a {type(head).__name__}, not one Linear layer: cannot apply it densely"
        )
    if feats.dim() == 3:
        B, N, C = feats.shape
        side = int(round((N - getattr(model, "num_prefix_tokens", 0)) ** 0.5))
        prefix = N - side * side
        if prefix < 0 or prefix > 8:
            raise UserError(f"the teacher's {N} tokens do not form a square grid")
        grid = feats[:, prefix:].reshape(B, side, side, C)
    elif feats.dim() == 4:
        fmt = getattr(model, "output_fmt", "NCHW")
        grid = feats if str(fmt).endswith("NHWC") else feats.permute(0, 2, 3, 1)
    else:
        raise UserError(f"the teacher's features have shape {tuple(feats.shape)}; expected tokens or a feature map")
    if grid.shape[-1] != head.in_features:
        raise UserError(
            f"the teacher's features have {grid.shape[-1]} channels, its classifier takes {head.in_features}"
        )
    return head(grid).permute(0, 3, 1, 2)  # (B, K, h, w)


class _Indexed(Dataset):
    """``(image or None, index)`` for the samples still to label; None for an image that cannot be read."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int]:
        try:
            return self.dataset[self.indices[i]][0], self.indices[i]
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable or truncated files
            _logger.warning("skipping unreadable image %s: %s", sample_key(self.dataset, self.indices[i]), e)
            return None, self.indices[i]


def _collate(batch: list[tuple[Tensor | None, int]]) -> tuple[Tensor | None, list[int], int]:
    """Stack the readable images; return them, their indices and how many were unreadable."""
    good = [(x, i) for x, i in batch if x is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], len(batch) - len(good)


def generate_token_labels(
    teacher: nn.Module,
    dataset: Dataset,
    output: str | os.PathLike,
    *,
    topk: int = 5,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Write the teacher's top-``k`` score map of every image of ``dataset`` into ``output`` (resumable).

    ``dataset`` yields ``(image tensor, label)`` with the teacher's input transform applied (the whole
    image, resized without cropping, so that map cells and image areas correspond). Images whose map
    exists are skipped unless ``overwrite`` (each map is written atomically, so an interrupted run
    resumes where it stopped). An unreadable image is skipped with a warning (no map: training skips it
    too). Returns ``{"written", "skipped", "unreadable", "images"}``.
    """
    if topk < 1:
        raise ArgumentError("{topk} must be >= 1, got {v0}", v0=topk)
    classes = getattr(teacher, "num_classes", None)
    if isinstance(classes, int) and 0 < classes < topk:
        raise ArgumentError("the teacher has {v0} classes, fewer than {topk} {v1}", v0=classes, v1=topk)
    store = LabelStore(output, writable=True)
    todo = [i for i in range(len(dataset)) if overwrite or not store.has(sample_key(dataset, i))]
    skipped = len(dataset) - len(todo)
    if skipped:
        _logger.info(
            "%d of %d images already have score maps in %s; labeling the other %d",
            skipped,
            len(dataset),
            output,
            len(todo),
        )
    teacher = teacher.eval().to(device)
    loader = DataLoader(
        _Indexed(dataset, todo), batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=_collate
    )
    bar = Progress(len(loader), "Label", progress, 10, 1)
    written = unreadable = 0
    try:
        for images, idx, bad in loader:
            unreadable += bad
            bar.update(len(idx) + bad)
            if images is None:
                continue
            scores = dense_logits(teacher, images.to(device)).float()
            if scores.shape[1] < topk:
                raise ArgumentError("the teacher has {v0} classes, fewer than {topk} {v1}", v0=scores.shape[1], v1=topk)
            values, indices = scores.topk(topk, dim=1)  # (B, k, h, w)
            for b, i in enumerate(idx):
                store.put(sample_key(dataset, i), values[b].cpu(), indices[b].cpu())
            written += len(idx)
    finally:
        bar.close()
        store.close()
    return {"written": written, "skipped": skipped, "unreadable": unreadable, "images": len(dataset)}


def teacher_transform(model: nn.Module, img_size: int | None = None):
    """The teacher's input: the whole image resized (no crop) to its input size, normalized as it was trained."""
    import torchvision.transforms as T

    cfg = getattr(model, "pretrained_cfg", None) or {}
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a model built for one input size
    if fixed is not None and not isinstance(fixed, int):
        fixed = fixed[-1]
    size = img_size or fixed or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    return T.Compose(
        [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(mean, std)]
    )


def label_summary(output: str | os.PathLike, stats: Mapping[str, int]) -> str:
    done = f"{stats['written']} written, {stats['skipped']} already there"
    if stats.get("unreadable"):
        done += f", {stats['unreadable']} unreadable images skipped"
    return f"score maps: {done} ({stats['images']} images) in {Path(output)}"
