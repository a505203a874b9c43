"""Swin Transformer backbone, behaving and named like detectron2's ``modeling/backbone/swin.py``.

This is the module detrex's Swin configs instantiate (adapted there from the official
Swin-Transformer-Object-Detection code). Parameter / buffer names, relative to the backbone::

    patch_embed.proj.{weight,bias}                 4x4 stride-4 conv, 3 -> e
    patch_embed.norm.{weight,bias}                 LayerNorm(e)
    layers.{i}.blocks.{j}.norm1 / norm2            LayerNorm(e * 2^i)
    layers.{i}.blocks.{j}.attn.qkv / attn.proj     Linear
    layers.{i}.blocks.{j}.attn.relative_position_bias_table   [(2w-1)^2, heads]
    layers.{i}.blocks.{j}.attn.relative_position_index        buffer [w^2, w^2] (persistent, as upstream)
    layers.{i}.blocks.{j}.mlp.fc1 / mlp.fc2        Linear (hidden 4x)
    layers.{i}.downsample.{norm,reduction}         patch merging after stage i (i < last)
    norm{i}                                        output LayerNorm for every out index i

Outputs ``p{i}`` for ``i`` in ``out_indices`` with ``e * 2^i`` channels and stride ``2^(i+2)``.

Behaviour kept from detectron2 (it matters for checkpoint parity):
* inputs that are not multiples of the patch size / window size are zero-padded bottom/right, and the
  padding is cropped off again after each attention;
* odd blocks use shifted windows (shift ``w // 2``) even when the feature map is smaller than a window,
  with an additive mask of -100 (not -inf) between regions that were not neighbours before the roll;
* patch merging pads odd sizes, so every stage halves sizes with rounding up;
* stochastic depth grows linearly from 0 to ``drop_path_rate`` over all blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focus_detr.backbones.base import Backbone
from focus_detr.config import SwinConfig


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole residual branch per sample with probability ``p`` and
    rescale the kept ones by ``1 / (1 - p)``. The identity in eval mode or when ``p == 0``.

    Shapes: any ``[B, ...]`` -> same.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (dropout 0 in every detrex config, so none here). ``[..., C] -> [..., C]``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """``[B, H, W, C]`` (H, W multiples of the window) -> ``[B * nH * nW, w, w, C]``, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nH * nW, w, w, C]`` -> ``[B, H, W, C]``."""
    n_h, n_w = height // window_size, width // window_size
    b = windows.shape[0] // (n_h * n_w)
    x = windows.view(b, n_h, n_w, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, height, width, -1)


def relative_position_index(window_size: int) -> Tensor:
    """``[w^2, w^2]`` long: for tokens p, q of a window, the row of the bias table for offset ``p - q``.

    Offsets (dy, dx) in ``[-(w-1), w-1]^2`` are shifted to start at 0 and flattened row-major with row
    length ``2w - 1``.
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)  # [2, w^2]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [w^2, w^2, 2]
    rel = rel + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learnt relative position bias.

    Args:
        dim: channels ``C``.
        window_size: window side ``w`` (``N = w^2`` tokens per window).
        num_heads: heads; ``C`` must be divisible by it.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent like upstream, so official Swin checkpoints (which contain it) load without leftovers.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """
        Args:
            x: ``[B * nW, N, C]`` window tokens.
            mask: ``[nW, N, N]`` additive mask (0 or -100) for shifted windows, or None.
        Returns:
            ``[B * nW, N, C]``.
        """
        bw, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B*nW, heads, N, d]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B*nW, heads, N, N]

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # bias [1, heads, N, N]
        if mask is not None:
            n_windows = mask.shape[0]
            # Windows of one image are contiguous in the batch dim: [B, nW, heads, N, N] + [1, nW, 1, N, N].
            attn = attn.view(bw // n_windows, n_windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    """``x + DropPath(W-MSA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``; W-MSA uses shifted windows when
    ``shift_size > 0``.

    Args:
        dim: channels. num_heads: heads. window_size: window side. shift_size: 0 or ``window_size // 2``.
        mlp_ratio: MLP hidden size / dim. drop_path: stochastic-depth probability of this block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int, attn_mask: Tensor) -> Tensor:
        """
        Args:
            x: ``[B, H*W, C]`` tokens, row-major.
            height, width: ``H``, ``W``.
            attn_mask: ``[nW, w^2, w^2]`` mask of the padded, shifted map (used only if shifted).
        Returns:
            ``[B, H*W, C]``.
        """
        b, length, c = x.shape
        if length != height * width:
            raise ValueError(f"Swin block got {length} tokens for a {height}x{width} map")
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)

        # Pad (after the norm, with zeros) to a multiple of the window size.
        pad_b = (ws - height % ws) % ws
        pad_r = (ws - width % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask: Tensor | None = attn_mask
        else:
            mask = None

        windows = window_partition(x, ws).view(-1, ws * ws, c)  # [B*nW, w^2, C]
        windows = self.attn(windows, mask)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, hp, wp)  # [B, Hp, Wp, C]

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(b, height * width, c)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), LayerNorm, project to 2C: ``[B, H*W, C]`` ->
    ``[B, ceil(H/2) * ceil(W/2), 2C]``. Odd sizes are zero-padded bottom/right first."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Order (0,0), (1,0), (0,1), (1,1) as upstream: the reduction weights depend on it.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = x.view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device
) -> Tensor:
    """Additive attention mask ``[nW, w^2, w^2]`` for shifted windows on a map padded to multiples of
    ``window_size``.

    After the cyclic roll, a window at the bottom/right edge holds tokens from up to 4 regions that were
    not adjacent in the image; tokens may only attend within their own region (0), others get -100.
    """
    hp = -(-height // window_size) * window_size
    wp = -(-width // window_size) * window_size
    img_mask = torch.zeros(1, hp, wp, 1, device=device)
    # Region boundaries, with the same (possibly empty) slices as upstream so the labelling is identical.
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region = 0
    for hs in slices:
        for wsl in slices:
            img_mask[:, hs, wsl, :] = region
            region += 1
    mask_windows = window_partition(img_mask, window_size).reshape(-1, window_size * window_size)
    diff = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)  # [nW, N, N]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks alternating plain / shifted windows, then optional patch merging.

    Args:
        dim: channels of the stage. depth: number of blocks. num_heads: heads. window_size: window side.
        mlp_ratio: MLP expansion. drop_path: per-block stochastic-depth probabilities (len ``depth``).
        downsample: whether to end with :class:`PatchMerging`.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: list[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, int, int]:
        """``x [B, H*W, C]`` -> (stage output ``[B, H*W, C]``, next-stage input ``[B, H'*W', C']``, H', W')
        with ``H' = ceil(H/2)`` and ``C' = 2C`` after merging (unchanged without it)."""
        attn_mask = shifted_window_mask(height, width, self.window_size, self.shift_size, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, height, width, attn_mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv embedding + LayerNorm: ``[B, 3, H, W]`` ->
    ``[B, e, ceil(H/patch), ceil(W/patch)]`` (the image is zero-padded bottom/right first)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)  # [B, e, Hp, Wp]
        b, e, hp, wp = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(b, e, hp, wp)


class SwinTransformer(Backbone):
    """Swin Transformer backbone (detectron2 variant: no absolute position embedding, patch norm on).

    Args:
        embed_dim: ``e``, channels after the patch embedding; stage ``i`` has ``e * 2^i`` channels.
        depths: blocks per stage. num_heads: heads per stage. window_size: window side.
        drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks).
        out_indices: stages to output, as ``p{i}``.
        pretrain_img_size: kept for config compatibility; only used upstream by the absolute position
            embedding, which detrex's Swin configs leave off.
        patch_size, mlp_ratio: 4 and 4.0 in every released model.

    ``forward(x [B, 3, H, W])`` -> ``{"p{i}": [B, e * 2^i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))]}``.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.2,
        out_indices: tuple[int, ...] = (1, 2, 3),
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have the same length")
        num_stages = len(depths)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of 0..{num_stages - 1}, got {out_indices}")
        self.pretrain_img_size = pretrain_img_size
        self.num_features = [embed_dim * 2**i for i in range(num_stages)]
        self.out_indices = tuple(out_indices)

        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        # Stochastic depth rate grows linearly with the global block index (float32 linspace as upstream).
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        start = 0
        for i in range(num_stages):
            self.layers.append(
                BasicLayer(
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    drop_path=rates[start:start + depths[i]],
                    downsample=i < num_stages - 1,
                )
            )
            start += depths[i]
        # One output LayerNorm per returned stage (no ImageNet counterpart: they start at weight 1, bias 0).
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        names = [f"p{i}" for i in self.out_indices]
        self._set_outputs(
            names,
            {f"p{i}": self.num_features[i] for i in self.out_indices},
            {f"p{i}": patch_size * 2**i for i in self.out_indices},
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x [B, 3, H, W]`` -> ``{"p{i}": [B, C_i, H_i, W_i]}`` for the out indices."""
        if x.dim() != 4:
            raise ValueError(f"Swin expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, e]
        outputs: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            stage_out, x, next_h, next_w = layer(x, height, width)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(stage_out)
                outputs[f"p{i}"] = y.view(-1, height, width, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            height, width = next_h, next_w
        return outputs


def build_swin(cfg: SwinConfig) -> SwinTransformer:
    """Swin Transformer from its config."""
    return SwinTransformer(
        embed_dim=cfg.embed_dim,
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size,
        drop_path_rate=cfg.drop_path_rate,
        out_indices=tuple(cfg.out_indices),
        pretrain_img_size=cfg.pretrain_img_size,
    )
