"""``repavit bench``: every form of a model timed side by side; table, JSON and PNG."""

from __future__ import annotations

import argparse


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def register(sub: argparse._SubParsersAction) -> None:
    from ..bench.suite import DEFAULT_FORMS, INFERENCE_FORMS

    p = sub.add_parser(
        "bench",
        help="measure speed ratios of vanilla / training-form / reparameterized / deploy forms",
        description="Times every form of each model interleaved in one process and reports medians with spread. "
        f"Forms: {', '.join(INFERENCE_FORMS)}.",
    )
    p.add_argument("--models", nargs="+", default=["RePaViT_Base"], help="registered model names")
    p.add_argument(
        "--forms",
        nargs="+",
        default=list(DEFAULT_FORMS),
        choices=INFERENCE_FORMS,
        metavar="FORM",
        help=f"inference forms to time (default: {' '.join(DEFAULT_FORMS)})",
    )
    p.add_argument("--batch-size", type=int, default=16, help="throughput batch size")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--iters", type=int, default=3, help="forward passes per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    p.add_argument("--train-step", action="store_true", help="also time training steps (vanilla, ours, masked)")
    p.add_argument("--train-batch-size", type=int, default=32)
    p.add_argument(
        "--breakdown", action="store_true",
        help="share of time in patch embed / attention / FFN; with --train-step also the step's time per "
        "operator group and the memory autograd keeps for backward",
    )  # fmt: skip
    p.add_argument(
        "--train-compile", action="store_true",
        help="with --train-step: also time torch.compile of ours and of vanilla (compiled vs compiled)",
    )  # fmt: skip
    p.add_argument("--sweep-sizes", type=_ints, default=[], help="e.g. 224,384: reparam/vanilla per image size")
    p.add_argument("--sweep-batches", type=_ints, default=[], help="e.g. 1,16,64: reparam/vanilla per batch size")
    p.add_argument(
        "--idle-ratio", type=float, default=None, help="default: each model's own (0.75; 2/3 for RePa-LV-ViT)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--amp", default="off", choices=("off", "fp16", "bf16"),
        help="autocast the PyTorch forms (SDPA flash kernel preferred); int8 and the runtimes are unaffected",
    )  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="the PyTorch forms and inputs in channels-last")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG chart here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.suite import run_suite
    from ..errors import UserError
    from ..measure import check_device
    from ..models import is_repa_model, list_models

    check_device(args.device)
    for name in args.models:
        if not is_repa_model(name):
            names = ", ".join(n for n in list_models() if n.startswith("RePa"))
            raise UserError(f"unknown model {name!r} (bench times RePa models against their vanilla twins): {names}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_suite(
        args.models,
        forms=args.forms,
        batch_size=args.batch_size,
        img_size=args.img_size,
        rounds=args.rounds,
        iters=args.iters,
        warmup=args.warmup,
        latency=not args.no_latency,
        train_step=args.train_step,
        train_batch_size=args.train_batch_size,
        breakdown=args.breakdown,
        sweep_sizes=args.sweep_sizes,
        sweep_batches=args.sweep_batches,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        train_compile=args.train_compile,
        output=args.output,
        plot=args.plot,
        **({} if args.idle_ratio is None else {"idle_ratio": args.idle_ratio}),
    )
    return 0
