"""A local folder laid out as a Hugging Face Hub model repository, loadable by timm.

::

    out/repavit_base/
      config.json          timm's layout (architecture, num_classes, model_args, pretrained_cfg,
                           label_names) and the model record under "repavit"
      model.safetensors    the state dict (training form or reparameterized), the record in its header
      README.md            model card written from the record: settings, classes, recorded accuracy

``timm.create_model("local-dir:out/repavit_base", pretrained=True)`` loads it (after
``import repavit``); uploaded (``hf upload ORG/NAME out/repavit_base``) it loads as
``"hf-hub:ORG/NAME"``. Reparameterized folders record ``reparameterized: true`` in
``model_args``, so timm builds the fused model directly.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models import ModelRecord, ReleasedWeights
from ..models.checkpoint import HUB_RECORD_KEY, HUB_WEIGHTS, METADATA_KEY
from ..models.record import FFN_ARGS
from ..utils import atomic_write, write_json, write_text
from .info import input_size_of, tensor_bytes

_logger = logging.getLogger(__name__)

__all__ = ["measure_model", "model_card", "save_hub_folder"]

CITATION = "\n".join(
    [
        "@inproceedings{xu2025repavit,",
        "  title = {RePaViT: Scalable Vision Transformer Acceleration via Structural Reparameterization on "
        "Feedforward Network Layers},",
        "  author = {Xu, Xuwei and Li, Yang and Chen, Yudong and Liu, Jiajun and Wang, Sen},",
        "  booktitle = {The 42nd International Conference on Machine Learning (ICML)},",
        "  year = {2025}",
        "}",
    ]
)


@torch.no_grad()
def measure_model(model: nn.Module, reference: nn.Module | None = None, batch_size: int = 2) -> dict[str, Any]:
    """Numbers for a model card: parameters, tensor size, GMACs, and the max difference to ``reference``.

    ``reference`` is the training form the model was folded from (same weights); the difference is
    measured on ``batch_size`` random images of the model's input size.
    """
    from ..measure import count_gmacs

    size = input_size_of(model)
    numbers: dict[str, Any] = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tensor_mb": tensor_bytes(model) / 1e6,
        "gmacs": count_gmacs(model.eval(), img_size=size[-1], in_chans=size[0]),
        "input_size": list(size),
    }
    if reference is not None:
        x = torch.randn(batch_size, *size, generator=torch.Generator().manual_seed(0))
        ref, out = reference.eval()(x), model(x)
        numbers["max_abs_diff_vs_training_form"] = (out - ref).abs().max().item()
        numbers["max_rel_diff_vs_training_form"] = ((out - ref).abs().max() / ref.abs().max()).item()
        numbers["training_form_params_m"] = sum(p.numel() for p in reference.parameters()) / 1e6
        numbers["training_form_tensor_mb"] = tensor_bytes(reference) / 1e6
    return numbers


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"
    return str(value)


_DATA_SETS = {
    "IMNET": "an ImageNet-layout image folder",
    "CIFAR": "CIFAR-100",
    "INAT": "iNaturalist 2018",
    "INAT19": "iNaturalist 2019",
    "SYNTH": "synthetic images",
}


def _accuracy_lines(metrics: Mapping[str, Any], released: ReleasedWeights | None) -> list[str]:
    lines = []
    if released is not None and released.top1 is not None:
        lines.append(f"- ImageNet-1k top-1 reported in the paper for these weights: {released.top1}%")
    if metrics.get("acc1") is not None:
        where = f" on the {metrics['images']} validation images" if metrics.get("images") else ""
        data = f" ({_DATA_SETS.get(metrics['data_set'], metrics['data_set'])})" if metrics.get("data_set") else ""
        epoch = f" after epoch {metrics['epoch'] + 1}" if isinstance(metrics.get("epoch"), int) else ""
        top5 = f", top-5 {metrics['acc5']:.2f}%" if metrics.get("acc5") is not None else ""
        lines.append(f"- Accuracy measured by the training run{where}{data}{epoch}: top-1 {metrics['acc1']:.2f}%{top5}")
    if not lines:
        lines.append("- Accuracy: none was recorded with these weights")
    return lines


def _class_lines(class_names: list[str] | None, num_classes: Any) -> list[str]:
    if not class_names:
        return [f"- Classes: {num_classes} (no names were recorded)"] if num_classes else []
    shown = ", ".join(f"`{c}`" for c in class_names[:20])
    more = f", ... ({len(class_names) - 20} more; all in config.json)" if len(class_names) > 20 else ""
    return [f"- Classes ({len(class_names)}): {shown}{more}"]


def model_card(
    record: ModelRecord,
    numbers: Mapping[str, Any],
    repo_id: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    released: ReleasedWeights | None = None,
    assumptions: list[str] | None = None,
    release_like: ReleasedWeights | None = None,
) -> str:
    """Markdown model card (YAML front matter as the Hub expects), written from the model record.

    Only weights known to be the authors' release (``released``) get the paper's numbers and the
    ImageNet-1k tag; any other model is described by its own settings, classes and the accuracy its
    training run recorded (``metrics``).
    """
    load_name = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in numbers.items())
    front = ["---", "tags:", "- image-classification", "- timm", "- repavit", "library_name: timm"]
    front += ["license: apache-2.0", *(["datasets:", "- imagenet-1k"] if released is not None else []), "---"]
    lines = [
        *front,
        f"# {repo_id or record.model_name}",
        "",
        *_about_lines(record, metrics, released, assumptions, release_like),
        "",
        "## Measured at export",
        "",
        "| quantity | value |",
        "|---|---|",
        rows,
        "",
        "Sizes are the bytes of all tensors in the state dict; GMACs are for one image; differences are "
        "between this model and the training form it was folded from, on random inputs.",
        "",
        "## Usage",
        "",
        "```python",
        "import timm",
        "import repavit  # registers the RePa models in timm",
        "",
        f'model = timm.create_model("{load_name}", pretrained=True).eval()',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def _about_lines(
    record: ModelRecord,
    metrics: Mapping[str, Any] | None,
    released: ReleasedWeights | None,
    assumptions: list[str] | None,
    release_like: ReleasedWeights | None,
) -> list[str]:
    """The card's description: what the model is, whose weights, its settings, classes and accuracy."""
    args = record.model_args
    form = "reparameterized (deploy) form" if record.reparameterized else "training form"
    settings = ", ".join(f"`{k}={args[k]!r}`" for k in FFN_ARGS if k in args)
    if released is not None:
        whose = f"the authors' released {released.names[0]} weights"
    elif release_like is not None:
        whose = (
            f"unverified: the source file recorded no settings and is shaped like the authors' released "
            f"{release_like.names[0]} weights, whose settings were assumed"
        )
    else:
        whose = "not the authors' release"
    fold = (
        "have been folded into three matrices; it cannot be trained further."
        if record.reparameterized
        else "fold into three matrices for inference (`repavit.reparameterize_model`)."
    )
    classes = (
        ["- Classes: the 1000 ImageNet-1k classes"]
        if released
        else _class_lines(record.class_names, args.get("num_classes"))
    )
    return [
        f"`{record.model_name}` in its {form}: a RePaViT (ICML 2025) model whose channel-idle FFNs {fold}",
        "",
        f"- Weights: {whose}",
        f"- Model: {record.describe()}",
        f"- Model settings: {settings}" if settings else "- Model settings: defaults",
        f"- Model arguments: `{json.dumps(dict(args))}`",
        *classes,
        *_accuracy_lines(metrics or {}, released),
        *[f"- Assumed (the source file did not record it): {a}" for a in assumptions or []],
        "- Paper: https://arxiv.org/abs/2505.21847",
        "- Original code: https://github.com/Ackesnal/RePaViT",
    ]


def save_hub_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    record: ModelRecord,
    repo_id: str | None = None,
    numbers: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    released: ReleasedWeights | None = None,
    assumptions: list[str] | None = None,
    release_like: ReleasedWeights | None = None,
) -> Path:
    """Write ``model`` as a Hub-layout folder (``config.json``, ``model.safetensors``, ``README.md``).

    Args:
        model: a timm-built RePa model (it carries the ``pretrained_cfg`` written to config.json).
        out_dir: output folder (created).
        record: the model record (:func:`repavit.models.record_of`); stored in ``config.json`` under
            ``"repavit"``, with timm's ``model_args`` and ``label_names`` beside it.
        repo_id: Hub repository the folder is meant for (used in the model card only).
        numbers: measured numbers for the model card; defaults to :func:`measure_model` (no reference).
        metrics: the accuracy the training run recorded with the weights (``acc1``, ``acc5``, ...).
        released: the released weights these are, if they are the authors' (the card then cites the paper).
        assumptions: what no file recorded about the model (listed in the card).
        release_like: released weights the source was assumed to be (said, unverified, in the card).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        raise UserError("the model has no pretrained_cfg; build it with timm.create_model / repavit.create_model")
    if bool(getattr(model, "reparameterized", False)) != record.reparameterized:
        raise UserError("the record's form (reparameterized or not) is not the model's")
    args = {**record.model_args, "reparameterized": record.reparameterized}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", METADATA_KEY: json.dumps(record.to_dict())}  # the weight file alone is enough too
    atomic_write(out / HUB_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=meta))
    cfg = {**cfg, "architecture": record.model_name}
    if released is None:  # the release's description and tag belong to the authors' weights only
        cfg = {k: v for k, v in cfg.items() if k not in ("tag", "description")}
        cfg["description"] = record.describe()
    model.pretrained_cfg = cfg
    model_config = {"label_names": record.class_names} if record.class_names else None
    with tempfile.TemporaryDirectory() as tmp:  # timm writes its config to a path; we add the record
        save_config_for_hf(model, os.path.join(tmp, "config.json"), model_config=model_config, model_args=args)
        config = json.loads(Path(tmp, "config.json").read_text())
    config[HUB_RECORD_KEY] = record.to_dict()
    write_json(out / "config.json", config)
    numbers = dict(numbers) if numbers is not None else measure_model(model)
    card = model_card(record, numbers, repo_id, metrics, released, assumptions, release_like)
    write_text(out / "README.md", card)
    _logger.info("wrote Hub-layout folder %s", out)
    return out
