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
from ..data.transforms import eval_preprocessing
from ..errors import ArgumentError, UserError
from ..layers.idle_mlp import set_hidden_path
from ..models import (
    Checkpoint,
    fold_refusal,
    load_checkpoint,
    record_of,
    reparameterize_model,
    save_checkpoint,
)
from ..models.record import ModelRecord, apply_preprocessing
from ..utils import write_json
from .builders import (
    build_criterion,
    build_datasets,
    build_loaders,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    build_token_label_loss,
    check_classes,
    data_desc,
    is_repa_model,
    transform_config,
)
from .config import TrainConfig
from .distributed import DistEnv, all_reduce_sum, barrier, gather_objects, state_fingerprint
from .engine import Precision, evaluate, train_one_epoch
from .rundir import RunDir
from .stop import StopRequest
from .token_labeling import enable_token_labeling
from .tracking import WandbRun

__all__ = ["Trainer", "epoch_seed", "seed_everything"]

_logger = logging.getLogger(__name__)

# Settings baked into a saved schedule (a resumed run keeps the checkpoint's schedule).
_SCHEDULE_KEYS = (
    "sched",
    "epochs",
    "lr",
    "min_lr",
    "warmup_lr",
    "warmup_epochs",
    "unscale_lr",
    "accumulation_steps",
    "batch_size",
)
# A checkpoint saved inside an epoch resumes only if the epoch's order and batching are the same.
_POSITION_KEYS = ("batch_size", "accumulation_steps", "seed", "repeated_aug", "ra_repeats")
STOPPED_NAME = "checkpoint_stopped.pth"  # a run stopped inside an epoch (checkpoint.pth keeps the epoch's start)


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
            check_classes(ckpt, settings, self.val_ds, data_desc(cfg))
        model = build_model(cfg, num_classes, checkpoint=ckpt)
        set_hidden_path(model, cfg.hidden_path)
        model.train()
        self.record = self._record_of(model, settings)
        if is_repa_model(cfg.model):
            why = fold_refusal(model)
            fold = "its FFNs fold after training (--reparam, or `repavit reparam`)" if not why else f"no fold: {why}"
            say(f"model: {self.record.describe()}; {fold}")
        model.to(env.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)

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
        self.criterion = self._criterion(model, num_classes)
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
        # every epoch done but the run not finished (stopped or killed in its final steps): finish it
        self.finish_only = self.start_epoch >= cfg.epochs and self._unfinished_here()
        if self.start_epoch >= cfg.epochs and not self.finish_only:
            raise ArgumentError(
                "nothing to train: the run is at epoch {v0} and {epochs} is {v1}", v0=self.start_epoch, v1=cfg.epochs
            )
        self.scheduler.step_update(
            self.start_epoch * self.updates_per_epoch + self.start_step // cfg.accumulation_steps
        )

        if cfg.sync_bn and env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.unwrapped = model
        self.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # compiled around DDP (its bucketed all-reduces stay graph breaks, as torch recommends)
        self.model = torch.compile(model) if cfg.compile else model

    def _record_of(self, model: nn.Module, settings: Any) -> ModelRecord:
        """The record this run's checkpoints carry: the model, its classes, how evaluation prepares images."""
        cfg = self.cfg
        if settings is not None and settings.overrides is not None:
            overrides = settings.overrides  # a resumed run: what its checkpoint's model was given
        else:  # what this command line gave on top of the model name's defaults
            overrides = [*cfg.model_kwargs, *(["img_size"] if cfg.input_size != 224 else [])]
        classes = [str(c) for c in dataset_classes(self.train_ds)]
        prep = eval_preprocessing(transform_config(cfg))  # how this run evaluates: deployment prepares alike
        apply_preprocessing(model, prep)
        return record_of(model, cfg.model, class_names=classes, overrides=overrides, preprocessing=prep)

    def _criterion(self, model: nn.Module, num_classes: int) -> nn.Module:
        """The training loss; with ``--token_label`` the model is switched to its dense training output."""
        cfg = self.cfg
        if not cfg.token_label:
            return build_criterion(cfg)
        grid = enable_token_labeling(model, cfg.model, cfg.mix_token, cfg.token_label_size)
        self.say(f"token labeling: {grid[0]}x{grid[1]} token targets, MixToken {'on' if cfg.mix_token else 'off'}")
        return build_token_label_loss(cfg, num_classes, grid)

    # ---- resuming ---------------------------------------------------------------------------------
    def _unfinished_here(self) -> bool:
        """A checkpoint of this output folder whose run wrote no summary yet."""
        if self.run_dir is None or self.resumed_from is None:
            return False
        here = Path(self.resumed_from).resolve().parent == self.run_dir.path.resolve()
        return here and not (self.run_dir.path / "summary.json").exists()

    def _restore(self, raw: dict[str, Any]) -> None:
        cfg = self.cfg
        if not all(k in raw for k in ("optimizer", "lr_scheduler", "epoch")):
            self.say(
                f"loaded weights from {self.resumed_from} (no training state: starting at epoch {cfg.start_epoch})"
            )
            self.resumed_from = None
            return
        old = raw.get("config") if isinstance(raw.get("config"), dict) else {}
        if "opt" in old and old["opt"] != cfg.opt:
            raise UserError(
                f"{self.resumed_from} was trained with --opt {old['opt']}, --opt {cfg.opt} was given: the optimizer "
                "state cannot move between optimizers (resume with the same --opt)"
            )
        try:
            self.optimizer.load_state_dict(raw["optimizer"])
            self.scheduler.load_state_dict(raw["lr_scheduler"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{self.resumed_from}: its optimizer or schedule state does not fit this run ({e})"
            ) from None
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
        if isinstance(raw.get("position"), dict):
            self._restore_position(raw["position"])
        where = f"epoch {self.start_epoch + 1}" + (f", step {self.start_step + 1}" if self.start_step else "")
        if self.start_epoch < cfg.epochs:
            self.say(f"resumed from {self.resumed_from}: continuing with {where}")

    def _restore_position(self, position: dict[str, Any]) -> None:
        """A checkpoint from inside an epoch: refuse what would change the epoch's order or batching."""
        env, cfg = self.env, self.cfg
        ranks = position["ranks"]
        saved = dict(position.get("run", {}))
        now = {**{k: getattr(cfg, k) for k in _POSITION_KEYS}, "world_size": env.world_size}
        now["train_images"] = len(self.train_ds)
        differ = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
        if len(ranks) != env.world_size and "world_size" not in saved:
            differ.append(f"world_size {len(ranks)} -> {env.world_size}")
        if differ:
            raise UserError(
                f"{self.resumed_from} was saved in the middle of an epoch, which resumes only with the same "
                f"batches ({', '.join(differ)}); resume with the same settings, or from checkpoint.pth (the start "
                "of that epoch)"
            )
        self.start_epoch, self.start_step = int(position["epoch"]), int(position["step"])
        self.position = ranks[env.rank]
        if self.ema is not None and "ema_buffers" in self.position:
            with torch.no_grad():
                for name, buf in self.ema.module.named_buffers():
                    buf.copy_(self.position["ema_buffers"][name])

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
        """Lock a folder created now (or clear a replaced run), then write config.yaml and, in log.txt, the
        lines a kill lost and a "resumed" line (main process; every process learns whether it worked)."""

        def write() -> None:
            assert self.run_dir is not None
            if not self.run_dir.locked:
                self.run_dir.lock()
                self.run_dir.decide(self.cfg.resume, overwrite=False)  # another run may have started meanwhile
            if self.run_dir.pending_clear:  # --overwrite: only now that every input check has passed
                self.run_dir.clear()
            self._write_start_files()

        self._main_writes(write)

    def _main_writes(self, write: Any) -> None:
        """Run ``write()`` on the main process; an error there is raised on every process (none waits forever)."""
        error = None
        if self.run_dir is not None and self.env.is_main:
            try:
                write()
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
        self.train_loader.sampler.set_epoch(epoch)
        self.train_loader.sampler.skip = skip * self.cfg.batch_size  # the positions already trained on
        self.train_loader.dataset.set_epoch(epoch)
        loader = iter(self.train_loader)
        if skip and self.position is not None:
            _set_rng_state(self.position["rng"], self.env.device)  # the states at the step it stopped after
        return loader

    def run(self, tracker: WandbRun | None, effective: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        cfg, env, say = self.cfg, self.env, self.say
        self._start_writing()
        barrier(env)
        t_start = time.perf_counter()
        sharded = env.distributed and cfg.dist_eval
        # the handlers stay until the summary is written: a signal in the final steps waits for them
        with StopRequest(env) as stop:
            if self.finish_only:
                steps = "evaluation, reparameterization, summary" if cfg.reparam else "evaluation, summary"
                say(f"every epoch of the run is done; finishing it ({steps})")
                test_stats, ema_stats = self._evaluate(sharded)
            else:
                say(f"Start training for {cfg.epochs} epochs")
                stopped, test_stats, ema_stats = self._train(stop, sharded, tracker)
                if stopped is not None:
                    if tracker is not None:
                        tracker.finish()
                    return stopped
            summary = self._summary(test_stats, ema_stats, effective, info, tracker, time.perf_counter() - t_start)
            if cfg.reparam:
                self._final_reparam(summary, test_stats, sharded)
            self._main_writes(lambda: write_json(self.run_dir.path / "summary.json", summary))
        if tracker is not None:
            tracker.finish()
        total = time.perf_counter() - t_start
        say(f"Training time {int(total // 3600)}:{int(total % 3600 // 60):02d}:{int(total % 60):02d}")
        return summary

    def _train(self, stop: StopRequest, sharded: bool, tracker: WandbRun | None) -> tuple[Any, Any, Any]:
        """The epochs; returns ``(stop result or None, last test stats, last EMA stats)``."""
        cfg = self.cfg
        test_stats: dict[str, float] = {}
        ema_stats: dict[str, float] | None = None
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
                self.env,
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
                stop=stop,
                channels_last=cfg.channels_last,
                unwrapped=self.unwrapped,
            )
            if train_stats["stopped_at"] is not None:
                return self._stop_mid_epoch(stop, epoch, train_stats), test_stats, ema_stats
            test_stats, ema_stats = self._end_epoch(epoch, train_stats, sharded, tracker)
            if epoch + 1 < cfg.epochs and stop.requested():
                return self._stopped(stop, f"after epoch {epoch + 1}", "checkpoint.pth"), test_stats, ema_stats
        return None, test_stats, ema_stats

    def _summary(
        self, test_stats: Any, ema_stats: Any, effective: dict, info: dict, tracker: WandbRun | None, seconds: float
    ) -> dict[str, Any]:
        fingerprints = gather_objects(state_fingerprint(self.unwrapped), self.env)
        identical = len(set(fingerprints)) == 1
        if not identical:
            _logger.warning("weights differ across processes: %s", fingerprints)
        return {
            "model": self.cfg.model,
            "epochs": self.cfg.epochs,
            "final": test_stats,
            "final_ema": ema_stats,
            "max_accuracy": self.max_accuracy,
            "train_time_s": seconds,
            "effective": effective,
            "complexity": info,
            "rank_fingerprints": fingerprints,
            "weights_identical_across_ranks": identical,
            "wandb_project": tracker.project if tracker else None,
        }

    def _evaluate(self, sharded: bool) -> tuple[dict[str, float], dict[str, float] | None]:
        cl = self.cfg.channels_last
        test_stats = evaluate(
            self.unwrapped, self.val_loader, self.env, sharded=sharded, log_freq=self.cfg.log_freq, channels_last=cl
        )
        ema_stats = None
        if self.ema is not None:
            ema_stats = evaluate(
                self.ema.module, self.val_loader, self.env, sharded=sharded, desc="Test (EMA)", channels_last=cl
            )
        return test_stats, ema_stats

    def _end_epoch(
        self, epoch: int, train_stats: dict[str, Any], sharded: bool, tracker: WandbRun | None
    ) -> tuple[dict[str, float], dict[str, float] | None]:
        cfg, env = self.cfg, self.env
        if env.distributed:
            # DDP broadcasts BN buffers from rank 0 at each forward, so after the last step every process holds
            # its own running statistics: average them, so that all processes evaluate and save the same model.
            distribute_bn(self.unwrapped, env.world_size, reduce=True)
            if self.ema is not None and (env.backend != "nccl" or not cfg.model_ema_force_cpu):
                distribute_bn(self.ema.module, env.world_size, reduce=True)
        test_stats, ema_stats = self._evaluate(sharded)
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
            "n_parameters": self.n_params,
        }
        self.history.append(row)

        def write() -> None:
            assert self.run_dir is not None
            state = self._state(epoch, self._metrics(epoch, test_stats, ema_stats), None)
            self._save("checkpoint.pth", state)
            if (epoch + 1) % cfg.save_freq == 0:
                self._save(f"checkpoint_{epoch + 1}epoch.pth", state)
            if improved:
                self._save("best_checkpoint.pth", state)
            (self.run_dir.path / STOPPED_NAME).unlink(missing_ok=True)  # passed: the epoch checkpoint is newer
            self.run_dir.append_log(row)  # after the checkpoint: a kill in between loses no line (restore_log)

        self._main_writes(write)
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
        run = {**{k: getattr(self.cfg, k) for k in _POSITION_KEYS}, "world_size": self.env.world_size}
        position = {"epoch": epoch, "step": step, "ranks": ranks, "run": {**run, "train_images": len(self.train_ds)}}
        # its own file: checkpoint.pth keeps the start of the epoch, for a resume with other settings;
        # the weights are between two evaluations, so no accuracy belongs to them
        self._main_writes(lambda: self._save(STOPPED_NAME, self._state(epoch - 1, None, position)))
        steps = self.updates_per_epoch * self.cfg.accumulation_steps
        return self._stopped(stop, f"at epoch {epoch + 1}, step {step}/{steps}", STOPPED_NAME)

    def _stopped(self, stop: StopRequest, where: str, name: str) -> dict[str, Any]:
        if self.run_dir is not None:
            hint = "continue with --resume auto"
            saved: str | None = str(self.run_dir.path / name)
        else:
            hint, saved = "nothing was saved (no --output_dir)", None
        self.say(f"stopped by {stop.name} {where}; {hint}")
        signum = stop.signum or signal.SIGTERM
        return {"stopped": {"signal": stop.name, "signum": int(signum), "where": where, "checkpoint": saved}}

    def _final_reparam(self, summary: dict[str, Any], test_stats: dict[str, Any], sharded: bool) -> None:
        fused = reparameterize_model(self.unwrapped)
        rep_stats = evaluate(
            fused, self.val_loader, self.env, sharded=sharded, desc="Test (reparameterized)",
            channels_last=self.cfg.channels_last,
        )  # fmt: skip
        summary["final_reparam"] = rep_stats
        self.say(
            f"reparameterized: top-1 {rep_stats['acc1']:.2f}%, top-5 {rep_stats['acc5']:.2f}% "
            f"({'identical to' if rep_stats['acc1'] == test_stats['acc1'] else 'differs from'} the training form)"
        )
        if self.run_dir is not None and self.env.is_main:
            fused_record = record_of(
                fused, self.cfg.model, self.record.model_args, self.record.class_names, self.record.overrides,
                self.record.preprocessing,
            )  # fmt: skip
            metrics = {**self._metrics(self.cfg.epochs - 1, rep_stats, None), "form": "reparameterized"}
            path = self.run_dir.path / "checkpoint_reparam.pth"
            save_checkpoint(path, fused.state_dict(), fused_record, {"metrics": metrics})
