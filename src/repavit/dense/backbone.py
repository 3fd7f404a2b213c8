"""Classification models as multi-scale backbones for detectors and segmenters.

:class:`DenseBackbone` wraps a registered model (a RePa model or timm's vanilla twin) and returns an
ordered dict of ``NCHW`` maps, one per pyramid level, as torchvision's FPN and our UperNet take them:

* **Swin** (``RePaSwin_*``, timm ``swin_*``): the four stage outputs at strides 4, 8, 16, 32, each
  through its own LayerNorm (the ``norm{i}`` of the Swin detection and segmentation configs). Any input
  size runs (maps are padded to the window inside the model).
* **PoolFormer** (``RePaPoolformer_*``): the four stage outputs, each through a GroupNorm with one group
  (the PoolFormer detection code's per-level norm).
* **ViT** (``RePaViT_*``): a ViTDet-style simple feature pyramid from the last block's stride-16 map:
  two transposed convolutions up to stride 4, one to stride 8, the map itself, and a 2x max-pool to
  stride 32. The position embedding is sized for ``img_size``, so a ViT backbone takes that square input
  (the detectors resize to it).

**The FFN BatchNorms under detection batches.** Detection trains with 1-16 images per GPU, too few for
BatchNorm statistics. ``bn="frozen"`` (the default, and what fine-tuning from an ImageNet checkpoint
should use) keeps every BatchNorm of the backbone in eval mode during training: the running statistics
stay the pretrained ones, the affine weights still learn. ``bn="train"`` updates the statistics from the
batches, and ``bn="sync"`` does so across processes (SyncBatchNorm under torchrun). Frozen statistics
are also what makes the fold exact for a fine-tuned detector: the fold uses the running statistics.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models import reparameterize_model

__all__ = ["BN_MODES", "DenseBackbone", "backbone_family", "build_backbone"]

BN_MODES = ("frozen", "train", "sync")
_FAMILIES = {"swin": "swin", "poolformer": "poolformer", "vit": "vit", "deit": "vit"}


def backbone_family(model_name: str) -> str:
    """``"swin"``, ``"poolformer"`` or ``"vit"`` for a model name; a UserError for other models."""
    low = model_name.lower()
    for key, family in _FAMILIES.items():
        if key in low and "mixer" not in low and "lvvit" not in low:
            return family
    raise UserError(
        f"{model_name!r} has no dense-prediction backbone here: expected a Swin (RePaSwin_*, swin_*), "
        "PoolFormer (RePaPoolformer_*) or ViT (RePaViT_*, vit_*/deit_*) model"
    )


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``NCHW`` map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _simple_pyramid(dim: int, levels: tuple[int, ...]) -> tuple[nn.ModuleDict, list[int]]:
    """ViTDet's scale ops from a stride-16 map for the requested levels (strides 4, 8, 16, 32), and the
    channel counts of all four."""
    half, quarter = dim // 2, dim // 4
    ops = nn.ModuleList(
        [
            nn.Sequential(
                nn.ConvTranspose2d(dim, half, 2, stride=2),
                _LayerNorm2d(half),
                nn.GELU(),
                nn.ConvTranspose2d(half, quarter, 2, stride=2),
            ),
            nn.ConvTranspose2d(dim, half, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ]
    )
    return nn.ModuleDict({str(i): ops[i] for i in levels}), [quarter, half, dim, dim]


class DenseBackbone(nn.Module):
    """A model's feature pyramid: ``forward(images) -> {"0": stride-4 map, "1": stride 8, ...}``.

    Attributes:
        body: the classification model (head removed); :meth:`reparameterize` folds it in place.
        family: ``"swin"``, ``"poolformer"`` or ``"vit"``.
        out_channels: channels per returned level; ``strides``: their strides.
        bn: the BatchNorm mode (see the module docstring).
    """

    def __init__(self, body: nn.Module, family: str, out_indices: tuple[int, ...] = (0, 1, 2, 3), bn: str = "frozen"):
        super().__init__()
        if bn not in BN_MODES:
            raise UserError(f"unknown BatchNorm mode {bn!r}: expected one of {', '.join(BN_MODES)}")
        levels = list(out_indices)
        if not levels or any(not 0 <= i <= 3 for i in levels) or sorted(set(levels)) != levels:
            raise UserError(f"out_indices {out_indices!r}: expected increasing levels from 0 to 3")
        self.body, self.family, self.bn, self.out_indices = body, family, bn, tuple(out_indices)
        if family == "vit":
            self.pyramid, chans = _simple_pyramid(body.embed_dim, self.out_indices)
            self.norms = None
            strides = [4, 8, 16, 32]
        else:
            info = body.feature_info
            chans, strides = [f["num_chs"] for f in info], [f["reduction"] for f in info]
            self.pyramid = None
            make = (lambda c: nn.LayerNorm(c)) if family == "swin" else (lambda c: nn.GroupNorm(1, c))
            self.norms = nn.ModuleList([make(chans[i]) for i in self.out_indices])
        self._nhwc = type(body).__module__.startswith("repavit")
        self.out_channels = [chans[i] for i in self.out_indices]
        self.strides = [strides[i] for i in self.out_indices]
        if bn == "sync" and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.body = nn.SyncBatchNorm.convert_sync_batchnorm(self.body)

    def train(self, mode: bool = True) -> DenseBackbone:
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def reparameterized(self) -> bool:
        return bool(getattr(self.body, "reparameterized", False))

    def reparameterize(self) -> DenseBackbone:
        """Fold the body's FFNs in place (exact with the running statistics); the wrapper stays as it is."""
        self.body.eval()
        reparameterize_model(self.body, inplace=True)
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.family == "vit":
            (last,) = self.body.forward_intermediates(x, indices=1, intermediates_only=True)
            maps = [self.pyramid[str(i)](last) for i in self.out_indices]
        elif self.family == "swin":
            if self._nhwc:  # ours gives channels-last maps without a copy
                feats = self.body.forward_intermediates(
                    x, indices=list(self.out_indices), output_fmt="NHWC", intermediates_only=True
                )
            else:  # timm's Swin returns NCHW only
                feats = self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
                feats = [f.permute(0, 2, 3, 1) for f in feats]
            maps = [norm(f).permute(0, 3, 1, 2) for norm, f in zip(self.norms, feats)]
        else:
            feats = self.body.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
            maps = [norm(f) for norm, f in zip(self.norms, feats)]
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def build_backbone(
    model_name: str,
    *,
    pretrained: str | None = None,
    bn: str = "frozen",
    out_indices: tuple[int, ...] = (0, 1, 2, 3),
    model_kwargs: dict[str, Any] | None = None,
) -> DenseBackbone:
    """A :class:`DenseBackbone` for a registered model, optionally with ImageNet weights.

    Args:
        model_name: e.g. ``"RePaSwin_Tiny"``, ``"RePaPoolformer_s12"``, ``"RePaViT_Small"``, or timm's
            vanilla ``"swin_tiny_patch4_window7_224"`` (the latency baseline).
        pretrained: a classification checkpoint in any layout :func:`repavit.load_model` reads (ours with
            its record, the authors', timm's); its head is dropped. For a ViT whose ``img_size`` differs
            from the checkpoint's, the position embedding is resampled.
        bn: ``"frozen"``, ``"train"`` or ``"sync"`` (module docstring).
        model_kwargs: model settings (``idle_ratio``, ``drop_path_rate``, ``img_size``, ...).
    """
    family = backbone_family(model_name)
    kwargs = dict(model_kwargs or {})
    if family == "swin" and not model_name.startswith("RePa"):
        kwargs.setdefault("strict_img_size", False)  # timm's Swin: any input size, as ours
    body = _build_body(model_name, pretrained, kwargs)
    # drop what the feature maps do not use (head, final norm, stages after the last level): DDP needs
    # every parameter to get a gradient
    keep = [len(body.blocks) - 1] if family == "vit" else [max(out_indices)]
    body.prune_intermediate_layers(keep, prune_norm=True, prune_head=True)
    return DenseBackbone(body, family, out_indices=out_indices, bn=bn)


def _build_body(model_name: str, pretrained: str | None, kwargs: dict[str, Any]) -> nn.Module:
    from ..models import create_model, load_model

    if pretrained is None:
        return create_model(model_name, **kwargs)
    img_size = kwargs.pop("img_size", None)
    loaded = load_model(pretrained, model_name, reparameterized=False, **kwargs).model
    if img_size is None or backbone_family(model_name) != "vit":
        return loaded
    model = create_model(model_name, img_size=img_size, **{**loaded_args(loaded), **kwargs})
    state = loaded.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(pos, model.patch_embed.grid_size, num_prefix_tokens=prefix)
    model.load_state_dict(state)
    return model


def loaded_args(model: nn.Module) -> dict[str, Any]:
    """The settings a loaded model was built with (its record's), without the input size."""
    from ..models.record import model_args_of

    return {k: v for k, v in model_args_of(model).items() if k != "img_size"}
