"""An independent plain-torch forward of the released EVA-02 ViTDet backbone, for the tests.

``reference_forward(state, cfg, pixels)`` recomputes the backbone from its checkpoint tensors
alone (keys without the ``backbone.net.`` prefix), in float64, without the module under test: a
loop over windows with explicit zero padding, softmax attention written out, the 2-D RoPE angle of
every channel from its formula (row for the first half of a head, column for the second, pairs of
adjacent channels, positions scaled to the 16-position pretrain grid), and the position
embedding's bicubic resize built as PyTorch's interpolation matrices (Keys' cubic, A = -0.75,
half-pixel centres, clamped borders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: 1-D bicubic resampling, align_corners=False, A = -0.75, borders clamped."""

    def w(t):
        t, a = abs(t), -0.75
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            m[i, min(max(j, 0), n_in - 1)] += w(src - j)
    return m


def rope(x: torch.Tensor, rows: list[float], cols: list[float], pretrain: int = 16) -> torch.Tensor:
    """x [heads, N, d]; token i sits at (rows[i], cols[i]) of an n x n grid, already scaled."""
    out = torch.empty_like(x)
    d = x.shape[-1]
    half = d // 2
    for c in range(0, d, 2):
        pos = torch.tensor(rows if c < half else cols, dtype=torch.float64)
        j = c if c < half else c - half  # the pair's index within its half
        angle = pos * 10000.0 ** (-(j // 2 * 2) / half)
        a, b = x[..., c], x[..., c + 1]
        out[..., c] = a * angle.cos() - b * angle.sin()
        out[..., c + 1] = b * angle.cos() + a * angle.sin()
    return out


def attend(tokens: torch.Tensor, sd: dict, i: int, heads: int, rows: list[float], cols: list[float]) -> torch.Tensor:
    """tokens [N, C] -> [N, C]: one image's (or one window's) softmax attention of block ``i``."""
    p = f"blocks.{i}.attn."
    n, c = tokens.shape
    q = tokens @ sd[p + "q_proj.weight"].T + sd[p + "q_bias"]
    k = tokens @ sd[p + "k_proj.weight"].T  # the released attention has no k bias
    v = tokens @ sd[p + "v_proj.weight"].T + sd[p + "v_bias"]
    q, k, v = (t.reshape(n, heads, c // heads).transpose(0, 1) for t in (q, k, v))
    q, k = rope(q, rows, cols), rope(k, rows, cols)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // heads)
    probs = scores.exp() / scores.exp().sum(-1, keepdim=True)
    out = (probs @ v).transpose(0, 1).reshape(n, c)
    return out @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * weight + bias


def reference_forward(sd: dict, cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """[B, H*W, C] float64 from the backbone tensors ``sd`` (prefix removed)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(pixels.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg["patch_size"])
    b, c, h, w = x.shape
    pos = sd["pos_embed"][0, 1:]  # the cls slot dropped
    s = int(round(pos.shape[0] ** 0.5))
    grid = pos.T.reshape(c, s, s)
    grid = torch.einsum("hi,cij,wj->chw", cubic_matrix(s, h), grid, cubic_matrix(s, w))
    x = (x + grid).permute(0, 2, 3, 1)  # [B, H, W, C]
    win, heads = cfg["window_size"], cfg["num_heads"]
    for i in range(cfg["depth"]):
        p = f"blocks.{i}."
        y = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        out = torch.zeros_like(y)
        for n in range(b):
            if i in cfg["global_blocks"]:
                rows = [r / h * 16 for r in range(h) for _ in range(w)]
                cols = [q / w * 16 for _ in range(h) for q in range(w)]
                out[n] = attend(y[n].reshape(h * w, c), sd, i, heads, rows, cols).reshape(h, w, c)
                continue
            hp, wp = -(-h // win) * win, -(-w // win) * win
            padded = torch.zeros(hp, wp, c, dtype=y.dtype)
            padded[:h, :w] = y[n]
            rows = [r / win * 16 for r in range(win) for _ in range(win)]
            cols = [q / win * 16 for _ in range(win) for q in range(win)]
            res = torch.zeros_like(padded)
            for r0 in range(0, hp, win):
                for c0 in range(0, wp, win):
                    tokens = padded[r0 : r0 + win, c0 : c0 + win].reshape(win * win, c)
                    res[r0 : r0 + win, c0 : c0 + win] = attend(tokens, sd, i, heads, rows, cols).reshape(win, win, c)
            out[n] = res[:h, :w]
        x = x + out
        z = layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        a = z @ sd[p + "mlp.w1.weight"].T + sd[p + "mlp.w1.bias"]
        g = z @ sd[p + "mlp.w2.weight"].T + sd[p + "mlp.w2.bias"]
        hidden = layer_norm(a * torch.sigmoid(a) * g, sd[p + "mlp.ffn_ln.weight"], sd[p + "mlp.ffn_ln.bias"])
        x = x + hidden @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
    return x.reshape(b, h * w, c)
