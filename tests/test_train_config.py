"""Run settings: flags (the seed README's spellings), YAML recipes, precedence and validation."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import timm

import repavit  # noqa: F401  (registers the models)
from repavit.cli.main import build_parser
from repavit.cli.train import build_seed_parser, config_from_args, seed_main
from repavit.train.config import TrainConfig, load_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# The seed README's commands (RePaViT README sections 2.1-3.3), verbatim after `main.py`.
SEED_COMMANDS = {
    "base": """--model=RePaViT_Base --batch_size=512 --epochs=300 --dist_eval --channel_idle --idle_ratio=0.75
        --feature_norm=BatchNorm --data_path=/path/to/imagenet --output_dir=/path/to/output --lr=4e-3 --min_lr=4e-5
        --warmup_lr=1e-6 --warmup_epochs=20 --unscale_lr --weight_decay=0.05 --opt=lamb --drop_path=0.1""",
    "large": """--model=RePaViT_Large --batch_size=512 --epochs=300 --dist_eval --channel_idle --idle_ratio=0.75
        --feature_norm=BatchNorm --data_path=/path/to/imagenet --output_dir=/path/to/output --lr=1e-3 --min_lr=5e-5
        --warmup_lr=1e-6 --warmup_epochs=20 --unscale_lr --weight_decay=0.05 --opt=lamb --drop_path=0.3""",
    "large_wandb": """--model=RePaViT_Large --batch_size=512 --epochs=300 --dist_eval --channel_idle --idle_ratio=0.75
        --feature_norm=BatchNorm --data_path=/path/to/imagenet --output_dir=/path/to/output --lr=1e-3 --min_lr=5e-5
        --warmup_lr=1e-6 --warmup_epochs=20 --unscale_lr --weight_decay=0.05 --opt=lamb --drop_path=0.3 --wandb
        --wandb_entity=your-entity-name --wandb_suffix=your-customized-suffix""",
    "slurm": """--model=RePaViT_Large --batch_size=256 --epochs=300 --num_workers=20 --dist_eval --channel_idle
        --idle_ratio=0.75 --feature_norm=BatchNorm --data_path=/path/to/imagenet --output_dir=/path/to/output
        --opt=lamb --lr=1e-3 --min_lr=5e-5 --warmup_lr=1e-6 --warmup_epochs=20 --unscale_lr --weight_decay=0.05
        --drop_path=0.3 --wandb""",
    "eval": """--model=RePaViT_Large --batch_size=512 --eval --dist_eval --channel_idle --idle_ratio=0.75
        --feature_norm=BatchNorm --data_path=/path/to/imagenet --resume=/path/to/pretrained_weight.pth""",
    "speed": "--model=RePaViT_Large --channel_idle --idle_ratio=0.75 --feature_norm=BatchNorm --test_speed",
    "speed_reparam": """--model=RePaViT_Large --channel_idle --idle_ratio=0.75 --feature_norm=BatchNorm --test_speed
        --reparam""",
}


def seed_config(argv: list[str]) -> TrainConfig:
    return config_from_args(build_seed_parser().parse_args(argv))


@pytest.mark.parametrize("name", sorted(SEED_COMMANDS))
def test_every_seed_command_parses_with_its_meaning(name):
    cfg = seed_config(shlex.split(SEED_COMMANDS[name]))
    assert cfg.channel_idle and cfg.idle_ratio == 0.75 and cfg.feature_norm == "BatchNorm"
    assert cfg.model in ("RePaViT_Base", "RePaViT_Large") and timm.is_model(cfg.model)
    if name in ("base", "large", "large_wandb", "slurm"):
        assert cfg.mode == "train" and cfg.opt == "lamb" and cfg.unscale_lr and cfg.dist_eval
        assert cfg.warmup_epochs == 20 and cfg.warmup_lr == 1e-6 and cfg.weight_decay == 0.05
        assert (cfg.lr, cfg.min_lr, cfg.drop_path) == ((4e-3, 4e-5, 0.1) if name == "base" else (1e-3, 5e-5, 0.3))
    if name == "large_wandb":
        assert cfg.wandb and cfg.wandb_entity == "your-entity-name" and cfg.wandb_suffix == "your-customized-suffix"
    if name == "slurm":
        assert cfg.num_workers == 20 and cfg.batch_size == 256
    if name == "eval":
        assert cfg.mode == "eval" and cfg.resume == "/path/to/pretrained_weight.pth"
    if name.startswith("speed"):
        assert cfg.mode == "speed" and cfg.reparam == (name == "speed_reparam")


def test_authors_defaults_and_switches():
    cfg = seed_config([])
    # the authors' main.py defaults (DeiT recipe)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob, cfg.color_jitter) == (0.8, 1.0, 0.1, 0.25, 0.3)
    assert cfg.aa == "rand-m9-mstd0.5-inc1" and cfg.sched == "cosine" and cfg.eval_crop_ratio == 0.875
    assert cfg.model_ema and cfg.model_ema_decay == 0.99996 and cfg.repeated_aug
    # one departure: the paper's FFN form by default (the authors' main.py defaults to a plain LayerNorm ViT)
    assert cfg.channel_idle and cfg.feature_norm == "BatchNorm" and cfg.clip_grad is None
    plain = seed_config(["--no_channel_idle", "--feature_norm", "LayerNorm"])
    assert not plain.channel_idle and plain.feature_norm == "LayerNorm"
    cfg = seed_config(["--no_model_ema", "--no_repeated_aug", "--ThreeAugment", "--bce_loss", "--only_test_speed"])
    assert not cfg.model_ema and not cfg.repeated_aug and cfg.ThreeAugment and cfg.bce_loss and cfg.test_speed
    # dashed aliases of the underscore flags
    assert seed_config(["--batch-size", "6", "--min-lr", "1e-4"]).batch_size == 6
    cfg = seed_config(["--heuristic", "linear", "--input_size", "32", "--sched", "step", "--clip_grad", "5",
                       "--seed", "7", "--start_epoch", "3", "--save_freq", "2", "--data_set", "CIFAR",
                       "--repeated_aug", "--device", "cpu", "--model_ema", "--model_ema_decay", "0.9"])  # fmt: skip
    assert (cfg.heuristic, cfg.input_size, cfg.sched, cfg.clip_grad, cfg.seed) == ("linear", 32, "step", 5.0, 7)
    assert (cfg.start_epoch, cfg.save_freq, cfg.data_set, cfg.device) == (3, 2, "CIFAR", "cpu")
    assert cfg.model_ema_decay == 0.9


def test_lr_scaling_rule():
    cfg = TrainConfig(lr=4e-3, warmup_lr=1e-6, min_lr=4e-5, batch_size=512, mixup=0, cutmix=0)
    assert cfg.scaled_lrs(8) == pytest.approx({"lr": 4e-3 * 4, "warmup_lr": 1e-6 * 4, "min_lr": 4e-5 * 4})
    cfg = TrainConfig(lr=4e-3, warmup_lr=1e-6, min_lr=4e-5, batch_size=128, unscale_lr=True, accumulation_steps=4)
    assert cfg.scaled_lrs(8) == pytest.approx({"lr": 16e-3, "warmup_lr": 4e-6, "min_lr": 16e-5})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_yaml_loads(path):
    values = load_yaml(path)
    cfg = TrainConfig.from_dict(values, source=str(path))
    assert timm.is_model(cfg.model), cfg.model
    if path.stem.startswith("RePa"):
        assert cfg.model == path.stem and cfg.feature_norm == "BatchNorm" and cfg.channel_idle
        global_batch = 1024 if path.stem.startswith("RePaLVViT") else 4096  # Table 7
        assert cfg.batch_size * 8 == global_batch and cfg.opt == "lamb" and cfg.epochs == 300


def test_flags_override_yaml_and_resolved_config_round_trips(tmp_path):
    cfg = config_from_args(
        build_seed_parser().parse_args(
            ["--config", str(ROOT / "configs" / "RePaViT_Base.yaml"), "--batch_size=64", "--epochs", "2"]
        )
    )
    assert (cfg.model, cfg.lr, cfg.min_lr, cfg.batch_size, cfg.epochs) == ("RePaViT_Base", 4e-3, 4e-5, 64, 2)
    cfg.save_yaml(tmp_path / "config.yaml")
    again = config_from_args(build_seed_parser().parse_args(["--config", str(tmp_path / "config.yaml")]))
    assert again == cfg


def test_model_kwargs_from_flags_merge_with_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("model_kwargs: {depth: 2, embed_dim: 64}\nlr: 4e-3\n")
    cfg = seed_config(["--config", str(tmp_path / "c.yaml"), "--model_kwargs", "depth=3", "patch_size=4"])
    assert cfg.model_kwargs == {"depth": 3, "embed_dim": 64, "patch_size": 4} and cfg.lr == 4e-3


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus_key: 1\n", "unknown setting.*bogus_key"),
        ("batch_size: lots\n", "--batch_size must be an integer"),
        ("- a\n- b\n", "must hold a mapping"),
        ("idle_ratio: 1.5\n", "--idle_ratio must be in"),
        ("feature_norm: GroupNorm\n", "--feature_norm 'GroupNorm' is not one of"),
        ("batch_size: 7\n", "even --batch_size"),
        ("eval: true\ntest_speed: true\n", "cannot be combined"),
        ("device: tpu\n", "--device 'tpu'"),
    ],
)
def test_bad_yaml_values_are_one_line_errors(tmp_path, text, needle, capsys):
    """The library names the setting (``batch_size``); the command line names the flag (``--batch_size``)."""
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=needle.replace("--", "")):
        seed_config(["--config", str(tmp_path / "bad.yaml")])
    assert seed_main(["--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(needle, err[0]), err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert seed_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config file not found" in err[0]


@pytest.mark.parametrize("cmd", ["train", "eval", "speed"])
def test_help_of_each_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--batch_size", "--channel_idle", "--idle_ratio", "--feature_norm", "--reparam", "--config"):
        assert flag in out


def test_subcommands_set_the_mode():
    p = build_parser()
    for argv, mode in ((["eval", "--resume", "x.pth"], "eval"), (["speed"], "speed"), (["train"], "train")):
        args = p.parse_args(argv)
        assert config_from_args(args, args._mode).mode == mode
    args = p.parse_args(["train", "--test_speed"])
    assert config_from_args(args, args._mode).mode == "speed"


# The flags issue 3 names: the seed README's, and the authors' main.py options the recipe relies on.
ISSUE_FLAGS = {
    "--model": "RePaViT_Tiny", "--batch_size": "8", "--epochs": "2", "--dist_eval": None, "--channel_idle": None,
    "--idle_ratio": "0.5", "--feature_norm": "BatchNorm", "--data_path": "/d", "--output_dir": "/o", "--lr": "1e-3",
    "--min_lr": "1e-6", "--warmup_lr": "1e-7", "--warmup_epochs": "1", "--unscale_lr": None, "--weight_decay": "0.1",
    "--opt": "sgd", "--drop_path": "0.2", "--accumulation_steps": "2", "--wandb": None, "--wandb_suffix": "s",
    "--wandb_entity": "e", "--rocksdb": "/r", "--eval": None, "--resume": "/c.pth", "--reparam": None,
    "--num_workers": "0", "--heuristic": "linear", "--input_size": "64", "--sched": "step", "--smoothing": "0.2",
    "--mixup": "0.5", "--cutmix": "0.5", "--reprob": "0.1", "--aa": "none", "--color_jitter": "0.2",
    "--model_ema": None, "--model_ema_decay": "0.9", "--clip_grad": "1.0", "--seed": "3", "--start_epoch": "1",
    "--save_freq": "5", "--eval_crop_ratio": "0.9", "--data_set": "CIFAR", "--ThreeAugment": None,
    "--bce_loss": None, "--repeated_aug": None, "--device": "cpu",
}  # fmt: skip


@pytest.mark.parametrize("flag", sorted(ISSUE_FLAGS))
def test_each_issue_flag_is_accepted_and_stored(flag):
    value = ISSUE_FLAGS[flag]
    cfg = seed_config([flag] if value is None else [f"{flag}={value}"])
    got = getattr(cfg, flag[2:])
    if value is None:
        assert got is True
    else:
        assert str(got) == value or got == type(got)(value)
    assert seed_config(["--test_speed"]).test_speed and seed_config(["--test_speed"]).mode == "speed"
