"""The EVA-02 ViTDet backbone of the released MoVE-KD ``eva`` teacher (architecture and config).

The released teacher (EAGLE's ``eva_vit.py``, ``build_eva_vit(model_name='eva02-l-16')``) is the
detectron2-style EVA-02-L backbone of ``eva02_L_coco_det_sys_o365.pth``, not a timm model. Written
here from its description (REFERENCE section 2) and checked against an independent plain-torch
forward in ``tests/pipeline/test_eva_vitdet.py``. The checkpoint loader and the teacher are in
``eva_vitdet_teacher.py``.

Decisions (each as released unless said otherwise):
- Patch embedding: a stride-``patch`` convolution with bias, tokens kept as ``[B, H, W, C]``.
- Absolute position embedding: a parameter for the pretrain grid (224 px / patch = 14 x 14) plus a
  cls slot. Each forward drops the slot and resizes the grid to the input's token grid with bicubic
  ``F.interpolate`` (align_corners=False) in float32, outside autocast; no resize when it already
  fits. There is no CLS token in the sequence and no final norm: the output is the last block.
- Blocks: pre-norm (LayerNorm eps 1e-6), attention, residual; pre-norm SwiGLU, residual. Window
  attention (window 16) everywhere except ``global_blocks`` (2, 5, ..., 23), which attend over the
  whole grid. Windows are cut after ``norm1`` ViTDet's way: zero padding up to a multiple of the
  window (no mask, so padded tokens are keys as in the released code), windows moved into the
  batch dimension, one attention call for all of them, then unpadded.
- Attention: separate q/k/v projections without bias, plus ``q_bias`` and ``v_bias`` parameters
  (k has no bias); RoPE on q and k (in float32, cast back to v's dtype); softmax(q k^T / sqrt(d)) v
  through ``F.scaled_dot_product_attention``; no sub-LN in attention (``inner_attn_ln`` is the
  identity for the det weights).
- SwiGLU: ``w3(ffn_ln(silu(w1 x) * w2 x))`` with hidden ``int(dim * 4 * 2/3)``. The MLP's sub-LN
  ``ffn_ln`` (LayerNorm eps 1e-6) is ON: the released ``Block`` builds its SwiGLU with
  ``subln=True`` whatever the model's ``subln`` flag (which only governs the attention sub-LN).
- 2-D RoPE over the full head dim: the first half rotated by the token's row, the second by its
  column, frequencies ``1 / 10000 ** (arange(0, d, 2)[: d // 2] / d)`` with ``d = head_dim // 2``,
  each used for an adjacent pair (``rotate_half`` pairs channels 2i, 2i+1). Positions are scaled to
  the RoPE pretrain grid (16, EVAViT's ``pt_hw_seq_len``): ``t = arange(n) / n * 16``, with one
  table for the window grid (n = window) and one for the global grid (n = image size / patch).
  The tables are non-persistent buffers: recomputed, never loaded (the checkpoint's are skipped).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cache.strict import from_mapping

RELEASED_GLOBAL_BLOCKS = (2, 5, 8, 11, 14, 17, 20, 23)
LN_EPS = 1e-6


@dataclass(frozen=True)
class EvaViTDetConfig:
    """The architecture; the defaults are the released EVA-02-L/16 ViTDet at 1024 px."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    window_size: int = 16
    global_blocks: tuple[int, ...] = RELEASED_GLOBAL_BLOCKS
    mlp_ratio: float = 4 * 2 / 3
    pretrain_img_size: int = 224
    rope_pretrain_grid: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_blocks", tuple(int(b) for b in self.global_blocks))
        positive = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "window_size", "pretrain_img_size")
        for name in (*positive, "rope_pretrain_grid"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"eva_vitdet: {name} must be > 0, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"eva_vitdet: embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head dim "
                "divisible by 4 (2-D RoPE rotates pairs in each half)"
            )
        bad = [b for b in self.global_blocks if not 0 <= b < self.depth]
        if bad:
            raise ValueError(f"eva_vitdet: global_blocks {bad} are outside the {self.depth} blocks")
        if self.img_size < self.patch_size or self.pretrain_img_size < self.patch_size:
            raise ValueError(f"eva_vitdet: img_size/pretrain_img_size must be >= patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["global_blocks"] = list(self.global_blocks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaViTDetConfig:
        return from_mapping(cls, d, "eva_vitdet config")


# -- RoPE --------------------------------------------------------------------------------------
def rope_table(head_dim: int, grid: int, pretrain_grid: int, theta: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``[grid * grid, head_dim]`` in row-major token order (see module docstring)."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * pretrain_grid
    f = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # [grid, dim]: f0 f0 f1 f1 ...
    angles = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    angles = angles.reshape(grid * grid, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with rotate_half(.., a, b, ..) = (.., -b, a, ..)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-b, a), dim=-1).flatten(-2)
    return x * cos + rotated * sin


# -- windows -----------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, H, W, C]`` -> ``[B * nh * nw, window, window, C]`` (zero-padded to a multiple of the
    window, windows row-major per image) and the padded ``(Hp, Wp)``."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """The inverse of ``window_partition``: ``[B, H, W, C]`` with the padding cut off."""
    hp, wp = padded
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous() if (hp, wp) != tuple(hw) else x


# -- modules (parameter names are the released checkpoint's) ----------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B, H, W, C]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` [B', N, C] (B' = images x windows) -> [B', N, C]: one SDPA call for every window."""
        b, n, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        q = apply_rope(q.float(), cos, sin).type_as(v)
        k = apply_rope(k.float(), cos, sin).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=LN_EPS)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    def __init__(self, cfg: EvaViTDetConfig, window: int):
        super().__init__()
        self.window = window  # 0 = global attention
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.mlp = SwiGLU(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window:
            y, padded = window_partition(y, self.window)
        n, gh, gw = y.shape[0], y.shape[1], y.shape[2]
        if cos.shape[0] != gh * gw:
            raise ValueError(f"eva_vitdet: a {gh}x{gw} attention grid does not fit the {cos.shape[0]}-position RoPE")
        y = self.attn(y.reshape(n, gh * gw, c), cos, sin).view(n, gh, gw, c)
        if self.window:
            y = window_unpartition(y, self.window, padded, (h, w))
        x = x + y
        return x + self.mlp(self.norm2(x))


class EvaViTDet(nn.Module):
    """``forward(pixels [B, 3, R, R]) -> [B, R/p, R/p, C]``: the last block's tokens, no norm."""

    def __init__(self, cfg: EvaViTDetConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        pretrain = cfg.pretrain_img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain * pretrain + 1, cfg.embed_dim))  # + the cls slot
        nn.init.normal_(self.pos_embed, std=0.02)
        globals_ = set(cfg.global_blocks)
        self.blocks = nn.ModuleList(Block(cfg, 0 if i in globals_ else cfg.window_size) for i in range(cfg.depth))
        for name, grid in (("win", cfg.window_size), ("glb", cfg.grid)):
            cos, sin = rope_table(cfg.head_dim, grid, cfg.rope_pretrain_grid)
            self.register_buffer(f"rope_{name}_cos", cos, persistent=False)
            self.register_buffer(f"rope_{name}_sin", sin, persistent=False)

    def abs_pos(self, hw: tuple[int, int]) -> torch.Tensor:
        """``[1, H, W, C]``: the pretrain-grid embedding without its cls slot, resized bicubic in fp32."""
        pos = self.pos_embed[:, 1:]
        size = math.isqrt(pos.shape[1])
        grid = pos.reshape(1, size, size, -1)
        if (size, size) == tuple(hw):
            return grid
        device = pos.device.type
        fp32 = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
        with fp32:
            resized = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=hw, mode="bicubic", align_corners=False)
        return resized.to(pos.dtype).permute(0, 2, 3, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = x + self.abs_pos((x.shape[1], x.shape[2]))
        for blk in self.blocks:
            if blk.window:
                x = blk(x, self.rope_win_cos, self.rope_win_sin)
            else:
                x = blk(x, self.rope_glb_cos, self.rope_glb_sin)
        return x
