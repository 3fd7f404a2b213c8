"""One training epoch and one evaluation pass; device-agnostic, with optional mixed precision."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from ..errors import ArgumentError, UserError
from .distributed import DistEnv, all_reduce_max, all_reduce_sum
from .progress import Progress

__all__ = ["Precision", "evaluate", "train_one_epoch"]

_logger = logging.getLogger(__name__)


class Precision:
    """Autocast and gradient scaling for one ``--amp`` setting on one device.

    ``auto``: fp16 with a gradient scaler on CUDA, full fp32 elsewhere. ``fp16``: float16 autocast with
    a gradient scaler on any device (``torch.amp.GradScaler`` runs on CPU too, which is how CI exercises
    the GPU recipe's path; CPU fp16 is correct but not fast). ``bf16``: bfloat16 autocast, no scaler.
    ``off``: fp32.

    With the scaler, an update whose gradients hold inf/NaN is skipped and the scale halved (the
    scaler's own rule); :attr:`skipped` counts them.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode == "auto":
            mode = "fp16" if device.type == "cuda" else "off"
        if mode not in ("fp16", "bf16", "off"):
            raise ArgumentError("{amp} {v0} is not a precision; expected auto, fp16, bf16 or off", v0=mode)
        self.mode, self.device = mode, device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        self.skipped = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], clip_grad: float | None) -> None:
        if self.scaler is not None:
            if clip_grad is not None:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            before = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            self.skipped += int(self.scaler.get_scale() < before)  # the scale only drops on a skipped step
        else:
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            optimizer.step()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and DDP wrappers: what the EMA averages and checkpoints hold."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "no_sync") else model


def _check_step(value: float, signum: int, env: DistEnv, epoch: int, step: int, steps: int) -> int:
    """Raise if the loss is not finite on any process; return the stop signal any process received (0: none).

    One all-reduce for both, so every process stops together (or the others would hang in the next one).
    """
    bad, signum = all_reduce_max([float(not math.isfinite(value)), float(signum)], env)
    if bad:
        raise ArgumentError(
            "loss is not finite at epoch {epoch}, step {step}/{steps}: training diverged "
            "(lower {lr} or set {clip_grad})",
            epoch=epoch + 1,
            step=step + 1,
            steps=steps,
        )
    return int(signum)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    precision: Precision,
    env: DistEnv,
    epoch: int,
    updates_per_epoch: int,
    accumulation_steps: int = 1,
    clip_grad: float | None = None,
    model_ema: ModelEmaV3 | None = None,
    mixup_fn: Mixup | None = None,
    desc: str = "",
    log_freq: int = 10,
    start_step: int = 0,
    carry: tuple[float, int] = (0.0, 0),
    stop: Any = None,
    channels_last: bool = False,
    unwrapped: nn.Module | None = None,
) -> dict[str, Any]:
    """Train for ``updates_per_epoch`` optimizer updates of ``accumulation_steps`` micro-batches each.

    The schedule is stepped after every update (``step_update(global update count)``), and the EMA is
    updated after every update (the authors update it every micro-batch, which under accumulation
    averages the same weights several times). Micro-batches left over at the end of the loader
    (fewer than ``accumulation_steps``) are skipped.

    ``unwrapped``: the module inside ``model``'s DDP / ``torch.compile`` wrappers (found if not given).
    A resumed epoch passes ``start_step`` (micro-batches already done; the loader yields the rest)
    and ``carry`` (this process's loss sum and image count so far). With ``stop`` (a
    :class:`~repavit.train.stop.StopRequest`), the epoch ends after the first update at which any
    process has received a stop signal.

    Returns the mean loss over all processes, the last learning rate, the number of images and
    images/s (with the fp16 scaler also ``skipped_updates`` and ``loss_scale``), and ``stopped_at``
    (micro-batches done when stopped early, else None) with this process's ``carry`` at that point.
    """
    model.train()
    unwrapped = unwrapped if unwrapped is not None else unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    k, n_micro = accumulation_steps, updates_per_epoch * accumulation_steps
    progress = Progress(
        n_micro, desc or f"Epoch [{epoch + 1}]", env.is_main, log_freq, env.world_size, start=start_step
    )
    optimizer.zero_grad(set_to_none=True)
    loss_sum, seen, stopped_at = float(carry[0]), int(carry[1]), None
    skipped_before = precision.skipped
    for i, (images, targets) in enumerate(loader, start_step):
        if i >= n_micro:
            break
        images = _images_to(images, env.device, channels_last)
        targets = _to_device(targets, env.device)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        last = (i + 1) % k == 0
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                output = model(images)
                loss = criterion(output, targets)
            loss_value = loss.item()
            signum = _check_step(loss_value, stop.signum or 0 if stop else 0, env, epoch, i, n_micro)
            precision.backward(loss / k)
        if last:
            _update(precision, optimizer, params, clip_grad)
            scheduler.step_update(epoch * updates_per_epoch + (i + 1) // k)
            if model_ema is not None:
                model_ema.update(unwrapped)
        loss_sum += loss_value * images.shape[0]
        seen += images.shape[0]
        progress.update(images.shape[0], loss=loss_value, lr=optimizer.param_groups[0]["lr"])
        if last and i + 1 < n_micro and signum:
            stop.signum = stop.signum or signum  # another process may have been the one signalled
            stopped_at = i + 1
            break
    progress.close()
    result = _epoch_result(progress, optimizer, env, loss_sum, seen, stopped_at)
    return {**result, **_scaler_stats(precision, skipped_before)}


def _scaler_stats(precision: Precision, skipped_before: int) -> dict[str, Any]:
    """fp16: the updates skipped for inf/NaN gradients this epoch, and the scale they left; else nothing."""
    if precision.scaler is None:
        return {}
    return {"skipped_updates": precision.skipped - skipped_before, "loss_scale": float(precision.scaler.get_scale())}


def _images_to(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch on ``device`` (asynchronously where the loader pinned it), channels-last if asked."""
    images = images.to(device, non_blocking=images.is_pinned())
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _to_device(targets: Any, device: torch.device) -> Any:
    """Class ids, or a token-label batch (a dict of tensors), on ``device``."""
    if isinstance(targets, dict):
        return {k: _to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in targets.items()}
    return targets.to(device, non_blocking=targets.is_pinned())


def _update(precision: Precision, optimizer: torch.optim.Optimizer, params: list, clip_grad: float | None) -> None:
    """One optimizer update from the accumulated gradients (scaled, clipped), then clear them."""
    precision.step(optimizer, params, clip_grad)
    optimizer.zero_grad(set_to_none=True)


def _epoch_result(
    progress: Progress, optimizer: torch.optim.Optimizer, env: DistEnv, loss_sum: float, seen: int, stopped_at
) -> dict[str, Any]:
    total_loss, total_seen = all_reduce_sum([loss_sum, float(seen)], env)
    elapsed = progress.elapsed
    return {
        "loss": total_loss / max(total_seen, 1.0),
        "lr": optimizer.param_groups[0]["lr"],
        "images": int(total_seen),
        "images_per_s": (progress.images * env.world_size) / max(elapsed, 1e-9),
        "time_s": elapsed,
        "stopped_at": stopped_at,
        "carry": (loss_sum, seen),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    env: DistEnv,
    sharded: bool = False,
    precision: Precision | None = None,
    desc: str = "Test",
    log_freq: int = 10,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy of ``model`` on ``loader``.

    With ``sharded=True`` each process saw a disjoint part of the data and the counts are summed
    over processes (exact: no sample counted twice). Pass the unwrapped model, not the DDP wrapper.
    Without ``precision`` the pass runs in fp32, so a reparameterized model scores exactly the same.
    """
    model.eval()
    device = env.device if next(model.parameters()).device.type == env.device.type else torch.device("cpu")
    total = len(loader) if hasattr(loader, "__len__") else 0
    progress = Progress(total, desc, env.is_main, log_freq, env.world_size if sharded else 1)
    correct1 = correct5 = loss_sum = n = 0.0
    ctx = precision.autocast if precision is not None else contextlib.nullcontext
    for images, targets in loader:
        images = _images_to(images, device, channels_last)
        targets = targets.to(device, non_blocking=targets.is_pinned())
        with ctx():
            output = model(images)
        output = output.float()
        loss_sum += F.cross_entropy(output, targets, reduction="sum").item()
        maxk = min(5, output.shape[1])
        top = output.topk(maxk, dim=1).indices  # (B, maxk)
        hit = top.eq(targets[:, None])
        correct1 += hit[:, :1].sum().item()
        correct5 += hit.sum().item()
        n += images.shape[0]
        progress.update(images.shape[0])
    progress.close()
    if sharded:
        correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], env)
    if n == 0:
        raise UserError("the validation split produced no batches")
    return {"acc1": 100.0 * correct1 / n, "acc5": 100.0 * correct5 / n, "loss": loss_sum / n, "images": int(n)}
