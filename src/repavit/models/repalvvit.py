"""RePa-LV-ViT: LV-ViT (token-labeling ViT) with channel-idle, reparameterizable FFNs, and vanilla LV-ViT.

Papers: RePaViT (Xu et al., ICML 2025, https://arxiv.org/abs/2505.21847); LV-ViT / token labeling
(Jiang et al., NeurIPS 2021, https://arxiv.org/abs/2104.10858). LV-ViT's reference code is
https://github.com/zihangJiang/TokenLabeling (Apache-2.0). This is an independent implementation;
the vanilla models load the reference's checkpoints (its key layout is mapped on load).

Architecture: a four-convolution stem (7x7/2 conv + BN + ReLU, two 3x3 convs + BN + ReLU, then an
8x8/8 projection: 16 px per token) -> class token -> position embedding -> blocks -> LayerNorm.
A block is ``x + drop_path(attn(norm1(x))) / skip_lam`` (no qkv bias), then the FFN, whose
branch is also divided by ``skip_lam`` (LV-ViT-S/M: 2). Two heads: ``head`` on the class token,
``aux_head`` on every patch token. The prediction is ``head(cls) + 0.5 * max_tokens aux_head(token)``.

RePa form: the FFN is the channel-idle FFN with BatchNorm (``mlp.norm1``/``mlp.norm2``), its
``1 / skip_lam`` folded into the fused weights and bias. ``reparameterize()`` also folds the stem's
three BatchNorms into their convolutions (exact; LV-ViT's stem has them, the authors' other
families have no BN there).

What "/0.75" means here: the paper names RePa-LV-ViT-S/M "/0.75" and counts 19.1M / 40.1M
parameters after reparameterization. Those counts are those of ``C`` activated hidden channels
(the paper's mu = 1, the same ``C`` channels that RePaViT's idle ratio 0.75 leaves at ``mlp_ratio``
4), not of 25% of LV-ViT's ``3C`` hidden channels (which gives 17.9M / 37.6M). So the default
``idle_ratio`` of this family is 2/3 of the hidden channels, and active channels are rounded to
the nearest integer (so that 2/3 gives exactly ``C``). ``idle_ratio`` keeps its meaning of every
family: the share of the FFN's hidden channels that skip the activation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from timm.layers import DropPath, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor, nn

from ..errors import UserError
from ..layers.attention import PreNormAttention
from ..layers.features import take_indices
from ..layers.ffn_state import prepare_ffns
from ..layers.fold import BNStats, fold_bn_after_conv
from ..layers.idle_mlp import ChannelIdleMlp, FusedIdleMlp, active_channels
from ..layers.reparam import ReparamMixin, check_ffn_settings
from ._pretrained import build_model_with_cfg, with_released_weights
from ._registry import register_variants, repa_cfg
from .record import CheckpointMismatchError

__all__ = ["ConvStem", "LVBlock", "RePaLVViT", "checkpoint_filter_fn", "mix_tokens", "unmix_tokens"]

# the paper's "/0.75" for LV-ViT: C of the 3C hidden channels activated (see the module docstring)
DEFAULT_IDLE_RATIO = 2.0 / 3.0
AUX_WEIGHT = 0.5  # weight of the aux head's token maximum in the prediction (the reference's 0.5)


class ConvStem(nn.Module):
    """LV-ViT's patch embedding: three conv-BN-ReLU layers at half resolution, then a patch projection.

    ``conv1`` 7x7/2 (``stem_dim`` channels), ``conv2`` and ``conv3`` 3x3/1, each followed by BatchNorm
    and ReLU; ``proj`` with kernel and stride ``patch_size // 2``. Output ``(B, embed_dim, H/p, W/p)``.
    ``fused=True``: the BatchNorms are folded into the convolutions (biased convs, no BN), the form
    :meth:`fuse` returns.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        stem_dim: int = 64,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if patch_size % 2:
            raise UserError(f"LV-ViT's stem needs an even patch_size (it halves the image first), got {patch_size}")
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans, self.embed_dim, self.stem_dim, self.fused = in_chans, embed_dim, stem_dim, fused
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=fused)
        self.bn1 = nn.Identity() if fused else nn.BatchNorm2d(stem_dim)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=fused)
        self.bn2 = nn.Identity() if fused else nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=fused)
        self.bn3 = nn.Identity() if fused else nn.BatchNorm2d(stem_dim)
        self.relu = nn.ReLU(inplace=True)
        k = patch_size // 2
        self.proj = nn.Conv2d(stem_dim, embed_dim, k, stride=k)

    def forward(self, x: Tensor) -> Tensor:
        # channels-last convolutions: 1.6x faster for this stem on CPU (inference; 1.3x for a training
        # step), and the (B, H, W, C) result is already the token layout (see ``RePaLVViT._tokens``)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    @torch.no_grad()
    def fuse(self) -> ConvStem:
        """The same stem with each BatchNorm folded into its convolution (float64 fold). Eval only."""
        if self.fused:
            return self
        w = self.conv1.weight
        out = ConvStem(self.img_size, self.patch_size[0], self.in_chans, self.embed_dim, self.stem_dim, fused=True)
        out.to(device=w.device, dtype=w.dtype)
        for i in (1, 2, 3):
            conv, bn, dst = getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), getattr(out, f"conv{i}")
            weight, bias = fold_bn_after_conv(conv.weight, conv.bias, BNStats.from_module(bn))
            dst.weight.copy_(weight.to(w.dtype))
            dst.bias.copy_(bias.to(w.dtype))
        out.proj.load_state_dict(self.proj.state_dict())
        return out.eval()


class LVBlock(nn.Module):
    """``x + drop_path(attn(norm1(x))) / skip_lam``, then the FFN (its residual, and ``/ skip_lam``, inside)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        skip_lam: float = 2.0,
        idle_ratio: float = DEFAULT_IDLE_RATIO,
        channel_idle: bool = True,
        feature_norm: str = "BatchNorm",
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.skip_lam = float(skip_lam)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PreNormAttention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm=False
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if reparameterized:
            act_dim = active_channels(hidden, idle_ratio, "round") if channel_idle else hidden
            self.mlp: nn.Module = FusedIdleMlp(dim, act_dim, has_linear=act_dim < hidden, hidden_dim=hidden)
        else:
            self.mlp = ChannelIdleMlp(
                dim,
                hidden,
                idle_ratio=idle_ratio,
                channel_idle=channel_idle,
                feature_norm=feature_norm,
                drop_path=drop_path,
                rounding="round",
                skip_lam=skip_lam,
            )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return self.mlp(x)


def mix_tokens(grid: Tensor, lam: float | None = None) -> tuple[Tensor, tuple[int, int, int, int]]:
    """MixToken (LV-ViT): a box of every sample's patch embeddings replaced by the batch-flipped sample's.

    ``grid`` is ``(B, C, H, W)``. The box is CutMix's: side ratio ``sqrt(1 - lam)`` of the grid, centre
    uniform, clipped to the grid; ``lam ~ Beta(1, 1)`` unless given. Returns the mixed grid and the box
    ``(y1, x1, y2, x2)`` (rows ``y1:y2``, columns ``x1:x2``); the share of tokens kept is
    ``1 - (y2 - y1) * (x2 - x1) / (H * W)``.
    """
    H, W = grid.shape[-2:]
    if lam is None:
        lam = float(torch.rand(()))  # Beta(1, 1) is uniform
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    return _swap_box(grid, (y1, x1, y2, x2), dims=(-2, -1)), (y1, x1, y2, x2)


def unmix_tokens(tokens: Tensor, grid_size: tuple[int, int], box: tuple[int, int, int, int]) -> Tensor:
    """Undo :func:`mix_tokens` on per-token outputs ``(B, H*W, K)``: the box comes back from the flipped sample.

    After this, every sample's token outputs all belong to its own image, so they are compared with
    that image's token targets unchanged.
    """
    B, N, K = tokens.shape
    grid = tokens.reshape(B, grid_size[0], grid_size[1], K)
    return _swap_box(grid, box, dims=(1, 2)).reshape(B, N, K)


def _swap_box(t: Tensor, box: tuple[int, int, int, int], dims: tuple[int, int]) -> Tensor:
    """``t`` with the box (on axes ``dims``) taken from ``t.flip(0)`` (out of place, differentiable)."""
    y1, x1, y2, x2 = box
    if y2 <= y1 or x2 <= x1:
        return t
    H, W = t.shape[dims[0]], t.shape[dims[1]]
    rows = torch.zeros(H, dtype=torch.bool, device=t.device)
    cols = torch.zeros(W, dtype=torch.bool, device=t.device)
    rows[y1:y2], cols[x1:x2] = True, True
    mask = rows[:, None] & cols[None, :]  # (H, W)
    shape = [1] * t.dim()
    shape[dims[0]], shape[dims[1]] = H, W
    return torch.where(mask.reshape(shape), t.flip(0), t)


class RePaLVViT(ReparamMixin, nn.Module):
    """LV-ViT with channel-idle FFNs (``channel_idle=False, feature_norm="LayerNorm"``: vanilla LV-ViT).

    Args:
        img_size, patch_size, in_chans: input; ``patch_size`` is the stem's total stride (16).
        num_classes: classes of both heads (0 for none).
        global_pool: ``"token"`` (class token, LV-ViT's) or ``""`` (``forward_head`` returns tokens).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size (LV-ViT: ratio 3, no qkv bias).
        skip_lam: every residual branch is divided by this (LV-ViT-S/M: 2).
        stem_dim: channels of the stem's convolutions (64).
        channel_idle, idle_ratio, feature_norm, heuristic: the FFN (see the module docstring for the
            default ratio 2/3; only the constant ``"static"`` schedule).
        aux_head: keep the dense head ``aux_head`` (LV-ViT-S/M have it; without it the prediction is the
            class head alone).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (linear).
        reparameterized: build the fused inference form (FFNs and stem), to load deploy checkpoints.

    Forward: in eval mode, and in training without token labels, the prediction
    ``head(cls) + 0.5 * max aux_head(tokens)``. With ``token_labeling = True`` (set by the trainer),
    training mode returns ``(class logits, token logits (B, N, K), box)`` for the token-labeling
    loss, with MixToken applied to the patch embeddings when ``mix_token`` is True (the box is
    ``(0, 0, 0, 0)`` when nothing was mixed).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        skip_lam: float = 2.0,
        stem_dim: int = 64,
        channel_idle: bool = True,
        idle_ratio: float = DEFAULT_IDLE_RATIO,
        feature_norm: str = "BatchNorm",
        heuristic: str = "static",
        aux_head: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", ""):
            raise UserError(f"unknown global_pool {global_pool!r}; expected 'token' or ''")
        self.heuristic = check_ffn_settings(feature_norm, idle_ratio, reparameterized, heuristic, "RePaLVViT")
        if isinstance(skip_lam, bool) or not isinstance(skip_lam, (int, float)) or not skip_lam > 0:
            raise UserError(f"skip_lam must be a positive number, got {skip_lam!r}")
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.channel_idle, self.feature_norm, self.idle_ratio = channel_idle, feature_norm, idle_ratio
        self.skip_lam, self.aux_weight = float(skip_lam), AUX_WEIGHT
        self.token_labeling, self.mix_token = False, True
        self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim, stem_dim, fused=reparameterized)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[
                LVBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    skip_lam=skip_lam,
                    idle_ratio=idle_ratio,
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
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) if aux_head else None
        self._init_weights()
        if reparameterized:
            self.eval()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
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
        """New ``head`` and ``aux_head`` (both read the classes) for ``num_classes``."""
        self._reset_head(num_classes, global_pool, ("token", ""), self.embed_dim)
        if self.aux_head is not None:
            aux = self.head
            self.aux_head = (
                nn.Linear(self.embed_dim, num_classes, device=aux.weight.device, dtype=aux.weight.dtype)
                if num_classes > 0
                else nn.Identity()
            ).train(self.training)

    def _tokens(self, grid: Tensor) -> Tensor:
        """Patch-embedding grid ``(B, C, H, W)`` -> normalized tokens ``(B, 1 + H*W, C)``."""
        B, C = grid.shape[0], grid.shape[1]
        x = grid.permute(0, 2, 3, 1).reshape(B, -1, C)  # a view of a channels-last grid
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return self.norm(self.blocks(self.pos_drop(x + self.pos_embed)))

    def forward_features(self, x: Tensor) -> Tensor:
        return self._tokens(self.patch_embed(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool != "token":
            return x
        if pre_logits:
            return x[:, 0]
        logits = self.head(x[:, 0])
        if self.aux_head is None or self.num_classes == 0:
            return logits
        return logits + self.aux_weight * self.aux_head(x[:, self.num_prefix_tokens :]).max(1)[0]

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # compiled: the prediction only
            return self.forward_head(self.forward_features(x))
        if self.training and self.token_labeling and self.aux_head is not None:
            return self.forward_token_labeling(x)  # a tuple (see the class docstring)
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_token_labeling(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int, int, int]]:
        """``(class logits (B, K), token logits (B, N, K), MixToken box)`` (training with token labels).

        The token logits of a mixed box are moved back (:func:`unmix_tokens`), so each sample's token
        logits belong to its own image's token targets.
        """
        grid = self.patch_embed(x)
        box = (0, 0, 0, 0)
        if self.mix_token and self.training:
            grid, box = mix_tokens(grid)
        tokens = self._tokens(grid)
        aux = self.aux_head(tokens[:, self.num_prefix_tokens :])
        if box[2] > box[0] and box[3] > box[1]:
            aux = unmix_tokens(aux, tuple(grid.shape[-2:]), box)
        return self.head(tokens[:, 0]), aux, box

    # ---- dense-prediction features (timm's forward_intermediates / features_only) -------------
    @property
    def feature_info(self) -> list[dict]:
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
        """Per-block outputs as feature maps (timm's API); the arguments are RePaViT's."""
        if output_fmt not in ("NCHW", "NLC"):
            raise UserError(f"unknown output_fmt {output_fmt!r}; expected 'NCHW' or 'NLC'")
        taken, max_index = take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self.patch_embed(x)
        x = x.permute(0, 2, 3, 1).reshape(B, -1, x.shape[1])
        x = self.pos_drop(torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1) + self.pos_embed)
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
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
            self.aux_head = None
        return taken

    def checkpoint_filter(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def vanilla_counterpart(self) -> nn.Module:
        """Vanilla LV-ViT of the same size (LayerNorm FFN, every channel activated), for benchmarks."""
        return RePaLVViT(
            img_size=self.patch_embed.img_size,
            patch_size=self.patch_embed.patch_size[0],
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=self.blocks[0].attn.num_heads,
            mlp_ratio=self.blocks[0].mlp.hidden_dim / self.embed_dim,
            skip_lam=self.skip_lam,
            stem_dim=self.patch_embed.stem_dim,
            channel_idle=False,
            feature_norm="LayerNorm",
            aux_head=self.aux_head is not None,
        )


# ---- checkpoint conversion ----------------------------------------------------------------
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_REF_NORM2 = re.compile(r"^(blocks\.\d+\.)norm2\.(weight|bias)$")


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: RePaLVViT) -> dict[str, Tensor]:
    """Map a checkpoint (LV-ViT's reference layout, or ours) onto ``model``'s keys, checking it fits.

    The reference keeps the FFN's LayerNorm in the block (``blocks.i.norm2``); ours keeps it in the
    FFN (``blocks.i.mlp.norm1``). A stem in the other form than the model's (training form with
    BatchNorms, or fused) is refused, as FFNs are. Position embeddings of another grid are resampled.
    Raises :class:`CheckpointMismatchError` naming what differs.
    """
    sd = {}
    for k, v in state_dict.items():
        m = _REF_NORM2.match(k)
        sd[f"{m.group(1)}mlp.norm1.{m.group(2)}" if m else k] = v
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
    if "aux_head.weight" in sd and model.aux_head is None:
        raise CheckpointMismatchError("checkpoint has an aux_head, the model has none: build it with aux_head=True")
    _check_stem(sd, model)
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


def _check_stem(sd: Mapping[str, Tensor], model: RePaLVViT) -> None:
    """Refuse a stem whose form (BatchNorms, or folded into the convolutions) is not the model's."""
    has_bn = "patch_embed.bn1.running_mean" in sd
    fused_file = "patch_embed.conv1.bias" in sd and not has_bn
    if model.patch_embed.fused and has_bn:
        raise CheckpointMismatchError(
            "checkpoint has a training-form stem (with BatchNorms) but the model is reparameterized: build it with "
            "reparameterized=False, load, then call reparameterize()"
        )
    if fused_file and not model.patch_embed.fused:
        raise CheckpointMismatchError(
            "checkpoint has a fused stem (BatchNorms folded into the convolutions): it is a reparameterized "
            "checkpoint; build the model with reparameterized=True"
        )


def identify_state_dict(state_dict: Mapping[str, Tensor]) -> str | None:
    """The LV-ViT size whose width and depth a state dict has: ``RePaLVViT_*`` for BatchNorm or fused FFNs,
    ``LVViT_*`` for LayerNorm ones (the reference's layout included); None for other models."""
    stem = state_dict.get("patch_embed.conv1.weight")
    if "cls_token" not in state_dict or stem is None or tuple(stem.shape[-2:]) != (7, 7):
        return None
    if "blocks.0.norm1.weight" not in state_dict or "blocks.0.attn.norm.weight" in state_dict:
        return None
    dim = state_dict["cls_token"].shape[-1]
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})
    repa = "blocks.0.mlp.norm1.running_mean" in state_dict or "blocks.0.mlp.in_proj.weight" in state_dict
    for size, (d, n, _) in ARCHS.items():
        if (d, n) == (dim, depth):
            return f"{'RePaLVViT' if repa else 'LVViT'}_{size.upper()}"
    return None


# ---- registry -------------------------------------------------------------------------------
# Model sizes: (embed_dim, depth, num_heads); mlp_ratio 3, skip_lam 2, 64-channel stem for both.
ARCHS = {"s": (384, 16, 6), "m": (512, 20, 8)}
_CROP = {"s": 0.9, "m": 1.0}  # the reference's test crops
MODEL_NAMES = {f"RePaLVViT_{s.upper()}": s for s in ARCHS} | {f"repa_lvvit_{s}_224": s for s in ARCHS}
# vanilla LV-ViT: its own architecture keys (a RePa name and a vanilla name are different models)
VANILLA_NAMES = {f"LVViT_{s.upper()}": f"vanilla_{s}" for s in ARCHS} | {
    f"lvvit_{s}_224": f"vanilla_{s}" for s in ARCHS
}
_LVVIT_ORIGIN = dict(
    origin_url="https://github.com/zihangJiang/TokenLabeling",
    paper_ids="arXiv:2104.10858",
    paper_name="All Tokens Matter: Token Labeling for Training Better Vision Transformers",
)


def _size(name: str) -> str:
    return (MODEL_NAMES | VANILLA_NAMES)[name].removeprefix("vanilla_")


def _cfg(name: str) -> dict:
    extra = _LVVIT_ORIGIN if name in VANILLA_NAMES else {}
    return repa_cfg(
        first_conv="patch_embed.conv1", pool_size=None, fixed_input_size=True, crop_pct=_CROP[_size(name)], **extra
    )


default_cfgs = generate_default_cfgs(with_released_weights({name: _cfg(name) for name in MODEL_NAMES | VANILLA_NAMES}))


def _create(variant: str, pretrained: bool = False, **kwargs) -> RePaLVViT:
    embed_dim, depth, num_heads = ARCHS[_size(variant)]
    model_args = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    if variant in VANILLA_NAMES:
        model_args.update(channel_idle=False, feature_norm="LayerNorm")
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        RePaLVViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


def _describe(name: str) -> str:
    kind = "vanilla LV-ViT (LayerNorm FFN)" if name in VANILLA_NAMES else "RePa-LV-ViT (channel-idle BatchNorm FFN)"
    return f"{name}: {kind} with embed_dim, depth, heads = {ARCHS[_size(name)]}."


register_variants(__name__, MODEL_NAMES | VANILLA_NAMES, _create, _describe, identify_state_dict)
