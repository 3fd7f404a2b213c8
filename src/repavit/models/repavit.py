"""RePaViT: DeiT-style Vision Transformers with channel-idle, reparameterizable FFNs.

Paper: "RePaViT: Scalable Vision Transformer Acceleration via Structural Reparameterization on
Feedforward Network Layers", Xu et al., ICML 2025, https://arxiv.org/abs/2505.21847
Original code: https://github.com/Ackesnal/RePaViT (Apache-2.0). This is an independent
implementation; its state-dict keys equal the authors', so their checkpoints load as they are.

Architecture: patch embedding (16x16 conv, no bias) -> class token -> absolute position
embedding -> ``norm_pre`` LayerNorm -> blocks -> ``norm`` LayerNorm -> token 0 -> ``head``.
A block is ``x + drop_path(attn(x))`` (the attention's LayerNorm lives inside ``attn``) followed
by the channel-idle FFN, which owns its residual.
"""

import re
from collections.abc import Mapping

import torch
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from ..errors import UserError
from ..layers.attention import PreNormAttention
from ..layers.features import take_indices
from ..layers.ffn_state import prepare_ffns
from ..layers.idle_mlp import (
    ChannelIdleMlp,
    FusedIdleMlp,
    active_channels,
    idle_ratios_for_depth,
)
from ..layers.reparam import ReparamMixin, check_ffn_settings
from ._pretrained import build_model_with_cfg, with_released_weights
from ._registry import register_variants, repa_cfg
from .record import CheckpointMismatchError

__all__ = ["Block", "RePaViT", "checkpoint_filter_fn"]


class Block(nn.Module):
    """``x + drop_path(attn(x))`` then the channel-idle FFN (residual inside the FFN)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        idle_ratio: float = 0.75,
        channel_idle: bool = True,
        feature_norm: str = "BatchNorm",
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attn = PreNormAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if reparameterized:
            act_dim = active_channels(hidden, idle_ratio) if channel_idle else hidden
            self.mlp: nn.Module = FusedIdleMlp(dim, act_dim, has_linear=act_dim < hidden, hidden_dim=hidden)
        else:
            self.mlp = ChannelIdleMlp(
                dim,
                hidden,
                idle_ratio=idle_ratio,
                channel_idle=channel_idle,
                feature_norm=feature_norm,
                drop_path=drop_path,
            )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(x))
        return self.mlp(x)

    def forward_prefix(self, x: Tensor, num_tokens: int = 1) -> Tensor:
        """``forward(x)[:, :num_tokens]`` without computing the other tokens' outputs (inference only).

        Exact when the FFN treats tokens independently: the fused FFN, or the training-form FFN in
        eval mode (BatchNorm with running statistics). In training mode BatchNorm normalizes over
        all tokens, so the caller must not use this there.
        """
        x = x[:, :num_tokens] + self.drop_path(self.attn.forward_prefix(x, num_tokens))
        return self.mlp(x)


class RePaViT(ReparamMixin, nn.Module):
    """Vision Transformer with channel-idle FFNs that fold into three matrices after training.

    Args:
        img_size: input resolution.
        patch_size: patch size of the embedding convolution.
        in_chans: input channels.
        num_classes: classes of the head (0 for no head).
        global_pool: ``"token"`` (class token, the authors' choice), ``"avg"`` or ``""``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        channel_idle: enable the channel-idle mechanism (False: every hidden channel activated).
        idle_ratio: share of FFN hidden channels that skip GELU, in [0, 1].
        feature_norm: FFN normalization, ``"BatchNorm"`` (foldable) or ``"LayerNorm"``.
        heuristic: per-block idle ratios, ``"static"`` (same everywhere) or ``"linear"``.
        drop_rate: dropout before the head and after attention projections.
        pos_drop_rate: dropout after the position embedding.
        attn_drop_rate: attention-probability dropout.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over the blocks.
        reparameterized: build the FFNs directly in their fused inference form (to load deploy
            checkpoints); such a model cannot be trained.
        class_token_shortcut: in inference (eval mode) with ``global_pool="token"``, ``forward``
            runs the last block for the class token only: its keys and values still come from every
            token, but the queries, attention rows, projection, FFN and final norm of the other
            tokens (196 at 224 px), which the head never reads, are skipped. The logits are the same (every token's
            row is computed independently; tests check it against the full computation), and
            RePaViT_Base does about 6% fewer multiply-adds. ``forward_features`` and
            ``forward_intermediates`` always return every token. Set the attribute to False to run
            the full computation (the benchmarks do, to compare with the paper).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        channel_idle: bool = True,
        idle_ratio: float = 0.75,
        feature_norm: str = "BatchNorm",
        heuristic: str = "static",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reparameterized: bool = False,
        class_token_shortcut: bool = True,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise UserError(f"unknown global_pool {global_pool!r}; expected 'token', 'avg' or ''")
        check_ffn_settings(feature_norm, idle_ratio, reparameterized)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.channel_idle, self.feature_norm, self.heuristic = channel_idle, feature_norm, heuristic
        self.idle_ratio = idle_ratio
        self.class_token_shortcut = class_token_shortcut
        self.idle_ratios = idle_ratios_for_depth(idle_ratio, depth, heuristic) if channel_idle else [0.0] * depth

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=False
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=1e-6)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear from 0
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    idle_ratio=self.idle_ratios[i],
                    channel_idle=channel_idle,
                    feature_norm=feature_norm,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
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
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- timm model API ---------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._reset_head(num_classes, global_pool, ("token", "avg", ""), self.embed_dim)

    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, N, C)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, C)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm_pre(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.blocks(self._embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not self.class_token_shortcut or self.global_pool != "token":
            return self.forward_head(self.forward_features(x))
        # Inference with class-token pooling: the head reads token 0 only, so the last block
        # computes that token's output alone (see ``class_token_shortcut``).
        x = self._embed(x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk.forward_prefix(x, 1) if i == last else blk(x)
        return self.forward_head(self.norm(x))

    # ---- dense-prediction features (timm's forward_intermediates / features_only) -------------
    @property
    def feature_info(self) -> list[dict]:
        """One map per block: ``embed_dim`` channels at stride ``patch_size`` (``features_only`` metadata)."""
        r = self.patch_embed.patch_size[0]
        return [dict(num_chs=self.embed_dim, reduction=r, module=f"blocks.{i}") for i in range(len(self.blocks))]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-block outputs as feature maps (timm's API), e.g. for a ViTDet-style neck.

        Args:
            x: images ``(B, C, H, W)``.
            indices: blocks to return: None for all, ``n`` for the last ``n``, or a list of indices.
            return_prefix_tokens: pair each map with its class token ``(B, 1, C)``.
            norm: apply the final LayerNorm to every returned map.
            stop_early: skip the blocks after the last requested one.
            output_fmt: ``"NCHW"`` (patch tokens reshaped to ``(B, C, H/16, W/16)``) or ``"NLC"``.
            intermediates_only: return only the list of maps.

        Returns:
            The maps, or ``(final normalized tokens, maps)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise UserError(f"unknown output_fmt {output_fmt!r}; expected 'NCHW' or 'NLC'")
        taken, max_index = take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        intermediates = []
        for i, blk in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            x = blk(x)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks (and norm/head) that the requested feature maps do not need. Returns the indices."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    def checkpoint_filter(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def vanilla_counterpart(self) -> nn.Module:
        """timm's plain ViT of the same size (the ``deit_*``/``vit_*`` architecture), for benchmarks."""
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=self.patch_embed.img_size,
            patch_size=self.patch_embed.patch_size,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=self.blocks[0].attn.num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            num_classes=self.num_classes,
        )


# ---- checkpoint conversion ----------------------------------------------------------------
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: RePaViT) -> dict[str, Tensor]:
    """Map a checkpoint in the authors' layout (or ours) onto ``model``'s keys, checking it fits.

    Handles the authors' training form, their reparameterized form (``mlp.fc1/fc2/fc3``), our
    fused form (through the FFN-state helpers every family shares, for any ``mlp_ratio``), and
    position embeddings of another grid size (resampled bicubically). Raises
    :class:`CheckpointMismatchError` naming the first setting that differs.
    """
    sd = dict(state_dict)
    if "cls_token" in sd and sd["cls_token"].shape[-1] != model.embed_dim:
        raise CheckpointMismatchError(
            f"checkpoint has embed_dim {sd['cls_token'].shape[-1]}, model {model.embed_dim}: "
            "it is for another model size"
        )
    depth = len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if depth and depth != len(model.blocks):
        raise CheckpointMismatchError(
            f"checkpoint has {depth} blocks, model has {len(model.blocks)}: it is for another model size "
            f"(or the same size with depth={depth})"
        )
    msg = prepare_ffns(sd, model, model.feature_norm, model.reparameterized)
    if msg:
        raise CheckpointMismatchError(msg)
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"],
            new_size=model.patch_embed.grid_size,
            num_prefix_tokens=model.num_prefix_tokens,
            interpolation="bicubic",
            antialias=True,
        )
    return sd


def identify_state_dict(state_dict: Mapping[str, Tensor]) -> str | None:
    """The RePaViT size (authors' name) whose width and depth a state dict has, or None."""
    if "cls_token" not in state_dict or "blocks.0.attn.norm.weight" not in state_dict:
        return None  # RePaViT keeps each block's attention LayerNorm inside ``attn``; DeiT does not
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or tuple(proj.shape[-2:]) != (16, 16):
        return None
    dim = state_dict["cls_token"].shape[-1]
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    for size, (d, n, _) in ARCHS.items():
        if (d, n) == (dim, depth):
            return f"RePaViT_{size.capitalize()}"
    return None


# ---- registry -------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return repa_cfg(first_conv="patch_embed.proj", pool_size=None, fixed_input_size=True, **kwargs)


# Model sizes: (embed_dim, depth, num_heads). Shared by both naming schemes.
ARCHS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
# The authors' names and the timm-style names, each mapped to a size.
MODEL_NAMES = {f"RePaViT_{s.capitalize()}": s for s in ARCHS} | {f"repavit_{s}_patch16_224": s for s in ARCHS}

default_cfgs = generate_default_cfgs(with_released_weights({name: _cfg() for name in MODEL_NAMES}))


def _create_repavit(variant: str, pretrained: bool = False, **kwargs) -> RePaViT:
    embed_dim, depth, num_heads = ARCHS[MODEL_NAMES[variant]]
    model_args = dict(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        RePaViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


def _describe(name: str) -> str:
    return f"{name}: RePaViT with embed_dim, depth, heads = {ARCHS[MODEL_NAMES[name]]}."


register_variants(__name__, MODEL_NAMES, _create_repavit, _describe, identify_state_dict)
