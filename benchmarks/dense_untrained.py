"""The score of an untrained model with a dense checkpoint's config: the baseline a trained one is compared to.

    python benchmarks/dense_untrained.py out/det_retinanet/checkpoint.pth --data out/det

Builds the checkpoint's detector or segmenter (the config it records) with fresh random weights (seed 0),
evaluates it on the validation split exactly as `repavit detect|segment eval` does, and prints both scores.
"""

from __future__ import annotations

import argparse
import json

import torch

from repavit.dense.api import evaluate, load_dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--output", default=None, help="JSON with both reports")
    args = p.parse_args()
    trained = load_dense(args.checkpoint, data=args.data)
    untrained = load_dense(args.checkpoint, data=args.data)
    torch.manual_seed(0)
    untrained.model = untrained.task.build(None).eval()  # same config, random weights
    reports = {"trained": evaluate(trained), "untrained": evaluate(untrained)}
    for name, r in reports.items():
        score = {k: r[k]["AP"] for k in ("bbox", "segm") if k in r} or {"mIoU": r["mIoU"], "aAcc": r["aAcc"]}
        print(f"{name:>9}: {json.dumps(score)}")
    if args.output:
        from repavit.utils import write_json

        write_json(args.output, reports)


if __name__ == "__main__":
    main()
