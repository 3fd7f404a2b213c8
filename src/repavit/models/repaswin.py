"""RePaSwin: Swin Transformers with channel-idle, reparameterizable FFNs.

Papers: RePaViT (Xu et al., ICML 2025, https://arxiv.org/abs/2505.21847); Swin Transformer (Liu et
al., ICCV 2021, https://arxiv.org/abs/2103.14030). Original code: https://github.com/Ackesnal/RePaViT
(Apache-2.0). This is an independent implementation; its state-dict keys equal the authors' except
for the structural buffers (``relative_position_index``, ``attn_mask``), which are computed here from
the input size and not stored, so one checkpoint serves every input size.

Architecture: 4x4 patch embedding with LayerNorm -> four stages of Swin blocks (window 7,
shifted windows on odd blocks, relative position bias) with 2x2 patch merging between stages ->
LayerNorm -> average over tokens -> ``head``. A block is ``x + drop_path(W-MSA(norm1(x)))``
followed by the channel-idle FFN, which owns its residual and normalization (no ``norm2``).
Tensors travel between blocks as ``(B, H, W, C)``.

Input sizes: at 224 every stage is a multiple of the window (56, 28, 14, 7) and the model is the
authors' model exactly. Other sizes work as in the Swin detection/segmentation code: feature maps
are padded at the bottom/right to a multiple of the window and the attention mask, built for that
size, also keeps real tokens from attending to padding (so the padding cannot change any real
token's output). A stage whose map fits in one window (``min(H, W) <= window``) does not shift,
as in the original classification model. Odd maps are padded before patch merging.
"""

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs, register_notrace_module
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

__all__ = ["RePaSwin", "checkpoint_filter_fn", "relative_position_index", "window_attention_mask"]

MASK_VALUE = -100.0  # the original Swin's additive mask value (exp(-100) ~ 4e-44)


# ---- window helpers ---------------------------------------------------------------------------
def window_partition(x: Tensor, ws: int) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, nW, ws*ws, C)``; windows row-major, tokens row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // ws) * (W // ws), ws * ws, C)


def window_reverse(windows: Tensor, ws: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, ws*ws, C)`` -> ``(B, H, W, C)``."""
    B, _, _, C = windows.shape
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_position_index(ws: int) -> Tensor:
    """``(ws*ws, ws*ws)`` index into the ``(2ws-1)^2`` bias table for every query/key pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # (2, N, N), offsets shifted to >= 0
    return rel[0] * (2 * ws - 1) + rel[1]


def window_attention_mask(
    H: int, W: int, ws: int, shift: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor | None:
    """Additive mask ``(nW, ws*ws, ws*ws)`` for a map of ``H x W`` tokens, or None if nothing is masked.

    Tokens may attend to each other only within the same region: after a cyclic shift by ``shift``,
    the up to 3x3 regions that were not neighbours before the shift are kept apart (the original Swin
    mask), and padding added to reach a multiple of ``ws`` forms a region of its own.
    """
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    if shift == 0 and (Hp, Wp) == (H, W):
        return None
    labels = torch.zeros(Hp, Wp, dtype=torch.long, device=device)
    if shift:
        cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for i, hs in enumerate(cuts):
            for j, wsl in enumerate(cuts):
                labels[hs, wsl] = 3 * i + j
    if (Hp, Wp) != (H, W):
        rows = torch.arange(Hp, device=device)[:, None] >= H
        cols = torch.arange(Wp, device=device)[None, :] >= W
        pad = torch.roll(rows | cols, shifts=(-shift, -shift), dims=(0, 1))  # padding in shifted coordinates
        labels = torch.where(pad, -1, labels)
    win = window_partition(labels[None, :, :, None], ws).reshape(-1, ws * ws)  # (nW, N)
    differ = win[:, None, :] != win[:, :, None]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill(differ, MASK_VALUE)


# ---- blocks -----------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Input ``(B, nW, N, C)`` with ``N = window_size^2``; optional additive mask ``(nW, N, N)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise UserError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.window_size = num_heads, dim // num_heads, window_size
        # Registration order follows the authors' state_dict order.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self) -> Tensor:
        N = self.window_size * self.window_size  # an int in TorchScript too (** gives a float there)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        return bias.view(N, N, -1).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B, nW, N, C = x.shape
        # Windows are the attention batch: q, k, v stay views of the qkv output (no copies), and the
        # position bias plus shift mask (nW, heads, N, N) is expanded over the images. Measured on
        # CPU (RePaSwin_Tiny, batch 16): 1.23x faster and 28% less peak memory than putting windows
        # and heads on one axis, which made q, k and v contiguous copies.
        qkv = self.qkv(x).reshape(B * nW, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B * nW, heads, N, head_dim) each
        bias = self.position_bias()  # (heads, N, N)
        bias = bias + mask[:, None] if mask is not None else bias.expand(nW, -1, -1, -1)  # (nW, heads, N, N)
        bias = bias.to(q.dtype).expand(B, -1, -1, -1, -1).reshape(B * nW, self.num_heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B * nW, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, nW, N, C)
        return self.proj_drop(self.proj(x))


@register_notrace_module  # its window shift depends on the map size: a leaf for FX tracing (timm's convention)
class SwinBlock(nn.Module):
    """``x + drop_path(W-MSA(norm1(x)))`` (shifted windows if ``shift_size``), then the channel-idle FFN.

    ``attn_mask`` (a non-persistent buffer) is the mask for ``input_resolution``; other sizes get
    theirs computed on the fly.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
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
        if not 0 <= shift_size < window_size:
            raise UserError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.dim, self.window_size, self.shift_size = dim, window_size, shift_size
        self.input_resolution = tuple(input_resolution)
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
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
        H, W = self.input_resolution
        self.register_buffer(
            "attn_mask", window_attention_mask(H, W, window_size, self.shift_for(H, W)), persistent=False
        )

    def shift_for(self, H: int, W: int) -> int:
        """The cyclic shift used on an ``H x W`` map: none when the map fits in one window."""
        return 0 if min(H, W) <= self.window_size else self.shift_size

    @torch.jit.ignore  # Python slicing builds a new mask; TorchScript calls back into Python for it
    def _mask(self, H: int, W: int, shift: int, ref: Tensor) -> Tensor | None:
        if (H, W) == self.input_resolution:
            return self.attn_mask
        return window_attention_mask(H, W, self.window_size, shift, device=ref.device, dtype=ref.dtype)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]  # x: (B, H, W, C)
        ws, shift = self.window_size, self.shift_for(H, W)
        y = self.norm1(x)
        pad_h, pad_w = (-H) % ws, (-W) % ws
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), self._mask(H, W, shift, y))  # (B, nW, N, C)
        y = window_reverse(y, ws, Hp, Wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        if pad_h or pad_w:
            y = y[:, :H, :W]
        x = x + self.drop_path(y)
        return self.mlp(x)


@register_notrace_module  # pads odd map sizes: a leaf for FX tracing
class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood ((0,0), (1,0), (0,1), (1,1)) -> LayerNorm(4C) -> linear to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]  # x: (B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), dim=-1)
        return self.reduction(self.norm(x))  # (B, H/2, W/2, 2C)


class SwinStage(nn.Module):
    """Swin blocks (even: regular windows, odd: shifted) followed by optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float],
        downsample: bool,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                SwinBlock(
                    dim,
                    input_resolution,
                    num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    drop_path=drop_path[i],
                    **block_kwargs,
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)
        return x if self.downsample is None else self.downsample(x)


# ---- model ------------------------------------------------------------------------------------
class RePaSwin(ReparamMixin, nn.Module):
    """Swin Transformer whose FFNs are channel-idle FFNs that fold into three matrices after training.

    Args:
        img_size: input resolution the attention masks are precomputed for (other sizes also run).
        patch_size: patch size of the embedding convolution.
        in_chans: input channels.
        num_classes: classes of the head (0 for no head).
        global_pool: ``"avg"`` (the authors' choice) or ``""`` (no pooling).
        embed_dim: channels of the first stage (doubled at every merge).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window side.
        mlp_ratio: FFN hidden width over its input width.
        qkv_bias: bias on the qkv projection.
        channel_idle: enable the channel-idle mechanism (False: every hidden channel activated).
        idle_ratio: share of FFN hidden channels that skip GELU, in [0, 1].
        feature_norm: FFN normalization, ``"BatchNorm"`` (foldable) or ``"LayerNorm"``.
        heuristic: idle-ratio schedule; only ``"static"`` (the same ratio in every block).
        drop_rate: dropout after the patch embedding, after attention projections and before the head.
        attn_drop_rate: attention-probability dropout.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over all blocks.
        reparameterized: build the FFNs directly in their fused inference form (to load deploy
            checkpoints); such a model cannot be trained.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        channel_idle: bool = True,
        idle_ratio: float = 0.75,
        feature_norm: str = "BatchNorm",
        heuristic: str = "static",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reparameterized: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise UserError(f"unknown global_pool {global_pool!r}; expected 'avg' or ''")
        if len(depths) != len(num_heads):
            raise UserError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} need one entry per stage")
        self.heuristic = check_ffn_settings(feature_norm, idle_ratio, reparameterized, heuristic, "RePaSwin")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.output_fmt = "NHWC"  # forward_features gives (B, H, W, C), as timm's Swin declares (its wrappers read it)
        self.channel_idle, self.idle_ratio, self.feature_norm = channel_idle, idle_ratio, feature_norm
        self.img_size, self.patch_size, self.window_size = img_size, patch_size, window_size
        self.embed_dim, self.depths, self.num_heads = embed_dim, tuple(depths), tuple(num_heads)
        n = len(depths)
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (n - 1)

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear from 0
        res = (math.ceil(img_size[0] / patch_size), math.ceil(img_size[1] / patch_size))
        ffn = dict(idle_ratio=idle_ratio, channel_idle=channel_idle, feature_norm=feature_norm)
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate, **ffn)
        stages = []
        for i in range(n):
            block_dpr = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            stage = SwinStage(embed_dim * 2**i, res, depths[i], num_heads[i], window_size, drop_path=block_dpr,
                              downsample=i < n - 1, reparameterized=reparameterized, **common)  # fmt: skip
            stages.append(stage)
            res = (math.ceil(res[0] / 2), math.ceil(res[1] / 2))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=embed_dim * 2**i, reduction=patch_size * 2**i, module=f"layers.{i}") for i in range(n)
        ]
        self._init_weights()
        if reparameterized:
            self.eval()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- timm model API ---------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._reset_head(num_classes, global_pool, ("avg", ""), self.num_features)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> normalized last-stage map ``(B, H/32, W/32, num_features)``."""
        x = self.pos_drop(self.patch_embed(x))  # (B, H/4, W/4, C)
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (before patch merging) as multi-scale feature maps, timm's API.

        Args:
            x: images ``(B, C, H, W)``.
            indices: stages to return: None for all, ``n`` for the last ``n``, or a list of indices.
            norm: apply the final LayerNorm to the last stage's map (the only one it is sized for).
            stop_early: skip the stages after the last requested one.
            output_fmt: ``"NCHW"`` (for FPN-style necks) or ``"NHWC"``.
            intermediates_only: return only the list of maps.

        Returns:
            The maps (strides 4, 8, 16, 32 for the four stages), or ``(final features, maps)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise UserError(f"unknown output_fmt {output_fmt!r}; expected 'NCHW' or 'NHWC'")
        taken, max_index = take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        x = self.pos_drop(self.patch_embed(x))
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage.blocks(x)
            if i in taken:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
            if stage.downsample is not None and i < len(stages) - 1:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        # the final norm is sized for the last stage only
        return (self.norm(x) if len(stages) == len(self.layers) else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm/head) that the requested feature maps do not need. Returns the indices."""
        taken, max_index = take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None  # nothing after the last kept stage uses it
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    # ---- checkpoints and benchmarks ------------------------------------------------------------
    def checkpoint_filter(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def vanilla_counterpart(self) -> nn.Module:
        """timm's plain Swin of the same size (``swin_*_patch4_window7_224``), for benchmarks."""
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer(
            img_size=self.img_size,
            patch_size=self.patch_size,
            window_size=self.window_size,
            embed_dim=self.embed_dim,
            depths=self.depths,
            num_heads=self.num_heads,
            num_classes=self.num_classes,
        )


# ---- checkpoint conversion ----------------------------------------------------------------
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: RePaSwin) -> dict[str, Tensor]:
    """Map a checkpoint in the authors' layout (or ours) onto ``model``'s keys, checking it fits.

    Drops the structural buffers (recomputed here for the model's input size), converts the
    authors' reparameterized FFNs (``mlp.fc1/fc2/fc3``) and raises :class:`CheckpointMismatchError`
    naming the first setting that differs (embed_dim, depths, window_size, num_heads, FFN form,
    feature_norm, idle_ratio).
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.shape[0] != model.embed_dim:
        raise CheckpointMismatchError(
            f"checkpoint has embed_dim {w.shape[0]}, model {model.embed_dim}: it is for another model size"
        )
    blocks: dict[int, int] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            stage, blk = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), blk + 1)
    if blocks:
        depths = tuple(blocks.get(i, 0) for i in range(max(blocks) + 1))
        if depths != model.depths:
            raise CheckpointMismatchError(
                f"checkpoint has depths {depths}, model {model.depths}: it is for another model size"
            )
    for i, heads in enumerate(model.num_heads):
        table = sd.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table")
        if table is None:
            continue
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0] or (side + 1) // 2 != model.window_size:
            raise CheckpointMismatchError(
                f"checkpoint has window_size {(side + 1) // 2} (bias table {tuple(table.shape)}), "
                f"model {model.window_size}"
            )
        if table.shape[1] != heads:
            raise CheckpointMismatchError(f"checkpoint stage {i} has {table.shape[1]} heads, model {heads}")
    msg = prepare_ffns(sd, model, model.feature_norm, model.reparameterized)
    if msg:
        raise CheckpointMismatchError(msg)
    return sd


def identify_state_dict(state_dict: Mapping[str, Tensor]) -> str | None:
    """The RePaSwin size (authors' name) whose width and stage depths a state dict has, or None."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or "layers.0.blocks.0.attn.relative_position_bias_table" not in state_dict:
        return None
    blocks: dict[int, int] = {}
    for k in state_dict:
        m = _BLOCK.match(k)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    depths = tuple(blocks.get(i, 0) for i in range(max(blocks, default=-1) + 1))
    for size, (dim, arch_depths, _) in ARCHS.items():
        if (proj.shape[0], depths) == (dim, arch_depths):
            return f"RePaSwin_{size.capitalize()}"
    return None


# ---- registry -------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return repa_cfg(first_conv="patch_embed.proj", pool_size=(7, 7), fixed_input_size=False, **kwargs)


# Model sizes: (embed_dim, depths, num_heads).
ARCHS = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
# The authors' names and the timm-style names, each mapped to a size.
MODEL_NAMES = {f"RePaSwin_{s.capitalize()}": s for s in ARCHS} | {f"repaswin_{s}_patch4_window7_224": s for s in ARCHS}

default_cfgs = generate_default_cfgs(with_released_weights({name: _cfg() for name in MODEL_NAMES}))


def _create_repaswin(variant: str, pretrained: bool = False, **kwargs) -> RePaSwin:
    embed_dim, depths, num_heads = ARCHS[MODEL_NAMES[variant]]
    model_args = dict(patch_size=4, window_size=7, embed_dim=embed_dim, depths=depths, num_heads=num_heads)
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    return build_model_with_cfg(
        RePaSwin,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


def _describe(name: str) -> str:
    embed_dim, depths, heads = ARCHS[MODEL_NAMES[name]]
    return f"{name}: RePaSwin, window 7, embed_dim {embed_dim}, depths {depths}, heads {heads}."


register_variants(__name__, MODEL_NAMES, _create_repaswin, _describe, identify_state_dict)
