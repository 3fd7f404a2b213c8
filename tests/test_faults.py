"""Faults: kill -9, SIGTERM and Ctrl-C mid-run, a second run into the same folder, stale temporary files.

Every run here is a real `python -m repavit train` process on a tiny model and synthetic data. A run
that is interrupted and continued with `--resume auto` must end with weights bit-identical to the
same run uninterrupted; a refused run must leave its folder byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repavit.train.rundir import RunDir
from repavit.utils import atomic_write

ARGS = (
    "train --model RePaViT_Tiny --model_kwargs depth=2 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 "
    "--channel_idle --feature_norm BatchNorm --data_set SYNTH --synthetic_train_size 480 --synthetic_val_size 32 "
    "--batch_size 16 --epochs 3 --log_freq 1 --device cpu --save_freq 1"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(out: Path, *extra: str, workers: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "repavit", *ARGS, "--num_workers", str(workers), "--output_dir", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {
        **{f"model.{k}": v for k, v in ckpt["model"].items()},
        **{f"ema.{k}": v for k, v in ckpt["model_ema"].items()},
    }


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def wait_for(proc: subprocess.Popen, needle: str, timeout: float = 60, allow_exit: bool = False) -> str:
    """Read the child's output until ``needle`` appears (or it exits, with ``allow_exit``); return what was read."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if allow_exit:
                return seen
            break
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared:\n{seen}")


def children_alive(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [p for p in found if int(p) != os.getpid()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, float]:
    """The reference run, and how long its training took (from "Start training" to its exit)."""
    out = tmp_path_factory.mktemp("faults") / "full"
    proc = start(out)
    wait_for(proc, "Start training")
    t0 = time.monotonic()
    rc, log = finish(proc)
    assert rc == 0, log
    return out, time.monotonic() - t0


def test_kill_9_at_random_points_then_resume_auto_is_bit_identical(uninterrupted, tmp_path):
    full, duration = uninterrupted
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(6):  # kills at random moments of the training (checkpoint writes included)
        proc = start(out, "--resume", "auto")
        seen = wait_for(proc, "Start training", allow_exit=True)
        if "Start training" in seen:
            time.sleep(rng.uniform(0.0, duration / 4))  # each resumed run has less left to do
        if proc.poll() is not None:
            break  # finished before the kill
        proc.kill()  # SIGKILL: no handler runs, no cleanup
        proc.communicate()
        kills += 1
    rc, log = finish(start(out, "--resume", "auto"))
    assert rc == 0, log
    assert kills >= 2
    assert_identical(full / "checkpoint.pth", out / "checkpoint.pth")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rows = [line for line in (out / "log.txt").read_text().splitlines() if '"event"' not in line]
    assert len(rows) == 3  # one line per epoch: none lost, none twice


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGTERM, 2), (signal.SIGINT, 0), (signal.SIGUSR1, 0)])
def test_signal_mid_epoch_saves_the_position_and_resumes_bit_identical(uninterrupted, tmp_path, sig, workers):
    full, _ = uninterrupted
    out = tmp_path / "stopped"
    proc = start(out, workers=workers)
    wait_for(proc, "Epoch [2/3] step 3/30")
    proc.send_signal(sig)
    rc, log = finish(proc)
    name = signal.Signals(sig).name
    assert rc == 128 + sig, log
    assert f"stopped by {name} at epoch 2, step " in log and "continue with --resume auto" in log
    assert "Traceback" not in log
    time.sleep(0.5)
    assert not children_alive(str(out)), "DataLoader workers outlived the run"
    saved = torch.load(out / "checkpoint_stopped.pth", map_location="cpu", weights_only=True)
    assert saved["position"]["epoch"] == 1 and 0 < saved["position"]["step"] < 30
    assert saved["metrics"] is None  # weights between two evaluations carry no accuracy
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0  # the epoch's start is kept
    rc, log = finish(start(out, "--resume", "auto", workers=workers))
    assert rc == 0, log
    assert f"continuing with epoch 2, step {saved['position']['step'] + 1}" in log
    assert_identical(full / "checkpoint.pth", out / "checkpoint.pth")
    assert not (out / "checkpoint_stopped.pth").exists()  # passed, so removed


def test_second_run_into_a_locked_or_finished_folder_is_refused_and_changes_nothing(uninterrupted, tmp_path):
    full, _ = uninterrupted
    before = folder_hash(full)
    rc, log = finish(start(full))
    assert rc == 2 and "holds a run (3 epoch(s) logged, finished" in log and "--resume auto" in log, log
    assert log.strip().count("\n") == 0  # one line
    assert folder_hash(full) == before
    rc, log = finish(start(full, "--resume", "auto"))  # a requeued job of a finished run: nothing to do
    assert rc == 0 and "is finished (see its summary.json): nothing to do" in log, log
    assert folder_hash(full) == before

    out = tmp_path / "busy"
    first = start(out, "--epochs", "100")  # still running when the second one looks
    wait_for(first, "Epoch [1/100] step 2/30")
    rc, log = finish(start(out, "--epochs", "100"))
    assert rc == 2 and f"--output_dir {out} is in use by another run (host " in log and "PID" in log, log
    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == 128 + signal.SIGTERM


def test_overwrite_replaces_a_finished_run(tmp_path):
    out = tmp_path / "again"
    assert finish(start(out, "--epochs", "1"))[0] == 0
    rc, log = finish(start(out, "--epochs", "1", "--overwrite"))
    assert rc == 0, log
    rows = (out / "log.txt").read_text().splitlines()
    assert len(rows) == 1


def test_kill_during_a_checkpoint_write_keeps_the_old_file_and_the_next_start_cleans_up(tmp_path):
    target = tmp_path / "checkpoint.pth"
    torch.save({"v": 1}, target)
    script = (
        "import sys, time, torch\n"
        "from repavit.utils import atomic_write\n"
        "def slow(tmp):\n"
        "    open(tmp, 'wb').write(b'half a checkpoint')\n"
        "    print('writing', flush=True); time.sleep(60)\n"
        f"atomic_write({str(target)!r}, slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.communicate()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and torch.load(target, weights_only=True) == {"v": 1}
    run_dir = RunDir(tmp_path)
    run_dir.lock()
    assert run_dir.clean_stale() == 1
    run_dir.unlock()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_a_failing_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "x.pth"

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, broken)
    assert list(tmp_path.iterdir()) == []


# ---- what a resume must refuse or finish (in-process, small) ----------------------------------------
def cli(*argv: str) -> int:
    from repavit.cli.main import main

    return main([str(a) for a in argv])


SMALL_RUN = [*ARGS, "--num_workers", "0", "--epochs", "2"]


def test_repeated_copies_of_an_image_are_augmented_differently():
    from repavit.data import SeededSamples, SyntheticImages, TransformConfig, build_transform

    ds = SeededSamples(SyntheticImages(8, 2, 32, transform=build_transform(True, TransformConfig(input_size=32))), 0)
    first, again, copy = ds[(3, 0)], ds[(3, 0)], ds[(3, 5)]
    assert torch.equal(first[0], again[0])  # one position, one stream
    assert not torch.equal(first[0], copy[0])  # another copy of image 3, another augmentation
    other_rank = SeededSamples(ds.dataset, 0, rank=1)[(3, 0)]
    assert not torch.equal(first[0], other_rank[0])


def test_overwrite_deletes_the_old_run_only_once_the_new_one_passed_its_checks(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*SMALL_RUN, "--output_dir", out, "--epochs", "1") == 0
    before = folder_hash(out)
    assert (
        cli(*SMALL_RUN, "--output_dir", out, "--overwrite", "--data_set", "IMNET", "--data_path", tmp_path / "no") == 2
    )
    assert folder_hash(out) == before  # the failed start deleted nothing
    assert cli(*SMALL_RUN, "--output_dir", out, "--overwrite", "--resume", "auto") == 2
    assert "cannot be combined with resuming" in capsys.readouterr().err


def test_a_mid_epoch_checkpoint_resumes_only_with_the_same_batches(tmp_path, capsys):
    out = tmp_path / "stopped"
    proc = start(out, "--epochs", "2")
    wait_for(proc, "Epoch [1/2] step 3/30")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 128 + signal.SIGTERM
    before = folder_hash(out)
    assert cli(*SMALL_RUN, "--output_dir", out, "--resume", "auto", "--batch_size", "32") == 2
    err = capsys.readouterr().err
    assert "middle of an epoch" in err and "batch_size 16 -> 32" in err and "\n" not in err.strip()
    assert folder_hash(out) == before
    assert cli(*SMALL_RUN, "--output_dir", out, "--resume", out / "checkpoint_stopped.pth", "--opt", "sgd") == 2
    assert "was trained with --opt adamw, --opt sgd was given" in capsys.readouterr().err
    assert folder_hash(out) == before
    assert cli(*SMALL_RUN, "--output_dir", tmp_path / "x", "--seed", "-1") == 2
    assert "--seed must be >= 0" in capsys.readouterr().err


def test_a_run_killed_after_its_last_epoch_is_finished_by_resume_auto(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*SMALL_RUN, "--output_dir", out, "--epochs", "1", "--reparam") == 0
    (out / "summary.json").unlink()  # as if killed while writing the summary
    (out / "checkpoint_reparam.pth").unlink()
    capsys.readouterr()
    assert cli(*SMALL_RUN, "--output_dir", out, "--epochs", "1", "--reparam", "--resume", "auto") == 0
    assert "finishing it (evaluation, reparameterization, summary)" in capsys.readouterr().out
    assert (out / "summary.json").is_file() and (out / "checkpoint_reparam.pth").is_file()
