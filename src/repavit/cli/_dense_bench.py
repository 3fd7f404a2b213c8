"""``repavit detect|segment bench``: per-image latency of vanilla Swin vs RePaSwin (training form, folded)."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_bench_parser(sub, kinds: tuple[str, ...], size: int) -> None:
    p = sub.add_parser(
        "bench",
        help="per-image latency: vanilla Swin vs RePaSwin training form vs reparameterized (one process)",
        description="Times the whole model (batch 1, a fixed square input) for timm's vanilla Swin backbone, "
        "RePaSwin in training form and RePaSwin folded, interleaved; also the backbone alone (its share of the time "
        "bounds what the fold can save). Random weights; thresholds 0 so each form keeps --detections boxes.",
    )
    p.add_argument("--model", default="RePaSwin_Tiny", help="RePaSwin_Tiny, RePaSwin_Small or RePaSwin_Base")
    p.add_argument("--kinds", nargs="+", choices=kinds, default=list(kinds), metavar="KIND", help=", ".join(kinds))
    p.add_argument("--size", type=int, default=size, help="input side (pixels)")
    p.add_argument("--num-classes", type=int, default=80 if "retinanet" in kinds else 150)
    p.add_argument("--detections", type=int, default=100, help="boxes per image kept by every detector")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output", default=None, help="results JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from ..dense.latency import dense_latency
    from ..utils import write_json

    if args.rounds < 1 or args.iters < 1 or args.size < 64:
        raise UserError("expected --rounds >= 1, --iters >= 1 and --size >= 64")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print(
        f"{'model':<34} {'vanilla ms':>11} {'train ms':>9} {'reparam ms':>11} {'vs vanilla':>10} {'backbone share':>15}"
    )
    for kind in args.kinds:
        r = dense_latency(
            kind,
            args.model,
            size=args.size,
            num_classes=args.num_classes,
            detections=args.detections,
            rounds=args.rounds,
            iters=args.iters,
        )
        results.append(r)
        ms = r["ms"]
        print(
            f"{kind + ' ' + args.model + ' ' + r['input']:<34} {ms['vanilla']:>11.1f} {ms['repa_train']:>9.1f} "
            f"{ms['repa_reparam']:>11.1f} {100 * r['reparam_vs_vanilla']:>+9.1f}% "
            f"{100 * r['backbone_share_vanilla']:>14.0f}%"
        )
    if args.output:
        write_json(args.output, {"results": results})
        print(f"wrote {args.output}")
    return 0
