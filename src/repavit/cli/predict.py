"""``repavit predict``: top-k classes with probabilities for some images."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ._deploy_args import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images: top-k classes with probabilities",
        description="Preprocess each image as the model's pretrained_cfg says (resize, center crop, normalize), "
        "run the (reparameterized) model and print the top-k classes, named as the checkpoint records them "
        "(repavit train saves the dataset's class names); unnamed 1000-class heads get ImageNet-1k names.",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", default=None, help="checkpoint or Hub-layout folder (see `repavit convert -h`)")
    p.add_argument("--pretrained", action="store_true", help="use the released weights (Hugging Face cache)")
    add_model_args(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--no-reparam", action="store_true", help="run the training form as it is")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def class_names(num_classes: int, recorded: list[str] | None = None) -> list[str] | None:
    """The checkpoint's recorded class names; else ImageNet-1k descriptions for a 1000-class head; else None."""
    if recorded and len(recorded) == num_classes:
        return list(recorded)
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(num_classes)]


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..export.info import eval_transform
    from ..measure import check_device
    from ._deploy_args import load_from_args

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.checkpoint is None and not args.pretrained:
        raise UserError("give the weights: --checkpoint FILE_OR_FOLDER or --pretrained (with --model)")
    if args.checkpoint is not None and args.pretrained:
        raise UserError("give either --checkpoint or --pretrained, not both")
    check_device(args.device)
    for f in args.images:
        if not Path(f).is_file():
            raise FileNotFoundError(f"image not found: {f}")
    loaded = load_from_args(args, reparameterized=None if args.no_reparam else True, pretrained=args.pretrained)
    model = loaded.model.to(args.device).eval()
    transform = eval_transform(model)
    num_classes = getattr(model, "num_classes", 0)
    names = class_names(num_classes, loaded.class_names)
    k = min(args.top_k, num_classes)
    for f in args.images:
        try:
            img = Image.open(f).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {f}: {e}") from None
        with torch.no_grad():
            probs = model(transform(img).unsqueeze(0).to(args.device)).softmax(-1)[0]
        top = probs.topk(k)
        print(f)
        for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
            label = names[i] if names else f"class {i}"
            print(f"  {rank}. {p:.4f}  {label} ({i})")
    return 0
