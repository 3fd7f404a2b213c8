"""Stopping a run cleanly: SIGTERM, SIGINT and SIGUSR1 become a request to stop at the next step boundary.

Slurm sends SIGTERM on preemption and at the time limit (and, with ``--signal=USR1@T``, SIGUSR1
``T`` seconds before it); Ctrl-C sends SIGINT. Instead of dying mid-step, the training loop asks
:meth:`StopRequest.requested` after every optimizer update; when it says yes, the loop saves a
checkpoint holding its position inside the epoch and returns. A second Ctrl-C aborts at once.

Under torchrun every process asks the others (one all-reduce of a flag), so all of them stop after
the same update even when the signal reached them at different times.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from .distributed import DistEnv

__all__ = ["SIGNALS", "StopRequest", "ignore_stop_signals"]

_logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave stopping to the main process, which shuts them down.

    (Without it, a SIGTERM or Ctrl-C that reaches the workers kills them mid-batch and the main
    process fails with "DataLoader worker exited unexpectedly" before it can save.)
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """A context manager that turns the stop signals into a flag (see the module docstring).

    Attributes:
        signum: the first signal received, or None.
    """

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            hint = " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
            if self.env.is_main:
                _logger.warning("%s received: stopping after the current step%s", self.name, hint)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def requested(self) -> bool:
        """Whether to stop now; under torchrun, True on every process as soon as one of them got a signal."""
        if not self.env.distributed:
            return self.signum is not None
        flag = torch.tensor([float(self.signum or 0)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the largest signal number any process received
        if flag.item() > 0 and self.signum is None:
            self.signum = int(flag.item())  # another process was told to stop
        return flag.item() > 0
