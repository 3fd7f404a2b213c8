"""What ``repavit detect`` and ``repavit segment`` share: the data subcommand and the training flags."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UserError


def key_values(items: list[str] | None) -> dict[str, Any]:
    """``["idle_ratio=0.5", "depths=2,2,6,2"]`` -> ``{"idle_ratio": 0.5, "depths": [2, 2, 6, 2]}``."""
    from ..utils import parse_value

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--model-kwargs {item!r}: expected KEY=VALUE, e.g. idle_ratio=0.5")
        out[key.strip()] = parse_value(value)
    return out


def add_data_parser(sub, layout: str, help_text: str) -> None:
    p = sub.add_parser("data", help=help_text, description=help_text)
    p.add_argument("output", help="folder to write the set into")
    p.add_argument("--num-train", type=int, default=160, help="training images")
    p.add_argument("--num-val", type=int, default=48, help="validation images")
    p.add_argument("--image-size", type=int, default=160, help="square image side (pixels)")
    p.add_argument("--num-classes", type=int, default=4, help="digit classes 0..N-1 (1-10)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per image (1 to this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a set already in the folder")
    p.set_defaults(func=lambda a: _run_data(a, layout))


def _run_data(args: argparse.Namespace, layout: str) -> int:
    from ..data.dense import write_dense_set

    counts = write_dense_set(
        args.output,
        layout=layout,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        num_classes=args.num_classes,
        max_objects=args.max_objects,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"wrote {layout} set to {args.output}: {json.dumps(counts)}")
    return 0


def add_train_args(p: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int, warmup: int) -> None:
    p.add_argument("--data", "--data-path", dest="data", required=True, help="dataset folder")
    p.add_argument("--model", default="RePaSwin_Tiny", help="backbone: RePaSwin_*, RePaPoolformer_*, RePaViT_*, swin_*")
    p.add_argument("--pretrained", help="ImageNet checkpoint for the backbone (ours, the authors' or timm's layout)")
    p.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", help="backbone settings, e.g. idle_ratio=0.5")
    p.add_argument(
        "--bn",
        choices=("frozen", "train", "sync"),
        default="frozen",
        help="backbone BatchNorm statistics: frozen (fine-tuning default), train, sync (torchrun)",
    )
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per process")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--lr-steps", type=int, nargs="*", default=None, help="epochs after which lr *= gamma")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--warmup-iters", type=int, default=warmup, help="linear warmup iterations")
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (scored each evaluation)")
    p.add_argument("--model-ema-decay", type=float, default=0.9998)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    p.add_argument("--resume", default="", help="checkpoint to continue, or 'auto' (the run folder's last one)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--dist-backend", default="auto", help="nccl or gloo (torchrun/Slurm)")
    p.add_argument("--workers", "--num_workers", dest="workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-freq", type=int, default=10)


def schedule_of(args: argparse.Namespace, lr_steps: tuple[int, ...]):
    from ..dense.engine import Schedule

    steps = tuple(args.lr_steps) if args.lr_steps is not None else lr_steps
    return Schedule(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_steps=steps,
        gamma=args.gamma,
        warmup_iters=args.warmup_iters,
        clip_grad=args.clip_grad,
        workers=args.workers,
        seed=args.seed,
        ema=args.model_ema,
        ema_decay=args.model_ema_decay,
        eval_every=args.eval_every,
        log_freq=args.log_freq,
        device=args.device,
        dist_backend=args.dist_backend,
    )


def fit_and_report(task, args: argparse.Namespace, schedule) -> int:
    """Train ``task`` into ``--output-dir`` and print the final scores (``detect train`` and ``segment train``)."""
    from ..dense.engine import fit
    from ._dense_eval import describe_scores

    summary = fit(task, schedule, args.output_dir, args.resume, args.overwrite, args.pretrained)
    if summary.get("metrics"):
        print(describe_scores({**summary["metrics"], "reparameterized": False}))
    print(f"run folder: {args.output_dir} (checkpoint.pth, log.txt, summary.json)")
    return 0
