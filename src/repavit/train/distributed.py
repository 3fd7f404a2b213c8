"""Process-group setup for torchrun and Slurm, on ``gloo`` (CPU) or ``nccl`` (CUDA).

* torchrun (and ``torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``.
* ``srun python main.py ...`` sets ``SLURM_PROCID``, ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS`` inside
  a step) and ``SLURM_LOCALID``; the job script exports ``MASTER_ADDR`` and ``MASTER_PORT``
  (see ``scripts/exec_config.sh``).
* Anything else is a single process, and no process group is created.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..measure import check_device

__all__ = [
    "DistEnv",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "detect_launcher",
    "gather_objects",
    "init_distributed",
    "resolve_device",
    "state_fingerprint",
]

_logger = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """Where this process stands in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # "torchrun", "slurm" or "single"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """Several processes, or one process in a process group (an explicit backend under a launcher)."""
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise UserError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def detect_launcher(environ: Mapping[str, str] | None = None) -> tuple[str, int, int, int]:
    """Return ``(launcher, rank, world_size, local_rank)`` from the environment."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return ("torchrun" if world > 1 else "single"), rank, world, local
    if "SLURM_PROCID" in env:
        key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _int_env(env, key) if key in env else 1
        rank = _int_env(env, "SLURM_PROCID")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        return ("slurm" if world > 1 else "single"), rank, world, local
    return "single", 0, 1, 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; bare ``cuda`` -> this process's GPU (local rank modulo
    the GPUs); anything this machine lacks is a one-line error (:func:`~repavit.measure.check_device`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Detect the launcher, pick the device and create the process group when there are several processes.

    One process started by torchrun or Slurm runs without a process group, unless ``backend`` is given
    (``nccl``, ``gloo``): then it gets one of size 1, with DDP and SyncBatchNorm as in a multi-GPU run,
    which is how one GPU exercises the multi-GPU code path.
    """
    launcher, rank, world, local = detect_launcher()
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside a world of {world} processes")
    dev = resolve_device(device, local)
    env = DistEnv(rank=rank, world_size=world, local_rank=local, launcher=launcher, device=dev)
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if world == 1 and not (launched and backend != "auto"):
        return env
    if world == 1:
        env.launcher = "torchrun" if "RANK" in os.environ else "slurm"
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise UserError(
                f"{launcher} run with {world} processes but {key} is not set "
                "(export MASTER_ADDR and MASTER_PORT, see scripts/exec_config.sh)"
            )
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    env.backend = backend
    if dist.is_initialized():
        return env
    # torchrun exports these already; Slurm does not.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    _logger.debug("process group up: %s rank %d/%d on %s (%s)", launcher, rank, world, dev, backend)
    return env


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a list of numbers over all processes (float64)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(values: list[float], env: DistEnv) -> list[float]:
    """The largest of each number over all processes (float64)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj: object, env: DistEnv) -> list[object]:
    """Every process's ``obj`` (picklable), in rank order."""
    if not env.distributed:
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer: equal iff the weights are bit-identical."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
