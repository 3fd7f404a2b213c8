"""Training and evaluation: config, engine, checkpoints, distributed setup, and ``fit``.

Library entry points::

    from repavit.train import TrainConfig, fit, evaluate_checkpoint, speed_test
    summary = fit(TrainConfig(model="RePaViT_Tiny", data_set="SYNTH", epochs=1, ...))
"""

from .config import TrainConfig, load_yaml
from .distributed import DistEnv, detect_launcher, init_distributed
from .engine import Precision, evaluate, train_one_epoch
from .fit import evaluate_checkpoint, fit, run, speed_test

__all__ = [
    "DistEnv",
    "Precision",
    "TrainConfig",
    "detect_launcher",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "init_distributed",
    "load_yaml",
    "run",
    "speed_test",
    "train_one_epoch",
]
