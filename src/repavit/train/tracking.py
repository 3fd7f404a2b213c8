"""Weights & Biases logging (optional: ``pip install 'repavit[wandb]'``), main process only.

As in the seed README, ``--wandb`` needs ``WANDB_MODE`` in the environment: ``online`` streams to the
dashboard, ``offline`` writes runs under ``<output_dir>/wandb`` to sync later (``wandb sync``).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from typing import Any

from ..errors import ArgumentError, UserError

__all__ = ["WandbRun", "check_wandb_env", "project_name"]

_logger = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")


def check_wandb_env() -> str:
    """Return ``WANDB_MODE``, or raise a one-line error when it is missing or unknown."""
    mode = os.environ.get("WANDB_MODE")
    if not mode:
        raise ArgumentError("{wandb} needs WANDB_MODE=online or WANDB_MODE=offline in the environment")
    if mode not in MODES:
        raise UserError(f"WANDB_MODE={mode!r} is not one of {', '.join(MODES)}")
    return mode


def project_name(model: str, suffix: str = "") -> str:
    """The model name, plus ``_<suffix>`` when a suffix is given (the authors' naming)."""
    return f"{model}_{suffix}" if suffix else model


class WandbRun:
    """A wandb run that logs one dict per epoch. Import of wandb is deferred to construction."""

    def __init__(
        self, model: str, suffix: str, entity: str, config: dict[str, Any], output_dir: str | None = None
    ) -> None:
        mode = check_wandb_env()
        try:
            import wandb
        except ModuleNotFoundError:
            raise ArgumentError("{wandb} needs the wandb package: pip install 'repavit[wandb]'") from None
        self.project = project_name(model, suffix)
        name = f"{model}_{random.SystemRandom().randint(0, 9999):04d}_{datetime.date.today()}"
        kwargs: dict[str, Any] = {"project": self.project, "name": name, "config": config, "mode": mode}
        if entity:
            kwargs["entity"] = entity
        if output_dir:
            kwargs["dir"] = output_dir
        self.run = wandb.init(**kwargs)
        _logger.info("wandb: project %s, run %s (%s)", self.project, name, mode)

    @property
    def dir(self) -> str:
        return self.run.dir

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()
