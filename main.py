"""Seed-compatible entry point: the RePaViT README's commands run unchanged.

    torchrun --nproc_per_node=8 main.py --model=RePaViT_Base --batch_size=512 ... --data_path=/path/to/imagenet
    srun python main.py ...          # Slurm (see scripts/exec_config.sh)
    python main.py --eval --resume=ckpt.pth ...   |   python main.py --test_speed [--reparam] ...

Same as ``repavit train`` (``--eval`` and ``--test_speed`` switch the mode), or
``torchrun --nproc_per_node=N -m repavit train ...``.
"""

import os
import sys

try:
    from repavit.cli.train import seed_main
except ModuleNotFoundError:  # a clone that was not pip-installed: use its src/ folder
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from repavit.cli.train import seed_main

if __name__ == "__main__":
    sys.exit(seed_main())
