"""``fit`` (train), ``evaluate_checkpoint`` (``--eval``) and ``speed_test`` (``--test_speed``).

Every check that a user's input can fail (data folders, model name, checkpoint, ``--reparam`` on a
LayerNorm model, ``--wandb`` without ``WANDB_MODE``) runs before anything is written, so a failed
start leaves the output folder as it was. Results are printed by the main process only.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn

from ..bench.throughput import count_gmacs, count_params, interleaved_throughput
from ..data import dataset_classes
from ..models import Checkpoint, load_checkpoint, open_checkpoint, record_of, reparameterize_model, save_checkpoint
from .builders import (
    build_criterion,
    build_datasets,
    build_loaders,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    check_classes,
    check_model_name,
    is_repa_model,
    settings_from_checkpoint,
)
from .config import TrainConfig
from .distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    state_fingerprint,
)
from .engine import Precision, evaluate, train_one_epoch
from .tracking import WandbRun, check_wandb_env

__all__ = ["evaluate_checkpoint", "fit", "run", "speed_test"]

# Settings baked into a saved schedule (a resumed run keeps the checkpoint's schedule).
_SCHEDULE_KEYS = ("sched", "epochs", "lr", "min_lr", "warmup_lr", "warmup_epochs", "unscale_lr", "accumulation_steps")

_logger = logging.getLogger(__name__)


# ---- shared helpers -----------------------------------------------------------------------------
class _Printer:
    """``print`` on the main process only (results go to stdout; progress goes through logging)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    def __call__(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one process. Re-seeding at every epoch makes resumed runs bit-identical."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _quiet_other_ranks(env: DistEnv) -> None:
    if not env.is_main:
        logging.getLogger("repavit").setLevel(logging.WARNING)


def _is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, "reparameterized", False))


def _foldable(model: nn.Module) -> bool:
    """True for a training-form RePa model whose FFNs can be folded (BatchNorm FFNs)."""
    if _is_fused(model) or getattr(model, "feature_norm", "BatchNorm") != "BatchNorm":
        return False
    return any(callable(getattr(m, "fuse", None)) for m in model.modules())


def complexity(model: nn.Module, img_size: int) -> dict[str, dict[str, float]]:
    """Parameters (M) and GMACs (attention matmuls included) before and, if possible, after reparameterization.

    An already reparameterized model only has the ``"after"`` entry.
    """
    probe = copy.deepcopy(model).eval()
    stats = {"params_m": count_params(probe) / 1e6, "gmacs": count_gmacs(probe, img_size)}
    if _is_fused(probe):
        return {"after": stats}
    out = {"before": stats}
    if _foldable(probe):
        fused = reparameterize_model(probe, inplace=True)
        out["after"] = {"params_m": count_params(fused) / 1e6, "gmacs": count_gmacs(fused, img_size)}
    return out


def _print_complexity(say: _Printer, info: dict[str, dict[str, float]]) -> None:
    for stage, label in (("before", "before reparameterization"), ("after", "after reparameterization")):
        if stage in info:
            v = info[stage]
            say(f"{label}: {v['params_m']:.4g} M parameters, {v['gmacs']:.4g} GMACs")
    if "after" not in info:
        say("no reparameterized form (needs a RePa model with --feature_norm=BatchNorm)")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _pop_bad_images(train_ds: Any, val_ds: Any, env: DistEnv) -> dict[str, int]:
    """Unreadable images replaced during the epoch (summed over processes), read and reset."""
    counts = [float(ds.pop_bad_count()) if hasattr(ds, "pop_bad_count") else 0.0 for ds in (train_ds, val_ds)]
    train_bad, val_bad = all_reduce_sum(counts, env) if env.distributed else counts
    return {"train_bad_images": int(train_bad), "test_bad_images": int(val_bad)}


def _append_line(path: Path, data: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(data) + "\n")


def _data_desc(cfg: TrainConfig) -> str:
    return cfg.rocksdb or cfg.data_path or f"--data_set {cfg.data_set}"


def _open_resume(cfg: TrainConfig) -> tuple[TrainConfig, Checkpoint | None, Any]:
    """Open ``--resume`` and take the model settings it records (before any data or model is built)."""
    if not cfg.resume:
        return cfg, None, None
    ckpt = open_checkpoint(cfg.resume)
    cfg, settings = settings_from_checkpoint(cfg, ckpt)
    return cfg, ckpt, settings


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Dispatch on the mode: ``--test_speed`` -> :func:`speed_test`, ``--eval`` -> evaluation, else :func:`fit`."""
    if cfg.mode == "speed":
        return speed_test(cfg)
    if cfg.mode == "eval":
        return evaluate_checkpoint(cfg)
    return fit(cfg)


# ---- training -------------------------------------------------------------------------------------
def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` with the DeiT recipe; return a summary (also written to ``summary.json``).

    Writes into ``cfg.output_dir`` (main process): ``config.yaml``, ``checkpoint.pth`` after every
    epoch, ``checkpoint_{N}epoch.pth`` every ``save_freq`` epochs, ``best_checkpoint.pth``, ``log.txt``
    (one JSON line per epoch) and ``summary.json``.
    """
    if cfg.wandb:
        check_wandb_env()
    env = init_distributed(cfg.device, cfg.dist_backend)
    try:
        _quiet_other_ranks(env)
        cfg, ckpt, settings = _open_resume(cfg)
        check_model_name(cfg)
        return _fit(cfg, env, ckpt, settings)
    finally:
        cleanup()


def _fit(cfg: TrainConfig, env: DistEnv, ckpt: Checkpoint | None, settings: Any) -> dict[str, Any]:
    say = _Printer(env)
    seed_everything(cfg.seed + env.rank)
    precision = Precision(cfg.amp, env.device)
    if cfg.sync_bn and env.distributed and env.device.type != "cuda":
        raise ValueError("--sync_bn needs CUDA: torch's SyncBatchNorm does not run on CPU (drop --sync_bn)")

    # -- everything that can fail on bad input, before anything is written --
    train_ds, val_ds, num_classes = build_datasets(cfg, need_train=True)
    if ckpt is not None:
        check_classes(ckpt, settings, val_ds, _data_desc(cfg))
    model = build_model(cfg, num_classes, checkpoint=ckpt)
    model.train()
    if not _foldable(model) and is_repa_model(cfg.model):
        _logger.info("feature_norm=%s: this model cannot be reparameterized after training", cfg.feature_norm)
    record = record_of(model, cfg.model, class_names=[str(c) for c in dataset_classes(train_ds)])
    model.to(env.device)
    raw = ckpt.raw if ckpt is not None else None

    lrs = cfg.scaled_lrs(env.world_size)
    optimizer = build_optimizer(cfg, model, lrs["lr"])
    loader_gen = torch.Generator()
    train_loader, val_loader = build_loaders(cfg, env, train_ds, val_ds, loader_gen)
    updates_per_epoch = len(train_loader) // cfg.accumulation_steps
    if updates_per_epoch == 0:
        per_update = cfg.batch_size * cfg.accumulation_steps * env.world_size
        raise ValueError(
            f"the training split has {len(train_ds)} images, fewer than one update needs "
            f"(batch_size x accumulation_steps x processes = {per_update}); lower --batch_size"
        )
    scheduler = build_scheduler(cfg, optimizer, lrs, updates_per_epoch)
    criterion = build_criterion(cfg)
    mixup_fn = build_mixup(cfg, num_classes)

    ema = None
    if cfg.model_ema:
        ema = ModelEmaV3(
            model, decay=cfg.model_ema_decay, device=torch.device("cpu") if cfg.model_ema_force_cpu else None
        )
    start_epoch, max_accuracy = cfg.start_epoch, -1.0
    if raw is not None and all(k in raw for k in ("optimizer", "lr_scheduler", "epoch")):
        optimizer.load_state_dict(raw["optimizer"])
        scheduler.load_state_dict(raw["lr_scheduler"])
        old = raw.get("config") if isinstance(raw.get("config"), dict) else {}
        changed = [k for k in _SCHEDULE_KEYS if k in old and old[k] != getattr(cfg, k)]
        if changed:
            _logger.warning(
                "resuming keeps the checkpoint's learning-rate schedule; these settings differ from it and do not "
                "change the schedule: %s",
                ", ".join(f"{k} {old[k]} -> {getattr(cfg, k)}" for k in changed),
            )
        if ema is not None and raw.get("model_ema"):
            load_checkpoint(ema.module, raw["model_ema"])
        if precision.scaler is not None and raw.get("scaler"):
            precision.scaler.load_state_dict(raw["scaler"])
        start_epoch = int(raw["epoch"]) + 1
        max_accuracy = float(raw.get("max_accuracy", -1.0))
        say(f"resumed from {cfg.resume}: {start_epoch} epoch(s) done, continuing with epoch {start_epoch + 1}")
    elif ckpt is not None:
        say(f"loaded weights from {cfg.resume} (no training state: starting at epoch {start_epoch})")
    if start_epoch >= cfg.epochs:
        raise ValueError(f"nothing to train: the run is at epoch {start_epoch} and --epochs is {cfg.epochs}")
    scheduler.step_update(start_epoch * updates_per_epoch)

    if cfg.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    unwrapped = model
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # -- from here on, write --
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if out is not None and env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
    barrier(env)

    n_params = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    effective = {
        **lrs,
        "world_size": env.world_size,
        "global_batch_size": cfg.batch_size * cfg.accumulation_steps * env.world_size,
        "updates_per_epoch": updates_per_epoch,
        "device": str(env.device),
        "amp": precision.mode,
        "launcher": env.launcher,
    }
    say(
        f"{cfg.model}: {n_params / 1e6:.2f} M trainable parameters; {env.world_size} process(es) on "
        f"{env.device.type} ({env.launcher}); global batch {effective['global_batch_size']}, "
        f"lr {lrs['lr']:.3g} (min {lrs['min_lr']:.3g}, warmup {lrs['warmup_lr']:.3g})"
    )
    info = complexity(unwrapped, cfg.input_size) if env.is_main else {}
    _print_complexity(say, info)
    tracker = None
    if cfg.wandb and env.is_main:
        wandb_cfg = {**cfg.to_dict(), **{f"effective_{k}": v for k, v in effective.items()}}
        tracker = WandbRun(cfg.model, cfg.wandb_suffix, cfg.wandb_entity, wandb_cfg, cfg.output_dir or None)

    say(f"Start training for {cfg.epochs} epochs")
    t_start = time.perf_counter()
    history: list[dict[str, Any]] = []
    test_stats: dict[str, float] = {}
    ema_stats: dict[str, float] | None = None
    sharded = env.distributed and cfg.dist_eval
    for epoch in range(start_epoch, cfg.epochs):
        s = epoch_seed(cfg.seed, epoch, env.rank)
        seed_everything(s)
        loader_gen.manual_seed(s)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model,
            criterion,
            train_loader,
            optimizer,
            scheduler,
            precision,
            env,
            epoch,
            updates_per_epoch,
            accumulation_steps=cfg.accumulation_steps,
            clip_grad=cfg.clip_grad,
            model_ema=ema,
            mixup_fn=mixup_fn,
            desc=f"Epoch [{epoch + 1}/{cfg.epochs}]",
            log_freq=cfg.log_freq,
        )
        if env.distributed:
            # DDP broadcasts BN buffers from rank 0 at each forward, so after the last step every process holds
            # its own running statistics: average them, so that all processes evaluate and save the same model.
            distribute_bn(unwrapped, env.world_size, reduce=True)
            if ema is not None and (env.backend != "nccl" or not cfg.model_ema_force_cpu):
                distribute_bn(ema.module, env.world_size, reduce=True)
        test_stats = evaluate(unwrapped, val_loader, env, sharded=sharded, log_freq=cfg.log_freq)
        ema_stats = evaluate(ema.module, val_loader, env, sharded=sharded, desc="Test (EMA)") if ema else None
        bad = _pop_bad_images(train_ds, val_ds, env)
        if bad["train_bad_images"] or bad["test_bad_images"]:
            say(
                f"Epoch {epoch + 1}: skipped {bad['train_bad_images']} unreadable training and "
                f"{bad['test_bad_images']} unreadable test images (see the warnings; --fatal_bad_images stops instead)"
            )
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        say(
            f"Epoch {epoch + 1}/{cfg.epochs}: train loss {train_stats['loss']:.4f}; accuracy of the network on the "
            f"{test_stats['images']} test images: top-1 {test_stats['acc1']:.2f}%, top-5 {test_stats['acc5']:.2f}%"
            + (f"; EMA top-1 {ema_stats['acc1']:.2f}%" if ema_stats else "")
            + f"; max accuracy {max_accuracy:.2f}%"
        )
        if out is not None and env.is_main:
            state = {
                "model_ema": ema.module.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
                "epoch": epoch,
                "max_accuracy": max_accuracy,
                "metrics": _metrics(cfg, epoch, test_stats, ema_stats),
                "config": cfg.to_dict(),
            }
            weights = unwrapped.state_dict()
            save_checkpoint(out / "checkpoint.pth", weights, record, state)
            if (epoch + 1) % cfg.save_freq == 0:
                save_checkpoint(out / f"checkpoint_{epoch + 1}epoch.pth", weights, record, state)
            if improved:
                save_checkpoint(out / "best_checkpoint.pth", weights, record, state)
        row = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items()},
            **({f"ema_test_{k}": v for k, v in ema_stats.items()} if ema_stats else {}),
            **bad,
            "epoch": epoch,
            "n_parameters": n_params,
        }
        history.append(row)
        if out is not None and env.is_main:
            _append_line(out / "log.txt", row)
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

    fingerprints = gather_objects(state_fingerprint(unwrapped), env)
    identical = len(set(fingerprints)) == 1
    if not identical:
        _logger.warning("weights differ across processes: %s", fingerprints)
    summary: dict[str, Any] = {
        "model": cfg.model,
        "epochs": cfg.epochs,
        "final": test_stats,
        "final_ema": ema_stats,
        "max_accuracy": max_accuracy,
        "train_time_s": time.perf_counter() - t_start,
        "effective": effective,
        "complexity": info,
        "rank_fingerprints": fingerprints,
        "weights_identical_across_ranks": identical,
        "wandb_project": tracker.project if tracker else None,
    }
    if cfg.reparam:
        fused = reparameterize_model(unwrapped)
        rep_stats = evaluate(fused, val_loader, env, sharded=sharded, desc="Test (reparameterized)")
        summary["final_reparam"] = rep_stats
        say(
            f"reparameterized: top-1 {rep_stats['acc1']:.2f}%, top-5 {rep_stats['acc5']:.2f}% "
            f"({'identical to' if rep_stats['acc1'] == test_stats['acc1'] else 'differs from'} the training form)"
        )
        if out is not None and env.is_main:
            fused_record = record_of(fused, cfg.model, record.model_args, record.class_names)
            metrics = {**_metrics(cfg, cfg.epochs - 1, rep_stats, None), "form": "reparameterized"}
            save_checkpoint(out / "checkpoint_reparam.pth", fused.state_dict(), fused_record, {"metrics": metrics})
    if out is not None and env.is_main:
        _write_json(out / "summary.json", summary)
    if tracker is not None:
        tracker.finish()
    total = time.perf_counter() - t_start
    say(f"Training time {int(total // 3600)}:{int(total % 3600 // 60):02d}:{int(total % 60):02d}")
    return summary


def _metrics(cfg: TrainConfig, epoch: int, stats: dict[str, Any], ema_stats: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation stored with a checkpoint's weights (model cards and ``repavit eval`` read it)."""
    metrics = {k: stats[k] for k in ("acc1", "acc5", "loss", "images") if k in stats}
    metrics.update(epoch=epoch, data_set=cfg.data_set)
    if ema_stats:
        metrics["ema_acc1"] = ema_stats["acc1"]
    return metrics


# ---- evaluation -----------------------------------------------------------------------------------
def evaluate_checkpoint(cfg: TrainConfig) -> dict[str, Any]:
    """``--eval``: top-1/top-5 of ``--resume`` (optionally reparameterized) on the validation split."""
    env = init_distributed(cfg.device, cfg.dist_backend)
    try:
        _quiet_other_ranks(env)
        say = _Printer(env)
        cfg, ckpt, settings = _open_resume(cfg)
        check_model_name(cfg)
        _, val_ds, num_classes = build_datasets(cfg, need_train=False)
        if ckpt is None:
            _logger.warning("--eval without --resume: evaluating randomly initialized weights")
        else:
            check_classes(ckpt, settings, val_ds, _data_desc(cfg))
        # a fused checkpoint is evaluated as it is; --reparam folds a training-form one
        model = build_model(
            cfg, num_classes, checkpoint=ckpt, reparameterized=True if cfg.reparam else None, use_ema=cfg.eval_ema
        )
        reparameterized = _is_fused(model)
        model.to(env.device).eval()
        _, val_loader = build_loaders(cfg, env, None, val_ds, torch.Generator())
        info = complexity(model, cfg.input_size) if env.is_main else {}
        if reparameterized and env.is_main:
            say("evaluating the reparameterized model")
        _print_complexity(say, info)
        stats = evaluate(model, val_loader, env, sharded=env.distributed and cfg.dist_eval, log_freq=cfg.log_freq)
        say(
            f"Accuracy of the network on the {stats['images']} test images: "
            f"top-1 {stats['acc1']:.2f}%, top-5 {stats['acc5']:.2f}%"
        )
        result = {
            "model": cfg.model,
            "checkpoint": cfg.resume or None,
            "reparameterized": reparameterized,
            "ema": cfg.eval_ema,
            **stats,
            "params_m": count_params(model) / 1e6,
            "complexity": info,
        }
        say(json.dumps({k: result[k] for k in ("acc1", "acc5", "loss", "images", "reparameterized")}))
        if cfg.output_dir and env.is_main:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            name = "eval" + ("_reparam" if reparameterized else "") + ("_ema" if cfg.eval_ema else "") + ".json"
            _write_json(out / name, result)
            say(f"wrote {out / name}")
        return result
    finally:
        cleanup()


# ---- speed ----------------------------------------------------------------------------------------
def speed_test(cfg: TrainConfig) -> dict[str, Any]:
    """``--test_speed``: images/s of the chosen form (three measurements, as the authors print them)
    and of the other form, timed interleaved in the same process, with their ratio. No dataset needed."""
    env = init_distributed(cfg.device, cfg.dist_backend)
    try:
        _quiet_other_ranks(env)
        say = _Printer(env)
        cfg, ckpt, _ = _open_resume(cfg)
        check_model_name(cfg)
        result: dict[str, Any] = {}
        if env.is_main:
            result = _speed(cfg, env, say, ckpt)
        barrier(env)
        return result
    finally:
        cleanup()


def _speed(cfg: TrainConfig, env: DistEnv, say: _Printer, ckpt: Checkpoint | None) -> dict[str, Any]:
    training_form = ckpt is None or ckpt.form != "fused"
    if not training_form and not cfg.reparam:
        raise ValueError(f"{ckpt.name} holds reparameterized weights: add --reparam to time them")
    model = build_model(cfg, cfg.nb_classes or 1000, checkpoint=ckpt, reparameterized=not training_form)
    model = model.to(env.device).eval()
    forms: dict[str, nn.Module] = {"train": model} if training_form else {"reparam": model}
    if _foldable(model):
        forms["reparam"] = reparameterize_model(model)
    chosen = "reparam" if cfg.reparam else "train"
    names = {"train": "training form", "reparam": "reparameterized"}
    info = {k: {"params_m": count_params(m) / 1e6, "gmacs": count_gmacs(m, cfg.input_size)} for k, m in forms.items()}
    _print_complexity(say, {("before" if k == "train" else "after"): v for k, v in info.items()})
    x = torch.rand(cfg.speed_batch_size, 3, cfg.input_size, cfg.input_size, device=env.device)
    say(
        f"Start inference speed testing ({names[chosen]}, batch {cfg.speed_batch_size}, {cfg.speed_iters} passes "
        f"per measurement, fp32, {env.device})..."
    )
    fns = {k: (lambda m=m: m(x)) for k, m in forms.items()}
    samples = interleaved_throughput(
        fns, cfg.speed_batch_size, rounds=3, iters=cfg.speed_iters, warmup=1, device=env.device
    )
    for v in samples[chosen]:
        say(f"inference_speed: {v:.1f} images/s")
    med = {k: float(np.median(v)) for k, v in samples.items()}
    result: dict[str, Any] = {
        "model": cfg.model,
        "device": str(env.device),
        "batch_size": cfg.speed_batch_size,
        "iters": cfg.speed_iters,
        "form": chosen,
        "images_per_s": samples,
        "median_images_per_s": med,
        "complexity": info,
    }
    if len(forms) == 2:
        other = "train" if chosen == "reparam" else "reparam"
        ratio = med["reparam"] / med["train"]
        result["speedup_reparam_over_train"] = ratio
        say(f"{names[other]}: {med[other]:.1f} images/s (median); reparameterized / training form = {ratio:.3f}x")
    else:
        why = "the checkpoint is reparameterized" if chosen == "reparam" else "no fused form"
        say(f"(only one form to time: {why})")
    if not all(math.isfinite(v) for v in med.values()):
        raise RuntimeError("speed measurement failed (non-finite throughput)")
    return result
