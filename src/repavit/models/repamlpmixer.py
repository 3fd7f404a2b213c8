"""RePaMlpMixer: MLP-Mixer whose channel-mixing MLP is the channel-idle, reparameterizable FFN.

Papers: RePaViT (Xu et al., ICML 2025, https://arxiv.org/abs/2505.21847); MLP-Mixer (Tolstikhin et
al., NeurIPS 2021, https://arxiv.org/abs/2105.01601). The authors' repository has an MLP-Mixer file
that no longer constructs with current timm and was never evaluated; this is an independent
implementation built to the same definitions as the other RePa families, with two deliberate
differences from that file:

* ``idle_ratio`` is honoured (``a = ceil(4C * (1 - idle_ratio))`` active channels); the authors
  hard-code ``a = C``, i.e. always 0.75.
* The token-mixing branch is normalized the standard MLP-Mixer way: LayerNorm over the *channels*
  of each token, then the MLP mixes along the token axis. The authors normalize over the wrong axis.

Architecture: patch embedding (conv, stride = patch) -> blocks -> LayerNorm -> token mean ->
``head``. A block is ``x + drop_path(token_mlp(LN(x)^T)^T)`` then the channel-idle FFN (which
owns its normalization and residual). The number of tokens, hence the token MLP, is fixed by
``img_size``.
"""

import math
import re
from collections.abc import Mapping, Sequence

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, lecun_normal_, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from ..errors import UserError
from ..layers.features import take_indices
from ..layers.ffn_state import prepare_ffns
from ..layers.idle_mlp import (
    ChannelIdleMlp,
    FusedIdleMlp,
    active_channels,
)
from ..layers.reparam import ReparamMixin, check_ffn_settings
from ._pretrained import build_model_with_cfg, with_released_weights
from ._registry import register_variants, repa_cfg
from .record import CheckpointMismatchError

__all__ = ["RePaMlpMixer", "checkpoint_filter_fn"]


class MixerBlock(nn.Module):
    """Token mixing ``x + drop_path(mlp_tokens(norm1(x)^T)^T)``, then the channel-idle FFN ``mlp``."""

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: tuple[float, float] = (0.5, 4.0),
        idle_ratio: float = 0.75,
        channel_idle: bool = True,
        feature_norm: str = "BatchNorm",
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        tokens_dim, channels_dim = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # over channels, per token (standard MLP-Mixer)
        self.mlp_tokens = Mlp(seq_len, tokens_dim, act_layer=nn.GELU, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if reparameterized:
            act_dim = active_channels(channels_dim, idle_ratio) if channel_idle else channels_dim
            self.mlp: nn.Module = FusedIdleMlp(dim, act_dim, has_linear=act_dim < channels_dim, hidden_dim=channels_dim)
        else:
            self.mlp = ChannelIdleMlp(
                dim,
                channels_dim,
                idle_ratio=idle_ratio,
                channel_idle=channel_idle,
                feature_norm=feature_norm,
                drop_path=drop_path,
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # mix along tokens: (B, N, C)
        x = x + self.drop_path(y)
        return self.mlp(x)


class RePaMlpMixer(ReparamMixin, nn.Module):
    """MLP-Mixer with channel-idle channel-mixing FFNs that fold into three matrices after training.

    Args:
        img_size: input resolution (fixes the number of tokens and so the token MLP's size).
        patch_size: patch size of the embedding convolution.
        in_chans: input channels.
        num_classes: classes of the head (0 for no head).
        global_pool: ``"avg"`` or ``""`` (no pooling).
        embed_dim: channels per token.
        depth: number of Mixer blocks.
        mlp_ratio: (token MLP, channel FFN) hidden widths over ``embed_dim``.
        channel_idle: enable the channel-idle mechanism (False: every hidden channel activated).
        idle_ratio: share of channel-FFN hidden channels that skip GELU, in [0, 1].
        feature_norm: channel-FFN normalization, ``"BatchNorm"`` (foldable) or ``"LayerNorm"``.
        heuristic: idle-ratio schedule; only ``"static"`` (the same ratio in every block).
        drop_rate: dropout before the head.
        proj_drop_rate: dropout inside the token MLP.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over the blocks.
        reparameterized: build the FFNs directly in their fused inference form; such a model cannot be trained.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 512,
        depth: int = 8,
        mlp_ratio: tuple[float, float] = (0.5, 4.0),
        channel_idle: bool = True,
        idle_ratio: float = 0.75,
        feature_norm: str = "BatchNorm",
        heuristic: str = "static",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise UserError(f"unknown global_pool {global_pool!r}; expected 'avg' or ''")
        self.heuristic = check_ffn_settings(feature_norm, idle_ratio, reparameterized, heuristic, "RePaMlpMixer")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.channel_idle, self.idle_ratio, self.feature_norm = channel_idle, idle_ratio, feature_norm
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_size, self.depth = patch_size, depth

        self.stem = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.img_size = self.stem.img_size
        seq_len = self.stem.num_patches
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    embed_dim,
                    seq_len,
                    mlp_ratio=mlp_ratio,
                    idle_ratio=idle_ratio,
                    channel_idle=channel_idle,
                    feature_norm=feature_norm,
                    proj_drop=proj_drop_rate,
                    drop_path=drop_path_rate * i / max(depth - 1, 1),
                    reparameterized=reparameterized,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if reparameterized:
            self.eval()

    def _init_weights(self) -> None:
        # As timm's MLP-Mixer (xavier-uniform linears, zero biases, lecun-normal stem), except the head:
        # trunc-normal like the other RePa models rather than zeros, so an untrained model's logits
        # are not all zero (which would hide reparameterization errors in relative comparisons).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        lecun_normal_(self.stem.proj.weight)
        nn.init.zeros_(self.stem.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)

    # ---- timm model API ---------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._reset_head(num_classes, global_pool, ("avg", ""), self.embed_dim)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> normalized tokens ``(B, N, embed_dim)``."""
        x = self.stem(x)  # (B, N, C)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def feature_info(self) -> list[dict]:
        """One map per block: ``embed_dim`` channels at stride ``patch_size`` (``features_only`` metadata)."""
        return [
            dict(num_chs=self.embed_dim, reduction=self.patch_size, module=f"blocks.{i}")
            for i in range(len(self.blocks))
        ]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-block token maps (timm's API): ``(B, C, H/p, W/p)`` for ``"NCHW"`` or ``(B, N, C)`` for ``"NLC"``.

        ``indices``: None for all blocks, ``n`` for the last ``n``, or a list. ``norm`` applies the final
        LayerNorm to every map. Returns the maps, or ``(final normalized tokens, maps)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise UserError(f"unknown output_fmt {output_fmt!r}; expected 'NCHW' or 'NLC'")
        taken, max_index = take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self.stem(x)  # (B, N, C)
        H, W = self.stem.grid_size
        intermediates = []
        for i, blk in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x = blk(x)
            if i in taken:
                y = self.norm(x) if norm else x
                intermediates.append(
                    y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y
                )
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks (and norm/head) that the requested maps do not need. Returns the indices."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    # ---- checkpoints and benchmarks ------------------------------------------------------------
    def checkpoint_filter(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def vanilla_counterpart(self) -> nn.Module:
        """timm's plain MLP-Mixer of the same size (``mixer_*``), for benchmarks."""
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(
            num_classes=self.num_classes,
            img_size=self.img_size,
            patch_size=self.patch_size,
            num_blocks=self.depth,
            embed_dim=self.embed_dim,
        )


# ---- checkpoint conversion ----------------------------------------------------------------
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: RePaMlpMixer) -> dict[str, Tensor]:
    """Check a checkpoint in our layout against ``model`` (there is no working authors' layout).

    Raises :class:`CheckpointMismatchError` naming the first setting that differs (embed_dim,
    depth, number of tokens, FFN form, feature_norm, idle_ratio).
    """
    sd = dict(state_dict)
    w = sd.get("stem.proj.weight")
    if w is not None and w.shape[0] != model.embed_dim:
        raise CheckpointMismatchError(
            f"checkpoint has embed_dim {w.shape[0]}, model {model.embed_dim}: it is for another model size"
        )
    if w is not None and w.shape[-1] != model.patch_size:
        raise CheckpointMismatchError(f"checkpoint has patch_size {w.shape[-1]}, model {model.patch_size}")
    depth = len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if depth and depth != model.depth:
        raise CheckpointMismatchError(
            f"checkpoint has depth {depth}, model {model.depth}: it is for another model size"
        )
    tok = sd.get("blocks.0.mlp_tokens.fc1.weight")
    n = model.stem.num_patches
    if tok is not None and tok.shape[1] != n:
        side = math.isqrt(tok.shape[1]) * model.patch_size
        raise CheckpointMismatchError(
            f"checkpoint mixes {tok.shape[1]} tokens (img_size ~{side}), model {n} (img_size {model.img_size[0]}): "
            "build the model with the checkpoint's img_size"
        )
    msg = prepare_ffns(sd, model, model.feature_norm, model.reparameterized)
    if msg:
        raise CheckpointMismatchError(msg)
    return sd


def identify_state_dict(state_dict: Mapping[str, Tensor]) -> str | None:
    """The RePaMlpMixer size (authors' name) whose patch, width and depth a state dict has, or None."""
    proj = state_dict.get("stem.proj.weight")
    if proj is None or "blocks.0.mlp_tokens.fc1.weight" not in state_dict:
        return None
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    for size, (patch, dim, arch_depth) in ARCHS.items():
        if (proj.shape[-1], proj.shape[0], depth) == (patch, dim, arch_depth):
            return f"RePaMlpMixer_{size}"
    return None


# ---- registry -------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return repa_cfg(first_conv="stem.proj", pool_size=None, fixed_input_size=True, **kwargs)


# Model sizes: (patch_size, embed_dim, depth), as MLP-Mixer S/B/L.
ARCHS = {
    "s32": (32, 512, 8),
    "s16": (16, 512, 8),
    "b32": (32, 768, 12),
    "b16": (16, 768, 12),
    "l32": (32, 1024, 24),
    "l16": (16, 1024, 24),
}
# The authors' names and the timm-style names, each mapped to a size.
MODEL_NAMES = {f"RePaMlpMixer_{s}": s for s in ARCHS} | {f"repamixer_{s}_224": s for s in ARCHS}

default_cfgs = generate_default_cfgs(with_released_weights({name: _cfg() for name in MODEL_NAMES}))


def _create_repamlpmixer(variant: str, pretrained: bool = False, **kwargs) -> RePaMlpMixer:
    patch, dim, depth = ARCHS[MODEL_NAMES[variant]]
    model_args = dict(patch_size=patch, embed_dim=dim, depth=depth)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        RePaMlpMixer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


def _describe(name: str) -> str:
    patch, dim, depth = ARCHS[MODEL_NAMES[name]]
    return f"{name}: RePaMlpMixer, patch {patch}, embed_dim {dim}, depth {depth}."


register_variants(__name__, MODEL_NAMES, _create_repamlpmixer, _describe, identify_state_dict)
