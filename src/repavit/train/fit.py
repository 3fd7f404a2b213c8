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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ArgumentError, UserError
from ..measure import (
    HALF_DTYPES,
    attention_kernels,
    count_gmacs,
    count_params,
    inference_precision,
    interleaved_throughput,
    peak_memory_mb,
)
from ..models import Checkpoint, foldable, open_checkpoint, reparameterize_model
from ..utils import write_json
from .builders import (
    build_datasets,
    build_loaders,
    build_model,
    check_classes,
    check_model_name,
    data_desc,
    settings_from_checkpoint,
)
from .config import TrainConfig
from .distributed import (
    DistEnv,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
)
from .engine import evaluate
from .rundir import RunDir
from .tracking import WandbRun, check_wandb_env
from .trainer import Trainer

__all__ = ["evaluate_checkpoint", "fit", "run", "speed_test"]

_logger = logging.getLogger(__name__)


# ---- shared helpers -----------------------------------------------------------------------------
class _Printer:
    """``print`` on the main process only (results go to stdout; progress goes through logging)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    def __call__(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)


def _quiet_other_ranks(env: DistEnv) -> None:
    if not env.is_main:
        logging.getLogger("repavit").setLevel(logging.WARNING)


def complexity(model: nn.Module, img_size: int) -> dict[str, dict[str, float]]:
    """Parameters (M) and GMACs (attention matmuls included) before and, if possible, after reparameterization.

    An already reparameterized model only has the ``"after"`` entry.
    """
    probe = copy.deepcopy(model).eval()
    stats = {"params_m": count_params(probe) / 1e6, "gmacs": count_gmacs(probe, img_size)}
    if getattr(probe, "reparameterized", False):
        return {"after": stats}
    out = {"before": stats}
    if foldable(probe):
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


def _open_resume(cfg: TrainConfig) -> tuple[TrainConfig, Checkpoint | None, Any]:
    """Open ``--resume`` and take the model settings it records (before any data or model is built)."""
    if not cfg.resume:
        return cfg, None, None
    if cfg.resume == "auto":
        raise ArgumentError("{resume} auto continues a training run; {eval} and {test_speed} need a checkpoint path")
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

    Writes into ``cfg.output_dir`` (main process, under the folder's lock): ``config.yaml``,
    ``checkpoint.pth`` after every epoch, ``checkpoint_{N}epoch.pth`` every ``save_freq`` epochs,
    ``best_checkpoint.pth``, ``log.txt`` (one JSON line per epoch, only ever appended to) and
    ``summary.json``. A run stopped by SIGTERM, SIGINT or SIGUSR1 saves ``checkpoint.pth`` with its
    position in the epoch and returns ``{"stopped": {...}}`` instead of a summary.
    """
    if cfg.wandb:
        check_wandb_env()
    env = init_distributed(cfg.device, cfg.dist_backend)
    run_dir = None
    try:
        _quiet_other_ranks(env)
        say = _Printer(env)
        cfg, run_dir = _claim_output(cfg, env)
        if run_dir is not None and cfg.resume == "auto":  # --resume auto on a run that has finished
            say(f"the run in {run_dir.path} is finished (see its summary.json): nothing to do")
            return {"finished": str(run_dir.path)}
        cfg, ckpt, settings = _open_resume(cfg)
        check_model_name(cfg)
        if cfg.sync_bn and env.device.type != "cuda":
            raise ArgumentError("{sync_bn} needs CUDA: torch's SyncBatchNorm does not run on CPU (drop {sync_bn})")
        if cfg.sync_bn and not env.distributed:
            _logger.warning("--sync_bn has no effect in a single process (there is nothing to synchronize)")
        trainer = Trainer(cfg, env, ckpt, settings, run_dir, say)
        effective = {
            **trainer.lrs,
            "world_size": env.world_size,
            "global_batch_size": cfg.batch_size * cfg.accumulation_steps * env.world_size,
            "updates_per_epoch": trainer.updates_per_epoch,
            "device": str(env.device),
            "amp": trainer.precision.mode,
            "launcher": env.launcher,
            "backend": env.backend,
            "sync_bn": bool(cfg.sync_bn and env.distributed),
            "channels_last": cfg.channels_last,
        }
        group = f", {env.backend}" if env.backend else ""
        say(
            f"{cfg.model}: {trainer.n_params / 1e6:.2f} M trainable parameters; {env.world_size} process(es) on "
            f"{env.device.type} ({env.launcher}{group}); global batch {effective['global_batch_size']}, "
            f"lr {trainer.lrs['lr']:.3g} (min {trainer.lrs['min_lr']:.3g}, warmup {trainer.lrs['warmup_lr']:.3g})"
        )
        info = complexity(trainer.unwrapped, cfg.input_size) if env.is_main else {}
        _print_complexity(say, info)
        tracker = None
        if cfg.wandb and env.is_main:
            wandb_cfg = {**cfg.to_dict(), **{f"effective_{k}": v for k, v in effective.items()}}
            tracker = WandbRun(cfg.model, cfg.wandb_suffix, cfg.wandb_entity, wandb_cfg, cfg.output_dir or None)
        return trainer.run(tracker, effective, info)
    finally:
        if run_dir is not None:
            run_dir.unlock()
        cleanup()


def _claim_output(cfg: TrainConfig, env: DistEnv) -> tuple[TrainConfig, RunDir | None]:
    """Lock ``--output_dir`` and decide what to resume from (``--resume auto``, ``--overwrite``), before anything
    else; every process learns the decision (or the error) of the main one."""
    if not cfg.output_dir:
        if cfg.resume == "auto":
            raise ArgumentError("{resume} auto continues the run in {output_dir}: give {output_dir}")
        if env.is_main:
            _logger.warning("no --output_dir: nothing will be saved (no checkpoint, log or summary)")
        return cfg, None
    run_dir, decision = None, None
    if env.is_main:
        try:
            run_dir = RunDir(cfg.output_dir)
            if run_dir.path.exists():  # a new folder is created (and locked) only once every check has passed
                run_dir.lock()
                finished = cfg.resume == "auto" and run_dir.finished(cfg.epochs) and not cfg.overwrite
                decision = ("ok", "auto" if finished else run_dir.decide(cfg.resume, cfg.overwrite))
                run_dir.clean_stale()
            else:
                decision = ("ok", "" if cfg.resume == "auto" else cfg.resume)
        except (UserError, OSError) as e:
            decision = ("error", e)
            if run_dir is not None:
                run_dir.unlock()
    decision = gather_objects(decision, env)[0] if env.distributed else decision
    kind, value = decision  # type: ignore[misc]
    if kind == "error":
        raise value
    if value != cfg.resume:
        cfg = cfg.with_given(cfg.given, resume=value)
    return cfg, run_dir


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
            check_classes(ckpt, settings, val_ds, data_desc(cfg))
        # a fused checkpoint is evaluated as it is; --reparam folds a training-form one
        model = build_model(
            cfg, num_classes, checkpoint=ckpt, reparameterized=True if cfg.reparam else None, use_ema=cfg.eval_ema
        )
        reparameterized = bool(getattr(model, "reparameterized", False))
        model.to(env.device).eval()
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        _, val_loader = build_loaders(cfg, env, None, val_ds, torch.Generator())
        info = complexity(model, cfg.input_size) if env.is_main else {}
        if reparameterized and env.is_main:
            say("evaluating the reparameterized model")
        _print_complexity(say, info)
        sharded = env.distributed and cfg.dist_eval
        stats = evaluate(
            model, val_loader, env, sharded=sharded, log_freq=cfg.log_freq, channels_last=cfg.channels_last
        )
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
            write_json(out / name, result)
            say(f"wrote {out / name}")
        return result
    finally:
        cleanup()


# ---- speed ----------------------------------------------------------------------------------------
def speed_test(cfg: TrainConfig) -> dict[str, Any]:
    """``--test_speed``: images/s of the chosen form (three measurements, as the authors print them)
    and of the other form, timed interleaved in the same process, with their ratio. No dataset needed.
    With ``--output_dir`` the result is also written to ``speed.json`` there."""
    env = init_distributed(cfg.device, cfg.dist_backend)
    try:
        _quiet_other_ranks(env)
        say = _Printer(env)
        cfg, ckpt, _ = _open_resume(cfg)
        check_model_name(cfg)
        result: dict[str, Any] = {}
        if env.is_main:
            result = _speed(cfg, env, say, ckpt)
            if cfg.output_dir:  # beside what the folder holds; replaces an earlier speed test's
                path = Path(cfg.output_dir) / "speed.json"
                write_json(path, result)
                say(f"wrote {path}")
        barrier(env)
        return result
    finally:
        cleanup()


SPEED_BUDGET_S = 60.0  # what the speed test aims to take on a CPU when --speed_batch_size/--speed_iters are not given


def _speed_size(cfg: TrainConfig, env: DistEnv, forms: dict[str, nn.Module]) -> tuple[int, int]:
    """``(batch, passes per measurement)``: the flags; else the authors' 128 x 100 on a GPU; else, on a CPU,
    sized from one timed pass so that 3 rounds of every form take about :data:`SPEED_BUDGET_S`."""
    if env.device.type == "cuda" or (cfg.speed_batch_size and cfg.speed_iters):
        return cfg.speed_batch_size or 128, cfg.speed_iters or 100
    probe_batch = cfg.speed_batch_size or 8
    x = torch.rand(probe_batch, 3, cfg.input_size, cfg.input_size, device=env.device)
    with torch.inference_mode():
        per_image = 0.0
        for m in forms.values():
            m(x)  # warm-up
            t0 = time.perf_counter()
            m(x)
            per_image += (time.perf_counter() - t0) / probe_batch
    per_pass_budget = SPEED_BUDGET_S / 4  # 3 rounds and the warm-up; per_image already sums the forms
    batch = cfg.speed_batch_size or int(min(64, max(1, per_pass_budget / 5 / max(per_image, 1e-9))))
    iters = cfg.speed_iters or int(
        min(100, max(1, (per_pass_budget - batch * per_image) / (batch * max(per_image, 1e-9))))
    )
    _logger.info(
        "CPU speed test sized to about %.0f s: batch %d, %d passes per measurement (the authors' GPU setting is "
        "--speed_batch_size 128 --speed_iters 100)",
        (3 * iters + 1) * batch * per_image,
        batch,
        iters,
    )
    return batch, iters


def _speed(cfg: TrainConfig, env: DistEnv, say: _Printer, ckpt: Checkpoint | None) -> dict[str, Any]:
    training_form = ckpt is None or ckpt.form != "fused"
    if not training_form and not cfg.reparam:
        raise ArgumentError("{v0} holds reparameterized weights: add {reparam} to time them", v0=ckpt.name)
    model = build_model(cfg, cfg.nb_classes or 1000, checkpoint=ckpt, reparameterized=not training_form)
    model = model.to(env.device).eval()
    forms: dict[str, nn.Module] = {"train": model} if training_form else {"reparam": model}
    if foldable(model):
        forms["reparam"] = reparameterize_model(model)
    chosen = "reparam" if cfg.reparam else "train"
    names = {"train": "training form", "reparam": "reparameterized"}
    info = {k: {"params_m": count_params(m) / 1e6, "gmacs": count_gmacs(m, cfg.input_size)} for k, m in forms.items()}
    _print_complexity(say, {("before" if k == "train" else "after"): v for k, v in info.items()})
    if cfg.channels_last:
        forms = {k: m.to(memory_format=torch.channels_last) for k, m in forms.items()}
    batch, iters = _speed_size(cfg, env, forms)
    x = torch.rand(batch, 3, cfg.input_size, cfg.input_size, device=env.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = cfg.amp if cfg.amp in HALF_DTYPES else "off"  # the authors time fp32; half precision when asked
    label = "fp32" if amp == "off" else f"{amp} autocast, SDPA flash kernel preferred"
    say(f"Start inference speed testing ({names[chosen]}, batch {batch}, {iters} passes per measurement, {label}, "
        f"{env.device})...")  # fmt: skip
    fns = {k: (lambda m=m: m(x)) for k, m in forms.items()}
    with torch.inference_mode(), inference_precision(amp, env.device):
        kernels = attention_kernels(fns[chosen])
        samples = interleaved_throughput(
            fns, batch, rounds=3, iters=iters, warmup=1, device=env.device, desc="speed test"
        )
        # the CUDA allocator's peak of one pass (the CPU profiler's timeline would cost a slow pass)
        peak = {k: peak_memory_mb(f, env.device) for k, f in fns.items()} if env.device.type == "cuda" else None
    for v in samples[chosen]:
        say(f"inference_speed: {v:.1f} images/s")
    med = {k: float(np.median(v)) for k, v in samples.items()}
    result: dict[str, Any] = {
        "model": cfg.model,
        "device": str(env.device),
        "batch_size": batch,
        "iters": iters,
        "form": chosen,
        "precision": amp,
        "attention_kernels": kernels,
        "peak_memory_mb": peak,
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
