"""``repavit bench``: throughput of vanilla timm, training-form and reparameterized models."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure throughput ratios (vanilla / training form / reparameterized)")
    p.add_argument("--models", nargs="+", default=["RePaViT_Base"], help="registered model names")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--iters", type=int, default=3, help="forward passes per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--idle-ratio", type=float, default=0.75)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.throughput import run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    run_benchmark(
        args.models,
        batch_size=args.batch_size,
        img_size=args.img_size,
        rounds=args.rounds,
        iters=args.iters,
        warmup=args.warmup,
        device=args.device,
        output=args.output,
        idle_ratio=args.idle_ratio,
    )
    return 0
