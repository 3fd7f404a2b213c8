"""Multi-process training on CPU (gloo, loopback): torchrun, two torchrun "nodes", and Slurm's srun.

Each test runs a real 2-process training of a tiny model on synthetic data and checks that both
processes end with bit-identical weights (their fingerprints are gathered into summary.json) and
that the saved checkpoint is those weights.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import repavit
from repavit.train.distributed import detect_launcher, state_fingerprint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = (
    "--model RePaViT_Tiny --model_kwargs depth=2 embed_dim=32 num_heads=2 patch_size=8 --input_size 32 "
    "--channel_idle --feature_norm BatchNorm --data_set SYNTH --synthetic_train_size 64 --synthetic_val_size 30 "
    "--batch_size 8 --epochs 2 --num_workers 0 --device cpu --dist_eval"
)
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and "SLURM" not in k}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **extra}


def check_run(out: Path, launcher: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["effective"]["world_size"] == 2 and summary["effective"]["launcher"] == launcher
    prints = summary["rank_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1], prints
    assert summary["weights_identical_across_ranks"]
    # the saved checkpoint holds exactly those weights
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    model = repavit.create_model(
        "RePaViT_Tiny", img_size=32, depth=2, embed_dim=32, num_heads=2, patch_size=8, num_classes=10,
        channel_idle=True, feature_norm="BatchNorm", drop_path_rate=0.1,
    )  # fmt: skip
    model.load_state_dict(ckpt["model"])
    assert state_fingerprint(model) == prints[0]
    # dist_eval shards the 30 validation images without duplicates
    assert summary["final"]["images"] == 30
    rows = (out / "log.txt").read_text().splitlines()
    assert len(rows) == 2
    return summary


def test_detect_launcher_reads_torchrun_and_slurm_variables():
    assert detect_launcher({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == ("torchrun", 1, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert detect_launcher(slurm) == ("slurm", 5, 16, 1)
    assert detect_launcher({**slurm, "SLURM_STEP_NUM_TASKS": "8"}) == ("slurm", 5, 8, 1)
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})[0] == "single"  # e.g. salloc
    assert detect_launcher({}) == ("single", 0, 1, 0)
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        detect_launcher({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})


@pytest.mark.slow  # ~20 s: two or more Python processes start and import torch
def test_torchrun_two_processes_end_identical(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", "-m", "repavit", "train", *shlex.split(TRAIN), "--output_dir", str(out)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    check_run(out, "torchrun")
    # only rank 0 prints its results
    assert r.stdout.count("Start training for 2 epochs") == 1


@pytest.mark.slow  # ~20 s: two or more Python processes start and import torch
def test_two_torchrun_agents_as_two_nodes(tmp_path):
    out = tmp_path / "out"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}"]
        cmd += ["--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "main.py"]
        cmd += [*shlex.split(TRAIN), "--output_dir", str(out)]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    check_run(out, "torchrun")


@pytest.mark.slow  # ~20 s: two or more Python processes start and import torch
def test_slurm_script_with_srun(tmp_path):
    """scripts/exec_config.sh as sbatch would run it, with stand-ins for `srun` and `scontrol`.

    The stand-in srun starts SLURM_NTASKS copies of its command with SLURM_PROCID / SLURM_LOCALID set,
    as Slurm does; the script splits the global batch over them and exports MASTER_ADDR/MASTER_PORT.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'  # drop srun's own options (--export=ALL)
        "pids=()\n"
        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'
    )
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')  # this venv's python
    for f in ("scontrol", "srun", "python"):
        (bin_dir / f).chmod((bin_dir / f).stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    extra = TRAIN.replace("--batch_size 8 ", "").replace("--num_workers 0 ", "")
    e = env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_SUBMIT_DIR=str(ROOT),
        MASTER_PORT=str(free_port()),
        BATCH_SIZE="16",  # global: 8 per process
        NUM_WORKERS="0",
        MODEL="RePaViT_Tiny",
        DATA_PATH=str(tmp_path / "unused"),
        OUTPUT_DIR=str(out),
        EPOCHS="2",
        WANDB_MODE="disabled",
        EXTRA_ARGS=extra,
    )
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "exec_config.sh")], cwd=tmp_path, env=e, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    summary = check_run(out, "slurm")
    assert summary["effective"]["global_batch_size"] == 16
    config = (out / "config.yaml").read_text()
    assert "batch_size: 8\n" in config and "opt: lamb\n" in config and "wandb: true\n" in config


@pytest.mark.slow  # ~40 s: three 2-process torchrun runs
def test_torchrun_ranks_stop_at_the_same_step_and_resume_bit_identical(tmp_path):
    """SIGTERM to both workers (as Slurm signals every task) at different moments: one mid-epoch checkpoint
    holding both ranks' states, and the resumed run ends with the weights of an uninterrupted one."""
    import signal
    import time

    longer = TRAIN.replace("--synthetic_train_size 64", "--synthetic_train_size 480") + " --log_freq 1"

    def torchrun(out: Path, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={free_port()}", "-m", "repavit", "train", *shlex.split(longer)]
        cmd += ["--output_dir", str(out), *extra]
        return subprocess.Popen(
            cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    full = tmp_path / "full"
    r = torchrun(full)
    log = r.communicate(timeout=TIMEOUT)[0]
    assert r.returncode == 0, log[-4000:]

    out = tmp_path / "stopped"
    agent = torchrun(out)
    seen = ""
    while "Epoch [2/2] step 4/" not in seen:
        line = agent.stdout.readline()
        assert line, seen[-4000:]
        seen += line
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGTERM)
    time.sleep(0.05)
    os.kill(int(workers[1]), signal.SIGTERM)
    seen += agent.communicate(timeout=TIMEOUT)[0]
    assert "stopped by SIGTERM at epoch 2, step " in seen, seen[-4000:]
    saved = torch.load(out / "checkpoint_stopped.pth", map_location="cpu", weights_only=True)
    assert saved["position"]["epoch"] == 1 and len(saved["position"]["ranks"]) == 2

    r = torchrun(out, "--resume", "auto")
    log = r.communicate(timeout=TIMEOUT)[0]
    assert r.returncode == 0, log[-4000:]
    a = torch.load(full / "checkpoint.pth", map_location="cpu", weights_only=True)
    b = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["model_ema"][k], b["model_ema"][k]) for k in a["model_ema"])


def test_slurm_script_requeues_a_run_stopped_by_a_signal(tmp_path):
    """The script resumes with --resume auto and requeues itself when training exits with 128 + SIGUSR1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho 127.0.0.1\n')
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> {calls}\nexit 138\n')  # as if SIGUSR1 stopped it
    for f in ("scontrol", "srun"):
        (bin_dir / f).chmod((bin_dir / f).stat().st_mode | stat.S_IEXEC)
    e = env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NTASKS="2", SLURM_JOB_NODELIST="n1", SLURM_JOB_ID="42")
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "exec_config.sh")], cwd=tmp_path, env=e, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    text = calls.read_text()
    assert "--resume=auto" in text and "requeue 42" in text
    assert "#SBATCH --signal=USR1@180" in (ROOT / "scripts" / "exec_config.sh").read_text()
