"""Progress reporting: a tqdm bar on a terminal, periodic plain log lines otherwise; main process only."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ..utils import format_eta

__all__ = ["Progress", "format_eta"]

_logger = logging.getLogger(__name__)


class Progress:
    """Reports ``update(n_images, **metrics)`` calls for one loop (an epoch, or an evaluation).

    Args:
        total: number of steps in the loop.
        desc: prefix, e.g. ``"Epoch [3/300]"``.
        enabled: False on non-main processes (prints nothing).
        log_freq: steps between plain log lines (when stderr is not a terminal).
        world_size: images/s are per process times this.
        use_bar: force the bar on/off (default: on iff stderr is a terminal).
        start: steps already done (a loop resumed in the middle); rates and ETA count from here.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        log_freq: int = 10,
        world_size: int = 1,
        use_bar: bool | None = None,
        start: int = 0,
    ) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.log_freq, self.world_size = max(log_freq, 1), world_size
        self.step = self.start = start
        self.images = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and (sys.stderr.isatty() if use_bar is None else use_bar):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)

    def update(self, n_images: int, **metrics: Any) -> None:
        self.step += 1
        self.images += n_images
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.images * self.world_size / max(elapsed, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix({**{k: _fmt(v) for k, v in metrics.items()}, "img/s": f"{rate:.0f}"}, refresh=False)
            self.bar.update(1)
        elif self.step % self.log_freq == 0 or self.step == self.total:
            eta = elapsed / (self.step - self.start) * (self.total - self.step)
            parts = [f"{k} {_fmt(v)}" for k, v in metrics.items()]
            _logger.info(
                "%s step %d/%d  %s  %.0f img/s  eta %s",
                self.desc,
                self.step,
                self.total,
                "  ".join(parts),
                rate,
                format_eta(eta),
            )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)
