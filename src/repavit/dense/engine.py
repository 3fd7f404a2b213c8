"""The training loop of ``repavit detect train`` and ``repavit segment train``.

One loop serves both tasks (:class:`~repavit.dense.tasks.Task` says how to build, batch, score): AdamW,
an iteration-wise linear warmup, then the learning rate times ``gamma`` at each epoch of ``lr_steps``
(MMDetection's 1x schedule is 12 epochs with steps at 8 and 11); no weight decay on norms, biases and
position tables, as the Swin detection configs. The run folder works as classification's
(:class:`~repavit.train.rundir.RunDir`): locked while a run writes, ``--resume auto`` continues from the
last epoch's ``checkpoint.pth`` (model, optimizer, schedule, EMA, history), ``--overwrite`` replaces,
``log.txt`` gets one JSON line per epoch and ``summary.json`` the final scores. A stop (Ctrl-C, kill)
loses at most the running epoch. Under torchrun or Slurm the model is wrapped in DDP, every process
trains on its shard and evaluates its share of the images; scores are computed from all of them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models import read_checkpoint, save_checkpoint
from ..train.distributed import DistEnv, cleanup, gather_objects, init_distributed
from ..train.engine import unwrap
from ..train.progress import Progress
from ..train.rundir import RunDir
from ..utils import write_json

__all__ = ["Schedule", "build_optimizer", "fit", "lr_factor"]

_logger = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Training settings (the CLI's flags). The defaults are MMDetection's 1x AdamW recipe for Swin."""

    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    lr_steps: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    clip_grad: float | None = None
    workers: int = 2
    seed: int = 0
    ema: bool = False
    ema_decay: float = 0.9998
    eval_every: int = 1
    log_freq: int = 10
    device: str = "auto"
    dist_backend: str = "auto"

    def __post_init__(self) -> None:
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        for name in ("epochs", "batch_size", "eval_every", "log_freq"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.gamma <= 1 or self.warmup_iters < 0:
            raise UserError("expected --lr > 0, --weight-decay >= 0, 0 < --gamma <= 1 and --warmup-iters >= 0")
        if not 0 < self.warmup_ratio <= 1:
            raise UserError(f"--warmup-ratio {self.warmup_ratio}: expected 0 < ratio <= 1")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise UserError(f"--clip-grad {self.clip_grad}: expected a positive gradient norm (or 0 for none)")
        if not 0 < self.ema_decay < 1:
            raise UserError(f"--model-ema-decay {self.ema_decay}: expected 0 < decay < 1")
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: expected 0 or more loader processes")


def lr_factor(it: int, iters_per_epoch: int, s: Schedule) -> float:
    """The learning-rate multiplier at iteration ``it`` (0-based, counted over the whole run)."""
    epoch = it // max(iters_per_epoch, 1)
    factor = s.gamma ** sum(epoch >= step for step in s.lr_steps)
    if it < s.warmup_iters:
        factor *= s.warmup_ratio + (1 - s.warmup_ratio) * it / s.warmup_iters
    return factor


def build_optimizer(model: nn.Module, s: Schedule) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or name.endswith(("relative_position_bias_table", "pos_embed", "cls_token"))
        (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr)


def _prepare_dir(env: DistEnv, out: Path, resume: str, overwrite: bool) -> tuple[RunDir, str]:
    """Lock and check the run folder on the main process; every process gets the checkpoint to resume from
    (``""``: a fresh start), or the main process's error (so no process waits for one that stopped)."""
    rundir = RunDir(out)
    decision: tuple[str, Any] = ("ok", "")
    if env.is_main:
        try:
            decision = ("ok", _claim(rundir, resume, overwrite))
        except (UserError, OSError) as e:
            rundir.unlock()
            decision = ("error", e)
    kind, value = gather_objects(decision, env)[0]
    if kind == "error":
        raise value
    return rundir, str(value)


def _claim(rundir: RunDir, resume: str, overwrite: bool) -> str:
    try:
        rundir.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output-dir {rundir.path}: {e.strerror}") from None
    rundir.lock()
    rundir.clean_stale()
    start = rundir.decide(resume, overwrite)
    if rundir.pending_clear:
        rundir.clear()
    return start


def _restore(path: str, task: Any, model: nn.Module, opt) -> tuple[int, list[dict[str, Any]], dict | None]:
    raw = read_checkpoint(path)
    if "optimizer" not in raw or "epoch" not in raw or "dense" not in raw:
        raise UserError(f"{path} holds no dense training state (model, optimizer, epoch): cannot resume it")
    task.check_config(raw["dense"], path)
    unwrap(model).load_state_dict(raw["model"])
    opt.load_state_dict(raw["optimizer"])
    _logger.info("resumed from %s (epoch %d)", path, raw["epoch"])
    return int(raw["epoch"]), list(raw.get("history", [])), raw.get("model_ema")


def _train_epoch(task, model, loader, opt, ema, s: Schedule, env: DistEnv, epoch: int, it0: int) -> dict[str, Any]:
    model.train()
    n = len(loader)
    prog = Progress(
        n, f"Epoch [{epoch + 1}/{s.epochs}]", enabled=env.is_main, log_freq=s.log_freq, world_size=env.world_size
    )
    totals: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = s.lr * lr_factor(it0 + i, n, s)
        loss, parts = task.loss(model, batch, env.device)
        if not math.isfinite(loss.item()):
            where = f"epoch {epoch + 1}, step {i + 1}"
            raise UserError(f"the loss is {loss.item()} at {where}: lower --lr or set --clip-grad")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
        opt.step()
        if ema is not None:
            ema.update(unwrap(model))
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
        prog.update(task.batch_len(batch), loss=loss.item(), lr=opt.param_groups[0]["lr"])
    prog.close()
    row = {f"train_{k}": v / max(n, 1) for k, v in totals.items()}
    return {**row, "train_time_s": time.perf_counter() - t0, "lr": opt.param_groups[0]["lr"]}


def fit(
    task: Any,
    s: Schedule,
    output_dir: str | Path,
    resume: str = "",
    overwrite: bool = False,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Train ``task``'s model; returns the summary (also written to ``summary.json``)."""
    from timm.utils import ModelEmaV3

    env = init_distributed(s.device, s.dist_backend)
    rundir, start = _prepare_dir(env, Path(output_dir), resume, overwrite)
    try:
        if start and rundir.finished(s.epochs):  # a finished run: nothing to train, its summary stands
            _logger.info("%s finished its %d epochs already; nothing to do", rundir.path, s.epochs)
            return json.loads((rundir.path / "summary.json").read_text())
        torch.manual_seed(s.seed + env.rank)
        model = task.build(pretrained).to(env.device)
        if env.distributed:  # DDP copies rank 0's weights to every process
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=task.unused_parameters)
        opt = build_optimizer(model, s)
        epoch0, history, ema_state = _restore(start, task, model, opt) if start else (0, [], None)
        ema = ModelEmaV3(unwrap(model), decay=s.ema_decay) if s.ema else None  # from the (restored) weights
        if ema is not None and ema_state is not None:
            ema.module.load_state_dict(ema_state)
        if env.is_main and start:
            rundir.append_log({"event": "resumed", "from": start, "epoch": epoch0})
        loader = task.train_loader(s, env)
        metrics: dict[str, Any] = {}
        for epoch in range(epoch0, s.epochs):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            if loader.generator is not None:  # the epoch's shuffle, the same when resumed
                loader.generator.manual_seed(s.seed + epoch)
            done = _train_epoch(task, model, loader, opt, ema, s, env, epoch, epoch * len(loader))
            row = {"epoch": epoch + 1, **done}
            if (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs:
                metrics = task.evaluate(unwrap(model), env)
                row.update(task.flat(metrics))
                if ema is not None:
                    row.update({f"ema_{k}": v for k, v in task.flat(task.evaluate(ema.module, env)).items()})
            history.append(row)
            if env.is_main:
                extra = {
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "dense": task.config.to_dict(),
                    "schedule": asdict(s),
                }
                if ema is not None:
                    extra["model_ema"] = ema.module.state_dict()
                save_checkpoint(
                    rundir.path / "checkpoint.pth", unwrap(model).state_dict(), task.record(unwrap(model)), extra
                )
                rundir.append_log(row)
                _logger.info("epoch %d: %s", epoch + 1, task.describe(row))
        summary = {
            "epochs": s.epochs,
            "final": history[-1] if history else {},
            "metrics": metrics,
            "config": task.config.to_dict(),
        }
        if env.is_main:
            write_json(rundir.path / "summary.json", summary)
        return summary
    finally:
        if env.is_main:
            rundir.unlock()
        cleanup()
