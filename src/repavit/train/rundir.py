"""The output folder of a training run: locked while a run writes to it, never mixed with another run.

* :meth:`RunDir.lock` takes an OS file lock (``fcntl.flock`` on ``<output_dir>/.lock``), released by
  the OS on any exit, ``kill -9`` included (the file then stays, empty of meaning: the lock is the
  kernel's). The file names the host, PID and start time of the holder, so a second run into the
  folder fails in one line saying who holds it. A clean exit removes it.
* :meth:`RunDir.decide` refuses a folder that holds another run unless the user continues it
  (``--resume auto``: its last good checkpoint, or a fresh start if it has none, which is what a
  requeued Slurm job needs) or replaces it (``--overwrite``).
* Temporary files that a killed writer left (``.<name>.<random>.tmp``) are removed at start.
* ``log.txt`` is only ever appended to: a resumed run adds a ``{"event": "resumed", ...}`` line, and
  the epoch lines a kill between the checkpoint and the log line lost are restored from the checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, UserError
from ..models import read_checkpoint

__all__ = ["RUN_FILES", "RunDir"]

_logger = logging.getLogger(__name__)

# What a run writes into its folder (eval*.json of `repavit eval --output_dir` are not a run's).
RUN_FILES = (
    "config.yaml",
    "log.txt",
    "summary.json",
    "checkpoint.pth",
    "checkpoint_stopped.pth",
    "best_checkpoint.pth",
    "checkpoint_reparam.pth",
)
_EPOCH_CHECKPOINT = re.compile(r"^checkpoint_(\d+)epoch\.pth$")
_STALE_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")  # atomic_write's temporary files
LOCK_NAME = ".lock"


class RunDir:
    """One run's output folder (see the module docstring). Used by the main process only."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_file: Any = None
        self.pending_clear = False  # --overwrite: clear the old run once the new one has passed its checks

    # ---- the lock ---------------------------------------------------------------------------------
    @property
    def locked(self) -> bool:
        return self._lock_file is not None

    def lock(self) -> None:
        """Create the folder if needed and lock it; a folder locked by another run is a :class:`UserError`."""
        if self.path.exists() and not self.path.is_dir():
            raise ArgumentError("{output_dir} {v0} is a file, not a folder", v0=self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK_NAME
        for _ in range(10):
            f = open(lock_path, "a+")  # held open for the run's lifetime
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise UserError(
                    f"--output_dir {self.path} is in use by another run ({holder}); wait for it to finish or choose "
                    "another --output_dir"
                ) from None
            try:
                same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and our lock: take the new one
                break
            f.close()
        else:
            raise ArgumentError("could not lock {output_dir} {v0}: its lock file keeps changing", v0=self.path)
        self._lock_file = f  # from here unlock() releases it, whatever fails next
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, PID {os.getpid()}, since {started}\n")
        f.flush()

    def unlock(self) -> None:
        """Release the lock and remove the lock file (a process that opened it meanwhile notices, see lock)."""
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # ---- what the folder holds --------------------------------------------------------------------
    def run_files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(
            p for p in self.path.iterdir() if p.is_file() and (p.name in RUN_FILES or _EPOCH_CHECKPOINT.match(p.name))
        )

    def epoch_checkpoints(self) -> list[Path]:
        """``checkpoint_{N}epoch.pth`` files, newest epoch first."""
        found = [(int(m.group(1)), p) for p in self.run_files() if (m := _EPOCH_CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def finished(self, epochs: int) -> bool:
        """The run wrote its summary after at least ``epochs`` epochs: there is nothing left to do."""
        try:
            summary = json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(summary, dict) and isinstance(summary.get("epochs"), int) and summary["epochs"] >= epochs

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint a continued run starts from: ``checkpoint_stopped.pth`` (a stop inside an epoch), else
        ``checkpoint.pth``, else the newest ``checkpoint_{N}epoch.pth`` that reads (a damaged file is reported and
        skipped)."""
        candidates = [self.path / "checkpoint_stopped.pth", self.path / "checkpoint.pth", *self.epoch_checkpoints()]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                raw = read_checkpoint(path, mmap=True)  # a quick look: the tensors stay on disk
            except (UserError, OSError) as e:
                _logger.warning("skipping %s: %s", path, e)
                continue
            if "optimizer" in raw and "epoch" in raw:
                return path
            _logger.warning("skipping %s: it holds no training state", path)
        return None

    def describe(self) -> str:
        rows = [r for r in self.log_rows() if "event" not in r]
        names = ", ".join(p.name for p in self.run_files()[:4])
        done = f"{len(rows)} epoch(s) logged" if rows else "no epoch logged"
        finished = "finished" if (self.path / "summary.json").is_file() else "not finished"
        return f"{done}, {finished}; {names}{', ...' if len(self.run_files()) > 4 else ''}"

    def clean_stale(self) -> int:
        """Remove temporary files a killed writer left behind; returns how many (call with the lock held)."""
        removed = 0
        for p in self.path.iterdir():
            if p.is_file() and _STALE_TMP.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed += 1
        if removed:
            _logger.info("removed %d temporary file(s) left by an interrupted write in %s", removed, self.path)
        return removed

    def clear(self) -> None:
        """Delete the run's files (``--overwrite``); other files in the folder are left alone."""
        for p in self.run_files():
            p.unlink()

    def decide(self, resume: str, overwrite: bool) -> str:
        """The checkpoint to resume from (``""``: a fresh start), after refusing a folder that holds another run.

        ``--overwrite`` only marks the old run for deletion (:attr:`pending_clear`): it is deleted once the new
        run has passed every check on its input.
        """
        inside = bool(resume) and resume != "auto" and Path(resume).resolve().parent == self.path.resolve()
        if overwrite and (resume == "auto" or inside):
            raise ArgumentError("{overwrite} replaces the run in {output_dir}; it cannot be combined with resuming it")
        if resume == "auto":
            latest = self.latest_checkpoint()
            if latest is None and self.run_files():
                _logger.info(
                    "--resume auto: no usable checkpoint in %s; starting the run from the beginning", self.path
                )
            elif latest is None:
                _logger.info("--resume auto: %s holds no run yet; starting a new one", self.path)
            return str(latest) if latest else ""
        if overwrite:
            if self.run_files():
                _logger.warning("--overwrite: the run in %s (%s) will be deleted", self.path, self.describe())
            self.pending_clear = True
            return resume
        if self.run_files() and not inside:
            raise UserError(
                f"--output_dir {self.path} holds a run ({self.describe()}): continue it with --resume auto, "
                "replace it with --overwrite, or choose another --output_dir"
            )
        return resume

    # ---- the log ----------------------------------------------------------------------------------
    def log_rows(self) -> list[dict[str, Any]]:
        """The lines of ``log.txt`` that parse (a line cut by a kill is skipped)."""
        path = self.path / "log.txt"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def append_log(self, row: dict[str, Any]) -> None:
        """Append one JSON line (after a newline, if a kill cut the last line short), and fsync."""
        path = self.path / "log.txt"
        cut = False
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
        with open(path, "a") as f:
            f.write(("\n" if cut else "") + json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def restore_log(self, history: list[dict[str, Any]]) -> None:
        """Append the epoch lines of ``history`` (from a checkpoint) that ``log.txt`` lacks."""
        logged = {r.get("epoch") for r in self.log_rows() if "event" not in r}
        for row in history:
            if row.get("epoch") not in logged:
                self.append_log(row)
