"""``make demo``: build a RePaViT, reparameterize it, show identical outputs and the speed-up."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch

import repavit
from repavit.bench.throughput import count_params, interleaved_throughput, summarize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="RePaViT_Small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-dir", default="out/demo")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    fused = repavit.reparameterize_model(model)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    with torch.no_grad():
        samples = interleaved_throughput(
            {"train": lambda: model(x), "reparam": lambda: fused(x)}, args.batch_size, 3, 2
        )
    speed = {k: summarize(v)["median"] for k, v in samples.items()}
    report = {
        "model": args.model,
        "params_m": {"train": count_params(model) / 1e6, "reparam": count_params(fused) / 1e6},
        "max_rel_err": err,
        "images_per_s": speed,
        "speedup": speed["reparam"] / speed["train"],
    }
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"report written to {out_dir / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
