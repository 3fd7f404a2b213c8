"""int8 dynamic quantization vs the fp32 reparameterized model, on real images.

Uses the model that `make demo` trains (out/demo/run/checkpoint.pth, scikit-learn digits) and its
validation split; reports top-1 agreement with fp32, logit cosine similarity, accuracy of each, for
the identity kept as a float add (repavit's default) and folded into the quantized matrix.

    python benchmarks/int8_agreement.py [--run out/demo/run] [--output benchmarks/results/int8_demo.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import repavit
from repavit.quantize import quantize_int8
from repavit.train.builders import build_datasets
from repavit.train.config import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="out/demo/run")
    p.add_argument("--output", default="benchmarks/results/int8_demo.json")
    args = p.parse_args()
    run = Path(args.run)
    ckpt = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    model = repavit.create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    repavit.load_checkpoint(model, ckpt["model"])
    fused = repavit.reparameterize_model(model.eval())
    cfg = TrainConfig(
        **{
            k: v
            for k, v in yaml.safe_load((run / "config.yaml").read_text()).items()
            if k in TrainConfig.__dataclass_fields__
        }
    )
    _, val, _ = build_datasets(cfg, need_train=False)
    xs, ys = zip(*(val[i] for i in range(len(val))))
    x, y = torch.stack(xs), torch.tensor(ys)
    forms = {
        "fp32": fused,
        "int8": quantize_int8(fused),
        "int8_identity_folded": quantize_int8(fused, keep_identity_separate=False),
    }
    with torch.no_grad():
        logits = {k: m(x) for k, m in forms.items()}
    ref = logits["fp32"]
    result = {"images": len(y), "checkpoint": str(run / "checkpoint.pth")}
    for k, out in logits.items():
        result[k] = {
            "top1_accuracy": (out.argmax(1) == y).float().mean().item(),
            "top1_agreement_with_fp32": (out.argmax(1) == ref.argmax(1)).float().mean().item(),
            "logit_cosine_mean": F.cosine_similarity(out, ref, dim=1).mean().item(),
            "logit_cosine_min": F.cosine_similarity(out, ref, dim=1).min().item(),
            "max_rel_err": ((out - ref).abs().max() / ref.abs().max()).item(),
        }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
