"""One training run: built from a config, resumable at any optimizer update, stopped cleanly by signals.

:class:`Trainer` is what :func:`repavit.train.fit` runs. Construction does everything a user's input
can fail (data, model, checkpoint, settings) before anything is written; :meth:`Trainer.run` then
trains, writes into the locked output folder (:class:`~repavit.train.rundir.RunDir`) and returns the
summary.

Exact resumption. Every epoch re-seeds all generators from ``(seed, epoch, rank)``, and every training
sample is augmented under generators seeded from ``(seed, epoch, index)``
(:class:`~repavit.data.SeededSamples`). A run stopped by a signal saves, with the usual training
state, its position inside the epoch: the micro-batches done, each process's random states and loss
sums. Resuming rebuilds the epoch's sampler order, skips the samples already seen without loading
them, restores the random states, and continues: the weights end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import datetime
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn

from ..data import dataset_classes
from ..errors import UserError
from ..models import Checkpoint, load_checkpoint, record_of, reparameterize_model, save_checkpoint
from ..models.checkpoint import write_json
from .builders import (
    build_criterion,
    build_datasets,
    build_loaders,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    check_classes,
    is_repa_model,
    rest_of_epoch,
)
from .config import TrainConfig
from .distributed import DistEnv, all_reduce_sum, barrier, gather_objects, state_fingerprint
from .engine import Precision, evaluate, train_one_epoch
from .rundir import RunDir
from .stop import StopRequest
from .tracking import WandbRun

__all__ = ["Trainer", "epoch_seed", "seed_everything"]

_logger = logging.getLogger(__name__)

# Settings baked into a saved schedule (a resumed run keeps the checkpoint's schedule).
_SCHEDULE_KEYS = ("sched", "epochs", "lr", "min_lr", "warmup_lr", "warmup_epochs", "unscale_lr", "accumulation_steps")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one process. Re-seeding at every epoch makes resumed runs bit-identical."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states, as plain values and tensors (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, "reparameterized", False))


def foldable(model: nn.Module) -> bool:
    """True for a training-form RePa model whose FFNs can be folded (BatchNorm FFNs)."""
    if _is_fused(model) or getattr(model, "feature_norm", "BatchNorm") != "BatchNorm":
        return False
    return any(callable(getattr(m, "fuse", None)) for m in model.modules())


class Trainer:
    """A training run (see the module docstring).

    Args:
        cfg: the settings, already resolved against ``ckpt``'s record.
        env: the process's distributed environment.
        ckpt: the checkpoint to resume or start from, or None.
        settings: what the checkpoint says about its model (for the class check).
        run_dir: the locked output folder (main process), or None when nothing is saved.
        say: prints a result line on the main process.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        ckpt: Checkpoint | None,
        settings: Any,
        run_dir: RunDir | None,
        say: Any,
    ) -> None:
        self.cfg, self.env, self.run_dir, self.say = cfg, env, run_dir, say
        self.resumed_from = str(ckpt.path) if ckpt is not None else None
        seed_everything(cfg.seed + env.rank)
        self.precision = Precision(cfg.amp, env.device)

        self.train_ds, self.val_ds, num_classes = build_datasets(cfg, need_train=True)
        if ckpt is not None:
            check_classes(ckpt, settings, self.val_ds, cfg.rocksdb or cfg.data_path or f"--data_set {cfg.data_set}")
        model = build_model(cfg, num_classes, checkpoint=ckpt)
        model.train()
        if not foldable(model) and is_repa_model(cfg.model):
            _logger.info("feature_norm=%s: this model cannot be reparameterized after training", cfg.feature_norm)
        self.record = record_of(model, cfg.model, class_names=[str(c) for c in dataset_classes(self.train_ds)])
        model.to(env.device)

        self.lrs = cfg.scaled_lrs(env.world_size)
        self.optimizer = build_optimizer(cfg, model, self.lrs["lr"])
        self.loader_gen = torch.Generator()
        self.train_loader, self.val_loader = build_loaders(cfg, env, self.train_ds, self.val_ds, self.loader_gen)
        self.updates_per_epoch = len(self.train_loader) // cfg.accumulation_steps
        if self.updates_per_epoch == 0:
            per_update = cfg.batch_size * cfg.accumulation_steps * env.world_size
            raise UserError(
                f"the training split has {len(self.train_ds)} images, fewer than one update needs "
                f"(batch_size x accumulation_steps x processes = {per_update}); lower --batch_size"
            )
        self.scheduler = build_scheduler(cfg, self.optimizer, self.lrs, self.updates_per_epoch)
        self.criterion = build_criterion(cfg)
        self.mixup_fn = build_mixup(cfg, num_classes)
        self.ema = None
        if cfg.model_ema:
            cpu = torch.device("cpu") if cfg.model_ema_force_cpu else None
            self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay, device=cpu)

        self.start_epoch, self.start_step, self.max_accuracy = cfg.start_epoch, 0, -1.0
        self.history: list[dict[str, Any]] = []
        self.position: dict[str, Any] | None = None
        if ckpt is not None:
            self._restore(ckpt.raw)
        if self.start_epoch >= cfg.epochs:
            raise UserError(f"nothing to train: the run is at epoch {self.start_epoch} and --epochs is {cfg.epochs}")
        self.scheduler.step_update(
            self.start_epoch * self.updates_per_epoch + self.start_step // cfg.accumulation_steps
        )

        if cfg.sync_bn and env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.unwrapped = model
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model

    # ---- resuming ---------------------------------------------------------------------------------
    def _restore(self, raw: dict[str, Any]) -> None:
        cfg, env = self.cfg, self.env
        if not all(k in raw for k in ("optimizer", "lr_scheduler", "epoch")):
            self.say(
                f"loaded weights from {self.resumed_from} (no training state: starting at epoch {cfg.start_epoch})"
            )
            self.resumed_from = None
            return
        self.optimizer.load_state_dict(raw["optimizer"])
        self.scheduler.load_state_dict(raw["lr_scheduler"])
        old = raw.get("config") if isinstance(raw.get("config"), dict) else {}
        changed = [k for k in _SCHEDULE_KEYS if k in old and old[k] != getattr(cfg, k)]
        if changed:
            _logger.warning(
                "resuming keeps the checkpoint's learning-rate schedule; these settings differ from it and do not "
                "change the schedule: %s",
                ", ".join(f"{k} {old[k]} -> {getattr(cfg, k)}" for k in changed),
            )
        if self.ema is not None and raw.get("model_ema"):
            load_checkpoint(self.ema.module, raw["model_ema"])
        if self.precision.scaler is not None and raw.get("scaler"):
            self.precision.scaler.load_state_dict(raw["scaler"])
        self.start_epoch = int(raw["epoch"]) + 1
        self.max_accuracy = float(raw.get("max_accuracy", -1.0))
        self.history = [dict(r) for r in raw.get("log_rows") or []]
        position = raw.get("position")
        if isinstance(position, dict):
            ranks = position["ranks"]
            if len(ranks) != env.world_size:
                raise UserError(
                    f"{self.resumed_from} was saved in the middle of an epoch by {len(ranks)} process(es); resume it "
                    f"with {len(ranks)} (this run has {env.world_size}), or from its last epoch checkpoint"
                )
            self.start_epoch, self.start_step = int(position["epoch"]), int(position["step"])
            self.position = ranks[env.rank]
            if self.ema is not None and "ema_buffers" in self.position:
                with torch.no_grad():
                    for name, buf in self.ema.module.named_buffers():
                        buf.copy_(self.position["ema_buffers"][name])
        if self.start_epoch >= cfg.epochs:
            raise UserError(
                f"nothing to train: {self.resumed_from} is at epoch {self.start_epoch} and --epochs is {cfg.epochs}"
            )
        where = f"epoch {self.start_epoch + 1}" + (f", step {self.start_step + 1}" if self.start_step else "")
        self.say(f"resumed from {self.resumed_from}: continuing with {where}")

    # ---- writing ----------------------------------------------------------------------------------
    def _state(self, epoch: int, metrics: dict[str, Any] | None, position: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "epoch": epoch,
            "max_accuracy": self.max_accuracy,
            "metrics": metrics,
            "config": self.cfg.to_dict(),
            "log_rows": self.history,
            "position": position,
        }

    def _save(self, name: str, state: dict[str, Any]) -> None:
        assert self.run_dir is not None
        save_checkpoint(self.run_dir.path / name, self.unwrapped.state_dict(), self.record, state)

    def _metrics(self, epoch: int, stats: dict[str, Any], ema_stats: dict[str, Any] | None) -> dict[str, Any]:
        """The evaluation stored with a checkpoint's weights (model cards and ``repavit eval`` read it)."""
        metrics = {k: stats[k] for k in ("acc1", "acc5", "loss", "images") if k in stats}
        metrics.update(epoch=epoch, data_set=self.cfg.data_set)
        if ema_stats:
            metrics["ema_acc1"] = ema_stats["acc1"]
        return metrics

    def _start_writing(self) -> None:
        """Lock a folder created now, then write config.yaml and, in log.txt, the lines a kill lost and a
        "resumed" line (main process; every process learns whether it worked)."""
        error = None
        if self.run_dir is not None and self.env.is_main:
            try:
                if not self.run_dir.locked:
                    self.run_dir.lock()
                    self.run_dir.decide(self.cfg.resume, overwrite=False)  # another run may have started meanwhile
                self._write_start_files()
            except (UserError, OSError) as e:
                error = e
        error = gather_objects(error, self.env)[0] if self.env.distributed else error
        if error is not None:
            raise error

    def _write_start_files(self) -> None:
        assert self.run_dir is not None
        self.cfg.save_yaml(self.run_dir.path / "config.yaml")
        if self.resumed_from is not None:
            if Path(self.resumed_from).resolve().parent == self.run_dir.path.resolve():
                self.run_dir.restore_log(self.history)  # the epoch lines a kill cut off after their checkpoint
            self.run_dir.append_log(
                {
                    "event": "resumed",
                    "from": self.resumed_from,
                    "next_epoch": self.start_epoch,
                    "next_step": self.start_step,
                    "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                }
            )

    # ---- the run ----------------------------------------------------------------------------------
    def _epoch_loader(self, epoch: int, skip: int) -> Any:
        """This epoch's batches from micro-batch ``skip`` on, with every generator as the uninterrupted run had it."""
        s = epoch_seed(self.cfg.seed, epoch, self.env.rank)
        seed_everything(s)
        self.loader_gen.manual_seed(s)
        if hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        loader = iter(rest_of_epoch(self.train_loader, skip))
        if skip and self.position is not None:
            _set_rng_state(self.position["rng"], self.env.device)  # the states at the step it stopped after
        return loader

    def run(self, tracker: WandbRun | None, effective: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        cfg, env, say = self.cfg, self.env, self.say
        self._start_writing()
        barrier(env)
        say(f"Start training for {cfg.epochs} epochs")
        t_start = time.perf_counter()
        test_stats: dict[str, float] = {}
        ema_stats: dict[str, float] | None = None
        sharded = env.distributed and cfg.dist_eval
        n_params = sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)
        with StopRequest(env) as stop:
            for epoch in range(self.start_epoch, cfg.epochs):
                skip = self.start_step if epoch == self.start_epoch else 0
                carry = tuple(self.position["carry"]) if skip and self.position else (0.0, 0)
                train_stats = train_one_epoch(
                    self.model,
                    self.criterion,
                    self._epoch_loader(epoch, skip),
                    self.optimizer,
                    self.scheduler,
                    self.precision,
                    env,
                    epoch,
                    self.updates_per_epoch,
                    accumulation_steps=cfg.accumulation_steps,
                    clip_grad=cfg.clip_grad,
                    model_ema=self.ema,
                    mixup_fn=self.mixup_fn,
                    desc=f"Epoch [{epoch + 1}/{cfg.epochs}]",
                    log_freq=cfg.log_freq,
                    start_step=skip,
                    carry=carry,  # type: ignore[arg-type]
                    should_stop=stop.requested,
                )
                if train_stats["stopped_at"] is not None:
                    return self._stop_mid_epoch(stop, epoch, train_stats)
                test_stats, ema_stats = self._end_epoch(epoch, train_stats, sharded, n_params, tracker)
                if epoch + 1 < cfg.epochs and stop.requested():
                    return self._stopped(stop, f"after epoch {epoch + 1}", "checkpoint.pth")

        fingerprints = gather_objects(state_fingerprint(self.unwrapped), env)
        identical = len(set(fingerprints)) == 1
        if not identical:
            _logger.warning("weights differ across processes: %s", fingerprints)
        summary: dict[str, Any] = {
            "model": cfg.model,
            "epochs": cfg.epochs,
            "final": test_stats,
            "final_ema": ema_stats,
            "max_accuracy": self.max_accuracy,
            "train_time_s": time.perf_counter() - t_start,
            "effective": effective,
            "complexity": info,
            "rank_fingerprints": fingerprints,
            "weights_identical_across_ranks": identical,
            "wandb_project": tracker.project if tracker else None,
        }
        if cfg.reparam:
            self._final_reparam(summary, test_stats, sharded)
        if self.run_dir is not None and env.is_main:
            write_json(self.run_dir.path / "summary.json", summary)
        if tracker is not None:
            tracker.finish()
        total = time.perf_counter() - t_start
        say(f"Training time {int(total // 3600)}:{int(total % 3600 // 60):02d}:{int(total % 60):02d}")
        return summary

    def _end_epoch(
        self, epoch: int, train_stats: dict[str, Any], sharded: bool, n_params: int, tracker: WandbRun | None
    ) -> tuple[dict[str, float], dict[str, float] | None]:
        cfg, env = self.cfg, self.env
        if env.distributed:
            # DDP broadcasts BN buffers from rank 0 at each forward, so after the last step every process holds
            # its own running statistics: average them, so that all processes evaluate and save the same model.
            distribute_bn(self.unwrapped, env.world_size, reduce=True)
            if self.ema is not None and (env.backend != "nccl" or not cfg.model_ema_force_cpu):
                distribute_bn(self.ema.module, env.world_size, reduce=True)
        test_stats = evaluate(self.unwrapped, self.val_loader, env, sharded=sharded, log_freq=cfg.log_freq)
        ema_stats = None
        if self.ema is not None:
            ema_stats = evaluate(self.ema.module, self.val_loader, env, sharded=sharded, desc="Test (EMA)")
        bad = self._pop_bad_images()
        if bad["train_bad_images"] or bad["test_bad_images"]:
            self.say(
                f"Epoch {epoch + 1}: skipped {bad['train_bad_images']} unreadable training and "
                f"{bad['test_bad_images']} unreadable test images (see the warnings; --fatal_bad_images stops instead)"
            )
        improved = test_stats["acc1"] > self.max_accuracy
        self.max_accuracy = max(self.max_accuracy, test_stats["acc1"])
        self.say(
            f"Epoch {epoch + 1}/{cfg.epochs}: train loss {train_stats['loss']:.4f}; accuracy of the network on the "
            f"{test_stats['images']} test images: top-1 {test_stats['acc1']:.2f}%, top-5 {test_stats['acc5']:.2f}%"
            + (f"; EMA top-1 {ema_stats['acc1']:.2f}%" if ema_stats else "")
            + f"; max accuracy {self.max_accuracy:.2f}%"
        )
        row = {
            **{f"train_{k}": v for k, v in train_stats.items() if k not in ("stopped_at", "carry")},
            **{f"test_{k}": v for k, v in test_stats.items()},
            **({f"ema_test_{k}": v for k, v in ema_stats.items()} if ema_stats else {}),
            **bad,
            "epoch": epoch,
            "n_parameters": n_params,
        }
        self.history.append(row)
        if self.run_dir is not None and env.is_main:
            state = self._state(epoch, self._metrics(epoch, test_stats, ema_stats), None)
            self._save("checkpoint.pth", state)
            if (epoch + 1) % cfg.save_freq == 0:
                self._save(f"checkpoint_{epoch + 1}epoch.pth", state)
            if improved:
                self._save("best_checkpoint.pth", state)
            self.run_dir.append_log(row)  # after the checkpoint: a kill in between loses no line (restore_log)
        if tracker is not None:
            tracker.log(
                {
                    "accuracy": test_stats["acc1"],
                    "accuracy_top5": test_stats["acc5"],
                    "loss": train_stats["loss"],
                    "lr": train_stats["lr"],
                    **({"ema_accuracy": ema_stats["acc1"]} if ema_stats else {}),
                },
                step=epoch,
            )
        barrier(env)
        return test_stats, ema_stats

    def _pop_bad_images(self) -> dict[str, int]:
        """Unreadable images replaced during the epoch (summed over processes), read and reset."""
        counts = [
            float(ds.pop_bad_count()) if hasattr(ds, "pop_bad_count") else 0.0 for ds in (self.train_ds, self.val_ds)
        ]
        train_bad, val_bad = all_reduce_sum(counts, self.env) if self.env.distributed else counts
        return {"train_bad_images": int(train_bad), "test_bad_images": int(val_bad)}

    def _stop_mid_epoch(self, stop: StopRequest, epoch: int, train_stats: dict[str, Any]) -> dict[str, Any]:
        step = int(train_stats["stopped_at"])
        mine: dict[str, Any] = {"rng": _rng_state(self.env.device), "carry": list(train_stats["carry"])}
        if self.ema is not None and self.env.distributed:
            # each process's EMA averages its own BatchNorm statistics until the epoch's distribute_bn
            mine["ema_buffers"] = {k: v.detach().cpu().clone() for k, v in self.ema.module.named_buffers()}
        ranks = gather_objects(mine, self.env)
        if self.run_dir is not None and self.env.is_main:
            position = {"epoch": epoch, "step": step, "ranks": ranks}
            # the weights are between two evaluations: no accuracy belongs to them
            self._save("checkpoint.pth", self._state(epoch - 1, None, position))
        barrier(self.env)
        steps = self.updates_per_epoch * self.cfg.accumulation_steps
        return self._stopped(stop, f"at epoch {epoch + 1}, step {step}/{steps}", "checkpoint.pth")

    def _stopped(self, stop: StopRequest, where: str, name: str) -> dict[str, Any]:
        if self.run_dir is not None:
            hint = "continue with --resume auto"
            saved = self.run_dir.path / name
        else:
            hint, saved = "nothing was saved (no --output_dir)", None
        self.say(f"stopped by {stop.name} {where}; {hint}")
        signum = stop.signum or signal.SIGTERM
        return {"stopped": {"signal": stop.name, "signum": int(signum), "where": where, "checkpoint": str(saved)}}

    def _final_reparam(self, summary: dict[str, Any], test_stats: dict[str, Any], sharded: bool) -> None:
        fused = reparameterize_model(self.unwrapped)
        rep_stats = evaluate(fused, self.val_loader, self.env, sharded=sharded, desc="Test (reparameterized)")
        summary["final_reparam"] = rep_stats
        self.say(
            f"reparameterized: top-1 {rep_stats['acc1']:.2f}%, top-5 {rep_stats['acc5']:.2f}% "
            f"({'identical to' if rep_stats['acc1'] == test_stats['acc1'] else 'differs from'} the training form)"
        )
        if self.run_dir is not None and self.env.is_main:
            fused_record = record_of(fused, self.cfg.model, self.record.model_args, self.record.class_names)
            metrics = {**self._metrics(self.cfg.epochs - 1, rep_stats, None), "form": "reparameterized"}
            save_checkpoint(
                Path(self.run_dir.path) / "checkpoint_reparam.pth",
                fused.state_dict(),
                fused_record,
                {"metrics": metrics},
            )
