"""``repavit convert``: any supported checkpoint -> our layout (safetensors + JSON config)."""

from __future__ import annotations

import argparse

from ._deploy_args import add_source_args, load_from_args, mb


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert the authors' .pth (or any checkpoint) into a clean safetensors + JSON checkpoint",
        description="Read a checkpoint safely (weights-only), find the model and its settings (from the "
        "checkpoint's pickled training args, our config, the released-weights table, or the options), load it "
        "strictly, and write OUTPUT.safetensors + OUTPUT.json. The form (training or reparameterized) is kept.",
    )
    add_source_args(p)
    p.add_argument("-o", "--output", required=True, help="output path without suffix (writes .safetensors and .json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import safetensors.torch

    from ..export import save_checkpoint, tensor_bytes

    loaded = load_from_args(args)
    weights, config = save_checkpoint(
        loaded.model, args.output, loaded.model_name, loaded.model_args, source=str(args.checkpoint)
    )
    reread = safetensors.torch.load_file(weights)
    own = loaded.model.state_dict()
    if reread.keys() != own.keys() or any(not reread[k].equal(own[k].cpu()) for k in own):
        raise RuntimeError(f"{weights} does not read back equal to the loaded model")
    form = "reparameterized" if loaded.reparameterized else "training form"
    print(f"{loaded.model_name} ({form}, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f}M params)")
    print(f"model args: {loaded.model_args}")
    print(f"wrote {weights} ({mb(tensor_bytes(own))}) and {config}")
    return 0
